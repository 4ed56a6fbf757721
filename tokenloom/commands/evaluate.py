"""``tokenloom evaluate``: metrics of any plan on any trace (e.g. a held-out one), against the baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenloom.commands.plan import add_bandwidth_flags
from tokenloom.commands.simulate_moe import add_cluster_flags
from tokenloom.common.errors import UsageError
from tokenloom.commands.args import arg_int

_EPILOG = """\
Metrics, with a raw trace (topk_ids), under the execution model (--token-home, --replica-choice;
default: the plan's): remote node messages per token and MoE layer (dispatch + combine, DeepEP
node dedup; exact expectation over homes and replica choices), the same per remote GPU, the
busiest NIC's messages per token, and per-layer max/mean GPU load under the replica rule.
Always: per-layer max/mean GPU load (each expert's tokens split evenly over its replicas),
tokens crossing GPUs and nodes between consecutive layers (needs transitions in the trace), and
an estimated all-to-all time from the plan's link bandwidths (override with the flags below).
The same numbers for contiguous, round_robin, greedy and DeepSeek EPLB (its own policy choice)
on the same cluster are shown beside the plan's.

With --hardware (and --nodes), a raw trace is also priced on that cluster: DeepEP-style dispatch
(FP8) and combine (BF16) time per MoE layer for the plan, EPLB's and greedy's, side by side (the
busiest NIC sets each layer's time; model: simulator/moe.py, as `tokenloom simulate moe`).

examples:
  tokenloom evaluate --plan plan.json --trace heldout.npz --png placement.png
  tokenloom evaluate --plan plan.json --trace heldout.npz --hardware h100-sxm --nodes 4
"""


def _summary(metrics, messages) -> dict:
    return {
        "max_mean_load": metrics.max_mean_load,
        "worst_max_mean_load": max(metrics.max_mean_load),
        "cross_gpu_tokens": metrics.cross_gpu_tokens,
        "cross_node_tokens": metrics.cross_node_tokens,
        "all_to_all_seconds": metrics.all_to_all_seconds,
        "messages": messages,
    }


def _evaluate(args: argparse.Namespace) -> int:
    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.placement import load_plan, load_trace
    from tokenloom.placement.evaluate import baseline_messages, baseline_metrics, evaluate_messages, evaluate_plan

    if args.png and Path(args.png).suffix.lower() != ".png":
        raise UsageError(f"--png: output file must end in .png, got {args.png!r}", field="--png")
    with OutputFiles(inputs=[args.plan, args.trace]) as out:
        out.claim("--png", args.png)
        plan = load_plan(args.plan, "--plan")
        trace = load_trace(args.trace, "--trace")
        metrics = evaluate_plan(plan, trace, intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
        token_home = args.token_home or plan.token_home
        replica_choice = args.replica_choice or plan.replica_choice
        messages = evaluate_messages(plan, trace, token_home=token_home, replica_choice=replica_choice)
        if args.expert_groups is not None and (plan.num_experts % args.expert_groups or (
                args.expert_groups > 1 and args.expert_groups % (plan.num_gpus // plan.gpus_per_node))):
            raise UsageError(f"--expert-groups: {args.expert_groups} must divide the {plan.num_experts} experts and be 1 "
                             f"or a multiple of the {plan.num_gpus // plan.gpus_per_node} nodes", field="--expert-groups")
        baselines = baseline_metrics(plan, trace, args.expert_groups)
        base_messages = baseline_messages(plan, trace, token_home, replica_choice, args.expert_groups)
        prices = describe = None
        if args.hardware is not None:
            from tokenloom.commands.simulate_moe import moe_prices

            prices, describe = moe_prices(args, plan, trace)
        if args.png:
            from tokenloom.placement.plot import draw_png

            out.write("--png", lambda path: draw_png(path, plan, trace, metrics, baselines))
        out.commit()
    result = {"plan": str(args.plan), "trace": str(args.trace), "method": plan.method, "token_home": token_home,
              "replica_choice": replica_choice, **_summary(metrics, messages),
              "cross_gpu_per_boundary": metrics.cross_gpu_per_boundary,
              "cross_node_per_boundary": metrics.cross_node_per_boundary,
              "baselines": {name: _summary(m, base_messages.get(name)) for name, m in baselines.items()}}
    if args.png:
        result["png"] = str(args.png)
    if prices is not None:
        result["moe_time"] = {"hardware": describe, "hidden": args.hidden, "prices": prices}
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    print(f"execution model: {token_home} token home, {replica_choice} replica choice")
    print(f"{'method':<14} {'worst max/mean':>14} {'msgs/token':>10} {'NIC/token':>9} {'cross-GPU tok':>14} "
          f"{'cross-node tok':>14} {'all-to-all s':>12}")
    for name, m in [(f"{plan.method} (plan)", metrics)] + list(baselines.items()):
        msg = messages if name.endswith("(plan)") else base_messages.get(name)
        sent = f"{msg['messages_per_token']:>10.4f} {msg['busiest_nic_per_token']:>9.3f}" if msg else f"{'n/a':>10} {'n/a':>9}"
        traffic = (f"{m.cross_gpu_tokens:>14.0f} {m.cross_node_tokens:>14.0f} {m.all_to_all_seconds:>12.3g}"
                   if m.cross_gpu_tokens is not None else f"{'n/a':>14} {'n/a':>14} {'n/a':>12}")
        print(f"{name:<14} {max(m.max_mean_load):>14.4f} {sent} {traffic}")
    if prices is not None:
        from tokenloom.simulator.moe import format_prices

        print()
        print(format_prices(prices, describe, args.hidden))
    if args.png:
        print(f"wrote {args.png}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a placement plan on a trace (balance, traffic, all-to-all time)",
                       description="Score a placement plan on a routing trace, beside the baseline plans.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan JSON written by `tokenloom plan`")
    p.add_argument("--trace", required=True, help="trace file (.npz raw or aggregated, or .json aggregated)")
    p.add_argument("--token-home", choices=("dp", "expert"), default=None, help="execution model (default: the plan's)")
    p.add_argument("--replica-choice", choices=("uniform", "local"), default=None, help="replica rule (default: the plan's)")
    p.add_argument("--expert-groups", type=arg_int(1, 1 << 20), default=None,
                   help="the model's routing groups handed to the EPLB baseline (default: the plan's, else 1)")
    add_bandwidth_flags(p, defaults=False)
    add_cluster_flags(p, hardware_default=None)
    p.add_argument("--png", default=None, help="also draw the GPU load heatmap and the traffic comparison here")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_evaluate)
