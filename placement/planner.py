"""The public entry points: ``plan_placement`` and ``evaluate_plan``.

``token_home="dp"`` (default; DeepEP with DP attention): per layer, EPLB replica counts and the
balanced greedy packing improved by swaps, then the node-level co-activation search
(colocate.py) under a per-layer cap on the busiest GPU: by default EPLB's own max load on that
layer (so the plan is never less balanced than EPLB), or ``max_imbalance`` x the mean. Layers
are independent, so they can run as Ray tasks (``map_fn``).

``token_home="expert"`` (MoETuner / ExFlow), method ``ilp``: two stages inside one time budget:

1. balance (about 40% of the budget): per layer, EPLB replica counts, the greedy packing improved
   by swaps, then the min-max ILP from that start (balance.py);
2. traffic (the rest, less a reserve for the metrics): re-place each layer to cut tokens over slow
   links between consecutive layers without raising any layer's busiest GPU above its cap
   (stage 1's max load, or ``max_imbalance`` x the mean when looser; affinity.py).

With a raw trace, ``holdout`` keeps a seeded fraction of the tokens out of planning and the plan's
metrics carry the message metrics on both sides (``metrics["messages"]``, ``metrics["heldout"]``).
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

from tokenloom.errors import UsageError
from tokenloom.placement.affinity import place_across_layers, weighted_cost
from tokenloom.placement.balance import balance_layer, improve_by_swaps, load_lower_bound
from tokenloom.placement.dispatch import REPLICA_CHOICES, TOKEN_HOMES, message_metrics
from tokenloom.placement.eplb import eplb_rows
from tokenloom.placement.greedy import baseline_plan, eplb_replica_counts, greedy_layer
from tokenloom.placement.metrics import PlanMetrics, evaluate_layers, gpu_loads
from tokenloom.placement.migrate import count_moves, migrate_layer
from tokenloom.placement.plan import Plan
from tokenloom.placement.problem import DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS, PlacementProblem
from tokenloom.placement.solver import FEASIBLE, OPTIMAL, highs_available, worst_status
from tokenloom.placement.trace import Trace

METHODS = ("ilp", "greedy", "round_robin", "contiguous")
DP_SEARCH_SHARE = 0.7  # of the time budget for the dp layer searches (the rest: metrics, writing)
BALANCE_SHARE = 0.4  # of the time budget for stage 1
METRICS_RESERVE = 0.05  # of the time budget kept for the final metrics
CHAIN_BALANCE_SHARE = 0.1  # expert model with raw ids: stage 1 ends here, the v1 traffic stage at
CHAIN_TRAFFIC_SHARE = 0.2  # this share, and the exact node-level stage (chain.py) gets the rest


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
    token_home: str = "dp",
    replica_choice: str = "uniform",
    max_imbalance: float | None = None,
    expert_groups: int | None = None,
    holdout: float = 0.0,
    seed: int = 0,
    map_fn=None,
) -> Plan:
    """Place every layer's experts (and redundant replicas) on ``num_gpus`` GPUs.

    ``trace``: loads (L, E), optional transitions (L-1, E, E), raw ``topk_ids`` (L, T, K) for the
    dp search and message metrics. ``num_redundant``: extra slots per layer (default: the fewest
    that make the slots divide the GPUs). ``previous`` with ``max_moves``: start from that plan
    and move at most ``max_moves`` experts per layer. ``token_home`` / ``replica_choice``: the
    execution model (dispatch.py). ``max_imbalance``: cap on each layer's busiest GPU / mean
    (default: EPLB's on that layer for dp). ``expert_groups``: the model's routing groups, as
    handed to EPLB for the default cap (default 1: no group-limited routing, EPLB global;
    DeepSeek-V3: 8, EPLB hierarchical). ``holdout``: fraction of tokens held out (seeded by
    ``seed``). ``map_fn(fn, items)``: how dp layers are solved (default: a loop; Ray tasks from
    the CLI). ``progress``: a tqdm bar over layers (default: only when stdout is a terminal).
    Returns a :class:`Plan` whose ``metrics`` are measured on the planning tokens.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise UsageError(f"method: unknown {method!r}; valid: {', '.join(METHODS)}")
    if token_home not in TOKEN_HOMES:
        raise UsageError(f"token_home: unknown {token_home!r}; valid: {', '.join(TOKEN_HOMES)}")
    if replica_choice not in REPLICA_CHOICES:
        raise UsageError(f"replica_choice: unknown {replica_choice!r}; valid: {', '.join(REPLICA_CHOICES)}")
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not np.isfinite(time_limit) or time_limit <= 0:
        raise UsageError(f"time_limit: must be a positive number of seconds, got {time_limit!r}")
    if max_imbalance is not None and (not np.isfinite(max_imbalance) or not 1.0 <= max_imbalance <= 1e6):
        raise UsageError(f"max_imbalance: must be a number >= 1 (busiest GPU / mean), got {max_imbalance!r}")
    if not (isinstance(holdout, (int, float)) and 0.0 <= holdout < 1.0):
        raise UsageError(f"holdout: must be in [0, 1), got {holdout!r}")
    problem = PlacementProblem.build(
        trace.num_layers, trace.num_experts, num_gpus, gpus_per_node, num_redundant,
        intra_node_gbps=intra_node_gbps, inter_node_gbps=inter_node_gbps,
    )
    full = trace
    heldout = None
    if holdout > 0:
        trace, heldout = trace.split(holdout, seed)
    if progress is None:
        progress = sys.stdout.isatty()
    if (previous is None) != (max_moves is None):
        raise UsageError("max_moves: give both a previous plan and max_moves, or neither")
    if previous is not None:
        if method != "ilp":
            warnings.warn(f"method: {method!r} has no effect with a previous plan; re-planning is a local search from it",
                          stacklevel=2)
        rows, solver = _migrate(trace, problem, previous, max_moves)
        method = "migrate"
    elif method == "ilp" and token_home == "dp":
        rows, solver = _dp(trace, problem, start, float(time_limit), max_imbalance, expert_groups, map_fn)
    elif method == "ilp":
        rows, solver = _ilp(trace, problem, start, float(time_limit), progress, max_imbalance, expert_groups)
    else:
        rows = baseline_plan(method, problem, trace.loads)
        solver = {"name": "none", "status": "heuristic", "gap": None, "bound": _bounds(trace, rows, problem)}
    metrics = evaluate_layers(rows, trace, problem).to_dict()
    if trace.is_raw:
        metrics["messages"] = _messages(rows, trace, problem, token_home, replica_choice)
    if heldout is not None:
        metrics["heldout"] = {"fraction": float(holdout), "seed": int(seed), "num_tokens": int(heldout.topk_ids.shape[1]),
                              "messages": _messages(rows, heldout, problem, token_home, replica_choice)}
    metrics["num_tokens"] = full.num_tokens
    solver["seconds"] = time.perf_counter() - start
    return Plan(
        phy2log=rows, num_experts=problem.num_experts, num_gpus=problem.num_gpus,
        gpus_per_node=problem.gpus_per_node, method=method, solver=solver, metrics=metrics,
        intra_node_gbps=float(problem.intra_node_gbps), inter_node_gbps=float(problem.inter_node_gbps),
        token_home=token_home, replica_choice=replica_choice,
    )


def _messages(rows: np.ndarray, trace: Trace, problem: PlacementProblem, token_home: str, replica_choice: str) -> dict:
    return message_metrics(rows, trace.topk_ids, problem.num_experts, problem.num_gpus, problem.gpus_per_node,
                           token_home, replica_choice).to_dict()


def eplb_policy_rows(loads: np.ndarray, problem: PlacementProblem, expert_groups: int | None = None) -> tuple[np.ndarray, str]:
    """EPLB's own choice for this shape: hierarchical when its routing groups (default 1: a model
    without group-limited routing) are a multiple of the nodes, else global."""
    groups = 1 if expert_groups is None else expert_groups
    if problem.num_nodes > 1 and problem.num_experts % groups == 0 and groups % problem.num_nodes == 0:
        return eplb_rows(loads, problem.num_slots, problem.num_gpus, problem.gpus_per_node, "hierarchical", groups), "hierarchical"
    return eplb_rows(loads, problem.num_slots, problem.num_gpus, problem.gpus_per_node, "global"), "global"


def _dp(trace: Trace, problem: PlacementProblem, start: float, time_limit: float, max_imbalance: float | None,
        expert_groups: int | None, map_fn):
    """Per layer: balanced start, cap, node-level co-activation search (colocate.plan_layer)."""
    _check_groups(problem, expert_groups)
    eplb, policy = eplb_policy_rows(trace.loads, problem, expert_groups)
    wall_deadline = time.time() + max(0.0, start + time_limit * DP_SEARCH_SHARE - time.perf_counter())
    budget = max(0.0, wall_deadline - time.time()) / trace.num_layers
    items = [(trace.loads[l], _layer_routing(trace, l), eplb[l], problem, max_imbalance, budget, wall_deadline,
              expert_groups) for l in range(trace.num_layers)]
    results = list(map_fn(dp_layer, items)) if map_fn is not None else [dp_layer(item) for item in items]
    rows = np.stack([r[0] for r in results])
    caps = [r[1] for r in results]
    solver = {"name": "colocate", "status": "heuristic", "gap": None, "bound": _bounds(trace, rows, problem),
              "cap": caps, "cap_rule": f"eplb {policy}" if max_imbalance is None else f"max_imbalance {max_imbalance:g}",
              "eplb_policy": policy, "expert_groups": expert_groups, "coactivation": _layer_routing(trace, 0) is not None,
              "time_limit": time_limit}
    return rows, solver


def _layer_routing(trace: Trace, layer: int):
    """What a dp layer needs to build its co-activation: the layer's ids (small), else a stored matrix."""
    if trace.topk_ids is not None:
        return trace.topk_ids[layer]
    return None if trace.coactivations is None else trace.coactivations[layer]


def _check_groups(problem: PlacementProblem, expert_groups: int | None) -> None:
    if expert_groups is not None and (problem.num_experts % expert_groups or
                                      (expert_groups > 1 and expert_groups % problem.num_nodes)):
        raise UsageError(f"expert_groups: {expert_groups} must divide num_experts={problem.num_experts} and be 1 or a "
                         f"multiple of the {problem.num_nodes} nodes")


def dp_layer(item) -> tuple[np.ndarray, float]:
    """One dp layer (a pure function of its inputs, so it can run as a Ray task): (row, cap).

    ``item``: (loads (E,), ids (T, K) or co-activation (E, E) or None, EPLB's row, problem,
    max_imbalance, seconds for this layer, wall-clock deadline of the whole search, the model's
    routing groups or None).
    """
    from tokenloom.placement.colocate import coactivation, group_start, plan_layer

    loads, routing, eplb_row, problem, max_imbalance, budget, wall_deadline, groups = item
    entered = time.perf_counter()  # the layer's share counts from here: the set-up below is part of it
    seconds = min(budget, wall_deadline - time.time())
    counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
    begin = improve_by_swaps(loads, greedy_layer(loads, problem, counts), problem)
    begin_max = float(gpu_loads(loads, begin, problem.num_gpus).max())
    mean = float(loads.sum()) / problem.num_gpus
    target = float(gpu_loads(loads, eplb_row, problem.num_gpus).max()) if max_imbalance is None else max_imbalance * mean
    cap = max(begin_max, target)
    if routing is None or problem.num_nodes == 1 or seconds <= 0 or time.perf_counter() >= entered + seconds:
        return begin, cap
    is_ids = not (routing.shape == (problem.num_experts, problem.num_experts) and routing.dtype.kind == "f")
    coact = coactivation(routing, problem.num_experts) if is_ids else routing
    starts = [begin]
    grouped = group_start(routing, counts, groups, problem) if is_ids else None
    if grouped is not None:
        starts.append(grouped)
    row = plan_layer(coact, loads, starts + [eplb_row], cap, problem, entered + seconds,
                     ids=routing if is_ids else None)
    return row, cap


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


def _ilp(trace: Trace, problem: PlacementProblem, start: float, time_limit: float, progress: bool,
         max_imbalance: float | None = None, expert_groups: int | None = None):
    chain = trace.is_raw and problem.num_nodes > 1  # the exact node-level stage needs per-token ids
    deadline = start + time_limit * (1 - METRICS_RESERVE)
    balance_deadline = start + time_limit * (CHAIN_BALANCE_SHARE if chain else BALANCE_SHARE)
    traffic_deadline = start + time_limit * CHAIN_TRAFFIC_SHARE if chain else deadline
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
        caps = _expert_caps(trace, problem, layers, max_imbalance, expert_groups)  # default: as balanced as EPLB
        bar = _progress_bar(progress, trace.num_layers - 1, "traffic")
        result = place_across_layers(rows, trace.loads, caps, trace.transitions, problem, traffic_deadline, bar)
        if bar is not None:
            bar.close()
        rows = result.rows
        traffic = {
            "status": result.status, "method": result.method, "seconds": result.seconds,
            "start_cost": result.start_cost, "cost": result.cost, "cap": [float(c) for c in caps],
        }
    node_stage = {"status": "skipped (needs a raw trace and more than one node)", "layers_changed": 0}
    if chain and traffic.get("status") == OPTIMAL:  # tiny shapes: keep the proven optimum of the chain model
        node_stage = {"status": "skipped (the traffic stage proved its plan optimal)", "layers_changed": 0}
    elif chain:
        from tokenloom.placement.chain import chain_polish

        if not trace.has_transitions:
            caps = _expert_caps(trace, problem, layers, max_imbalance, expert_groups)
        began = time.perf_counter()
        rows, info = chain_polish(rows, trace.topk_ids, trace.loads, caps, problem, deadline)
        node_stage = {"status": "feasible", "method": "node block-coordinate descent, exact expert metric",
                      "seconds": time.perf_counter() - began, **info}
        if trace.has_transitions:  # the v1 objective after this stage (the traffic stage's cost is before it)
            node_stage["traffic_cost"] = weighted_cost(rows, trace.transitions, problem)
    statuses = [balance["status"]] + ([traffic["status"]] if trace.has_transitions else [])
    if chain and node_stage["layers_changed"]:
        statuses.append(FEASIBLE)  # a local search changed the plan after the proven stages
    solver = {
        "name": "HiGHS" if highs_available() else "CBC",
        "status": worst_status(statuses),
        "gap": balance["gap"],
        "bound": [r.bound for r in layers],
        "balance": balance,
        "traffic": traffic,
        "node_stage": node_stage,
        "time_limit": time_limit,
    }
    return rows, solver


def _expert_caps(trace: Trace, problem: PlacementProblem, layers, max_imbalance: float | None,
                 expert_groups: int | None) -> np.ndarray:
    """Per-layer cap of the ``expert`` model: the balance optimum, loosened to ``max_imbalance`` x
    the mean or (default) to EPLB's max load on the layer."""
    caps = np.array([r.max_load for r in layers])
    if max_imbalance is not None:
        return np.maximum(caps, max_imbalance * trace.loads.sum(axis=1) / problem.num_gpus)
    _check_groups(problem, expert_groups)
    eplb = eplb_policy_rows(trace.loads, problem, expert_groups)[0]
    return np.maximum(caps, [gpu_loads(trace.loads[l], eplb[l], problem.num_gpus).max() for l in range(trace.num_layers)])


def _migrate(trace: Trace, problem: PlacementProblem, previous: Plan, max_moves: object):
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
        raise UsageError(
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
    return _messages(plan.phy2log, trace, plan.problem(), token_home, replica_choice)


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
    return {m: _messages(_baseline_rows(m, problem, trace, groups), trace, problem, token_home, replica_choice)
            for m in BASELINES}


def traffic_cost(plan: Plan, trace: Trace) -> float:
    """The ILP's stage-2 objective (link-weighted cross-layer tokens) of ``plan`` on ``trace``."""
    assert trace.transitions is not None
    return weighted_cost(plan.phy2log, trace.transitions, plan.problem())


__all__ = ["METHODS", "plan_placement", "evaluate_plan", "evaluate_messages", "baseline_metrics", "traffic_cost"]
