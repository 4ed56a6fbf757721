"""Score a plan on a trace: balance and cross-layer metrics, message metrics, and the same for the
baselines (contiguous, round_robin, greedy, DeepSeek EPLB with its own policy choice) on the
same cluster. Any trace of the plan's shape works, so a plan can be scored on held-out tokens.
"""

from __future__ import annotations

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.placement.affinity import weighted_cost
from tokenloom.placement.dispatch import message_metrics
from tokenloom.placement.eplb import eplb_policy_rows
from tokenloom.placement.greedy import baseline_plan
from tokenloom.placement.metrics import PlanMetrics, evaluate_layers
from tokenloom.placement.plan import Plan
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.trace import Trace


def evaluate_plan(
    plan: Plan, trace: Trace, *, intra_node_gbps: float | None = None, inter_node_gbps: float | None = None
) -> PlanMetrics:
    """Metrics of ``plan`` on ``trace`` (any trace of the same shape: held-out evaluation).

    Bandwidths default to the plan's. Returns per-layer max/mean load, cross-GPU and cross-node
    tokens per layer boundary and in total, and the estimated all-to-all seconds.
    """
    _check_shape(plan, trace)
    problem = plan.problem()
    if intra_node_gbps is not None or inter_node_gbps is not None:
        problem = PlacementProblem(
            problem.num_layers, problem.num_experts, problem.num_gpus, problem.gpus_per_node, problem.num_redundant,
            intra_node_gbps if intra_node_gbps is not None else problem.intra_node_gbps,
            inter_node_gbps if inter_node_gbps is not None else problem.inter_node_gbps,
        )
    return evaluate_layers(plan.phy2log, trace, problem)


def evaluate_messages(plan: Plan, trace: Trace, *, token_home: str | None = None,
                      replica_choice: str | None = None) -> dict | None:
    """Message metrics (dispatch.py) of ``plan`` on a raw ``trace``; None for aggregated traces.

    The execution model defaults to the plan's own.
    """
    if not trace.is_raw:
        return None
    token_home = plan.token_home if token_home is None else token_home
    replica_choice = plan.replica_choice if replica_choice is None else replica_choice
    _check_shape(plan, trace)
    return trace_messages(plan.phy2log, trace, plan.problem(), token_home, replica_choice)


def _check_shape(plan: Plan, trace: Trace) -> None:
    if trace.num_layers != plan.num_layers or trace.num_experts != plan.num_experts:
        raise UsageError(
            f"trace: shape (num_layers={trace.num_layers}, num_experts={trace.num_experts}) does not match the plan's "
            f"(num_layers={plan.num_layers}, num_experts={plan.num_experts})"
        )


BASELINES = ("contiguous", "round_robin", "greedy", "eplb")


def _baseline_rows(name: str, problem: PlacementProblem, trace: Trace, expert_groups: int | None = None) -> np.ndarray:
    if name == "eplb":  # DeepSeek's policy choice for this shape (may hold two replicas on one GPU)
        return eplb_policy_rows(trace.loads, problem, expert_groups)[0]
    return baseline_plan(name, problem, trace.loads)


def baseline_metrics(plan: Plan, trace: Trace, expert_groups: int | None = None) -> dict[str, PlanMetrics]:
    """Metrics of the load-oblivious baselines, greedy and DeepSeek EPLB on the same cluster and trace.

    ``expert_groups``: the model's routing groups handed to EPLB (default: the plan's, else 1).
    """
    problem = plan.problem()
    groups = _plan_groups(plan, expert_groups)
    return {m: evaluate_layers(_baseline_rows(m, problem, trace, groups), trace, problem) for m in BASELINES}


def _plan_groups(plan: Plan, expert_groups: int | None) -> int | None:
    if expert_groups is not None:
        return expert_groups
    stored = plan.solver.get("expert_groups")
    return stored if isinstance(stored, int) and not isinstance(stored, bool) and stored >= 1 else None


def baseline_messages(plan: Plan, trace: Trace, token_home: str, replica_choice: str,
                      expert_groups: int | None = None) -> dict[str, dict]:
    """Message metrics of the baselines (empty for aggregated traces)."""
    if not trace.is_raw:
        return {}
    problem = plan.problem()
    groups = _plan_groups(plan, expert_groups)
    return {m: trace_messages(_baseline_rows(m, problem, trace, groups), trace, problem, token_home, replica_choice)
            for m in BASELINES}


def traffic_cost(plan: Plan, trace: Trace) -> float:
    """The ILP's stage-2 objective (link-weighted cross-layer tokens) of ``plan`` on ``trace``."""
    assert trace.transitions is not None
    return weighted_cost(plan.phy2log, trace.transitions, plan.problem())


def trace_messages(rows: np.ndarray, trace: Trace, problem: PlacementProblem, token_home: str,
                   replica_choice: str) -> dict:
    """Message metrics (dispatch.py) of phy2log ``rows`` (L, num_slots) on a raw ``trace``, as a dict."""
    return message_metrics(rows, trace.topk_ids, problem.num_experts, problem.num_gpus, problem.gpus_per_node,
                           token_home, replica_choice).to_dict()


__all__ = ["BASELINES", "evaluate_plan", "evaluate_messages", "baseline_metrics", "baseline_messages", "traffic_cost",
           "trace_messages"]
