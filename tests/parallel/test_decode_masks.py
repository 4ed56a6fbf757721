"""Sliding windows, soft-capping, sinks and non-finite inputs in decode and chunked prefill, on 1-3
gloo ranks and every decode strategy, against an fp64 single-process reference written out here
(scores, soft-cap, causal window by position, the sink column, softmax over the visible pairs)."""

import math

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.parallel.decode import cached_attention, new_token_part
from tokenloom.parallel.decode_runtime import Timing
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache

B, H, HKV, D = 1, 4, 2, 8


def reference(q, k, v, q0, left, softcap, sinks):
    """fp64 attention of queries at positions ``q0..`` over keys at ``0..``: causal, the window
    ``left`` (-1: none), soft-cap, sinks; masked pairs contribute exact zeros whatever they hold."""
    q, k, v = (t.double() for t in (q, k, v))
    g = H // HKV
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    qp = torch.arange(q0, q0 + q.shape[1])[:, None]
    kp = torch.arange(k.shape[1])[None, :]
    vis = (kp <= qp) & ((kp >= qp - left) if left >= 0 else True)
    prod = torch.where(vis[None, :, None, :, None], q[:, :, :, None] * k.permute(0, 2, 1, 3)[:, None], 0.0)
    s = prod.permute(0, 2, 1, 3, 4).sum(-1) / math.sqrt(D)  # (b, h, t, s)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(vis, s, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, H, 1, 1).expand(B, H, s.shape[2], 1)], -1)
    p = torch.softmax(s, -1)[..., :k.shape[1]]
    w = torch.where(vis[None, None, :, :, None], p[..., None] * v.permute(0, 2, 1, 3)[:, :, None], 0.0)
    return w.sum(-2).transpose(1, 2)  # (b, t, h, d)


def _seq(total, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, total, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV))


def _run(rank, n, strategy, queries, steps, left, softcap, use_sinks, poison):
    total = sum(steps)
    q, k, v = _seq(total, seed=3 + n)
    for where, what in poison:  # (position, "k"/"v"/"nan"/"inf")
        (k if what[0] == "k" else v)[0, where, 0, 0] = float("nan") if what[1:] == "nan" else float("inf")
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0]) if use_sinks else None
    ql, kl, vl = (t.float() for t in (q, k, v))
    cache = ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, n, rank), 512)
    window = None if left < 0 else (left, -1)
    errs, at, ran = [], 0, []
    for t in steps:
        lo, hi = new_token_part(rank, n, at, t) if queries == "sharded" else (0, t)
        sl = slice(at + lo, at + hi)
        timing = Timing()
        out = cached_attention(ql[:, sl], kl[:, sl], vl[:, sl], cache, 0, strategy=strategy,
                               queries=queries, window_size=window, softcap=softcap, sinks=sinks,
                               timing=timing)
        ran.append(timing.strategy)
        ref = reference(q[:, sl], k[:, :sl.stop], v[:, :sl.stop], sl.start, left, softcap, sinks)
        fin = torch.isfinite(ref)  # non-finite exactly where plain attention is (as test_nan.py)
        assert torch.equal(torch.isfinite(out), fin), (sl, (torch.isfinite(out) != fin).nonzero())
        errs.append(float((out.double()[fin] - ref[fin]).abs().max()) if fin.any() else 0.0)
        at += t
    return errs, ran


CASES = [("gather", "replicated"), ("gather", "sharded"), ("ring", "sharded"), ("passkv", "sharded"),
         ("ring", "replicated"), ("passkv", "replicated")]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("strategy,queries", CASES)
def test_window_softcap_sinks_match_fp64(world_size, strategy, queries):
    steps = [19, 1, 1, 6, 1]  # a chunked prefill, decode steps, a chunk, decode
    for left, softcap, sinks in ((4, None, False), (7, 3.0, True), (-1, 2.0, False), (0, None, True)):
        for errs, ran in spawn_ranks(world_size, _run, strategy, queries, steps, left, softcap, sinks,
                                     (), timeout=60):
            assert max(errs) < 2e-5, (left, softcap, sinks, errs)
            assert set(ran) == {strategy}, ran


@pytest.mark.parametrize("strategy,queries", CASES[:4])
def test_non_finite_inputs_poison_exactly_what_they_reach(strategy, queries):
    """A nan/inf in a cached key or value poisons the rows that see it and no other: outside the
    window (hidden) it changes nothing; in the fast full-block path it poisons every later row."""
    steps = [12, 1, 1, 5, 1]
    for poison, left in ((((2, "knan"),), 3), (((2, "vinf"),), 3), (((5, "vnan"),), -1),
                         (((13, "kinf"),), 2), (((0, "vnan"), (14, "knan")), 4)):
        for errs, _ in spawn_ranks(2, _run, strategy, queries, steps, left, None, False, poison,
                                   timeout=60):
            assert max(errs) < 2e-5, (poison, left, errs)


def test_window_skips_shards_outside_it():
    """Decode with a window shorter than a rank's distance: the kernel reads no key of a shard
    wholly outside the window (an empty partial), and the answer is still exact."""
    from tokenloom.kernels.decode import cache_block

    q = torch.randn(1, 1, H, D)
    k = torch.full((1, HKV, 6, D), float("nan"))  # would poison anything that read it
    out, lse = cache_block(q, k, k, causal=False, scale=0.3, q_pos=100, k_pos=torch.arange(6), left=50)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_bad_mask_arguments_are_named():
    cache = ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, 1, 0), 64)
    q, k, v = (t.float() for t in _seq(3, 0))
    for kwargs, field in (({"window_size": (-2, 0)}, "window_size"), ({"softcap": -1.0}, "softcap"),
                          ({"sinks": torch.zeros(3)}, "sinks")):
        with pytest.raises(UsageError) as e:
            cached_attention(q, k, v, cache, 0, **kwargs)
        assert e.value.field == field
        assert cache.seq_len(0) == 0  # nothing appended


def _replicated_outputs(rank, n):
    q, k, v = (t.float() for t in _seq(40, 11))
    cache = ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, n, rank), 64)
    cached_attention(q[:, :37], k[:, :37], v[:, :37], cache, 0, window_size=(9, 0))
    return [cached_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, 0, strategy="gather",
                             window_size=(9, 0)) for t in (37, 38, 39)]


def test_replicated_decode_gives_every_rank_the_same_bits():
    """Every rank runs the model on the output: the partials are merged identically everywhere."""
    outs = spawn_ranks(3, _replicated_outputs, timeout=60)
    for other in outs[1:]:
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(outs[0], other))


def _kernel_fails_on_rank_1(rank, n):
    from unittest import mock

    q, k, v = (t.float() for t in _seq(4, 2))
    cache = ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, n, rank), 64)
    boom = mock.patch("tokenloom.parallel.decode_runtime.cache_block", side_effect=RuntimeError("boom"))
    try:
        with boom if rank == 1 else mock.patch.dict({}):
            cached_attention(q, k, v, cache, 0, strategy="gather")
    except (RuntimeError, UsageError) as exc:
        return type(exc).__name__, str(exc)[:80], cache.seq_len(0)
    return "no error", "", cache.seq_len(0)


def test_a_kernel_failure_before_the_agreement_raises_on_every_rank_without_hanging():
    got = spawn_ranks(2, _kernel_fails_on_rank_1, timeout=60)
    assert got[1][:2] == ("RuntimeError", "boom") and got[0][0] == "UsageError", got
    assert got[0][2] == got[1][2] == 0  # nothing appended anywhere
