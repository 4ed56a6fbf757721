"""``tokenloom simulate validate``: the calibration set (published primitive measurements) against
what the simulator predicts for each, with the relative error and a summary.

Rows live in ``simulator/data/calibration.json`` (one citation each; docs/calibration.md). Kinds:

- ``collective``: an NCCL-tests bus bandwidth on one node (:mod:`.collectives`); ``hardware``
  ``"pcie-gen4"`` is a generic PCIe Gen4 box with the row's ``gpus_per_switch`` and ``p2p_via``;
- ``p2p_copy``: a peer-to-peer copy bandwidth, one or both directions (:mod:`.collectives`);
- ``collective_latency``: the time of one small NCCL-tests call in microseconds (:mod:`.collectives`),
  what the per-message latencies are calibrated to;
- ``gemm``: a bf16 GEMM's TFLOP/s, priced as TokenWeave's layers price theirs;
- ``attention``: a single-GPU attention kernel's TFLOP/s, priced by the engine's own cost model
  (:meth:`CostModel.compute_s` on one whole-sequence block), FLOPs counted the FlashAttention way;
- ``moe_dispatch``: DeepEP's bottleneck bandwidths against the rate of the bounding link (NVLink
  inside a node, the NIC across nodes), the rate :mod:`.moe` prices dispatch with.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from tokenloom.parallel.schedule import Block, Buf, Compute
from tokenloom.simulator import collectives
from tokenloom.simulator.cost import BWD_FLOP_FACTOR, AttentionShape, CostModel
from tokenloom.simulator.hardware import CATALOG, Cluster, NodeSpec, pcie_box

CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.json"
GOAL = 0.15  # issue 20: every calibration row within +-15%


def load_rows(path: Path = CALIBRATION_FILE) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["rows"]


def attention_tflops(row: dict) -> float:
    """TFLOP/s of one attention call of the row's shape on one GPU of the row's hardware."""
    seq, batch, heads, d = row["seq"], row["batch"], row["heads"], row["head_dim"]
    backward, causal = row["pass"] == "bwd", bool(row["causal"])
    node = row_node(row)
    assert node is not None, row["id"]
    cost = CostModel(AttentionShape(seq, heads, d, batch=batch), Cluster(node, 1), "contiguous")
    q = Buf("qg" if backward else "q", 0, (0,))
    op = Compute(q, Buf("kv", 0, (0,)), (Block((0,), (0,), causal),), Buf("dq" if backward else "out", 0, (0,), at=0))
    flops = 4.0 * batch * seq * seq * heads * d * (0.5 if causal else 1.0) * (BWD_FLOP_FACTOR if backward else 1.0)
    return flops / cost.compute_s(op) / 1e12


def h800() -> NodeSpec:
    """H800 SXM: the H100's SMs, HBM and NIC (CX7 400 Gb/s) with NVLink at 400 GB/s both ways (its
    datasheet), i.e. 200 GB/s per direction at the fitted H100 efficiency."""
    h100 = CATALOG["h100-sxm"]
    return replace(h100, name="h800-sxm", link=replace(h100.link, bw=200e9))


def a5000() -> NodeSpec:
    """RTX A5000: the A10's die (GA102) with 64 of its 72 SMs at the same 1695 MHz boost, so
    111.1 TFLOP/s dense (datasheet: 222.2 with sparsity) and the A10's efficiencies: the rows that
    calibrate the A10's attention curve (docs/calibration.md)."""
    a10 = CATALOG["a10-pcie"]
    return replace(a10, name="rtx-a5000", device=replace(a10.device, name="rtx-a5000", sms=64, flops=111.1e12))


def row_node(row: dict) -> NodeSpec | None:
    """The node a row was measured on: a catalog entry, the H800, or a generic PCIe Gen4 box built
    from the row's stated topology (``gpus``, ``gpus_per_switch``, ``p2p_via``)."""
    name = row.get("hardware")
    if name == "h800":
        return h800()
    if name == "pcie-gen4":
        return pcie_box(row["gpus"], row["gpus_per_switch"], row["p2p_via"])
    if name == "rtx-a5000":
        return a5000()
    return CATALOG.get(name)


