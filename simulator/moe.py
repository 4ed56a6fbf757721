"""MoE dispatch and combine priced under a placement plan (DeepEP-style, DP token homes).

Messages come from the placement package's exact counts (:func:`tokenloom.placement.dispatch.
message_metrics`): a token sends one RDMA message per *remote node* holding a chosen replica
(per-node deduplication; inside the node DeepEP forwards over NVLink), on rail-aligned NICs (one per
GPU), and combine mirrors dispatch. Per MoE layer the busiest NIC (each direction) carries
``busiest_nic`` token messages for dispatch and combine together; the layer's time is set by it:

- dispatch: ``nic.latency + busiest/2 * hidden * DISPATCH_BYTES / nic.rate``;
- combine: the same with ``COMBINE_BYTES`` (BF16 back);
- the NVLink forwarding inside a node is not the bottleneck at DeepEP's ratios (NVLink ~3-8x a NIC)
  and is not priced.

``DISPATCH_BYTES`` is FP8 plus one fp32 scale per 128 values (DeepSeek-V3's dispatch); the NIC rate
is the catalog's (``nic.bw * nic.efficiency``), checked against DeepEP's published bottleneck
bandwidths in the calibration set (docs/calibration.md).
"""

from __future__ import annotations

from tokenloom.common.errors import UsageError
from tokenloom.simulator.hardware import Cluster

DISPATCH_BYTES = 1 + 4 / 128  # per hidden element: FP8 value + fp32 scale per 128
COMBINE_BYTES = 2.0  # BF16


def price_messages(metrics: dict, cluster: Cluster, hidden: int, *, dispatch_bytes: float = DISPATCH_BYTES,
                   combine_bytes: float = COMBINE_BYTES) -> dict:
    """Per-layer dispatch and combine milliseconds from one plan's message metrics (a dict)."""
    nic = cluster.node.nic
    per_msg = hidden / nic.rate
    busiest = [float(b) for b in metrics["busiest_nic"]]
    dispatch = [(nic.latency_s + b / 2 * per_msg * dispatch_bytes) * 1e3 for b in busiest]
    combine = [(nic.latency_s + b / 2 * per_msg * combine_bytes) * 1e3 for b in busiest]
    return {"dispatch_ms": dispatch, "combine_ms": combine,
            "mean_dispatch_ms": sum(dispatch) / len(dispatch) if dispatch else 0.0,
            "mean_combine_ms": sum(combine) / len(combine) if combine else 0.0,
            "busiest_nic_messages": busiest}


def price_plan(plan, trace, cluster: Cluster, hidden: int, baselines: tuple[str, ...] = ("eplb", "greedy")) -> dict:
    """``{"plan": ..., "eplb": ..., "greedy": ...}`` priced on ``cluster`` (raw traces only)."""
    from tokenloom.placement.evaluate import baseline_messages, evaluate_messages

    if not trace.is_raw:
        raise UsageError("--trace: pricing dispatch needs a raw trace (topk_ids), not aggregated loads",
                         field="--trace")
    if cluster.num_gpus != plan.num_gpus or cluster.gpus_per_node != plan.gpus_per_node:
        raise UsageError(f"--nodes: the plan places experts on {plan.num_gpus} GPUs, {plan.gpus_per_node} per node; "
                         f"the cluster has {cluster.num_gpus} ({cluster.gpus_per_node} per node)", field="--nodes")
    out = {"plan": price_messages(evaluate_messages(plan, trace), cluster, hidden)}
    others = baseline_messages(plan, trace, plan.token_home, plan.replica_choice)
    for name in baselines:
        out[name] = price_messages(others[name], cluster, hidden)
    return out


def format_prices(prices: dict, describe: str, hidden: int) -> str:
    names = list(prices)
    lines = [f"MoE dispatch / combine per layer on {describe}, hidden {hidden} (FP8 dispatch, BF16 combine), ms",
             "layer " + "".join(f"{n + ' disp':>14}{n + ' comb':>14}" for n in names)]
    for layer in range(len(prices[names[0]]["dispatch_ms"])):
        cells = "".join(f"{prices[n]['dispatch_ms'][layer]:>14.3f}{prices[n]['combine_ms'][layer]:>14.3f}" for n in names)
        lines.append(f"{layer:>5} {cells}")
    cells = "".join(f"{prices[n]['mean_dispatch_ms']:>14.3f}{prices[n]['mean_combine_ms']:>14.3f}" for n in names)
    lines.append(f"{'mean':>5} {cells}")
    return "\n".join(lines)
