"""Stage 2 of the ``expert`` planner (expert_planner.py): place each layer's replicas to cut
traffic between consecutive layers.

Objective: ``sum_l sum_{g,h} W[g, h] * traffic_l[g, h]`` with ``traffic_l = A_l.T @ F_l @ A_{l+1}``
(metrics.py: ``A_l[e, g]`` = share of expert e's replicas on GPU g, ``F_l`` the (E, E)
transitions) and ``W`` the link cost (0 same GPU, 1 inside a node, intra/inter bandwidth ratio
across nodes). Every layer keeps its replica counts and its busiest GPU at or below a cap
(stage 1's max load, so the balance is never given up).

With the neighbouring layers fixed, a layer's cost is linear in its assignment ``x[e, g]``, so:

- ``exact_chain``: tiny problems (few placements per layer) enumerate every placement that meets
  the cap and run a Viterbi pass over the layer chain: the proven optimum of the joint model.
- otherwise ``sweep``: a forward pass then back-and-forth sweeps; each layer takes the best
  permutation of its GPUs' contents (an assignment problem, ``linear_sum_assignment``; loads are
  unchanged), then swap descent under the cap (with escapes through a briefly loosened cap, see
  :func:`tokenloom.placement.gpu_swaps.relaxed_descent`), then, for small layers only
  (``MAX_MILP_VARS``), the capped generalised-assignment MILP warm-started from there. A layer changes only if its cost drops.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pulp
from scipy.optimize import linear_sum_assignment

from tokenloom.placement.balance import assignment_matrix, row_from_assignment
from tokenloom.placement.gpu_swaps import relaxed_descent
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.solver import FEASIBLE, OPTIMAL, binary_matrix, read_binary_matrix, solve

MAX_EXACT_STATES = 3000  # placements per layer for the exact chain model
MAX_MILP_VARS = 1024  # the per-layer MILP runs only below this many x[e, g] (HiGHS is slow beyond)
MAX_MILP_SECONDS = 2.0  # per layer and sweep
MAX_SWEEPS = 8


@dataclass(frozen=True)
class TrafficResult:
    """Stage 2 outcome: the rows, weighted cost before/after, how and how well it was solved."""

    rows: np.ndarray
    start_cost: float
    cost: float
    method: str
    status: str
    seconds: float


def weighted_cost(rows: np.ndarray, transitions: np.ndarray, problem: PlacementProblem) -> float:
    """Objective value of ``rows`` (L, num_slots) on (L-1, E, E) transitions."""
    weights, num_experts = problem.link_weights(), transitions.shape[1]
    fracs = [_fractions(r, num_experts, problem.num_gpus) for r in rows]
    return float(sum((fracs[l].T @ transitions[l] @ fracs[l + 1] * weights).sum() for l in range(len(rows) - 1)))


def _fractions(row: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    held = assignment_matrix(row, num_experts, num_gpus).astype(float)
    return held / held.sum(axis=1, keepdims=True)


def place_across_layers(
    rows: np.ndarray, loads: np.ndarray, caps: np.ndarray, transitions: np.ndarray,
    problem: PlacementProblem, deadline: float, progress=None,
) -> TrafficResult:
    """Re-place ``rows`` (L, num_slots) to cut cross-layer traffic; every layer keeps max load <= caps[l]."""
    start = time.perf_counter()
    start_cost = weighted_cost(rows, transitions, problem)
    exact = _exact_states(rows, loads, caps, problem)
    if exact is not None:
        new_rows = _viterbi(exact, transitions, problem)
        method, status = "exact_chain", OPTIMAL
    else:
        new_rows = _sweeps(rows.copy(), loads, caps, transitions, problem, deadline, progress)
        method, status = "sweep", FEASIBLE
    cost = weighted_cost(new_rows, transitions, problem)
    if cost > start_cost:  # cannot happen (every step is monotone); guard the invariant anyway
        new_rows, cost = rows, start_cost
    return TrafficResult(new_rows, start_cost, cost, method, status, time.perf_counter() - start)


# ----------------------------------------------------------------------------- exact chain model
def _exact_states(rows, loads, caps, problem) -> list[np.ndarray] | None:
    """Per layer, every placement (as (n, E, G) fractions) with max load <= cap; None if too many."""
    num_experts, num_gpus = loads.shape[1], problem.num_gpus
    cache: dict[tuple, np.ndarray | None] = {}
    states = []
    for l, row in enumerate(rows):
        counts = np.bincount(row, minlength=num_experts)
        key = tuple(counts)
        if key not in cache:
            cache[key] = _enumerate(counts, num_gpus, problem.slots_per_gpu)
        held = cache[key]
        if held is None:
            return None
        gpu_load = np.einsum("neg,e->ng", held, loads[l] / counts)
        keep = held[gpu_load.max(axis=1) <= caps[l] * (1 + 1e-9)]
        states.append(keep / counts[None, :, None])
    return states


def _enumerate(counts: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray | None:
    """All (n, E, G) 0/1 placements with these counts, full GPUs, no duplicates; None past the limit."""
    found: list[np.ndarray] = []
    held = np.zeros((counts.shape[0], num_gpus), dtype=np.int8)
    free = np.full(num_gpus, slots_per_gpu)

    def rec(e: int) -> bool:
        if e == counts.shape[0]:
            found.append(held.copy())
            return len(found) <= MAX_EXACT_STATES
        for gpus in itertools.combinations(np.flatnonzero(free > 0).tolist(), int(counts[e])):
            held[e, list(gpus)] = 1
            free[list(gpus)] -= 1
            ok = rec(e + 1)
            held[e, list(gpus)] = 0
            free[list(gpus)] += 1
            if not ok:
                return False
        return True

    if counts.shape[0] * num_gpus > 64 or not rec(0):
        return None
    return np.array(found)


def _viterbi(states: list[np.ndarray], transitions: np.ndarray, problem: PlacementProblem) -> np.ndarray:
    """Cheapest chain of one state per layer; cost(a, b) = sum W * (A_a.T F A_b)."""
    weights = problem.link_weights()
    best = np.zeros(len(states[0]))
    back = []
    for l in range(1, len(states)):
        prev, cur = states[l - 1], states[l]
        # N[a] = F.T @ A_a @ W  (E, G): cost(a, b) = <N[a], A_b>
        n_prev = np.einsum("fe,aeg,gh->afh", transitions[l - 1].T, prev, weights).reshape(len(prev), -1)
        total = best[:, None] + n_prev @ cur.reshape(len(cur), -1).T
        back.append(np.argmin(total, axis=0))
        best = total.min(axis=0)
    choice = [int(np.argmin(best))]
    for pointers in reversed(back):
        choice.append(int(pointers[choice[-1]]))
    choice.reverse()
    spg = problem.slots_per_gpu
    return np.stack([row_from_assignment((states[l][c] > 0).astype(np.int64), spg) for l, c in enumerate(choice)])


# ----------------------------------------------------------------------------- sweeps
def _layer_costs(l: int, fracs: list[np.ndarray], transitions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(E, G) traffic cost of one full replica set of expert e sitting on GPU g, neighbours fixed."""
    cost = np.zeros_like(fracs[l])
    if l > 0:  # tokens arriving from layer l-1: P_in[g', e] = (A_{l-1}.T F_{l-1})[g', e]
        cost += (fracs[l - 1].T @ transitions[l - 1]).T @ weights
    if l + 1 < len(fracs):  # tokens leaving to layer l+1: P_out[e, h] = (F_l A_{l+1})[e, h]
        cost += transitions[l] @ fracs[l + 1] @ weights.T
    return cost


