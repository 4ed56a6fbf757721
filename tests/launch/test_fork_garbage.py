"""Forked ranks never finalize the parent's garbage: a dead TCPStore server waiting in the parent's
collector used to abort (SIGABRT) or hang a rank at the rank's first garbage collection (its
destructor detaches a thread that does not exist in the child)."""

import contextlib
import gc
from datetime import timedelta

import pytest
import torch.distributed as dist

from tokenloom.comm.launch import local
from tokenloom.comm.launch.local import RankError, spawn_ranks


def _collect_garbage(rank, world_size):
    gc.collect()  # a forked child finalizing what it inherited
    return rank


def _leave_a_dead_store_server_in_the_collector():
    gc.disable()  # keep the cycle uncollected until the fork (or the launcher) collects
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=5))
    cycle = [store]
    cycle.append(cycle)
    del store, cycle


@pytest.fixture
def garbage():
    try:
        _leave_a_dead_store_server_in_the_collector()
        yield
    finally:
        gc.enable()
        gc.collect()


def test_ranks_survive_the_parents_garbage(garbage):
    assert spawn_ranks(2, _collect_garbage, timeout=60) == [0, 1]


def test_without_the_guard_the_rank_aborts(garbage, monkeypatch):
    """The yardstick: the same set-up without the collect-and-freeze aborts or hangs the ranks."""
    monkeypatch.setattr(local, "_no_inherited_garbage", contextlib.nullcontext)
    with pytest.raises(RankError, match="died|exited without a result|did not finish"):
        spawn_ranks(2, _collect_garbage, timeout=6)
