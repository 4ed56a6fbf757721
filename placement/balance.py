"""Stage 1 of the ILP planner: per layer, pack the replicas so the busiest GPU is as light as possible.

Model (one layer; replica counts ``c_e`` fixed by EPLB's rule, which minimises the largest share
``load_e / c_e``; each replica carries that share)::

    min t
    s.t. sum_g x[e, g] = c_e                 every expert gets its replicas
         sum_e x[e, g] = slots_per_gpu       every GPU is full
         sum_e share_e x[e, g] <= t          t is the busiest GPU's load
         t >= max(max_e share_e, total / G)  the lower-bound cut
         x binary                            (at most one replica of an expert per GPU)
         load_g >= load_{g+1}                symmetry breaking: GPUs are interchangeable here

The greedy packing, improved by swaps, is the MIP start, so a stopped search is never worse than
greedy; when that start already meets the lower bound the layer is proven optimal without a
solve, and when it is within ``SKIP_GAP`` of it the solve is skipped too (the start is kept with
status ``feasible`` and its gap: on hundreds of experts HiGHS rarely closes the last 0.1% within
the per-layer budget, and that budget is better spent on cross-layer traffic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pulp

from tokenloom.placement.metrics import gpu_loads
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.solver import FEASIBLE, OPTIMAL, binary_matrix, read_binary_matrix, solve

_REL_TOL = 1e-9
SKIP_GAP = 1e-3  # a start within 0.1% of the bound is kept without a solve (status feasible, gap recorded)


@dataclass(frozen=True)
class LayerBalance:
    """One layer's packing: ``row`` (num_slots,) phy2log, its max GPU load, the proven lower bound."""

    row: np.ndarray
    max_load: float
    bound: float
    status: str
    gap: float
    seconds: float


def load_lower_bound(loads: np.ndarray, counts: np.ndarray, num_gpus: int) -> float:
    """max(largest replica share, total / num_gpus): no packing of these replicas does better."""
    return float(max((loads / counts).max(), loads.sum() / num_gpus))


def layer_bounds(loads: np.ndarray, rows: np.ndarray, problem: PlacementProblem) -> list[float]:
    """Per layer of ``loads`` (L, E), the lower bound on the busiest GPU's load for the replica
    counts of ``rows`` (L, num_slots)."""
    return [
        load_lower_bound(loads[l], np.bincount(rows[l], minlength=problem.num_experts), problem.num_gpus)
        for l in range(loads.shape[0])
    ]


def balance_layer(
    loads: np.ndarray, counts: np.ndarray, warm_row: np.ndarray, problem: PlacementProblem, time_limit: float
) -> LayerBalance:
    """Min-max packing of one layer; ``warm_row`` (num_slots,) is a feasible start with these counts."""
    num_gpus = problem.num_gpus
    warm_row = improve_by_swaps(loads, warm_row, problem)
    warm_max = float(gpu_loads(loads, warm_row, num_gpus).max())
    bound = load_lower_bound(loads, counts, num_gpus)
    if _gap(warm_max, bound) <= SKIP_GAP or time_limit <= 0.01:
        status = OPTIMAL if warm_max <= bound * (1 + _REL_TOL) else FEASIBLE
        return LayerBalance(warm_row, warm_max, bound, status, _gap(warm_max, bound), 0.0)
    scale = loads.sum() / num_gpus  # keep coefficients near 1 for the solver's tolerances
    shares = loads / counts / scale
    prob, x, t = _model(shares, counts, problem, bound / scale)
    _set_start(x, t, _by_load(loads, warm_row, num_gpus), problem, warm_max / scale)
    result = solve(prob, time_limit)
    row = _row_from_x(x, problem) if result.status in (OPTIMAL, FEASIBLE) else None
    new_max = float(gpu_loads(loads, row, num_gpus).max()) if row is not None else np.inf
    if result.bound is not None:
        bound = max(bound, result.bound * scale)
    if new_max >= warm_max:  # never worse than the warm start
        row, new_max = warm_row, warm_max
    status = OPTIMAL if result.status == OPTIMAL or new_max <= bound * (1 + _REL_TOL) else FEASIBLE
    return LayerBalance(row, new_max, min(bound, new_max), status, _gap(new_max, bound), result.seconds)


