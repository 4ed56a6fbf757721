"""EPLB-style greedy placement and the load-oblivious baselines.

``greedy`` follows DeepSeek EPLB: give each redundant slot to the expert whose per-replica share
``load / count`` is largest (that rule minimises the largest share), then pack the replicas
largest-first onto the least-loaded bin; hierarchically (nodes first, then the GPUs of each node)
when there is more than one node. Unlike EPLB it never puts two replicas of one expert on one
GPU, and an expert never gets more replicas than there are GPUs.

Baselines know nothing about loads: their redundant slots hold experts ``0, 1, 2, ...`` again.
``contiguous`` fills slots in order (Megatron's default: GPU g holds a block of consecutive
experts); ``round_robin`` deals replica ``i`` to GPU ``i mod num_gpus``.
"""

from __future__ import annotations

import heapq

import numpy as np

from tokenloom.common.errors import UsageError

from tokenloom.placement.packing import SlotBins, expand_replicas, pack_balanced
from tokenloom.placement.problem import PlacementProblem


def eplb_replica_counts(loads: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """(E,) replicas per expert: one each, then each extra slot to the largest share (< num_gpus copies)."""
    num_experts = loads.shape[0]
    assert num_experts <= num_slots <= num_experts * num_gpus
    counts = np.ones(num_experts, dtype=np.int64)
    heap = [(-float(loads[e]), e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        while True:
            _, e = heapq.heappop(heap)
            if counts[e] < num_gpus:
                break
        counts[e] += 1
        if counts[e] < num_gpus:
            heapq.heappush(heap, (-float(loads[e]) / counts[e], e))
    return counts


def greedy_layer(loads: np.ndarray, problem: PlacementProblem, counts: np.ndarray | None = None) -> np.ndarray:
    """One layer's ``phy2log`` row (num_slots,) by EPLB-style replication and balanced packing."""
    if counts is None:
        counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
    experts, shares = expand_replicas(counts, loads)
    gpus = SlotBins(problem.num_gpus, problem.slots_per_gpu, 1, problem.num_experts)
    if problem.num_nodes == 1:
        pack_balanced(experts, shares, gpus)
        return _rows(gpus)
    nodes = SlotBins(problem.num_nodes, problem.slots_per_gpu * problem.gpus_per_node, problem.gpus_per_node, problem.num_experts)
    pack_balanced(experts, shares, nodes)
    for node in range(problem.num_nodes):
        local = SlotBins(problem.gpus_per_node, problem.slots_per_gpu, 1, problem.num_experts)
        node_experts = np.array([e for e, _ in nodes.items[node]], dtype=np.int64)
        node_shares = np.array([s for _, s in nodes.items[node]])
        pack_balanced(node_experts, node_shares, local)
        for i in range(problem.gpus_per_node):
            for expert, share in local.items[i]:
                gpus.add(node * problem.gpus_per_node + i, expert, share)
    return _rows(gpus)


def _rows(gpus: SlotBins) -> np.ndarray:
    return np.concatenate([gpus.experts(g) for g in range(gpus.num_bins)]).astype(np.int64)


def oblivious_replicas(problem: PlacementProblem) -> np.ndarray:
    """(num_slots,) the baselines' replica list: experts 0..E-1, then 0, 1, 2, ... again."""
    return np.arange(problem.num_slots) % problem.num_experts


def contiguous_layer(problem: PlacementProblem) -> np.ndarray:
    """Slot s holds expert s mod E; never a duplicate on a GPU because slots_per_gpu <= E."""
    return oblivious_replicas(problem)


def round_robin_layer(problem: PlacementProblem) -> np.ndarray:
    """Replica i goes to GPU i mod G (next GPU with room and without that expert if not)."""
    num_gpus = problem.num_gpus
    gpus = SlotBins(num_gpus, problem.slots_per_gpu, 1, problem.num_experts)
    for i, expert in enumerate(oblivious_replicas(problem)):
        start = i % num_gpus
        gpus.place(int(expert), 0.0, [(start + k) % num_gpus for k in range(num_gpus)])
    return _rows(gpus)


def baseline_plan(method: str, problem: PlacementProblem, loads: np.ndarray) -> np.ndarray:
    """(L, num_slots) ``phy2log`` for ``contiguous``, ``round_robin`` or ``greedy``; loads is (L, E)."""
    if method == "contiguous":
        row = contiguous_layer(problem)
        return np.tile(row, (problem.num_layers, 1))
    if method == "round_robin":
        row = round_robin_layer(problem)
        return np.tile(row, (problem.num_layers, 1))
    if method == "greedy":
        return np.stack([greedy_layer(loads[l], problem) for l in range(problem.num_layers)])
    raise UsageError(f"method: unknown {method!r}; valid: contiguous, round_robin, greedy, ilp")
