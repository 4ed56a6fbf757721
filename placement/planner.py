"""The public entry points: ``plan_placement`` and ``evaluate_plan``.

``ilp`` runs two stages inside one time budget (``time_limit`` seconds for the whole run):

1. balance (about 40% of the budget): per layer, EPLB replica counts, the greedy packing improved
   by swaps, then the min-max ILP from that start (balance.py);
2. traffic (the rest, less a reserve for the metrics): re-place each layer to cut tokens over slow
   links between consecutive layers without raising any layer's busiest GPU (affinity.py).
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

from tokenloom.placement.affinity import place_across_layers, weighted_cost
from tokenloom.placement.balance import balance_layer, load_lower_bound
from tokenloom.placement.greedy import baseline_plan, eplb_replica_counts, greedy_layer
from tokenloom.placement.metrics import PlanMetrics, evaluate_layers
from tokenloom.placement.migrate import count_moves, migrate_layer
from tokenloom.placement.plan import Plan
from tokenloom.placement.problem import DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS, PlacementProblem
from tokenloom.placement.solver import OPTIMAL, highs_available, worst_status
from tokenloom.placement.trace import Trace

METHODS = ("ilp", "greedy", "round_robin", "contiguous")
BALANCE_SHARE = 0.4  # of the time budget for stage 1
METRICS_RESERVE = 0.05  # of the time budget kept for the final metrics


def plan_placement(
    trace: Trace,
    num_gpus: int,
    *,
    gpus_per_node: int | None = None,
    num_redundant: int | None = None,
    method: str = "ilp",
    time_limit: float = 60.0,
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS,
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS,
    previous: Plan | None = None,
    max_moves: int | None = None,
    progress: bool | None = None,
) -> Plan:
    """Place every layer's experts (and redundant replicas) on ``num_gpus`` GPUs.

    ``trace``: loads (L, E) and optional transitions (L-1, E, E). ``num_redundant``: extra slots
    per layer (default: the fewest that make the slots divide the GPUs). ``previous`` with
    ``max_moves``: start from that plan and move at most ``max_moves`` experts per layer.
    ``progress``: a tqdm bar over layers (default: only when stdout is a terminal).
    Returns a :class:`Plan` whose ``metrics`` are measured on ``trace``.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; valid: {', '.join(METHODS)}")
    if not isinstance(time_limit, (int, float)) or not np.isfinite(time_limit) or time_limit <= 0:
        raise ValueError(f"time_limit: must be a positive number of seconds, got {time_limit!r}")
    problem = PlacementProblem.build(
        trace.num_layers, trace.num_experts, num_gpus, gpus_per_node, num_redundant,
        intra_node_gbps=intra_node_gbps, inter_node_gbps=inter_node_gbps,
    )
    if progress is None:
        progress = sys.stdout.isatty()
    if (previous is None) != (max_moves is None):
        raise ValueError("max_moves: give both a previous plan and max_moves, or neither")
    if previous is not None:
        if method != "ilp":
            warnings.warn(f"method: {method!r} has no effect with a previous plan; re-planning is a local search from it",
                          stacklevel=2)
        rows, solver = _migrate(trace, problem, previous, max_moves)
        method = "migrate"
    elif method == "ilp":
        rows, solver = _ilp(trace, problem, start, float(time_limit), progress)
    else:
        rows = baseline_plan(method, problem, trace.loads)
        solver = {"name": "none", "status": "heuristic", "gap": None, "bound": _bounds(trace, rows, problem)}
    metrics = evaluate_layers(rows, trace, problem)
    solver["seconds"] = time.perf_counter() - start
    return Plan(
        phy2log=rows, num_experts=problem.num_experts, num_gpus=problem.num_gpus,
        gpus_per_node=problem.gpus_per_node, method=method, solver=solver, metrics=metrics.to_dict(),
        intra_node_gbps=float(problem.intra_node_gbps), inter_node_gbps=float(problem.inter_node_gbps),
    )


def _bounds(trace: Trace, rows: np.ndarray, problem: PlacementProblem) -> list[float]:
    """Per layer, the lower bound on the busiest GPU's load for these replica counts."""
    return [
        load_lower_bound(trace.loads[l], np.bincount(rows[l], minlength=problem.num_experts), problem.num_gpus)
        for l in range(trace.num_layers)
    ]


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False)


