"""``tokenloom plan``: place MoE experts on GPUs from a routing trace and write a plan JSON."""

from __future__ import annotations

import argparse
import json

from tokenloom.placement.problem import DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS

_EPILOG = """\
methods:
  ilp          (default) per layer a min-max load ILP (PuLP + HiGHS, CBC as fallback) warm-started
               from greedy, then layers re-placed to cut tokens crossing GPUs and nodes between
               consecutive layers without raising any layer's busiest GPU
  greedy       DeepSeek EPLB style: replicate the hottest experts, balanced packing by node then GPU
  round_robin  replica i on GPU i mod G (ignores loads)
  contiguous   GPU g holds a block of consecutive experts (Megatron's default; ignores loads)

Slots: experts + --redundant per layer, split evenly over the GPUs (slot s on GPU s // slots_per_gpu).
The default --redundant is the fewest extra slots that make that split even. Never two replicas of
one expert on one GPU. The plan JSON has DeepSeek EPLB / SGLang shapes: phy2log, log2phy, logcnt.

examples:
  tokenloom plan --trace deepseek.npz --gpus 32 --gpus-per-node 8 --redundant 32 --out plan.json
  tokenloom plan --trace new.npz --gpus 32 --gpus-per-node 8 --redundant 32 \\
      --previous plan.json --max-moves 4 --out plan2.json      # move <= 4 experts per layer
"""


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")


def _plan(args: argparse.Namespace) -> int:
    import sys

    from tokenloom.placement import load_plan, load_trace, plan_placement

    _positive("time_limit", args.time_limit)
    _positive("gpus", args.gpus)
    trace = load_trace(args.trace)
    previous = load_plan(args.previous) if args.previous else None
    plan = plan_placement(
        trace, args.gpus, gpus_per_node=args.gpus_per_node, num_redundant=args.redundant, method=args.method,
        time_limit=args.time_limit, intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
        previous=previous, max_moves=args.max_moves, progress=sys.stdout.isatty() and not args.json,
    )
    plan.save(args.out)
    metrics = plan.metrics
    summary = {
        "out": str(args.out), "method": plan.method, "seconds": plan.solver["seconds"],
        "status": plan.solver["status"], "num_gpus": plan.num_gpus, "gpus_per_node": plan.gpus_per_node,
        "num_slots": plan.num_slots, "max_mean_load": metrics["max_mean_load"],
        "cross_gpu_tokens": metrics["cross_gpu_tokens"], "cross_node_tokens": metrics["cross_node_tokens"],
        "all_to_all_seconds": metrics["all_to_all_seconds"],
    }
    if "moves" in plan.solver:
        summary["moves"] = plan.solver["moves"]
    if args.json:
        print(json.dumps(summary))
        return 0
    worst = max(metrics["max_mean_load"])
    print(f"{plan.method}: {plan.num_layers} layers, {plan.num_slots} slots on {plan.num_gpus} GPUs "
          f"({_nodes(plan.num_gpus // plan.gpus_per_node)}), {summary['status']} in {summary['seconds']:.1f} s")
    print(f"  worst max/mean GPU load {worst:.4f}")
    if metrics["cross_gpu_tokens"] is not None:
        print(f"  cross-GPU tokens {metrics['cross_gpu_tokens']:.0f}, cross-node tokens {metrics['cross_node_tokens']:.0f}")
    print(f"  wrote {args.out}")
    return 0


def add_bandwidth_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """--intra-node-gbps / --inter-node-gbps; ``defaults=False`` (evaluate) keeps the plan's own values."""
    for flag, value, where in (("--intra-node-gbps", DEFAULT_INTRA_NODE_GBPS, "inside a node, NVLink4"),
                               ("--inter-node-gbps", DEFAULT_INTER_NODE_GBPS, "across nodes, a 400 Gb/s NIC")):
        default = f"default {value:g}, {where}" if defaults else "default: the plan's"
        p.add_argument(flag, type=float, default=value if defaults else None,
                       help=f"GB/s per GPU and direction {where.split(',')[0]} ({default})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="place MoE experts on GPUs (balance load, cut cross-node routing)",
                       description="Plan where each MoE expert (and its redundant replicas) lives, from a routing trace.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="trace file: raw .npz (topk_ids, num_experts) or aggregated .npz/.json (loads[, transitions])")
    p.add_argument("--gpus", type=int, required=True, help="expert-parallel GPUs G")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (must divide --gpus; default min(G, 8))")
    p.add_argument("--redundant", type=int, default=None,
                   help="extra expert slots per layer (default: fewest that make experts+redundant divisible by G)")
    p.add_argument("--method", choices=("ilp", "greedy", "round_robin", "contiguous"), default="ilp",
                   help="planner (default ilp; see below)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for the whole planning run (default 60)")
    add_bandwidth_flags(p, defaults=True)
    p.add_argument("--previous", default=None, help="an existing plan JSON to re-plan from (needs --max-moves)")
    p.add_argument("--max-moves", type=int, default=None, help="with --previous: move at most this many experts per layer")
    p.add_argument("--out", required=True, help="plan JSON to write (atomically)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=_plan)
