"""Attention of new queries over a sharded KV cache, on 1-4 gloo ranks, against fp64 single-process
attention over the whole sequence (decode and chunked prefill, every strategy, GQA)."""

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.kernels.reference import attention_with_lse
from tokenloom.parallel.decode import cached_attention, gather_cache, new_token_part
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache, prefill_positions

B, H, HKV, D = 2, 4, 2, 8


def _seq(total, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, total, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, total, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, total, HKV, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cache(rank, n, dtype, layers=1, layout="appended", max_tokens=4096, keys_last=None):
    return ShardedKVCache(CacheSpec(layers, B, HKV, D, dtype, n, rank, layout=layout), max_tokens,
                          keys_last=keys_last)


def _decode_run(rank, n, strategy, queries, prompt, steps, dtype, fill, orders=None):
    """Prompt by zigzag prefill fill (fill=True) or one chunked prefill; then decode chunks."""
    total = prompt + sum(steps)
    q, k, v = _seq(total, seed=prompt + 7 * n)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    cache = _cache(rank, n, dtype, layout="zigzag" if fill else "appended",
                   keys_last=None if orders is None else orders[rank])
    errs = []
    if fill:
        pos = prefill_positions(rank, n, prompt, layout="zigzag")
        cache.fill(0, kl[:, pos], vl[:, pos], pos, prompt)
        at = prompt
    else:
        at = 0
        steps = [prompt] + list(steps)
    for t in steps:
        if queries == "sharded":
            lo, hi = new_token_part(rank, n, at, t)
            sl = slice(at + lo, at + hi)
        else:
            sl = slice(at, at + t)
        out = cached_attention(ql[:, sl], kl[:, sl], vl[:, sl], cache, 0, strategy=strategy,
                               queries=queries)
        ref, _ = attention_with_lse(q[:, sl], k[:, :sl.stop], v[:, :sl.stop], causal=True)
        assert out.shape == ref.shape, (out.shape, ref.shape)
        errs.append(float((out.double() - ref).abs().max()) if ref.numel() else 0.0)
        at += t
    kf, vf = gather_cache(cache, 0)
    assert kf.shape[1] == total
    errs.append(float((kf.double() - k).abs().max()) + float((vf.double() - v).abs().max()))
    return errs


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy,queries", [("gather", "replicated"), ("gather", "sharded"),
                                              ("ring", "sharded"), ("passkv", "sharded"),
                                              ("ring", "replicated"), ("auto", "replicated")])
def test_decode_matches_fp64_single_process(world_size, strategy, queries):
    for fill in (True, False):
        prompt = 8 * world_size if fill else 13
        per_rank = spawn_ranks(world_size, _decode_run, strategy, queries, prompt, [1, 1, 3, 1, 17],
                               torch.float32, fill, timeout=60)
        for errs in per_rank:
            assert max(errs[:-1]) < 2e-5, errs
            assert errs[-1] < 1e-6, errs  # the filled cache is the single-process one (fp32 copy)


@pytest.mark.parametrize("strategy,queries", [("passkv", "sharded"), ("ring", "sharded"),
                                              ("gather", "replicated")])
def test_ranks_whose_caches_use_different_storage_orders(strategy, queries):
    """K/V travel keys-last whatever each rank stores: a heads-first rank sends transposed rows, a
    keys-last rank receives them as its own; the answer is the same (fp32 and fp64)."""
    for dtype, tol, cache_tol in ((torch.float32, 2e-5, 1e-6), (torch.float64, 2e-5, 1e-6),
                                  (torch.bfloat16, 3e-2, 6e-2)):  # bf16: heads-first on the wire
        per_rank = spawn_ranks(3, _decode_run, strategy, queries, 13, [1, 2, 9], dtype, False,
                               [True, False, True], timeout=60)
        for errs in per_rank:
            assert max(errs[:-1]) < tol, (dtype, errs)
            assert errs[-1] < cache_tol, (dtype, errs)


def test_fp64_is_exact_to_rounding():
    for errs in spawn_ranks(3, _decode_run, "ring", "sharded", 10, [1, 2, 40], torch.float64, False):
        assert max(errs) < 1e-12, errs


@pytest.mark.parametrize("strategy,queries", [("gather", "replicated"), ("gather", "sharded"),
                                              ("ring", "sharded"), ("passkv", "sharded")])
def test_more_ranks_than_tokens(strategy, queries):
    """A one-token prompt on 4 ranks: most shards and parts are empty (no message is posted for
    them) and the result is still exact."""
    for errs in spawn_ranks(4, _decode_run, strategy, queries, 1, [1, 2, 1], torch.float32, False,
                            timeout=60):
        assert max(errs[:-1]) < 2e-5 and errs[-1] < 1e-6, errs


def _auto_on_hardware(rank, n):
    from tokenloom.parallel.decode_runtime import Timing

    q, k, v = _seq(301, seed=9)
    ql, kl, vl = (t.float() for t in (q, k, v))
    cache = _cache(rank, n, torch.float32)
    cached_attention(ql[:, :40], kl[:, :40], vl[:, :40], cache, 0)  # a short cache
    chosen = []
    for queries, t in (("sharded", 260), ("replicated", 0)):
        at = cache.seq_len(0)
        t = t or 1
        lo, hi = new_token_part(rank, n, at, t) if queries == "sharded" else (0, t)
        timing = Timing()
        out = cached_attention(ql[:, at + lo:at + hi], kl[:, at + lo:at + hi], vl[:, at + lo:at + hi],
                               cache, 0, strategy="auto", queries=queries, hardware="h100-sxm",
                               timing=timing)
        ref, _ = attention_with_lse(q[:, at + lo:at + hi], k[:, :at + hi], v[:, :at + hi], causal=True)
        assert float((out.double() - ref).abs().max()) < 2e-5
        chosen.append(timing.strategy)
    return chosen


def test_auto_with_hardware_runs_what_the_simulator_prices_fastest():
    from tokenloom.simulator.decode import DecodeShape, simulate_decode
    from tokenloom.simulator.hardware import make_cluster

    chunk = DecodeShape(64, 512, H, HKV, D, 1, B, 4)  # 260 new over 40 cached, rounded up
    decode = DecodeShape(512, 1, H, HKV, D, 1, B, 4)
    want = [simulate_decode(make_cluster("h100-sxm", 2), chunk, "auto", replicated=False).strategy,
            simulate_decode(make_cluster("h100-sxm", 2), decode, "auto").strategy]
    for chosen in spawn_ranks(2, _auto_on_hardware, timeout=60):
        assert chosen == want
    assert want[1] == "gather"
