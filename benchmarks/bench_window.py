"""Sliding-window attention on 2 local gloo ranks vs the same call without a window vs one process.

    python benchmarks/bench_window.py                        # S=16384, 8 heads, d=64, causal, window 1024
    python benchmarks/bench_window.py --seq 4096 --window 256 --iters 1

Forward+backward, fp32, sdpa blocks, every contender on the same inputs in the same run (forked
processes: the ranks get one intra-op thread each, the single-process baselines all cores).
Reported per contender: wall ms of the slowest rank, its ratio to the windowed TokenRing, and per
rank the CPU ms of the step (process time), the ms it spent off the CPU (wall - CPU: waiting for
the other rank, or for a core other jobs hold) and the share of visible (query, key) pairs its
query tokens hold (the ideal work split). Imbalance = max/min - 1 of the per-rank CPU ms. The
goals (issue 18) are printed below the table: the window's wall speedup over the same call without
one, and the zigzag layout's imbalance, with the load average, since the machine may be shared.

Single-process torch baselines for the same windowed attention: torch's SDPA with a dense boolean
mask (computes every pair, masks most), and SDPA per query tile of ``--tile`` rows against only the
keys the tile's window reaches (a hand-tiled path anyone can write; the fastest one found here:
flex_attention has no CPU backward in torch 2.13). Speed goals are not asserted: this prints.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench_attention import _inputs, _timed  # the same inputs and the same timer as the attention table
from tokenloom.comm.launch.local import spawn_ranks


def _distributed(rank, n, strategy, layout, window, seq, heads, head_dim, iters):
    from tokenloom.parallel import shard_sequence, sp_attention

    q, k, v, dout = (shard_sequence(t, rank, n, layout) for t in _inputs(seq, heads, head_dim))
    win = None if window < 0 else (window, 0)

    def step():
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        sp_attention(ql, kl, vl, strategy=strategy, causal=True, layout=layout, impl="sdpa",
                     window_size=win).backward(dout)

    return _timed(step, iters)


def _single(rank, n, which, window, seq, heads, head_dim, iters, tile):
    import torch.nn.functional as F

    q, k, v, dout = (t.transpose(1, 2).contiguous() for t in _inputs(seq, heads, head_dim))  # (b, h, s, d)
    pos = torch.arange(seq)

    def dense():
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).backward(dout)

    def tiled():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        outs = []
        for r0 in range(0, seq, tile):
            r1 = min(seq, r0 + tile)
            k0 = max(0, r0 - window)
            qp, kp = pos[r0:r1, None], pos[None, k0:r1]
            mask = (kp <= qp) & (kp >= qp - window)
            outs.append(F.scaled_dot_product_attention(qq[:, :, r0:r1], kk[:, :, k0:r1], vv[:, :, k0:r1],
                                                       attn_mask=mask))
        torch.cat(outs, dim=2).backward(dout)

    return _timed(dense if which == "dense" else tiled, iters)


def _visible_share(n, layout, seq, window):
    """Share of the visible (query, key) pairs held by each rank's query tokens."""
    from tokenloom.parallel.layout import SeqLayout

    lay = SeqLayout(n, layout)
    per_rank = []
    for r in range(n):
        count = 0
        for start, length in lay.global_ranges(r, seq):
            i = torch.arange(start, start + length)
            count += int((torch.clamp(i, max=window) + 1).sum())
        per_rank.append(count)
    total = sum(per_rank)
    return [c / total for c in per_rank]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=16384, help="global sequence length")
    ap.add_argument("--heads", type=int, default=8, help="attention heads")
    ap.add_argument("--head-dim", type=int, default=64, help="head dimension")
    ap.add_argument("--window", type=int, default=1024, help="left window (causal): keys i-window .. i")
    ap.add_argument("--world-size", type=int, default=2, help="gloo ranks")
    ap.add_argument("--iters", type=int, default=1, help="timed iterations after one warm-up")
    ap.add_argument("--tile", type=int, default=1024, help="query rows per tile of the hand-tiled baseline")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    n, threads = args.world_size, max(1, cores // args.world_size)
    shape = (args.seq, args.heads, args.head_dim, args.iters)
    rows = []
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    for strategy, layout, window in [("tokenring", "zigzag", args.window), ("ring", "zigzag", args.window),
                                     ("ring", "contiguous", args.window), ("ulysses", "zigzag", args.window),
                                     ("tokenring", "zigzag", -1), ("ring", "zigzag", -1)]:
        res = spawn_ranks(n, _distributed, strategy, layout, window, *shape, timeout=3600, threads=threads)
        name = f"{strategy} {layout}, {n} ranks, " + (f"window {window}" if window >= 0 else "no window")
        share = _visible_share(n, layout, args.seq, window if window >= 0 else args.seq)
        rows.append((name, max(w for w, _ in res), [c for _, c in res], [w - c for w, c in res], share))
    for which in ("tiled", "dense"):
        wall, cpu = spawn_ranks(1, _single, which, args.window, *shape, args.tile, timeout=3600,
                                threads=cores)[0]
        label = (f"1 process, torch SDPA per {args.tile}-query tile + window keys" if which == "tiled"
                 else "1 process, torch SDPA with a dense window mask")
        rows.append((label, wall, [cpu], [], [1.0]))
    base = rows[0][1]
    print(f"S={args.seq}, {args.heads} heads x {args.head_dim}, causal, left window {args.window}, fwd+bwd "
          f"fp32, sdpa blocks, {cores} cores, load average {load_before} before, "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} after")
    print("| contender | wall ms | vs windowed tokenring | CPU ms per rank | off-CPU ms per rank | imbalance "
          "| visible pairs per rank |")
    print("|---|---:|---:|---|---|---:|---|")
    for name, wall, cpus, idle, share in rows:
        imb = max(cpus) / max(min(cpus), 1e-9) - 1 if len(cpus) > 1 else 0.0
        print(f"| {name} | {wall:.0f} | {wall / base:.2f}x | {', '.join(f'{c:.0f}' for c in cpus)} | "
              f"{', '.join(f'{i:.0f}' for i in idle) or '-'} | {imb:.1%} | {', '.join(f'{s:.1%}' for s in share)} |")
    _goals(rows, n)


def _goals(rows, n) -> None:
    """The issue's goals, from the rows above: wall speedup of the window for each strategy that
    also ran without one (goal >= 5x), and the zigzag layout's imbalance (goal <= 10%)."""
    by_name = {r[0]: r for r in rows}
    for strategy in ("tokenring", "ring"):
        win = next(r for name, r in by_name.items() if name.startswith(f"{strategy} zigzag") and "no window" not in name)
        full = by_name[f"{strategy} zigzag, {n} ranks, no window"]
        cpus = win[2]
        print(f"- {strategy} zigzag: window speedup {full[1] / win[1]:.2f}x wall, "
              f"{max(full[2]) / max(cpus):.2f}x slowest-rank CPU (goal >= 5x); imbalance "
              f"{max(cpus) / min(cpus) - 1:.1%} CPU, {max(win[4]) / min(win[4]) - 1:.1%} in visible pairs "
              f"(goal <= 10%)")


if __name__ == "__main__":
    main()
