"""``tokenloom evaluate``: metrics of any plan on any trace (e.g. a held-out one), against the baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenloom.commands.plan import add_bandwidth_flags

_EPILOG = """\
Metrics: per-layer max/mean GPU load (each expert's tokens split evenly over its replicas),
tokens crossing GPUs and nodes between consecutive layers (needs transitions in the trace), and
an estimated all-to-all time from the plan's link bandwidths (override with the flags below).
The same numbers for contiguous, round_robin and greedy plans on the same cluster are shown
beside the plan's.

example:
  tokenloom evaluate --plan plan.json --trace heldout.npz --png placement.png
"""


def _summary(metrics) -> dict:
    return {
        "max_mean_load": metrics.max_mean_load,
        "worst_max_mean_load": max(metrics.max_mean_load),
        "cross_gpu_tokens": metrics.cross_gpu_tokens,
        "cross_node_tokens": metrics.cross_node_tokens,
        "all_to_all_seconds": metrics.all_to_all_seconds,
    }


def _evaluate(args: argparse.Namespace) -> int:
    from tokenloom.placement import baseline_metrics, evaluate_plan, load_plan, load_trace

    if args.png and Path(args.png).suffix.lower() != ".png":
        raise ValueError(f"png: output file must end in .png, got {args.png!r}")
    plan = load_plan(args.plan)
    trace = load_trace(args.trace)
    metrics = evaluate_plan(plan, trace, intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    baselines = baseline_metrics(plan, trace)
    if args.png:
        from tokenloom.placement.plot import draw_png

        draw_png(args.png, plan, trace, metrics, baselines)
    result = {"plan": str(args.plan), "trace": str(args.trace), "method": plan.method, **_summary(metrics),
              "cross_gpu_per_boundary": metrics.cross_gpu_per_boundary,
              "cross_node_per_boundary": metrics.cross_node_per_boundary,
              "baselines": {name: _summary(m) for name, m in baselines.items()}}
    if args.png:
        result["png"] = str(args.png)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'method':<12} {'worst max/mean':>14} {'cross-GPU tok':>14} {'cross-node tok':>14} {'all-to-all s':>12}")
    for name, m in [(f"{plan.method} (plan)", metrics)] + list(baselines.items()):
        traffic = (f"{m.cross_gpu_tokens:>14.0f} {m.cross_node_tokens:>14.0f} {m.all_to_all_seconds:>12.3g}"
                   if m.cross_gpu_tokens is not None else f"{'n/a':>14} {'n/a':>14} {'n/a':>12}")
        print(f"{name:<12} {max(m.max_mean_load):>14.4f} {traffic}")
    if args.png:
        print(f"wrote {args.png}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a placement plan on a trace (balance, traffic, all-to-all time)",
                       description="Score a placement plan on a routing trace, beside the baseline plans.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan JSON written by `tokenloom plan`")
    p.add_argument("--trace", required=True, help="trace file (.npz raw or aggregated, or .json aggregated)")
    add_bandwidth_flags(p, defaults=False)
    p.add_argument("--png", default=None, help="also draw the GPU load heatmap and the traffic comparison here")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_evaluate)
