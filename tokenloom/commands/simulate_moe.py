"""``tokenloom simulate moe``: MoE dispatch and combine time per layer under a placement plan."""

from __future__ import annotations

import argparse
import json

from tokenloom.commands.args import arg_int


def moe_prices(args: argparse.Namespace, plan, trace) -> tuple[dict, str]:
    """Dispatch/combine time per layer of ``plan`` (and EPLB's, greedy's) on ``--hardware`` with
    ``--nodes``: ``(prices, cluster description)``. Shared by ``simulate moe`` and ``evaluate``."""
    from tokenloom.simulator.hardware import make_cluster
    from tokenloom.simulator.moe import price_plan

    nodes = args.nodes or max(1, plan.num_gpus // plan.gpus_per_node)
    cluster = make_cluster(args.hardware, plan.num_gpus, nodes, args.hardware_file)
    return price_plan(plan, trace, cluster, args.hidden), cluster.describe()


def _moe(args: argparse.Namespace) -> int:
    from tokenloom.placement import load_plan, load_trace
    from tokenloom.simulator.moe import format_prices

    plan = load_plan(args.plan, "--plan")
    trace = load_trace(args.trace, "--trace")
    prices, describe = moe_prices(args, plan, trace)
    if args.json:
        print(json.dumps({"hardware": describe, "hidden": args.hidden, "prices": prices}, allow_nan=False))
    else:
        print(format_prices(prices, describe, args.hidden))
    return 0


def add_cluster_flags(p: argparse.ArgumentParser, hardware_default: str | None = "h100-sxm") -> None:
    """--hardware, --hardware-file, --nodes, --hidden (``hardware_default`` None: pricing is optional)."""
    what = "catalog name (default h100-sxm)" if hardware_default else \
        "also price MoE dispatch/combine per layer on this catalog hardware (e.g. h100-sxm), beside EPLB and greedy"
    p.add_argument("--hardware", default=hardware_default, metavar="NAME", help=what)
    p.add_argument("--hardware-file", default=None, metavar="FILE", help="JSON adding or overriding catalog entries")
    p.add_argument("--nodes", type=arg_int(1, 1 << 20), default=None, metavar="K",
                   help="nodes of the cluster (default: the plan's GPUs over its GPUs per node)")
    p.add_argument("--hidden", type=arg_int(1, 1 << 20), default=7168, metavar="H",
                   help="hidden size of a token (default 7168, DeepSeek-V3)")


def add_moe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="MoE dispatch/combine time per layer for a placement plan, beside EPLB and greedy",
                       description="Price DeepEP-style dispatch (FP8) and combine (BF16) of every MoE layer of a "
                       "raw trace under PLAN on a cluster: one RDMA message per remote node holding a chosen "
                       "replica, the busiest NIC sets the time; EPLB's and greedy's plans on the same cluster "
                       "beside it (model: simulator/moe.py).")
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="plan from 'tokenloom plan'")
    p.add_argument("--trace", required=True, metavar="FILE", help="raw trace (.npz with topk_ids)")
    add_cluster_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_moe)
