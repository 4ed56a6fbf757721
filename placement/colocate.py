"""One layer of the ``dp`` planner: put experts chosen together in one layer on one node (DeepEP
node dedup). Layers are independent when tokens return to their DP rank; dp_planner.py runs them.

Objective (maximised): ``F = sum_{e<f} C[e, f] * sum_n p_e(n) p_f(n)`` with ``C`` the layer's
co-activation (tokens routed to both e and f) and ``p_e(n)`` the share of e's replicas on node n:
the expected co-activated pairs that land on one node under uniform replica choice. It is the
pairwise part of the exact metric (expected distinct nodes per token), cheap to update, and works
on aggregated traces that carry only ``C``; the plan is scored afterwards with the exact metric.

Search (node level, then GPUs), from each start row: the balanced greedy packing; with the
model's routing groups, whole groups on nodes paired by how tokens choose them (starts.py);
EPLB's hierarchical layout. A start above the node cap is repaired first.

1. swap polish (node_search.py): the gains of all replica swaps between two nodes are tabulated
   at once; the best and then up to ``BATCH`` next candidates are applied, each re-checked on the
   current state (gain recomputed exactly in O(1) from the updated affinities, node loads within
   the cap ``cap * gpus_per_node``), until no swap improves;
2. escapes (node_search.py): polish under a cap loosened by a few percent, then least-cost repair
   (swap load off the nodes above the cap at the least loss of F) and polish again; kept when F
   improves;
3. GPU packing inside each node (gpu_pack.py; largest first, then swaps), and a GPU-level
   least-cost repair if a GPU is still above ``cap``. If that fails the start row (which meets
   the cap) is kept.
4. choice: with the layer's raw ids, the result with the fewest expected distinct nodes on the
   planning tokens (the exact metric) among all starts' results and the first start; else the
   highest F.
5. exact polish (raw ids; exact.py), with the rest of the layer's time (the F search gets
   ``F_SHARE`` of it): node swaps ranked by the linearised exact metric, each verified exactly on
   the tokens it touches, then GPU packing; kept only when the exact metric drops.

Assignment rounds (every replica re-placed at once by ``linear_sum_assignment`` on the
linearised affinities, then repaired) were tried first: on the DeepSeek-V3-shaped router trace
they cost most of the time and ended in worse local optima than swaps alone (held-out messages
4.62 vs 4.59 per token at 5 s per layer), so the dp search does not use them.

Replicas: counts follow EPLB's rule (each redundant slot to the largest share); *where* each
replica goes is decided by the objective, at most one per GPU and ``gpus_per_node`` per node.
"""

from __future__ import annotations

import time

import numpy as np

from tokenloom.placement.exact import exact_cost, exact_polish
from tokenloom.placement.gpu_pack import gpu_repair, pack_gpus
from tokenloom.placement.node_search import block_descent, repair, row_state
from tokenloom.placement.problem import PlacementProblem

_EPS = 1e-9
F_SHARE = 0.6  # of a layer's time for the F search when raw ids allow the exact polish afterwards
PACK_SHARE = 0.2  # of the time left after the F search, kept for packing the polished nodes onto GPUs


def plan_layer(coact: np.ndarray, loads: np.ndarray, starts: list[np.ndarray], cap: float, problem: PlacementProblem,
               deadline: float, ids: np.ndarray | None = None) -> np.ndarray:
    """One layer's ``dp`` row (num_slots,), from feasible start rows (GPU loads <= ``cap``).

    ``coact`` (E, E) co-activation, ``loads`` (E,). Each start keeps its replica counts; only its
    slot -> node map is used. The result meets ``cap`` on every GPU, has no duplicate on a GPU and
    is never worse in F than the first start (which must itself be a valid row). With the
    layer's raw ``ids`` (T, K), every start is searched and the final choice among the results
    (and the first start) is by the exact metric on those tokens instead of F.
    """
    spn = problem.slots_per_gpu * problem.gpus_per_node
    node = np.arange(problem.num_slots) // spn
    final_deadline = deadline
    if ids is not None:  # the F search from every start, then the exact polish of the best
        now = time.perf_counter()
        deadline = now + F_SHARE * max(0.0, deadline - now)
    best_row, best_score = starts[0], None
    candidates = [starts[0]]
    for i, start_row in enumerate(starts):
        if time.perf_counter() >= deadline:
            break
        start = row_state(start_row, node, coact, loads, problem)
        if i == 0:
            best_score = start.score()
        if start.X.max() > problem.gpus_per_node:  # e.g. EPLB put more replicas on a node than it has GPUs
            continue
        node_cap = max(cap * problem.gpus_per_node, float(start.load.max()) if i == 0 else 0.0)
        if not repair(start, problem.gpus_per_node, node_cap):  # a structured start may overload a node
            continue
        found = block_descent(start, problem.gpus_per_node, node_cap, deadline)  # later starts get what is left
        if ids is None and found.score() <= best_score + _EPS:
            continue
        row = gpu_repair(pack_gpus(found, problem), found, problem, cap)
        if row is None:
            continue
        if ids is None:
            best_row, best_score = row, found.score()
        else:
            candidates.append(row)
    if ids is not None:
        costs = [exact_cost(row, ids, problem) for row in candidates]
        best_row = candidates[int(np.argmin(costs))]  # ties: the earlier candidate
        now = time.perf_counter()  # keep a share of what is left for the GPU packing after the polish
        polish_deadline = now + (1 - PACK_SHARE) * max(0.0, final_deadline - now)
        best_row = exact_polish_row(best_row, min(costs), ids, coact, loads, cap, problem, polish_deadline)
    return best_row


def exact_polish_row(row: np.ndarray, cost: float, ids: np.ndarray, coact: np.ndarray, loads: np.ndarray, cap: float,
                     problem: PlacementProblem, deadline: float) -> np.ndarray:
    """``row`` polished by node-level swaps on the exact metric (expected distinct nodes of the
    planning tokens ``ids``), then re-packed onto GPUs under ``cap``; ``row`` itself (exact cost
    ``cost``) when that is not better."""
    spn = problem.slots_per_gpu * problem.gpus_per_node
    state = row_state(row, np.arange(problem.num_slots) // spn, coact, loads, problem)
    node_cap = max(cap * problem.gpus_per_node, float(state.load.max()))
    if not exact_polish(state, ids, problem.gpus_per_node, node_cap, deadline):
        return row
    new = gpu_repair(pack_gpus(state, problem), state, problem, cap)
    if new is None or exact_cost(new, ids, problem) >= cost - _EPS:
        return row
    return new
