"""What the cross-rank argument agreement costs: one 16-int64 all-gather per forward call.

On 2 gloo ranks (one thread each) times a small TokenRing forward (the agreement included) and the
agreement's all-gather alone, side by side, and prints the share. The agreement is the same
all-gather whatever the shapes, so its share shrinks as the attention grows.

    python benchmarks/sp_agree_cost.py [--seq 256] [--iters 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenloom.comm.launch.local import spawn_ranks


def _measure(rank, n, seq, iters):
    from tokenloom.comm.communicator import Communicator
    from tokenloom.parallel import shard_sequence, token_ring_attention

    q = shard_sequence(torch.randn(1, seq, 4, 32), rank, n)
    comm = Communicator()
    vec = torch.zeros(16, dtype=torch.int64)
    rows = {}
    for name, fn in (("attention call", lambda: token_ring_attention(q, q, q, causal=True)),
                     ("agreement all-gather", lambda: comm.all_gather(vec))):
        for _ in range(10):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        rows[name] = (time.perf_counter() - t0) / iters
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256, help="global tokens")
    p.add_argument("--iters", type=int, default=200, help="timed calls")
    args = p.parse_args()
    rows = spawn_ranks(2, _measure, args.seq, args.iters, timeout=300)[0]
    call, agree = rows["attention call"], rows["agreement all-gather"]
    print(f"| 2 gloo ranks, seq {args.seq}, 4 heads x 32 | us per call |")
    print("|---|---:|")
    print(f"| token_ring_attention forward (agreement included) | {call * 1e6:.0f} |")
    print(f"| agreement all-gather alone | {agree * 1e6:.0f} ({agree / call:.0%} of the call) |")


if __name__ == "__main__":
    main()
