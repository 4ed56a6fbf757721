"""``tokenloom demo``: the tour on embedded defaults, CPU only, about a minute.

1. TokenRing, Ring and Ulysses attention, forward and backward, on local CPU ranks over gloo,
   each checked against the fp64 single-process reference.
2. MoE expert placement on a bundled small trace (contiguous vs greedy vs ILP).
3. The simulator's comparison of the three strategies on an 8xH100 node.
4. TokenWeave: a tensor-parallel stack on local CPU ranks (baseline vs TokenWeave, checked against
   fp64), then the simulated 8xH100 table for four models.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tokenloom.common.vocab import STRATEGIES
from tokenloom.commands.args import arg_int

DEMO_WORLD_SIZES = (1, 2, 4, 8)  # must divide the demo's 8 heads (Ulysses splits heads)
MAX_DEMO_SEQ = 8192  # CPU attention costs seq^2: the default 2048 takes ~10 s, 8192 a few minutes


def attention_section(out, *, world_size: int, seq: int, causal: bool = True) -> bool:
    """Run every strategy on ``world_size`` forked CPU ranks; print a table; True if all checks pass."""
    from tokenloom.jobs.attention import combine, job  # torch: only when run
    from tokenloom.comm.launch import run_job

    threads = max(1, (os.cpu_count() or 1) // world_size)
    print(f"== Sequence-parallel attention on {world_size} local CPU ranks (gloo), seq {seq}, "
          f"8 heads (GQA 8/2), head_dim 64, {'causal ' if causal else ''}zigzag, fp32, "
          f"forward+backward ==", file=out)
    print(f"{'strategy':<10} {'fwd ms':>8} {'bwd ms':>8} {'out err':>9} {'grad err':>9} "
          f"{'tolerance':>9}  check", file=out)
    all_ok = True
    for cfg in _demo_runs(world_size, seq, causal):
        strategy = cfg.strategy
        rep = combine(run_job(job, cfg, launcher="local", world_size=world_size, threads=threads), cfg)
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


def tokenweave_section(out, *, world_size: int = 2) -> bool:
    """TokenWeave on ``world_size`` forked CPU ranks (dense and MoE), then simulated TP8 on H100."""
    from tokenloom.jobs import tokenweave as tw
    from tokenloom.comm.launch import run_job
    from tokenloom.simulator.hardware import make_cluster
    from tokenloom.simulator.tokenweave import MODELS, model_shape, simulate_tokenweave

    print(f"== TokenWeave: tensor-parallel layers on {world_size} local CPU ranks (gloo), 2 layers, fp32, "
          f"checked against the fp64 single-device stack ==", file=out)
    print(f"{'layer':<26}{'tokens':>7}{'plan':>16}{'baseline ms':>13}{'tokenweave ms':>15}{'max err':>9}  check",
          file=out)
    all_ok = True
    cases = (("dense 128/8 heads/2 kv", tw.TokenweaveRun(tokens=1100, hidden=128, heads=8, kv_heads=2, ffn=256)),
             ("MoE 4 experts top-2", tw.TokenweaveRun(tokens=2100, hidden=128, heads=8, kv_heads=2, ffn=256,
                                                      moe_experts=4)))
    for label, base in cases:
        cfg = tw.TokenweaveRun(**{**base.__dict__, "check": True, "iters": 1})
        cfg.validate(world_size)
        res = run_job(tw.job, cfg, launcher="local", world_size=world_size)
        rep = tw.combine(res, cfg)
        ok = all(c["ok"] for c in rep["check"].values())
        all_ok &= ok
        plan = f"{rep['plan']['mode']} " + "+".join(str(e - s) for s, e in rep["plan"]["pieces"])
        err = max(c["max_abs_err"] for c in rep["check"].values())
        print(f"{label:<26}{cfg.tokens:>7}{plan:>16}{max(rep['baseline_ms']):>13.1f}"
              f"{max(rep['tokenweave_ms']):>15.1f}{err:>9.1e}  {'ok' if ok else 'FAILED'}", file=out)
    print("(ms per layer, slowest rank; two cores leave overlap little room: see docs/tokenweave.md)", file=out)
    cluster = make_cluster("h100-sxm", 8)
    print("Simulated TP8 on h100-sxm, ms per layer (tokenloom simulate tokenweave):", file=out)
    print(f"  {'model':<16}{'tokens':>7}{'baseline':>10}{'tokenweave':>12}{'no-comm':>9}{'speedup':>9}", file=out)
    for model in MODELS:
        layer, layers = model_shape(model, 8)
        for tokens in (2048, 8192, 32768):
            s = simulate_tokenweave(cluster, layer, tokens, num_layers=layers, model=model).summary()
            print(f"  {model:<16}{tokens:>7}{s['baseline_ms']:>10.3f}{s['tokenweave_ms']:>12.3f}"
                  f"{s['no_comm_ms']:>9.3f}{s['speedup']:>8.2f}x", file=out)
    return all_ok


def _demo_runs(world_size: int, seq: int, causal: bool = True) -> list:
    """The attention section's runs, every one checked by the API's rules before any starts (the
    demo's heads are fixed, so a heads rule is the --world-size's fault)."""
    from tokenloom.jobs.attention import AttentionRun

    runs = [AttentionRun(strategy=strategy, seq=seq, heads=8, kv_heads=2, head_dim=64, causal=causal,
                         dtype="fp32", check=True, iters=2) for strategy in STRATEGIES]
    for cfg in runs:
        cfg.validate(world_size, flags={"heads": "--world-size", "kv_heads": "--world-size"})
    return runs


def _run(args: argparse.Namespace) -> int:
    _demo_runs(args.world_size, args.seq)
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
    print(file=out)
    ok &= tokenweave_section(out, world_size=2)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s", file=out)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a tour on CPU: SP attention on local ranks, MoE placement, "
                       "simulated 8xH100", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=arg_int(1, max(DEMO_WORLD_SIZES)), choices=DEMO_WORLD_SIZES, default=2,
                   help="local CPU ranks for the attention run: 1, 2, 4 or 8 (default 2)")
    p.add_argument("--seq", type=arg_int(2, MAX_DEMO_SEQ), default=2048,
                   help=f"global sequence length for attention, a multiple of 2 * world size, at most "
                        f"{MAX_DEMO_SEQ} (default 2048)")
    p.set_defaults(func=_run)
