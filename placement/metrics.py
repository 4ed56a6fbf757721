"""Metrics of a placement on a trace: load balance, cross-GPU / cross-node tokens, all-to-all time.

Traffic model. A token copy at expert ``i`` of layer ``l`` moving to expert ``j`` of layer ``l+1``
(``transitions[l, i, j]`` copies) starts on one of ``i``'s replicas and lands on one of ``j``'s,
each chosen uniformly: the same even split of an expert's tokens over its replicas that the
load-balance metric assumes (EPLB). So with ``A[e, g]`` = fraction of expert ``e``'s replicas on
GPU ``g``, the GPU-to-GPU token matrix of a layer boundary is ``A_l.T @ transitions[l] @ A_{l+1}``.
A copy is a cross-GPU token when the GPUs differ and a cross-node token when the nodes differ
(cross-node tokens are also cross-GPU tokens).

All-to-all time (an estimate, bandwidth terms only): at each layer boundary every GPU sends and
receives over NVLink (inside its node) and its NIC (across nodes) at the same time; the boundary
takes as long as the busiest GPU's busiest direction on its slower-finishing link, and the
boundaries add up. The number covers one pass of the traced tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.trace import Trace


def replica_counts(phy_layer: np.ndarray, num_experts: int) -> np.ndarray:
    """(E,) int replicas per expert from one layer's ``phy2log`` row ``(num_slots,)``."""
    return np.bincount(phy_layer, minlength=num_experts)


def gpu_loads(loads: np.ndarray, phy_layer: np.ndarray, num_gpus: int) -> np.ndarray:
    """(G,) token copies per GPU for one layer: each expert's load split evenly over its replicas."""
    counts = replica_counts(phy_layer, loads.shape[0])
    share = loads / np.maximum(counts, 1)
    return share[phy_layer].reshape(num_gpus, -1).sum(axis=1)


def max_mean_ratio(gpu_load: np.ndarray) -> float:
    """Busiest GPU over the mean GPU; 1.0 for an idle layer."""
    mean = float(gpu_load.mean())
    return float(gpu_load.max()) / mean if mean > 0 else 1.0


def replica_fractions(phy_layer: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """(E, G) fraction of expert e's replicas that sit on GPU g (rows sum to 1)."""
    slots_per_gpu = phy_layer.shape[0] // num_gpus
    gpu_of_slot = np.arange(phy_layer.shape[0]) // slots_per_gpu
    frac = np.zeros((num_experts, num_gpus))
    np.add.at(frac, (phy_layer, gpu_of_slot), 1.0)
    return frac / np.maximum(frac.sum(axis=1, keepdims=True), 1.0)


def boundary_traffic(frac_cur: np.ndarray, flow: np.ndarray, frac_next: np.ndarray) -> np.ndarray:
    """(G, G) token copies from GPU g (layer l) to GPU h (layer l+1); flow is (E, E)."""
    return frac_cur.T @ flow @ frac_next


@dataclass
class PlanMetrics:
    """Per-layer balance and per-boundary traffic of one plan on one trace.

    ``max_mean_load``: (L,) busiest/mean GPU load per layer. Traffic lists have L-1 entries and
    the totals are their sums; all traffic fields are None when the trace has no transitions.
    """

    max_mean_load: list[float]
    max_gpu_load: list[float]
    routed_tokens: float | None = None
    cross_gpu_tokens: float | None = None
    cross_node_tokens: float | None = None
    cross_gpu_per_boundary: list[float] | None = None
    cross_node_per_boundary: list[float] | None = None
    all_to_all_seconds: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_layers(phy2log: np.ndarray, trace: Trace, problem: PlacementProblem) -> PlanMetrics:
    """Metrics of ``phy2log`` (L, num_slots) on ``trace`` under ``problem``'s cluster and links."""
    assert phy2log.shape == (trace.num_layers, problem.num_slots)
    num_gpus = problem.num_gpus
    loads_per_gpu = [gpu_loads(trace.loads[l], phy2log[l], num_gpus) for l in range(trace.num_layers)]
    metrics = PlanMetrics(
        max_mean_load=[max_mean_ratio(x) for x in loads_per_gpu],
        max_gpu_load=[float(x.max()) for x in loads_per_gpu],
    )
    if not trace.has_transitions:
        return metrics
    fracs = [replica_fractions(phy2log[l], trace.num_experts, num_gpus) for l in range(trace.num_layers)]
    node = problem.node_of_gpu()
    cross_node_mask = node[:, None] != node[None, :]
    cross_gpu, cross_node, seconds, routed = [], [], 0.0, 0.0
    for l in range(trace.num_layers - 1):
        traffic = boundary_traffic(fracs[l], trace.transitions[l], fracs[l + 1])
        routed += float(traffic.sum())
        cross_gpu.append(float(traffic.sum() - np.trace(traffic)))
        cross_node.append(float(traffic[cross_node_mask].sum()))
        seconds += boundary_seconds(traffic, cross_node_mask, problem)
    metrics.routed_tokens = routed
    metrics.cross_gpu_per_boundary = cross_gpu
    metrics.cross_node_per_boundary = cross_node
    metrics.cross_gpu_tokens = float(sum(cross_gpu))
    metrics.cross_node_tokens = float(sum(cross_node))
    metrics.all_to_all_seconds = seconds
    return metrics


def boundary_seconds(traffic: np.ndarray, cross_node_mask: np.ndarray, problem: PlacementProblem) -> float:
    """Estimated seconds to move one boundary's (G, G) token matrix (see module docstring)."""
    off_diag = traffic - np.diag(np.diag(traffic))
    inter = np.where(cross_node_mask, off_diag, 0.0)
    intra = off_diag - inter
    intra_tokens = np.maximum(intra.sum(axis=0), intra.sum(axis=1))
    inter_tokens = np.maximum(inter.sum(axis=0), inter.sum(axis=1))
    intra_s = intra_tokens * problem.token_bytes / (problem.intra_node_gbps * 1e9)
    inter_s = inter_tokens * problem.token_bytes / (problem.inter_node_gbps * 1e9)
    return float(np.maximum(intra_s, inter_s).max())
