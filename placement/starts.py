"""Structured start rows for the ``dp`` search (beside the balanced packing and EPLB's layout)."""

from __future__ import annotations

import itertools

import numpy as np

from tokenloom.placement.problem import PlacementProblem


def group_start(ids: np.ndarray, counts: np.ndarray, num_groups: int | None, problem: PlacementProblem) -> np.ndarray | None:
    """A start row with whole routing groups on nodes, paired by how tokens choose them.

    Group-limited routing (DeepSeek-V3: a token keeps 4 of 8 contiguous expert groups) makes the
    *groups* a token uses co-occur. EPLB's hierarchical policy pairs groups on nodes by load;
    here the group -> node map is a local search (swap two groups between nodes) on the exact
    number of distinct nodes the planning tokens touch, from the contiguous map. Replicas go
    beside their primary while the node has room. Only the slot -> node map of the result is
    meaningful (the caller re-packs GPUs); the caller repairs node loads. None when the groups
    do not split evenly over more than one group per node.
    """
    num_experts, num_nodes = counts.shape[0], problem.num_nodes
    if not num_groups or num_experts % num_groups or num_groups % num_nodes or num_groups == num_nodes:
        return None
    group_tokens = ids // (num_experts // num_groups)  # (T, K) group of each routed expert
    assign = np.arange(num_groups) // (num_groups // num_nodes)

    def touched(a: np.ndarray) -> int:
        nodes = np.sort(a[group_tokens], axis=1)
        return int((np.diff(nodes, axis=1) != 0).sum())

    best = touched(assign)
    improved = True
    while improved:
        improved = False
        for g, h in itertools.combinations(range(num_groups), 2):
            if assign[g] == assign[h]:
                continue
            assign[g], assign[h] = assign[h], assign[g]
            value = touched(assign)
            if value < best:
                best, improved = value, True
            else:
                assign[g], assign[h] = assign[h], assign[g]
    return _row_from_nodes(assign[np.arange(num_experts) // (num_experts // num_groups)], counts, problem)


def _row_from_nodes(home: np.ndarray, counts: np.ndarray, problem: PlacementProblem) -> np.ndarray | None:
    """Units grouped by node: every expert's primary on ``home[e]``, extra replicas beside it while
    there is room (and at most one per GPU), else on the node with the most free slots."""
    spn, gpn = problem.slots_per_gpu * problem.gpus_per_node, problem.gpus_per_node
    members: list[list[int]] = [[] for _ in range(problem.num_nodes)]
    held = np.zeros((counts.shape[0], problem.num_nodes), dtype=np.int64)
    for e, n in enumerate(home):
        members[n].append(e)
        held[e, n] += 1
    if max(len(m) for m in members) > spn:
        return None
    for e in np.repeat(np.arange(counts.shape[0]), counts - 1):
        room = [spn - len(m) if held[e, n] < gpn else -1 for n, m in enumerate(members)]
        n = int(home[e]) if room[home[e]] > 0 else int(np.argmax(room))
        if room[n] <= 0:
            return None
        members[n].append(int(e))
        held[e, n] += 1
    return np.concatenate([np.array(m, dtype=np.int64) for m in members])
