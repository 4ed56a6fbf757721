"""The ``evaluate --png`` picture: per-GPU load heatmap of a plan, and its traffic against baselines."""

from __future__ import annotations

import os

import numpy as np

from tokenloom.common.files import atomic_write
from tokenloom.placement.metrics import PlanMetrics, gpu_loads
from tokenloom.placement.plan import Plan
from tokenloom.placement.trace import Trace


def draw_png(path: str | os.PathLike, plan: Plan, trace: Trace, metrics: PlanMetrics, baselines: dict[str, PlanMetrics]) -> None:
    """Write a PNG: left, GPU load / mean per layer (L, G); right, cross-GPU and cross-node tokens per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = np.stack([gpu_loads(trace.loads[l], plan.phy2log[l], plan.num_gpus) for l in range(plan.num_layers)])
    heat = heat / np.maximum(heat.mean(axis=1, keepdims=True), 1e-12)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
    left.set(xlabel="GPU", ylabel="layer", title=f"{plan.method}: GPU load / layer mean")
    fig.colorbar(image, ax=left)
    names = [plan.method] + list(baselines)
    rows = [metrics] + list(baselines.values())
    if metrics.cross_gpu_tokens is not None:
        x = np.arange(len(names))
        right.bar(x - 0.2, [m.cross_gpu_tokens for m in rows], 0.4, label="cross-GPU")
        right.bar(x + 0.2, [m.cross_node_tokens for m in rows], 0.4, label="cross-node")
        right.set_xticks(x, names)
        right.set(ylabel="tokens between consecutive layers", title="traffic")
        right.set_ylim(0, 1.25 * max(m.cross_gpu_tokens for m in rows))  # room for the legend
        right.legend(loc="upper right")
    else:
        right.text(0.5, 0.5, "trace has no transitions:\nno traffic to compare", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