def moe_bottleneck_gbs(row: dict) -> float:
    """DeepEP's 'bottleneck bandwidth' at a large batch is the rate of the link that bounds it:
    NVLink inside a node (EP 8), the NIC across nodes (:mod:`.moe` prices by the busiest NIC)."""
    node = h800() if row["hardware"] == "h800" else CATALOG[row["hardware"]]
    return (node.link.rate if row["ep"] <= node.gpus_per_node else node.nic.rate) / 1e9


def predict(row: dict) -> float | None:
    """The simulator's number for ``row`` in the row's unit; None where it has no model."""
    kind = row["kind"]
    if kind == "attention":
        return attention_tflops(row)
    if kind == "moe_dispatch":
        return moe_bottleneck_gbs(row)
    node = row_node(row)
    if node is None:
        return None
    if kind == "collective_latency":
        return collectives.op_time(node, row["op"], row["bytes"], row["gpus"], row["algo"]) * 1e6
    if kind == "collective":
        return collectives.busbw(node, row["op"], row["bytes"], row["gpus"], row["algo"]) / 1e9
    if kind == "gemm":  # the GEMM model TokenWeave's layers are priced with
        from tokenloom.simulator.gemm import TIMED_CALL_S, gemm_seconds

        call = TIMED_CALL_S if row.get("timed") == "one call" else None  # events around one call
        seconds = gemm_seconds(node.device, row["m"], row["n"], row["k"], call_s=call)
        return 2.0 * row["m"] * row["n"] * row["k"] / seconds / 1e12
    if kind == "p2p_copy":
        return collectives.p2p_copy_bw(node, row["bytes"], row["both_directions"]) / 1e9
    raise ValueError(f"calibration row {row.get('id')}: unknown kind {kind!r}")


def validate(rows: list[dict] | None = None) -> dict:
    """Every row with predicted, published and relative error; summary over the priced rows."""
    out = []
    for row in rows if rows is not None else load_rows():
        got = predict(row)
        err = None if got is None else got / row["published"] - 1.0
        out.append({"id": row["id"], "kind": row["kind"], "hardware": row["hardware"], "unit": row["unit"],
                    "published": row["published"], "predicted": got, "rel_error": err, "source": row["source"]})
    errors = [abs(r["rel_error"]) for r in out if r["rel_error"] is not None]
    worst = max((r for r in out if r["rel_error"] is not None), key=lambda r: abs(r["rel_error"]), default=None)
    summary = {"rows": len(out), "priced": len(errors), "not_modelled": len(out) - len(errors),
               "within_goal": sum(e <= GOAL for e in errors), "goal": GOAL,
               "worst_abs_error": max(errors, default=0.0), "worst_id": worst["id"] if worst else None,
               "median_abs_error": statistics.median(errors) if errors else 0.0}
    return {"summary": summary, "results": out}


def format_report(report: dict) -> str:
    lines = [f"{'row':<34} {'unit':<16} {'published':>10} {'predicted':>10} {'error':>8}"]
    for r in report["results"]:
        if r["predicted"] is None:
            lines.append(f"{r['id']:<34} {r['unit']:<16} {r['published']:>10.1f} {'-':>10} {'not modelled':>8}")
            continue
        flag = "" if abs(r["rel_error"]) <= GOAL else "  off"
        lines.append(f"{r['id']:<34} {r['unit']:<16} {r['published']:>10.1f} {r['predicted']:>10.1f} "
                     f"{r['rel_error']:>+8.1%}{flag}")
    s = report["summary"]
    lines.append(f"{s['priced']} rows priced ({s['not_modelled']} not modelled): worst |error| "
                 f"{s['worst_abs_error']:.1%} ({s['worst_id']}), median {s['median_abs_error']:.1%}, "
                 f"{s['within_goal']}/{s['priced']} within +-{s['goal']:.0%}")
    return "\n".join(lines)
