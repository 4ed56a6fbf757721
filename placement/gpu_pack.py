"""From nodes to GPUs in the ``dp`` search: pack each node's replicas onto its GPUs, and repair
GPUs still above the cap by GPU-level swaps at the least loss of the objective F."""

from __future__ import annotations

import numpy as np

from tokenloom.placement.balance import assignment_matrix, improve_by_swaps
from tokenloom.placement.gpu_swaps import GpuSwaps
from tokenloom.placement.node_search import NodeState
from tokenloom.placement.packing import SlotBins, pack_balanced
from tokenloom.placement.problem import PlacementProblem

_EPS = 1e-9


def pack_gpus(state: NodeState, problem: PlacementProblem) -> np.ndarray:
    """(num_slots,) phy2log row: each node's replicas packed onto its GPUs, largest first, then swaps."""
    gpn, spg = problem.gpus_per_node, problem.slots_per_gpu
    num_experts = state.coact.shape[0]
    row = np.empty(problem.num_slots, dtype=np.int64)
    sub = PlacementProblem(1, num_experts, gpn, gpn, spg * gpn - num_experts) if spg * gpn >= num_experts else None
    for n in range(state.num_nodes):
        units = np.flatnonzero(state.node == n)
        bins = SlotBins(gpn, spg, 1, num_experts)
        pack_balanced(state.expert[units], state.shares[state.expert[units]], bins)
        local = np.concatenate([bins.experts(g) for g in range(gpn)]).astype(np.int64)
        if sub is not None:
            local = _swaps_inside(local, state.shares, gpn, spg)
        row[n * gpn * spg:(n + 1) * gpn * spg] = local
    return row


def _swaps_inside(local: np.ndarray, shares: np.ndarray, gpn: int, spg: int) -> np.ndarray:
    """Balance one node's GPUs by swaps (``improve_by_swaps`` on the node's own replica list)."""
    experts = np.unique(local)
    index = np.searchsorted(experts, local)
    counts = np.bincount(index, minlength=experts.shape[0])
    problem = PlacementProblem(1, experts.shape[0], gpn, gpn, local.shape[0] - experts.shape[0])
    better = improve_by_swaps(shares[experts] * counts, index, problem)
    return experts[better]


def gpu_repair(row: np.ndarray, state: NodeState, problem: PlacementProblem, cap: float) -> np.ndarray | None:
    """Move load off GPUs above ``cap`` by GPU-level swaps at the least affinity loss; None if stuck."""
    num_experts = state.coact.shape[0]
    held = assignment_matrix(row, num_experts, problem.num_gpus)
    shares = state.shares
    if (held * shares[:, None]).sum(0).max() <= cap * (1 + _EPS):
        return row
    node_of = np.arange(problem.num_gpus) // problem.gpus_per_node
    cost = -(state.A / state.counts[:, None])[:, node_of]  # (E, G) linearised loss of F
    swaps = GpuSwaps(held, shares, problem.slots_per_gpu)
    if not swaps.repair(cost, cap):
        return None
    out = swaps.placement()
    return np.concatenate([np.flatnonzero(out[:, g]) for g in range(problem.num_gpus)]).astype(np.int64)
