"""Issue 9, class 1: every argument that changes the result is agreed across ranks before any
transfer; a mismatch (or one rank's bad argument) raises on EVERY rank within seconds, naming the
argument and the ranks; one small collective per forward call, none in backward; a cache hit on
one rank and a miss on another cannot deadlock."""

import time

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.parallel import gather_sequence, shard_sequence, sp_attention, token_ring_attention
from bounds import NO_SPIN_S


def _call(rank, n, overrides):
    """Run one attention call with this rank's overrides; return the error text or None."""
    g = torch.Generator().manual_seed(0)
    kwargs = dict(strategy="tokenring", causal=True, layout="zigzag", softmax_scale=None, impl="torch")
    kwargs.update(overrides.get(rank, {}))
    seq = kwargs.pop("seq", 8)
    dtype = kwargs.pop("dtype", torch.float32)
    grad = kwargs.pop("grad", False)
    q = torch.randn(1, seq, 4, 8, generator=g).to(dtype).requires_grad_(grad)
    start = time.monotonic()
    try:
        sp_attention(q, q, q, **kwargs)
    except UsageError as exc:
        return str(exc), time.monotonic() - start
    return None, time.monotonic() - start


CASES = {
    "softmax_scale": {1: {"softmax_scale": 0.5}},
    "causal": {0: {"causal": False}},
    "layout": {1: {"layout": "contiguous"}},
    "strategy": {1: {"strategy": "ring"}},
    "impl": {1: {"impl": "sdpa"}},
    "seq": {1: {"seq": 12}},
    "dtype": {0: {"dtype": torch.float64}},
    "cu_seqlens": {0: {"cu_seqlens": [0, 3, 16]}, 1: {"cu_seqlens": [0, 16]}},
    "backward": {1: {"grad": True}},
}


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_disagreement_raises_on_every_rank_naming_it(field):
    results = spawn_ranks(2, _call, CASES[field], timeout=60)
    for rank, (err, seconds) in enumerate(results):
        assert err is not None, f"rank {rank} did not raise for {field}"
        assert f"disagree on {field}" in err and "rank 0" in err and "rank 1" in err, err
        assert seconds < NO_SPIN_S, seconds


def test_scale_disagreement_shows_both_values():
    (err, _), _ = spawn_ranks(2, _call, CASES["softmax_scale"], timeout=60)
    assert "rank 0: 0.353553" in err and "rank 1: 0.5" in err, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5"])
def test_one_ranks_bad_scale_raises_on_every_rank(bad):
    results = spawn_ranks(3, _call, {1: {"softmax_scale": bad}}, timeout=60)
    assert "softmax_scale must be" in results[1][0]
    for rank in (0, 2):
        assert "rank 1: softmax_scale" in results[rank][0] and "refused" in results[rank][0]


def test_nan_scale_is_refused_in_one_process():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(UsageError, match="softmax_scale must be finite"):
        token_ring_attention(q, q, q, softmax_scale=float("nan"))


def _cache_then_change(rank, n):
    """Agree twice (a cache hit on every rank), then only rank 1 changes its scale; then agree again."""
    q = torch.randn(1, 8, 4, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        sp_attention(q, q, q, strategy="tokenring", softmax_scale=0.25)
    errors = []
    try:  # rank 0 hits its cache, rank 1 misses: both must raise, nobody waits forever
        sp_attention(q, q, q, strategy="tokenring", softmax_scale=0.25 if rank == 0 else 0.3)
    except UsageError as exc:
        errors.append(str(exc))
    try:  # the other way round: rank 1 reuses an agreed plan, rank 0 a new one
        sp_attention(q, q, q, strategy="tokenring", softmax_scale=0.25 if rank == 1 else 0.3)
    except UsageError as exc:
        errors.append(str(exc))
    out = sp_attention(q, q, q, strategy="tokenring", softmax_scale=0.25)  # still in step
    return errors, float(out.abs().sum())


def test_cache_hit_on_one_rank_and_miss_on_another_cannot_deadlock():
    results = spawn_ranks(2, _cache_then_change, timeout=60)
    for errors, total in results:
        assert len(errors) == 2 and all("disagree on softmax_scale" in e for e in errors), errors
        assert total > 0


def _count_collectives(rank, n):
    from tokenloom.comm.communicator import Communicator

    calls = []
    real = Communicator.all_gather

    def counted(self, tensor, what="all_gather"):
        calls.append(what)
        return real(self, tensor, what)

    Communicator.all_gather = counted
    q = torch.randn(1, 8, 4, 8, requires_grad=True)
    per_call = []
    for _ in range(3):
        before = len(calls)
        out = token_ring_attention(q, q, q, causal=True)
        middle = len(calls)
        out.sum().backward()
        per_call.append((middle - before, len(calls) - middle))
    return per_call


def test_one_small_collective_per_forward_none_in_backward():
    for per_call in spawn_ranks(2, _count_collectives, timeout=60):
        assert per_call == [(1, 0)] * 3, per_call


def _gather_mismatch(rank, n):
    x = torch.arange(16.0).view(1, 16)
    try:
        gather_sequence(shard_sequence(x, rank, n, "zigzag"), layout="zigzag" if rank == 0 else "contiguous")
    except UsageError as exc:
        return str(exc)
    return None


def test_gather_sequence_agrees_on_its_layout():
    for err in spawn_ranks(2, _gather_mismatch, timeout=60):
        assert err is not None and "disagree on layout" in err, err


def _same_call_on_ranks(rank, n, q):
    q = torch.from_numpy(q)
    local = shard_sequence(q, rank, n, "zigzag")
    return gather_sequence(token_ring_attention(local, local, local, causal=True), layout="zigzag")


def test_a_forked_rank_does_not_reuse_its_parents_world_of_one_plan():
    from tokenloom.kernels.reference import attention_with_lse

    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    token_ring_attention(q[:, :4], q[:, :4], q[:, :4], causal=True)  # the parent caches a 1-rank plan
    ref = attention_with_lse(q, q, q, causal=True)[0]
    for out in spawn_ranks(2, _same_call_on_ranks, q.numpy()):
        assert torch.allclose(torch.from_numpy(out), ref, atol=1e-12)
