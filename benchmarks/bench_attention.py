"""Sequence-parallel attention on local gloo ranks vs single-process attention, side by side.

    python benchmarks/bench_attention.py                 # S=8192, 8 heads, d=64, causal, 2 ranks
    python benchmarks/bench_attention.py --seq 4096 --world-size 2 --iters 3 --non-causal

Every contender runs forward+backward on the same inputs in the same run, in forked processes that
together use every core: the N-rank strategies get one intra-op thread per rank, the single-process
baselines get all cores. Reported: median wall time of the slowest rank and its ratio to the
single-process reference kernel (tokenloom.kernels.block_attention on the full sequence) and to
torch's scaled_dot_product_attention. A ratio below 1 means the ranks together beat one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tokenloom.comm.spawn import spawn_ranks


def _inputs(seq, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, heads, head_dim, generator=g) for _ in range(4)]


def _timed(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _distributed(rank, n, strategy, seq, heads, head_dim, causal, iters):
    from tokenloom.parallel import shard_sequence, sp_attention

    q, k, v, dout = (shard_sequence(t, rank, n, "zigzag") for t in _inputs(seq, heads, head_dim))

    def step():
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        sp_attention(ql, kl, vl, strategy=strategy, causal=causal).backward(dout)

    return _timed(step, iters)


def _single(rank, n, which, seq, heads, head_dim, causal, iters):
    from tokenloom.kernels import block_attention
    from tokenloom.kernels.reference import torch_sdpa

    q, k, v, dout = _inputs(seq, heads, head_dim)

    def step():
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        if which == "reference":
            out = block_attention(ql, kl, vl, causal=causal)[0]
        else:
            out = torch_sdpa(ql, kl, vl, causal)
        out.backward(dout)

    return _timed(step, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--non-causal", action="store_true")
    args = p.parse_args()
    causal = not args.non_causal
    cores = os.cpu_count() or 1
    shape = (args.seq, args.heads, args.head_dim, causal, args.iters)
    rows = {}
    for which in ("reference", "torch_sdpa"):
        rows[f"single process, {which}"] = spawn_ranks(1, _single, which, *shape, timeout=1800,
                                                       threads=cores)[0]
    threads = max(1, cores // args.world_size)
    for strategy in ("tokenring", "ring", "ulysses"):
        times = spawn_ranks(args.world_size, _distributed, strategy, *shape, timeout=1800,
                            threads=threads)
        rows[f"{strategy}, {args.world_size} ranks"] = max(times)
    ref, sdpa = rows["single process, reference"], rows["single process, torch_sdpa"]
    print(f"forward+backward, seq {args.seq}, {args.heads} heads, head_dim {args.head_dim}, "
          f"{'causal' if causal else 'non-causal'}, fp32, zigzag; {cores} cores; "
          f"median of {args.iters}")
    print(f"| {'contender':<28} | {'ms':>9} | {'vs reference':>12} | {'vs torch SDPA':>13} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 14}|{'-' * 15}|")
    for name, ms in rows.items():
        print(f"| {name:<28} | {ms:9.0f} | {ms / ref:11.2f}x | {ms / sdpa:12.2f}x |")


if __name__ == "__main__":
    main()
