"""``tokenloom plan``: place MoE experts on GPUs from a routing trace and write a plan JSON."""

from __future__ import annotations

import argparse
import json
import time

from tokenloom.common.errors import UsageError
from tokenloom.commands.args import arg_float, arg_int

# The planner's defaults (tokenloom.placement.problem), repeated so --help does not load numpy.
DEFAULT_INTRA_NODE_GBPS = 450.0
DEFAULT_INTER_NODE_GBPS = 50.0

MAX_GPUS = 4096
WRITE_RESERVE = 0.1  # of --time-limit kept for the metrics and writing the plan

_EPILOG = """\
execution models (--token-home):
  dp           (default) tokens return to their data-parallel attention rank after every MoE
               layer (SGLang / vLLM with DeepEP): dispatch sends one message per remote node
               holding a chosen replica, combine mirrors it. The planner puts experts that are
               routed *together in one layer* on one node (co-activation), per layer.
  expert       tokens stay where the previous layer combined them (MoETuner / ExFlow): the
               planner cuts tokens crossing nodes between consecutive layers.
--replica-choice: uniform (a replica drawn uniformly; EPLB's load model) or local (prefer a
replica on the sender's GPU, then node: a locality-aware dispatch map).
--max-imbalance: cap on each layer's busiest GPU / mean. Default for dp: EPLB's own value on
that layer, EPLB run as the deployment would run it: hierarchical when the model's routing
groups (--expert-groups, DeepSeek-V3: 8) are a multiple of the nodes, else global (default: no
groups), so the plan is never less balanced than EPLB; the same for expert (never tighter than
the balance stage's optimum). --max-imbalance 1 keeps each layer at that optimum.
--holdout F (default 0.2 for raw traces): a seeded fraction of tokens is kept out of planning;
every message metric is reported on it beside the in-sample value.

methods:
  ilp          (default) dp: balanced greedy start, then node-level co-activation search
               (assignment rounds, least-cost repair, GPU packing, swap polish) under the cap;
               expert: per layer a min-max load ILP (PuLP + HiGHS) warm-started from greedy,
               then layers re-placed to cut tokens crossing GPUs and nodes between
               consecutive layers without raising any layer's busiest GPU above its cap
  greedy       DeepSeek EPLB style: replicate the hottest experts, balanced packing by node then GPU
  round_robin  replica i on GPU i mod G (ignores loads)
  contiguous   GPU g holds a block of consecutive experts (Megatron's default; ignores loads)

Slots: experts + --redundant per layer, split evenly over the GPUs (slot s on GPU s // slots_per_gpu).
The default --redundant is the fewest extra slots that make that split even. Never two replicas of
one expert on one GPU. The plan JSON has DeepSeek EPLB / SGLang shapes: phy2log, log2phy, logcnt.

examples:
  tokenloom plan --trace deepseek.npz --gpus 32 --gpus-per-node 8 --redundant 32 --expert-groups 8 --out plan.json
  tokenloom plan --trace deepseek.npz --gpus 32 --gpus-per-node 8 --redundant 32 --token-home expert --out plan.json
  tokenloom plan --trace new.npz --gpus 32 --gpus-per-node 8 --redundant 32 \\
      --previous plan.json --max-moves 4 --out plan2.json      # move <= 4 experts per layer
"""


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _plan(args: argparse.Namespace) -> int:
    start = time.perf_counter()  # before numpy, scipy and pulp load: --time-limit bounds them too
    import sys

    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.placement import load_plan, load_trace, plan_placement

    if (args.previous is None) != (args.max_moves is None):
        raise UsageError("--max-moves: give both --previous and --max-moves, or neither", field="--max-moves")
    with OutputFiles(inputs=[args.trace, args.previous]) as out:
        out.claim("--out", args.out)
        trace = load_trace(args.trace, "--trace")
        previous = load_plan(args.previous, "--previous") if args.previous else None
        holdout = args.holdout
        if holdout is None:
            holdout = 0.2 if trace.is_raw and (trace.num_tokens or 0) >= 10 else 0.0
        elif holdout > 0 and not trace.is_raw:
            raise UsageError("--holdout: needs a raw trace (topk_ids); give --holdout 0 for an aggregated trace",
                             field="--holdout")
        remaining = args.time_limit * (1 - WRITE_RESERVE) - (time.perf_counter() - start)
        if remaining <= 0:
            raise UsageError(f"--time-limit: {args.time_limit:g} s was used up loading the inputs; give more time",
                             field="--time-limit")
        plan = plan_placement(
            trace, args.gpus, gpus_per_node=args.gpus_per_node, num_redundant=args.redundant, method=args.method,
            time_limit=remaining, intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
            previous=previous, max_moves=args.max_moves, progress=sys.stdout.isatty() and not args.json,
            token_home=args.token_home, replica_choice=args.replica_choice, max_imbalance=args.max_imbalance,
            expert_groups=args.expert_groups, holdout=holdout, seed=args.seed, map_fn=_ray_map(args),
        )
        plan.solver["command_seconds"] = time.perf_counter() - start
        out.write("--out", plan.save)
        out.commit()
    metrics = plan.metrics
    summary = {
        "out": str(args.out), "method": plan.method, "seconds": time.perf_counter() - start,
        "status": plan.solver["status"], "num_gpus": plan.num_gpus, "gpus_per_node": plan.gpus_per_node,
        "num_slots": plan.num_slots, "token_home": plan.token_home, "replica_choice": plan.replica_choice,
        "max_mean_load": metrics["max_mean_load"],
        "cross_gpu_tokens": metrics["cross_gpu_tokens"], "cross_node_tokens": metrics["cross_node_tokens"],
        "all_to_all_seconds": metrics["all_to_all_seconds"],
        "messages": metrics.get("messages"), "heldout": metrics.get("heldout"),
    }
    if "moves" in plan.solver:
        summary["moves"] = plan.solver["moves"]
    if args.json:
        print(json.dumps(summary))
        return 0
    worst = max(metrics["max_mean_load"])
    print(f"{plan.method} ({plan.token_home} token home, {plan.replica_choice} replica choice): {plan.num_layers} layers, "
          f"{plan.num_slots} slots on {plan.num_gpus} GPUs ({_nodes(plan.num_gpus // plan.gpus_per_node)}), "
          f"{summary['status']} in {summary['seconds']:.1f} s")
    print(f"  worst max/mean GPU load {worst:.4f}")
    for name, block in (("in-sample", metrics.get("messages")), ("held-out", (metrics.get("heldout") or {}).get("messages"))):
        if block:
            print(f"  {name:<9} remote messages per token and layer {block['messages_per_token']:.4f} "
                  f"(busiest NIC {block['busiest_nic_per_token']:.3f} per token, {block['num_tokens']} tokens)")
    if metrics["cross_gpu_tokens"] is not None:
        print(f"  cross-layer: cross-GPU tokens {metrics['cross_gpu_tokens']:.0f}, cross-node tokens {metrics['cross_node_tokens']:.0f}")
    print(f"  wrote {args.out}")
    return 0