def _ilp(trace: Trace, problem: PlacementProblem, start: float, time_limit: float, progress: bool):
    deadline = start + time_limit * (1 - METRICS_RESERVE)
    balance_deadline = start + time_limit * BALANCE_SHARE
    rows, layers = [], []
    bar = _progress_bar(progress, trace.num_layers, "balance")
    for l in range(trace.num_layers):
        loads = trace.loads[l]
        counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
        budget = (balance_deadline - time.perf_counter()) / (trace.num_layers - l)
        result = balance_layer(loads, counts, greedy_layer(loads, problem, counts), problem, budget)
        rows.append(result.row)
        layers.append(result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows = np.stack(rows)
    balance = {
        "status": worst_status([r.status for r in layers]),
        "gap": max(r.gap for r in layers),
        "seconds": sum(r.seconds for r in layers),
        "layers_optimal": sum(r.status == OPTIMAL for r in layers),
    }
    traffic = {"status": "skipped (trace has no transitions)"}
    if trace.has_transitions:
        caps = np.array([r.max_load for r in layers])
        bar = _progress_bar(progress, trace.num_layers - 1, "traffic")
        result = place_across_layers(rows, trace.loads, caps, trace.transitions, problem, deadline, bar)
        if bar is not None:
            bar.close()
        rows = result.rows
        traffic = {
            "status": result.status, "method": result.method, "seconds": result.seconds,
            "start_cost": result.start_cost, "cost": result.cost,
        }
    statuses = [balance["status"]] + ([traffic["status"]] if trace.has_transitions else [])
    solver = {
        "name": "HiGHS" if highs_available() else "CBC",
        "status": worst_status(statuses),
        "gap": balance["gap"],
        "bound": [r.bound for r in layers],
        "balance": balance,
        "traffic": traffic,
        "time_limit": time_limit,
    }
    return rows, solver


def _migrate(trace: Trace, problem: PlacementProblem, previous: Plan, max_moves: object):
    if isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0:
        raise ValueError(f"max_moves: must be an integer >= 0, got {max_moves!r}")
    for name, want, got in (
        ("num_layers", trace.num_layers, previous.num_layers),
        ("num_experts", trace.num_experts, previous.num_experts),
        ("num_gpus", problem.num_gpus, previous.num_gpus),
        ("num_slots", problem.num_slots, previous.num_slots),
    ):
        if want != got:
            raise ValueError(f"previous: plan has {name}={got} but this request has {want}")
    rows = np.stack([
        migrate_layer(trace.loads[l], previous.phy2log[l], problem, int(max_moves)) for l in range(trace.num_layers)
    ])
    moves = [count_moves(previous.phy2log[l], rows[l], problem.num_experts, problem.num_gpus) for l in range(trace.num_layers)]
    solver = {"name": "none", "status": "heuristic", "gap": None, "bound": _bounds(trace, rows, problem),
              "max_moves": int(max_moves), "moves": moves}
    return rows, solver


def evaluate_plan(
    plan: Plan, trace: Trace, *, intra_node_gbps: float | None = None, inter_node_gbps: float | None = None
) -> PlanMetrics:
    """Metrics of ``plan`` on ``trace`` (any trace of the same shape: held-out evaluation).

    Bandwidths default to the plan's. Returns per-layer max/mean load, cross-GPU and cross-node
    tokens per layer boundary and in total, and the estimated all-to-all seconds.
    """
    if trace.num_layers != plan.num_layers or trace.num_experts != plan.num_experts:
        raise ValueError(
            f"trace: shape (num_layers={trace.num_layers}, num_experts={trace.num_experts}) does not match the plan's "
            f"(num_layers={plan.num_layers}, num_experts={plan.num_experts})"
        )
    problem = plan.problem()
    if intra_node_gbps is not None or inter_node_gbps is not None:
        problem = PlacementProblem(
            problem.num_layers, problem.num_experts, problem.num_gpus, problem.gpus_per_node, problem.num_redundant,
            intra_node_gbps if intra_node_gbps is not None else problem.intra_node_gbps,
            inter_node_gbps if inter_node_gbps is not None else problem.inter_node_gbps,
        )
    return evaluate_layers(plan.phy2log, trace, problem)


def baseline_metrics(plan: Plan, trace: Trace) -> dict[str, PlanMetrics]:
    """Metrics of the load-oblivious baselines and greedy on the same cluster and trace."""
    problem = plan.problem()
    return {m: evaluate_layers(baseline_plan(m, problem, trace.loads), trace, problem) for m in ("contiguous", "round_robin", "greedy")}


def traffic_cost(plan: Plan, trace: Trace) -> float:
    """The ILP's stage-2 objective (link-weighted cross-layer tokens) of ``plan`` on ``trace``."""
    assert trace.transitions is not None
    return weighted_cost(plan.phy2log, trace.transitions, plan.problem())


__all__ = ["METHODS", "plan_placement", "evaluate_plan", "baseline_metrics", "traffic_cost"]
