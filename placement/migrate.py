"""Migration-aware re-planning: improve an existing plan on a new trace with at most K moves per layer.

A *move* loads an expert onto a GPU that did not hold it before (the weights must be copied
there). Re-planning from scratch would move most experts; here each layer starts from the previous
plan and makes at most ``max_moves`` single-slot replacements (slot s: expert a -> expert b,
keeping every expert at >= 1 replica and no duplicates on a GPU), each the one that lowers the
busiest GPU's load the most (ties: the smaller sum of squared GPU loads). It stops early when no
replacement helps. This is a greedy local search, not an ILP.
"""

from __future__ import annotations

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.placement.balance import assignment_matrix, layer_bounds
from tokenloom.placement.plan import Plan
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.trace import Trace


def count_moves(old_row: np.ndarray, new_row: np.ndarray, num_experts: int, num_gpus: int) -> int:
    """Replicas in ``new_row`` on a GPU that held no replica of that expert in ``old_row``."""
    old = assignment_matrix(old_row, num_experts, num_gpus)
    new = assignment_matrix(new_row, num_experts, num_gpus)
    return int(np.maximum(new - old, 0).sum())


def migrate_layer(loads: np.ndarray, prev_row: np.ndarray, problem: PlacementProblem, max_moves: int) -> np.ndarray:
    """(num_slots,) row reached from ``prev_row`` by <= ``max_moves`` improving slot replacements."""
    num_experts, num_gpus = loads.shape[0], problem.num_gpus
    row = prev_row.copy()
    for _ in range(max_moves):
        step = _best_replacement(loads, row, num_experts, num_gpus)
        if step is None:
            break
        slot, expert = step
        row[slot] = expert
    # A replacement back onto a GPU that held the expert before is not a move; it never happens
    # here because each replacement strictly improves, but the contract is checked anyway.
    assert count_moves(prev_row, row, num_experts, num_gpus) <= max_moves
    return row


def _best_replacement(loads: np.ndarray, row: np.ndarray, num_experts: int, num_gpus: int) -> tuple[int, int] | None:
    """The (slot, new expert) replacement with the best (max load, sum of squares); None if none helps."""
    held = assignment_matrix(row, num_experts, num_gpus).astype(float)  # (E, G)
    counts = held.sum(axis=1)
    share = loads / counts
    gpu_load = held.T @ share
    spg = row.shape[0] // num_gpus
    gpu_of = np.arange(row.shape[0]) // spg
    old = row
    # share changes of the expert losing a replica (a) and the one gaining it (b)
    grow_a = np.where(counts > 1, loads / np.maximum(counts - 1, 1) - share, 0.0)  # (E,); count 1 is illegal below
    shrink_b = loads / (counts + 1) - share  # (E,)
    # new[s, b, h] = gpu_load[h] + held[a,h]*grow_a[a] + held[b,h]*shrink_b[b], then fix GPU g = gpu_of[s]
    new = gpu_load[None, None, :] + (held[old] * grow_a[old, None])[:, None, :] + (held * shrink_b[:, None])[None, :, :]
    rows_idx = np.arange(row.shape[0])
    new[rows_idx, :, gpu_of] += -share[old][:, None] - grow_a[old][:, None]  # g drops a entirely
    new[rows_idx, :, gpu_of] += (loads / (counts + 1))[None, :]  # and gains b's new share
    legal = (held[:, gpu_of].T == 0) & (counts[old] > 1)[:, None]  # b absent from g; a keeps a replica
    new_max = np.where(legal, new.max(axis=2), np.inf)
    best = float(new_max.min())
    current = float(gpu_load.max())
    if not np.isfinite(best) or best > current * (1 + 1e-12):
        return None
    sumsq = np.where(new_max <= best * (1 + 1e-12), (new**2).sum(axis=2), np.inf)
    if best >= current * (1 - 1e-12) and sumsq.min() >= float((gpu_load**2).sum()) * (1 - 1e-12):
        return None
    slot, expert = np.unravel_index(np.argmin(sumsq), sumsq.shape)
    return int(slot), int(expert)


def replan(trace: Trace, problem: PlacementProblem, previous: Plan, max_moves: object) -> tuple[np.ndarray, dict]:
    """(rows, solver record): every layer of ``previous`` re-planned on ``trace`` with <= ``max_moves`` moves."""
    if isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0:
        raise UsageError(f"max_moves: must be an integer >= 0, got {max_moves!r}")
    for name, want, got in (
        ("num_layers", trace.num_layers, previous.num_layers),
        ("num_experts", trace.num_experts, previous.num_experts),
        ("num_gpus", problem.num_gpus, previous.num_gpus),
        ("num_slots", problem.num_slots, previous.num_slots),
    ):
        if want != got:
            raise UsageError(f"previous: plan has {name}={got} but this request has {want}")
    rows = np.stack([
        migrate_layer(trace.loads[l], previous.phy2log[l], problem, int(max_moves)) for l in range(trace.num_layers)
    ])
    moves = [count_moves(previous.phy2log[l], rows[l], problem.num_experts, problem.num_gpus) for l in range(trace.num_layers)]
    solver = {"name": "none", "status": "heuristic", "gap": None, "bound": layer_bounds(trace.loads, rows, problem),
              "max_moves": int(max_moves), "moves": moves}
    return rows, solver