def _ray_map(args: argparse.Namespace):
    """``map_fn`` running dp layers as Ray tasks (tokenloom.comm.launch.ray.map_tasks), or None."""
    if not args.ray:
        return None
    try:
        from tokenloom.comm.launch.ray import map_tasks
    except ImportError as exc:
        raise UsageError(f"--ray: the Ray launcher is not available ({exc})", field="--ray") from None
    return lambda fn, items: map_tasks(fn, items, address=args.ray_address)


def add_bandwidth_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """--intra-node-gbps / --inter-node-gbps; ``defaults=False`` (evaluate) keeps the plan's own values."""
    for flag, value, where in (("--intra-node-gbps", DEFAULT_INTRA_NODE_GBPS, "inside a node, NVLink4"),
                               ("--inter-node-gbps", DEFAULT_INTER_NODE_GBPS, "across nodes, a 400 Gb/s NIC")):
        default = f"default {value:g}, {where}" if defaults else "default: the plan's"
        p.add_argument(flag, type=arg_float(0, 1e6, lo_open=True), default=value if defaults else None,
                       help=f"GB/s per GPU and direction {where.split(',')[0]} ({default})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="place MoE experts on GPUs (balance load, cut cross-node routing)",
                       description="Plan where each MoE expert (and its redundant replicas) lives, from a routing trace.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="trace file: raw .npz (topk_ids, num_experts) or aggregated .npz/.json (loads[, transitions])")
    p.add_argument("--gpus", type=arg_int(1, MAX_GPUS), required=True, help=f"expert-parallel GPUs G (<= {MAX_GPUS})")
    p.add_argument("--gpus-per-node", type=arg_int(1, MAX_GPUS), default=None, help="GPUs per node (must divide --gpus; default min(G, 8))")
    p.add_argument("--redundant", type=arg_int(0, 1 << 20), default=None,
                   help="extra expert slots per layer (default: fewest that make experts+redundant divisible by G)")
    p.add_argument("--method", choices=("ilp", "greedy", "round_robin", "contiguous"), default="ilp",
                   help="planner (default ilp; see below)")
    p.add_argument("--token-home", choices=("dp", "expert"), default="dp",
                   help="where a token lives between MoE layers (default dp; see below)")
    p.add_argument("--replica-choice", choices=("uniform", "local"), default="uniform",
                   help="how a token picks among an expert's replicas (default uniform; see below)")
    p.add_argument("--max-imbalance", type=arg_float(1, 1e6), default=None,
                   help="cap on each layer's busiest GPU / mean load (default: EPLB's on that layer for dp)")
    p.add_argument("--expert-groups", type=arg_int(1, 1 << 20), default=None,
                   help="the model's routing groups, handed to EPLB for the default cap (DeepSeek-V3: 8; default 1: none, EPLB global)")
    p.add_argument("--holdout", type=arg_float(0, 0.95), default=None,
                   help="fraction of tokens kept out of planning and scored separately (default 0.2 for raw traces)")
    p.add_argument("--seed", type=arg_int(0, 2**63 - 1), default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--time-limit", type=arg_float(0, 86400, lo_open=True), default=60.0,
                   help="seconds for the whole command, loading and writing included (default 60)")
    add_bandwidth_flags(p, defaults=True)
    p.add_argument("--previous", default=None, help="an existing plan JSON to re-plan from (needs --max-moves)")
    p.add_argument("--max-moves", type=arg_int(0, 1 << 20), default=None, help="with --previous: move at most this many experts per layer")
    p.add_argument("--ray", action="store_true", help="dp: solve the layers as Ray tasks (same result as serial)")
    p.add_argument("--ray-address", default=None, help="with --ray: an existing cluster (default: start a local one)")
    p.add_argument("--out", required=True, help="plan JSON to write (atomically)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=_plan)
