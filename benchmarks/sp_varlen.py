"""Packed sequences vs one dense sequence of the same length, side by side on gloo ranks.

Causal forward+backward of the same number of tokens, dense and packed into 4 / 16 / 64 equal
documents, for each strategy; prints milliseconds per call and the ratio to dense. Packing cuts
the work (no attention across documents, blocks without visible keys are never scheduled) but
adds one kernel call per document per block, so many tiny documents pay in launches.

    python benchmarks/sp_varlen.py [--world-size 2] [--seq 4096] [--iters 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.vocab import STRATEGIES

DOCS = (1, 4, 16, 64)


def _measure(rank, n, seq, iters, strategy):
    from tokenloom.parallel import shard_sequence, sp_attention

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq, 8, 64, generator=g) for _ in range(4)]
    times = {}
    for docs in DOCS:
        cu = None if docs == 1 else torch.arange(0, seq + 1, seq // docs, dtype=torch.int32)
        q, k, v, dout = (shard_sequence(t, rank, n, cu_seqlens=cu) for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def call():
            sp_attention(q, k, v, strategy=strategy, causal=True, cu_seqlens=cu).backward(dout)

        call()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        times[docs] = (time.perf_counter() - t0) / iters
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    print(f"| {args.world_size} gloo ranks, seq {args.seq}, 8 heads x 64, causal fwd+bwd | "
          + " | ".join("dense" if d == 1 else f"{d} docs" for d in DOCS) + " |")
    print("|---|" + "---:|" * len(DOCS))
    for strategy in STRATEGIES:
        t = max((r for r in spawn_ranks(args.world_size, _measure, args.seq, args.iters, strategy,
                                        timeout=600)), key=lambda r: r[1])
        cells = [f"{t[d] * 1e3:.0f} ms" + ("" if d == 1 else f" ({t[d] / t[1]:.2f}x)") for d in DOCS]
        print(f"| {strategy} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
