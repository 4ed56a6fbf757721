"""Communicator and the spawn_ranks harness on real gloo ranks."""

import time

import pytest
import torch

from tokenloom.comm import Communicator
from tokenloom.comm.communicator import P2P, CommError
from tokenloom.comm.launch.local import RankError, spawn_ranks
from bounds import NO_SPIN_S


def test_world_of_one_is_identity():
    comm = Communicator()
    assert (comm.rank, comm.world_size, comm.backend) == (0, 1, "local")
    x = torch.arange(6.0)
    y = torch.empty(6)
    comm.batch_p2p([P2P("send", 0, x), P2P("recv", 0, y)]).wait()
    assert torch.equal(x, y)
    out = torch.empty(6)
    comm.all_to_all(out, x).wait()
    assert torch.equal(out, x)
    assert torch.equal(comm.all_gather(x), x.unsqueeze(0))
    comm.check_agree("shapes", [1, 2, 3])


def _ring_exchange(rank, n):
    comm = Communicator()
    mine = torch.full((3,), float(rank))
    got = torch.empty(3)
    comm.batch_p2p([P2P("send", (rank + 1) % n, mine), P2P("recv", (rank - 1) % n, got)]).wait()
    a2a_in = torch.arange(n * 2, dtype=torch.float32) + 100 * rank
    a2a_out = torch.empty_like(a2a_in)
    comm.all_to_all(a2a_out, a2a_in).wait()
    return got, a2a_out, comm.all_gather(torch.tensor([rank, rank * 10]))


def test_p2p_all_to_all_all_gather_on_three_ranks():
    n = 3
    res = spawn_ranks(n, _ring_exchange)
    for r, (got, a2a, gathered) in enumerate(res):
        assert (got == (r - 1) % n).all()
        assert a2a.tolist() == [100 * j + 2 * r + i for j in range(n) for i in range(2)]
        assert gathered.tolist() == [[j, 10 * j] for j in range(n)]


def _disagree(rank, n):
    Communicator().check_agree("tensor shapes", [4, 8 if rank == 2 else 16])


def test_check_agree_names_the_disagreeing_rank():
    with pytest.raises(RankError, match=r"differs across ranks.*2: \[4, 8\]"):
        spawn_ranks(3, _disagree)


def _bad_peer(rank, n):
    Communicator().batch_p2p([P2P("send", 5, torch.zeros(1))])


def test_peer_outside_the_group_is_an_error():
    with pytest.raises(RankError, match="peer 5 outside world_size 2"):
        spawn_ranks(2, _bad_peer)


def _raise_on_one(rank, n):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_worker_exception_names_the_rank():
    with pytest.raises(RankError, match="(?s)rank 1 failed.*boom on purpose"):
        spawn_ranks(2, _raise_on_one)


def _hang(rank, n):
    if rank == 0:
        time.sleep(60)
    return rank


def test_hang_is_reported_with_the_rank():
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"ranks \[0\] did not finish within 2 s"):
        spawn_ranks(2, _hang, timeout=2)
    assert time.monotonic() - t0 < NO_SPIN_S


def _orphan_recv(rank, n):
    """Rank 1 waits for a message rank 0 never sends: the group timeout turns it into an error."""
    comm = Communicator(timeout=__import__("datetime").timedelta(seconds=1))
    if rank == 1:
        comm.batch_p2p([P2P("recv", 0, torch.empty(2))], what="orphan").wait()
    else:
        time.sleep(3)


def test_unmatched_receive_times_out_as_comm_error():
    with pytest.raises(RankError, match="(?s)rank 1 failed.*orphan on rank 1 with peers \\[0\\] failed"):
        spawn_ranks(2, _orphan_recv, timeout=20)


def test_bad_op_name():
    with pytest.raises(CommError):
        Communicator().batch_p2p([P2P("send", 0, torch.zeros(1))])  # self-send without receive


# ---------------------------------------------------------------- heartbeats and the watchdog
def _store(tmp_path):
    import torch.distributed as dist

    return dist.FileStore(str(tmp_path / "store"), -1)


def test_a_peer_that_stops_beating_is_published_as_lost(tmp_path):
    from tokenloom.comm import health

    store = _store(tmp_path)
    a = health.Monitor(store, 0, 2, timeout_s=0.5, interval_s=0.05, startup_s=5)
    b = health.Monitor(store, 1, 2, timeout_s=0.5, interval_s=0.05, startup_s=5)
    b._beat("running")  # one beat, then silence (as a killed or stopped rank)
    a._beat("running")
    t0 = time.monotonic()
    while a.poll() is None and time.monotonic() - t0 < 5:
        a._beat("running")
        time.sleep(0.05)
    assert a.failure is not None and a.failure["lost"] == [1], a.failure
    assert 0.4 < time.monotonic() - t0 < 3
    assert "rank 1 not responding" in health.describe_abort(a.failure)
    # everyone reads the same record; the first writer wins
    assert b.poll()["lost"] == [1]
    b.publish([0], "something else", by="rank 1")
    assert b.failure["lost"] == [1]


def test_a_finished_peer_is_not_lost_and_a_silent_one_never_started(tmp_path):
    from tokenloom.comm import health

    store = _store(tmp_path)
    a = health.Monitor(store, 0, 3, timeout_s=0.2, interval_s=0.05, startup_s=0.6)
    done = health.Monitor(store, 1, 3, timeout_s=0.2, interval_s=0.05)
    done._beat("running")
    done.stop("done")
    time.sleep(0.3)
    assert a.poll() is None  # rank 1 finished; rank 2 may still be starting
    time.sleep(0.4)
    failure = a.poll()
    assert failure["lost"] == [2] and "never started" in failure["reason"]


def test_step_labels_travel_with_the_heartbeat(tmp_path):
    from tokenloom.comm import health

    store = _store(tmp_path)
    a = health.Monitor(store, 0, 2, timeout_s=5, interval_s=0.05).start()
    try:
        health.set_step("ring forward step 3")
        time.sleep(0.2)  # written through, or by the thread within one interval
        b = health.Monitor(store, 1, 2, timeout_s=5)
        assert b.peer(0)["step"] == "ring forward step 3"
        assert "rank 0 running at 'ring forward step 3'" in b.describe_peers([0])
    finally:
        a.stop()
    assert health.active() is None and b.peer(0)["state"] == "done"
