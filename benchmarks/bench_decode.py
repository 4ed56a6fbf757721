"""Decode and chunked prefill over a sharded KV cache on local gloo ranks vs single-process torch SDPA.

    python benchmarks/bench_decode.py                       # 64K cache, 8 heads, d=64, 2 ranks
    python benchmarks/bench_decode.py --context 16384 --iters 5

Side by side in one run, each contender in forked processes that together use every core:

* decode: one new token over a ``--context`` cache. tokenloom: ``--world-size`` ranks, one thread
  each, each holding its share of the cache (pass-Q gather, replicated queries, as HF generation
  runs it). Baseline: torch's SDPA in one process with every core over the whole cache (stored
  heads-first, its fastest layout), and over half of it with one thread (what one rank must read).
  Also reported, not a goal: tokenloom's own decode kernel in one process with every core over the
  whole cache in its CPU storage (keys-last), which says how much of the gain is the kernel (the
  ranks share one memory here; on GPUs each has its own).
* chunked prefill: ``--chunk`` new tokens over a ``context - chunk`` cache (the new tokens causal
  among themselves). tokenloom: each strategy with sharded queries (each rank holds its part of the
  chunk). Baseline: torch's fused CPU SDPA op in one process on the same work (the cache part and
  the causal square, merged by their log-sum-exp).

Reported: median ms of the slowest rank per step, its split between attention and communication
(the argument agreement included; a decode step's partials ride it), and the ratio to the
single-process baseline. ``--rounds R`` alternates baseline and tokenloom R times (the machine's
load moves between them) and reports every round's ratio and their median. The goals (issue 19):
decode <= 1.0x, chunked prefill <= 1.1x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.simulator.calibrate import median_time


def _kv(total, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, total, heads, head_dim, generator=g),
            torch.randn(1, total, heads, head_dim, generator=g))


def _ms(fn, iters: int) -> float:
    return 1e3 * median_time(fn, iters)


def _baseline(rank, n, context, chunk, heads, head_dim, iters):
    """Single process: decode over the whole cache, over half of it, and the chunked prefill work."""
    torch.set_num_threads(os.cpu_count() or 2)
    k, v = _kv(context, heads, head_dim)
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    q1 = torch.randn(1, heads, 1, head_dim)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = _ms(lambda: sdpa(q1, kt, vt), iters)
    half_k, half_v = kt[:, :, :context // 2].contiguous(), vt[:, :, :context // 2].contiguous()
    torch.set_num_threads(1)
    half = _ms(lambda: sdpa(q1, half_k, half_v), iters)
    torch.set_num_threads(os.cpu_count() or 2)
    from tokenloom.kernels.decode import cache_block

    kl, vl = (t.permute(0, 2, 3, 1).contiguous().transpose(-1, -2) for t in (k, v))  # keys-last
    q1s = q1.transpose(1, 2)
    ours = _ms(lambda: cache_block(q1s, kl, vl, causal=False, scale=head_dim ** -0.5), iters)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    qc = torch.randn(1, heads, chunk, head_dim)
    old = context - chunk

    def prefill():
        o1, l1 = op(qc, kt[:, :, :old], vt[:, :, :old], 0.0, False)[:2]
        o2, l2 = op(qc, kt[:, :, old:], vt[:, :, old:], 0.0, True)[:2]
        lse = torch.logaddexp(l1, l2)
        return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]

    return {"decode_full_ms": full, "decode_half_1thread_ms": half, "decode_ours_ms": ours,
            "prefill_ms": _ms(prefill, max(1, iters // 3))}


def _ranks(rank, n, context, chunk, heads, head_dim, iters, strategies, order):
    from tokenloom.parallel.decode import cached_attention, new_token_part
    from tokenloom.parallel.decode_runtime import Timing
    from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache

    k, v = _kv(context, heads, head_dim)
    out = {}
    for mode, old, new in (("decode", context, 1), ("prefill", context - chunk, chunk)):
        cache = ShardedKVCache(CacheSpec(1, 1, heads, head_dim, torch.float32, n, rank), context + 1,
                               keys_last={"auto": None, "keys-last": True, "heads-first": False}[order])
        lo, hi = new_token_part(rank, n, 0, old)
        cache.append(0, k[:, lo:hi], v[:, lo:hi], torch.arange(lo, hi), old)
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, new, heads, head_dim, generator=g)
        kn, vn = (k[:, old:old + new], v[:, old:old + new]) if mode == "prefill" else (q, q)
        for strategy in (["gather"] if mode == "decode" else strategies):
            queries = "replicated" if mode == "decode" else "sharded"
            a, b = (0, new) if queries == "replicated" else new_token_part(rank, n, old, new)
            rows = []
            for it in range((iters if mode == "decode" else max(1, iters // 3)) + 1):
                timing = Timing()
                t0 = time.perf_counter()
                cached_attention(q[:, a:b], kn[:, a:b], vn[:, a:b], cache, 0, group=None,
                                 strategy=strategy, queries=queries, timing=timing)
                wall = (time.perf_counter() - t0) * 1e3
                cache.truncate(0, hi - lo, old)  # the same work every iteration
                if it:
                    rows.append((wall, timing.attention_s * 1e3, timing.comm_s * 1e3))
            out[f"{mode}:{strategy}"] = [statistics.median(r[i] for r in rows) for i in range(3)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=65536, help="cached tokens for decode")
    p.add_argument("--chunk", type=int, default=4096, help="new tokens of the chunked prefill")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=9, help="decode steps timed (prefill: a third)")
    p.add_argument("--strategies", default="gather,ring,passkv", help="for the chunked prefill")
    p.add_argument("--rounds", type=int, default=1, help="alternate baseline and tokenloom this often")
    p.add_argument("--cache-order", choices=("auto", "keys-last", "heads-first"), default="auto",
                   help="the cache's storage order (auto: keys-last for fp32 on CPU)")
    a = p.parse_args()
    if not 0 < a.chunk < a.context:  # the prefill runs over context - chunk cached tokens
        p.error(f"--chunk must be between 1 and --context - 1 ({a.context - 1}), got {a.chunk}")
    ratios: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        base, per_rank = _round(a)
        _report(a, base, per_rank, ratios)
    if a.rounds > 1:
        print("median ratio over rounds: " + ", ".join(
            f"{k} {statistics.median(v):.2f}x ({' '.join(f'{x:.2f}' for x in v)})" for k, v in ratios.items()))


def _round(a):
    base = spawn_ranks(1, _baseline, a.context, a.chunk, a.heads, a.head_dim, a.iters,
                       threads=os.cpu_count() or 2, timeout=600)[0]
    per_rank = spawn_ranks(a.world_size, _ranks, a.context, a.chunk, a.heads, a.head_dim, a.iters,
                           a.strategies.split(","), a.cache_order, threads=1, timeout=1200)
    return base, per_rank


def _report(a, base, per_rank, ratios) -> None:
    print(f"context {a.context}, heads {a.heads}, head_dim {a.head_dim}, fp32, {a.world_size} CPU ranks "
          f"x 1 thread vs one process x {os.cpu_count()} threads")
    print(f"single-process SDPA, one decode step: full cache {base['decode_full_ms']:.2f} ms "
          f"({os.cpu_count()} threads); half the cache, 1 thread {base['decode_half_1thread_ms']:.2f} ms; "
          f"tokenloom's decode kernel, one process, full cache {base['decode_ours_ms']:.2f} ms")
    print(f"single-process fused SDPA, chunked prefill {a.chunk} over {a.context - a.chunk}: "
          f"{base['prefill_ms']:.1f} ms")
    print(f"{'case':<18} {'step ms':>9} {'attention':>10} {'comm':>8} {'vs SDPA':>8}")
    for key in per_rank[0]:
        slowest = max(per_rank, key=lambda r: r[key][0])[key]
        ref = base["decode_full_ms"] if key.startswith("decode") else base["prefill_ms"]
        print(f"{key:<18} {slowest[0]:9.2f} {slowest[1]:10.2f} {slowest[2]:8.2f} {slowest[0] / ref:7.2f}x")
        ratios.setdefault(key, []).append(slowest[0] / ref)


if __name__ == "__main__":
    main()
