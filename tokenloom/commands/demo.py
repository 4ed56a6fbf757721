"""``tokenloom demo``: the tour on embedded defaults, CPU only, about a minute.

1. TokenRing, Ring and Ulysses attention, forward and backward, on local CPU ranks over gloo,
   each checked against the fp64 single-process reference.
2. MoE expert placement on a bundled small trace (contiguous vs greedy vs ILP).
3. The simulator's comparison of the three strategies on an 8xH100 node.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tokenloom.errors import UsageError
from tokenloom.validate import arg_int

DEMO_WORLD_SIZES = (1, 2, 4, 8)  # must divide the demo's 8 heads (Ulysses splits heads)
MAX_DEMO_SEQ = 16384  # CPU attention: ~a minute at the default; beyond this the tour takes hours


def attention_section(out, *, world_size: int, seq: int, causal: bool = True) -> bool:
    """Run every strategy on ``world_size`` forked CPU ranks; print a table; True if all checks pass."""
    from tokenloom.comm.spawn import spawn_ranks
    from tokenloom.commands.run import AttentionRun, attention_rank  # torch: only when run

    threads = max(1, (os.cpu_count() or 1) // world_size)
    print(f"== Sequence-parallel attention on {world_size} local CPU ranks (gloo), seq {seq}, "
          f"8 heads (GQA 8/2), head_dim 64, {'causal ' if causal else ''}zigzag, fp32, "
          f"forward+backward ==", file=out)
    print(f"{'strategy':<10} {'fwd ms':>8} {'bwd ms':>8} {'out err':>9} {'grad err':>9} "
          f"{'tolerance':>9}  check", file=out)
    all_ok = True
    for strategy in ("tokenring", "ring", "ulysses"):
        cfg = AttentionRun(strategy=strategy, seq=seq, heads=8, kv_heads=2, head_dim=64,
                           causal=causal, check=True, iters=2)
        cfg.validate(world_size)
        rep = spawn_ranks(world_size, attention_rank, cfg, timeout=300, threads=threads)[0]
        chk = rep["check"]
        ok = all(c["ok"] for c in chk.values())
        all_ok &= ok
        grad_err = max(chk[n]["max_abs_err"] for n in ("dq", "dk", "dv"))
        tol = min(c["tolerance"] for c in chk.values())
        print(f"{strategy:<10} {max(rep['forward_ms']):8.1f} {max(rep['backward_ms']):8.1f} "
              f"{chk['out']['max_abs_err']:9.1e} {grad_err:9.1e} {tol:9.1e}  "
              f"{'ok' if ok else 'FAILED'}", file=out)
    print("(errors: max |x - fp64 reference| over out and dq/dk/dv; times: slowest rank, median)",
          file=out)
    return all_ok


def _run(args: argparse.Namespace) -> int:
    if args.world_size not in DEMO_WORLD_SIZES:
        raise UsageError(f"--world-size must be one of {', '.join(map(str, DEMO_WORLD_SIZES))} (it must "
                         f"divide the demo's 8 heads), got {args.world_size}", field="world-size")
    if args.seq % (2 * args.world_size):
        raise UsageError(f"--seq ({args.seq}) must be a multiple of 2 * --world-size = {2 * args.world_size} "
                         f"(zigzag layout)", field="seq")
    out = sys.stdout
    t0 = time.perf_counter()
    print(f"tokenloom demo (CPU only; {os.cpu_count()} cores)\n", file=out)
    ok = attention_section(out, world_size=args.world_size, seq=args.seq)
    print(file=out)
    from tokenloom.placement.demo import demo_section as placement_section

    placement_section(out)
    print(file=out)
    from tokenloom.simulator.demo import demo_section as simulator_section

    simulator_section(out)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s", file=out)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a tour on CPU: SP attention on local ranks, MoE placement, "
                       "simulated 8xH100", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=arg_int(1, max(DEMO_WORLD_SIZES)), default=2,
                   help="local CPU ranks for the attention run: 1, 2, 4 or 8 (default 2)")
    p.add_argument("--seq", type=arg_int(2, MAX_DEMO_SEQ), default=2048,
                   help=f"global sequence length for attention, a multiple of 2 * world size, at most "
                        f"{MAX_DEMO_SEQ} (default 2048)")
    p.set_defaults(func=_run)