def _sweeps(rows, loads, caps, transitions, problem, deadline, progress) -> np.ndarray:
    """Forward pass (each layer follows the one before), then backward/forward sweeps with both
    neighbours fixed, until a sweep changes nothing, ``MAX_SWEEPS`` or the deadline."""
    num_layers, num_experts = rows.shape[0], loads.shape[1]
    weights = problem.link_weights()
    fracs = [_fractions(r, num_experts, problem.num_gpus) for r in rows]
    for sweep in range(MAX_SWEEPS):
        if sweep == 0:
            layers = list(range(1, num_layers))
        else:
            layers = list(range(num_layers - 1, -1, -1)) if sweep % 2 else list(range(num_layers))
        changed = False
        for i, l in enumerate(layers):
            if time.perf_counter() >= deadline:
                return rows
            counts = np.bincount(rows[l], minlength=num_experts)
            cost = _layer_costs(l, fracs, transitions, weights) / counts[:, None]  # per replica
            milp_seconds = min(MAX_MILP_SECONDS, (deadline - time.perf_counter()) / (len(layers) - i + num_layers))
            new_row = _best_layer(rows[l], cost, loads[l] / counts, caps[l], problem, milp_seconds)
            if not np.array_equal(new_row, rows[l]):
                rows[l], changed = new_row, True
                fracs[l] = _fractions(new_row, num_experts, problem.num_gpus)
            if progress is not None and sweep == 0:
                progress.update(1)
        if sweep > 0 and not changed:
            break
    return rows


