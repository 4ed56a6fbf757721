"""TokenWeave benchmarks: measured on local gloo ranks, and simulated on 8xH100.

1. ``--local``: a tensor-parallel stack on 2 forked CPU ranks (gloo, one thread each), per-layer
   median time of the baseline, of TokenWeave, and of TokenWeave with every communication waited
   on at once (the same two pieces and fused ops, no overlap), measured side by side; ratios
   against the baseline. Two shared cores leave overlap little room: read it as a check that the
   schedule costs nothing, not as the GPU speedup.
2. ``--sim``: the simulated table for 1K-64K tokens, TP8 on h100-sxm, four models (markdown).

    python benchmarks/bench_tokenweave.py            # both
    python benchmarks/bench_tokenweave.py --sim      # the simulated table only (~1 s)
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = (  # (label, hidden, heads, kv_heads, ffn, experts, tokens)
    ("dense h256 f704", 256, 8, 2, 704, 0, 1024),
    ("dense h512 f1408", 512, 8, 2, 1408, 0, 2048),
    ("MoE h256 8x f352 top-2", 256, 8, 2, 352, 8, 2048),
)
LAYERS = 4


def _no_overlap(steps):
    from tokenloom.parallel.tokenweave_schedule import Step

    out = []
    for s in steps:
        if s.kind == "wait":
            continue
        out.append(s)
        if s.kind == "post":
            out.append(Step("wait", s.layer, s.piece))
    return out


def _rank(rank: int, world: int, case: tuple, iters: int) -> dict:
    import torch

    from tokenloom.comm.communicator import Communicator
    from tokenloom.parallel.tokenweave_layer import Pieces, TPStack, plan_for
    from tokenloom.parallel.tokenweave_model import LayerConfig, make_weights, shard_weights
    from tokenloom.parallel.tokenweave_schedule import build_steps

    _, hidden, heads, kv, ffn, experts, tokens = case
    cfg = LayerConfig(hidden, heads, kv, ffn, experts, 2 if experts else 0)
    full = make_weights(cfg, LAYERS, seed=0)
    stack = TPStack(cfg, shard_weights(full, cfg, rank, world, torch.float32, torch.device("cpu")), Communicator())
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    plan = plan_for(cfg, world, tokens)
    pieces = Pieces.from_plan(plan)
    tw_steps = build_steps(LAYERS, len(pieces.ranges), True)
    runs = {"baseline": lambda: stack.run(x, "baseline"),
            "tokenweave": lambda: stack.run(x, "tokenweave", pieces, tw_steps),
            "no overlap": lambda: stack.run(x, "tokenweave", pieces, _no_overlap(tw_steps))}
    times: dict[str, list] = {k: [] for k in runs}
    for it in range(iters + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if it:
                times[name].append((time.perf_counter() - t0) * 1e3 / LAYERS)
    return {"plan": f"{plan.mode} {'+'.join(str(e - s) for s, e in plan.pieces)}",
            **{k: statistics.median(v) for k, v in times.items()}}


def local_table(iters: int) -> None:
    from tokenloom.comm.launch.local import spawn_ranks

    print(f"2 gloo ranks on this machine, {LAYERS} layers, fp32, ms per layer (slowest rank, median of {iters}):")
    print("| layer | tokens | plan | baseline | TokenWeave | no overlap | TokenWeave / baseline |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        res = spawn_ranks(2, _rank, case, iters, timeout=900)
        worst = {k: max(r[k] for r in res) for k in ("baseline", "tokenweave", "no overlap")}
        print(f"| {case[0]} | {case[-1]} | {res[0]['plan']} | {worst['baseline']:.1f} | {worst['tokenweave']:.1f} | "
              f"{worst['no overlap']:.1f} | {worst['tokenweave'] / worst['baseline']:.2f} |")


def sim_table() -> None:
    from tokenloom.simulator.hardware import make_cluster
    from tokenloom.simulator.tokenweave import MODELS, model_shape, simulate_tokenweave

    cluster = make_cluster("h100-sxm", 8)
    print("Simulated, TP8 on h100-sxm, bf16, ms per layer over the model's layers "
          "(tokenloom simulate tokenweave --hardware h100-sxm --tp 8 --tokens T --model M):")
    print("| model | tokens | plan | baseline | TokenWeave | baseline, free comm | no-comm | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        layer, layers = model_shape(model, 8)
        for k in (1, 2, 4, 8, 16, 32, 64):
            r = simulate_tokenweave(cluster, layer, k * 1024, num_layers=layers, model=model).summary()
            sp = r["split"]
            plan = f"split at {sp['cut']}" if sp["mode"] == "split" else sp["mode"]
            print(f"| {model} | {k}K | {plan} | {r['baseline_ms']:.3f} | {r['tokenweave_ms']:.3f} | "
                  f"{r['no_comm_norm_ms']:.3f} | {r['no_comm_ms']:.3f} | {r['speedup']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true", help="only the measured 2-rank table")
    p.add_argument("--sim", action="store_true", help="only the simulated table")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per mode (after one warm-up)")
    args = p.parse_args()
    both = not (args.local or args.sim)
    if args.local or both:
        local_table(args.iters)
        print()
    if args.sim or both:
        sim_table()


if __name__ == "__main__":
    main()
