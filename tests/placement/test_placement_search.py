"""The search pieces on their own: balance swaps, capped traffic descent, re-planning moves, solver status."""

import numpy as np
import pulp
import pytest

from tokenloom.placement import PlacementProblem
from tokenloom.placement.balance import assignment_matrix, improve_by_swaps
from tokenloom.placement.greedy import eplb_replica_counts, greedy_layer
from tokenloom.placement.gpu_swaps import relaxed_descent
from tokenloom.placement.metrics import gpu_loads
from tokenloom.placement.migrate import count_moves
from tokenloom.placement.solver import _status, solve


def _valid(held, counts, slots_per_gpu):
    return (held.sum(axis=1) == counts).all() and (held.sum(axis=0) == slots_per_gpu).all() and held.max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_swaps_keep_counts_and_never_raise_the_max(seed):
    rng = np.random.default_rng(seed)
    problem = PlacementProblem.build(1, 40, 8, 4, 8)
    loads = rng.zipf(1.5, size=40).astype(float)
    counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
    start = greedy_layer(loads, problem, counts)
    better = improve_by_swaps(loads, start, problem)
    assert _valid(assignment_matrix(better, 40, 8), counts, problem.slots_per_gpu)
    assert gpu_loads(loads, better, 8).max() <= gpu_loads(loads, start, 8).max() + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_capped_descent_lowers_cost_and_respects_the_cap(seed):
    rng = np.random.default_rng(seed)
    problem = PlacementProblem.build(1, 48, 8, 4, 8)
    loads = rng.integers(10, 100, size=48).astype(float)
    counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
    row = improve_by_swaps(loads, greedy_layer(loads, problem, counts), problem)
    cap = gpu_loads(loads, row, 8).max()
    cost = rng.random((48, 8))
    held = assignment_matrix(row, 48, 8)
    out = relaxed_descent(held, cost, loads / counts, cap, problem.slots_per_gpu)
    assert _valid(out, counts, problem.slots_per_gpu)
    assert (out * (loads / counts)[:, None]).sum(axis=0).max() <= cap * (1 + 1e-9)
    assert (out * cost).sum() < (held * cost).sum()


def test_count_moves_counts_new_expert_gpu_pairs():
    old = np.array([0, 1, 2, 3])  # 2 GPUs x 2 slots
    assert count_moves(old, old, 4, 2) == 0
    assert count_moves(old, np.array([2, 3, 0, 1]), 4, 2) == 4  # every expert changes GPU
    assert count_moves(old, np.array([0, 3, 2, 1]), 4, 2) == 2


def test_solver_reads_sol_status_not_lpstatus():
    # PuLP sets status "Optimal" after a time limit too; only sol_status tells the truth
    prob = pulp.LpProblem("p", pulp.LpMinimize)
    prob.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)
    assert pulp.LpStatus[prob.status] == "Optimal" and _status(prob) == "feasible"
    prob.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionOptimal)
    assert _status(prob) == "optimal"
    prob.assignStatus(pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound)
    assert _status(prob) == "no_solution"


def test_solver_proves_an_easy_model():
    easy = pulp.LpProblem("easy", pulp.LpMinimize)
    y = easy.add_variable("y", lowBound=2, cat=pulp.LpInteger)
    easy += y
    done = solve(easy, time_limit=5)
    assert done.status == "optimal" and y.varValue == 2 and done.gap == 0.0