def improve_by_swaps(loads: np.ndarray, row: np.ndarray, problem: PlacementProblem, max_steps: int = 2000) -> np.ndarray:
    """Swap local search: trade a replica of the busiest GPU for a lighter one elsewhere.

    Each step takes the swap that lowers max(load of the busiest GPU, load of the other GPU) the
    most, keeping slot counts, replica counts and the no-duplicate rule; stops when none helps.
    Returns a new (num_slots,) row whose max GPU load is <= the input's.
    """
    num_gpus, spg = problem.num_gpus, problem.slots_per_gpu
    counts = np.bincount(row, minlength=loads.shape[0])
    share = (loads / np.maximum(counts, 1))[row].reshape(num_gpus, spg)
    experts = row.reshape(num_gpus, spg).copy()
    held = assignment_matrix(row, loads.shape[0], num_gpus).astype(bool)
    gpu_load = share.sum(axis=1)
    for _ in range(max_steps):
        g = int(np.argmax(gpu_load))
        # delta[i, h, j]: load moved from g to h by swapping g's slot i with h's slot j
        delta = share[g][:, None, None] - share[None, :, :]
        new_max = np.maximum(gpu_load[g] - delta, gpu_load[None, :, None] + delta)
        ok = (delta > 0) & (new_max < gpu_load[g] * (1 - 1e-12))
        ok &= ~held[experts[g]][:, :, None]  # g's expert must be absent from h
        ok &= ~held[experts, g][None, :, :]  # h's expert must be absent from g
        ok[:, g, :] = False
        if not ok.any():
            break
        i, h, j = np.unravel_index(np.argmin(np.where(ok, new_max, np.inf)), ok.shape)
        a, b = experts[g, i], experts[h, j]
        held[a, g], held[b, h], held[a, h], held[b, g] = False, False, True, True
        experts[g, i], experts[h, j] = b, a
        share[g, i], share[h, j] = share[h, j], share[g, i]
        gpu_load[g], gpu_load[h] = share[g].sum(), share[h].sum()
    return np.sort(experts, axis=1).reshape(-1)


def _by_load(loads: np.ndarray, row: np.ndarray, num_gpus: int) -> np.ndarray:
    """The same row with whole GPUs reordered busiest first (the model's symmetry breaking)."""
    order = np.argsort(-gpu_loads(loads, row, num_gpus), kind="stable")
    return row.reshape(num_gpus, -1)[order].reshape(-1)


def _gap(value: float, bound: float) -> float:
    return max(0.0, (value - bound) / value) if value > 0 else 0.0


def _model(shares: np.ndarray, counts: np.ndarray, problem: PlacementProblem, t_min: float):
    num_experts, num_gpus = shares.shape[0], problem.num_gpus
    prob = pulp.LpProblem("balance", pulp.LpMinimize)
    x = binary_matrix(prob, num_experts, num_gpus)
    t = prob.add_variable("t", lowBound=t_min)
    prob += t
    for e in range(num_experts):
        prob += pulp.lpSum(x[e]) == int(counts[e])
    gpu_load = [pulp.LpAffineExpression([(x[e][g], float(shares[e])) for e in range(num_experts)]) for g in range(num_gpus)]
    for g in range(num_gpus):
        prob += pulp.lpSum(x[e][g] for e in range(num_experts)) == problem.slots_per_gpu
        if g + 1 < num_gpus:
            prob += gpu_load[g] - gpu_load[g + 1] >= 0
    prob += gpu_load[0] <= t  # the busiest GPU is GPU 0 under the ordering above
    return prob, x, t


def _set_start(x: list, t: pulp.LpVariable, row: np.ndarray, problem: PlacementProblem, t_value: float) -> None:
    held = assignment_matrix(row, len(x), problem.num_gpus)
    for e, x_e in enumerate(x):
        for g, var in enumerate(x_e):
            var.setInitialValue(int(held[e, g]))
    t.setInitialValue(t_value)


def _row_from_x(x: list, problem: PlacementProblem) -> np.ndarray | None:
    held = read_binary_matrix(x)
    return row_from_assignment(held, problem.slots_per_gpu)


def assignment_matrix(row: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """(E, G) 0/1: does GPU g hold a replica of expert e (one layer's ``phy2log`` row)."""
    slots_per_gpu = row.shape[0] // num_gpus
    held = np.zeros((num_experts, num_gpus), dtype=np.int64)
    np.add.at(held, (row, np.arange(row.shape[0]) // slots_per_gpu), 1)
    return held


def row_from_assignment(held: np.ndarray, slots_per_gpu: int) -> np.ndarray | None:
    """Inverse of :func:`assignment_matrix` (experts sorted inside a GPU); None if a GPU is not full."""
    if (held.sum(axis=0) != slots_per_gpu).any() or held.max() > 1:
        return None
    return np.concatenate([np.flatnonzero(held[:, g]) for g in range(held.shape[1])]).astype(np.int64)