def _best_layer(row, cost, shares, cap, problem, time_limit) -> np.ndarray:
    """Cheapest placement of one layer: GPU permutation (LAP), swap descent, then (small) the MILP."""
    held = assignment_matrix(row, cost.shape[0], problem.num_gpus)
    perm_cost = held.T @ cost  # [b, g]: contents of GPU b placed on GPU g
    src, dst = linear_sum_assignment(perm_cost)
    permuted = np.zeros_like(held)
    permuted[:, dst] = held[:, src]
    best = permuted if float((permuted * cost).sum()) < float((held * cost).sum()) - 1e-9 else held
    best = relaxed_descent(best, cost, shares, cap, problem.slots_per_gpu)
    if time_limit > 0.05 and cost.size <= MAX_MILP_VARS:
        milp = _capped_assignment(cost, shares, cap, best, problem, time_limit)
        if milp is not None and float((milp * cost).sum()) < float((best * cost).sum()) - 1e-9:
            best = milp
    return row_from_assignment(best, problem.slots_per_gpu)


def _capped_assignment(cost, shares, cap, start, problem, time_limit) -> np.ndarray | None:
    """min sum cost*x s.t. replica counts, full GPUs, GPU load <= cap; x binary; warm start ``start``."""
    num_experts, num_gpus = cost.shape
    counts = start.sum(axis=1)
    scale = float(cap) if cap > 0 else 1.0
    cost_scale = float(np.abs(cost).max()) or 1.0
    prob = pulp.LpProblem("traffic", pulp.LpMinimize)
    x = binary_matrix(prob, num_experts, num_gpus)
    prob += pulp.LpAffineExpression([(x[e][g], float(cost[e, g] / cost_scale)) for e in range(num_experts) for g in range(num_gpus)])
    for e in range(num_experts):
        prob += pulp.lpSum(x[e]) == int(counts[e])
    for g in range(num_gpus):
        prob += pulp.lpSum(x[e][g] for e in range(num_experts)) == problem.slots_per_gpu
        prob += pulp.LpAffineExpression([(x[e][g], float(shares[e] / scale)) for e in range(num_experts)]) <= 1 + 1e-9
    for e in range(num_experts):
        for g in range(num_gpus):
            x[e][g].setInitialValue(int(start[e, g]))
    result = solve(prob, time_limit, gap_rel=1e-3)
    if result.status not in (OPTIMAL, FEASIBLE):
        return None
    held = read_binary_matrix(x)
    ok = (held.sum(axis=1) == counts).all() and (held.sum(axis=0) == problem.slots_per_gpu).all()
    if not ok or (held * shares[:, None]).sum(axis=0).max() > cap * (1 + 1e-7):
        return None
    return held
