"""The public entry point ``plan_placement``: options -> problem -> one method -> a scored :class:`Plan`.

Methods: ``ilp`` with ``token_home="dp"`` (default; dp_planner.py), ``ilp`` with
``token_home="expert"`` (expert_planner.py), re-planning from a previous plan (migrate.py), and
the baselines ``greedy``, ``round_robin``, ``contiguous`` (greedy.py).

With a raw trace, ``holdout`` keeps a seeded fraction of the tokens out of planning and the plan's
metrics carry the message metrics on both sides (``metrics["messages"]``, ``metrics["heldout"]``).
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.placement.balance import layer_bounds
from tokenloom.placement.dp_planner import plan_dp
from tokenloom.placement.eplb import check_groups
from tokenloom.placement.evaluate import trace_messages
from tokenloom.placement.expert_planner import plan_expert
from tokenloom.placement.greedy import baseline_plan
from tokenloom.placement.metrics import evaluate_layers
from tokenloom.placement.migrate import replan
from tokenloom.placement.options import METHODS, PlanOptions
from tokenloom.placement.plan import Plan
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.trace import Trace


def plan_placement(trace: Trace, num_gpus: int, options: PlanOptions | None = None, **overrides: Any) -> Plan:
    """Place every layer's experts (and redundant replicas) on ``num_gpus`` GPUs.

    ``trace``: loads (L, E), optional transitions (L-1, E, E), raw ``topk_ids`` (L, T, K) for the
    dp search and message metrics. ``options``: a :class:`PlanOptions` (default: all defaults);
    keywords named like its fields override it (``plan_placement(trace, 32, gpus_per_node=8,
    time_limit=60)``), an unknown keyword is a TypeError. Returns a :class:`Plan` whose
    ``metrics`` are measured on the planning tokens (and on the held-out ones under ``heldout``).
    """
    start = time.perf_counter()
    options = (PlanOptions() if options is None else options).replace(**overrides)
    problem = PlacementProblem.build(
        trace.num_layers, trace.num_experts, num_gpus, options.gpus_per_node, options.num_redundant,
        intra_node_gbps=options.intra_node_gbps, inter_node_gbps=options.inter_node_gbps,
    )
    full, heldout = trace, None
    if options.holdout > 0:
        trace, heldout = trace.split(options.holdout, options.seed)
    rows, solver, method = _run_method(trace, problem, options, start)
    metrics = _metrics(rows, trace, heldout, problem, options)
    metrics["num_tokens"] = full.num_tokens
    solver["seconds"] = time.perf_counter() - start
    return Plan(
        phy2log=rows, num_experts=problem.num_experts, num_gpus=problem.num_gpus,
        gpus_per_node=problem.gpus_per_node, method=method, solver=solver, metrics=metrics,
        intra_node_gbps=float(problem.intra_node_gbps), inter_node_gbps=float(problem.inter_node_gbps),
        token_home=options.token_home, replica_choice=options.replica_choice,
    )


def _run_method(trace: Trace, problem: PlacementProblem, options: PlanOptions,
                start: float) -> tuple[np.ndarray, dict, str]:
    """(rows (L, num_slots), solver record, method name as stored in the plan)."""
    if (options.previous is None) != (options.max_moves is None):
        raise UsageError("max_moves: give both a previous plan and max_moves, or neither")
    if options.previous is not None:
        if options.method != "ilp":
            warnings.warn(f"method: {options.method!r} has no effect with a previous plan; re-planning is a local "
                          "search from it", stacklevel=3)
        return (*replan(trace, problem, options.previous, options.max_moves), "migrate")
    if options.method == "ilp" and options.token_home == "dp":
        check_groups(problem, options.expert_groups)
        return (*plan_dp(trace, problem, options, start), "ilp")
    if options.method == "ilp":
        progress = sys.stdout.isatty() if options.progress is None else options.progress
        return (*plan_expert(trace, problem, options, start, progress), "ilp")
    rows = baseline_plan(options.method, problem, trace.loads)
    solver = {"name": "none", "status": "heuristic", "gap": None, "bound": layer_bounds(trace.loads, rows, problem)}
    return rows, solver, options.method


def _metrics(rows: np.ndarray, trace: Trace, heldout: Trace | None, problem: PlacementProblem,
             options: PlanOptions) -> dict:
    """The plan's metrics on the planning tokens, with the message metrics on the held-out ones."""
    metrics = evaluate_layers(rows, trace, problem).to_dict()
    home, choice = options.token_home, options.replica_choice
    if trace.is_raw:
        metrics["messages"] = trace_messages(rows, trace, problem, home, choice)
    if heldout is not None:
        metrics["heldout"] = {"fraction": float(options.holdout), "seed": int(options.seed),
                              "num_tokens": int(heldout.topk_ids.shape[1]),
                              "messages": trace_messages(rows, heldout, problem, home, choice)}
    return metrics


__all__ = ["METHODS", "PlanOptions", "plan_placement"]
