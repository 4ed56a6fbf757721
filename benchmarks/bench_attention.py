"""Sequence-parallel attention on local gloo ranks vs single-process attention, side by side.

    python benchmarks/bench_attention.py                 # S=8192, 8 heads, d=64, causal, 2 ranks, sdpa blocks
    python benchmarks/bench_attention.py --impls sdpa,torch --seq 4096 --iters 3 --non-causal

Every contender runs forward+backward on the same inputs in the same run, in forked processes that
together use every core: the N-rank strategies get one intra-op thread per rank, the single-process
baselines get all cores. Reported: median wall time of the slowest rank and its ratio to torch's
scaled_dot_product_attention in one process on the full sequence (the goal is <= 1.15x for the
strategies on 2 ranks). ``--impls`` picks the block kernels (tokenloom.kernels: "sdpa" = torch's
fused LSE op, "torch" = the pure-torch reference); each row says which one it used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.vocab import STRATEGIES


def _inputs(seq, heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, heads, head_dim, generator=g) for _ in range(4)]


def _timed(fn, iters):
    """Median wall ms and median process CPU ms (all threads) of ``fn``."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def _distributed(rank, n, strategy, impl, seq, heads, head_dim, causal, iters):
    from tokenloom.parallel import shard_sequence, sp_attention

    q, k, v, dout = (shard_sequence(t, rank, n, "zigzag") for t in _inputs(seq, heads, head_dim))

    def step():
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        sp_attention(ql, kl, vl, strategy=strategy, causal=causal, impl=impl).backward(dout)

    return _timed(step, iters)


def _single(rank, n, which, impl, seq, heads, head_dim, causal, iters):
    from tokenloom.kernels import block_attention
    from tokenloom.kernels.reference import torch_sdpa

    q, k, v, dout = _inputs(seq, heads, head_dim)

    def step():
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        if which == "block_attention":
            out = block_attention(ql, kl, vl, causal=causal, impl=impl)[0]
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
    p.add_argument("--impls", default="sdpa", help="comma-separated block kernels: sdpa, torch")
    args = p.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in ("sdpa", "torch")]
    if bad or not impls:
        p.error(f"--impls takes sdpa and/or torch, got {args.impls!r}")
    causal = not args.non_causal
    cores = os.cpu_count() or 1
    shape = (args.seq, args.heads, args.head_dim, causal, args.iters)
    rows = {("single process, torch SDPA", "-"): spawn_ranks(
        1, _single, "torch_sdpa", None, *shape, timeout=1800, threads=cores)[0]}
    for impl in impls:
        rows[("single process, block_attention", impl)] = spawn_ranks(
            1, _single, "block_attention", impl, *shape, timeout=1800, threads=cores)[0]
    threads = max(1, cores // args.world_size)
    for impl in impls:
        for strategy in STRATEGIES:
            times = spawn_ranks(args.world_size, _distributed, strategy, impl, *shape, timeout=1800,
                                threads=threads)
            rows[(f"{strategy}, {args.world_size} ranks", impl)] = (max(t[0] for t in times),
                                                                  sum(t[1] for t in times))
    sdpa, sdpa_cpu = rows[("single process, torch SDPA", "-")]
    print(f"forward+backward, seq {args.seq}, {args.heads} heads, head_dim {args.head_dim}, "
          f"{'causal' if causal else 'non-causal'}, fp32, zigzag; {cores} cores; "
          f"median of {args.iters}")
    print(f"| {'contender':<33} | {'blocks':<6} | {'ms':>9} | {'vs torch SDPA':>13} | "
          f"{'CPU ms':>9} | {'CPU vs SDPA':>11} |")
    print(f"|{'-' * 35}|{'-' * 8}|{'-' * 11}|{'-' * 15}|{'-' * 11}|{'-' * 13}|")
    for (name, impl), (ms, cpu) in rows.items():
        print(f"| {name:<33} | {impl:<6} | {ms:9.0f} | {ms / sdpa:12.2f}x | {cpu:9.0f} | "
              f"{cpu / sdpa_cpu:10.2f}x |")


if __name__ == "__main__":
    main()
