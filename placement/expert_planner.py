"""The ``expert`` planner (``token_home="expert"``, method ``ilp``; MoETuner / ExFlow): stages inside
one time budget.

1. balance (``BALANCE_SHARE`` of the budget): per layer, EPLB replica counts, the greedy packing
   improved by swaps, then the min-max ILP from that start (balance.py);
2. traffic (the rest, less ``METRICS_RESERVE`` for the metrics): re-place each layer to cut tokens
   over slow links between consecutive layers without raising any layer's busiest GPU above its
   cap (stage 1's max load, loosened to EPLB's or to ``max_imbalance`` x the mean; affinity.py);
3. with a raw trace on several nodes, the balance stage ends at ``CHAIN_BALANCE_SHARE``, traffic
   at ``CHAIN_TRAFFIC_SHARE``, and the node-level stage on the exact message metric (chain.py)
   gets the rest.
"""

from __future__ import annotations

import time

import numpy as np

from tokenloom.placement.affinity import place_across_layers, weighted_cost
from tokenloom.placement.balance import LayerBalance, balance_layer
from tokenloom.placement.chain import chain_polish
from tokenloom.placement.eplb import check_groups, eplb_policy_rows
from tokenloom.placement.greedy import eplb_replica_counts, greedy_layer
from tokenloom.placement.metrics import gpu_loads
from tokenloom.placement.options import PlanOptions
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.solver import FEASIBLE, OPTIMAL, highs_available, worst_status
from tokenloom.placement.trace import Trace

BALANCE_SHARE = 0.4  # of the time budget for stage 1
METRICS_RESERVE = 0.05  # of the time budget kept for the final metrics
CHAIN_BALANCE_SHARE = 0.1  # expert model with raw ids: stage 1 ends here, the v1 traffic stage at
CHAIN_TRAFFIC_SHARE = 0.2  # this share, and the exact node-level stage (chain.py) gets the rest


def plan_expert(trace: Trace, problem: PlacementProblem, options: PlanOptions, start: float,
                progress: bool) -> tuple[np.ndarray, dict]:
    """(rows (L, num_slots), solver record); ``start``: the ``perf_counter`` the time limit counts from."""
    time_limit, max_imbalance, expert_groups = float(options.time_limit), options.max_imbalance, options.expert_groups
    chain = trace.is_raw and problem.num_nodes > 1  # the exact node-level stage needs per-token ids
    deadline = start + time_limit * (1 - METRICS_RESERVE)
    balance_deadline = start + time_limit * (CHAIN_BALANCE_SHARE if chain else BALANCE_SHARE)
    traffic_deadline = start + time_limit * CHAIN_TRAFFIC_SHARE if chain else deadline
    rows, layers, balance = _balance_stage(trace, problem, balance_deadline, progress)
    traffic = {"status": "skipped (trace has no transitions)"}
    if trace.has_transitions:
        caps = expert_caps(trace, problem, layers, max_imbalance, expert_groups)  # default: as balanced as EPLB
        rows, traffic = _traffic_stage(trace, problem, rows, caps, traffic_deadline, progress)
    node_stage = {"status": "skipped (needs a raw trace and more than one node)", "layers_changed": 0}
    if chain and traffic.get("status") == OPTIMAL:  # tiny shapes: keep the proven optimum of the chain model
        node_stage = {"status": "skipped (the traffic stage proved its plan optimal)", "layers_changed": 0}
    elif chain:
        if not trace.has_transitions:
            caps = expert_caps(trace, problem, layers, max_imbalance, expert_groups)
        rows, node_stage = _node_stage(trace, problem, rows, caps, deadline)
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


def _balance_stage(trace: Trace, problem: PlacementProblem, deadline: float,
                   progress: bool) -> tuple[np.ndarray, list[LayerBalance], dict]:
    """Stage 1: every layer's min-max ILP from the greedy start, sharing the time left evenly."""
    rows, layers = [], []
    bar = _progress_bar(progress, trace.num_layers, "balance")
    for l in range(trace.num_layers):
        loads = trace.loads[l]
        counts = eplb_replica_counts(loads, problem.num_slots, problem.num_gpus)
        budget = (deadline - time.perf_counter()) / (trace.num_layers - l)
        result = balance_layer(loads, counts, greedy_layer(loads, problem, counts), problem, budget)
        rows.append(result.row)
        layers.append(result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    balance = {
        "status": worst_status([r.status for r in layers]),
        "gap": max(r.gap for r in layers),
        "seconds": sum(r.seconds for r in layers),
        "layers_optimal": sum(r.status == OPTIMAL for r in layers),
    }
    return np.stack(rows), layers, balance


def _traffic_stage(trace: Trace, problem: PlacementProblem, rows: np.ndarray, caps: np.ndarray, deadline: float,
                   progress: bool) -> tuple[np.ndarray, dict]:
    """Stage 2: cut the link-weighted tokens between consecutive layers under the caps (affinity.py)."""
    bar = _progress_bar(progress, trace.num_layers - 1, "traffic")
    result = place_across_layers(rows, trace.loads, caps, trace.transitions, problem, deadline, bar)
    if bar is not None:
        bar.close()
    traffic = {
        "status": result.status, "method": result.method, "seconds": result.seconds,
        "start_cost": result.start_cost, "cost": result.cost, "cap": [float(c) for c in caps],
    }
    return result.rows, traffic


def _node_stage(trace: Trace, problem: PlacementProblem, rows: np.ndarray, caps: np.ndarray,
                deadline: float) -> tuple[np.ndarray, dict]:
    """Stage 3: node-level descent on the exact ``expert`` message metric (chain.py)."""
    began = time.perf_counter()
    rows, info = chain_polish(rows, trace.topk_ids, trace.loads, caps, problem, deadline)
    node_stage = {"status": "feasible", "method": "node block-coordinate descent, exact expert metric",
                  "seconds": time.perf_counter() - began, **info}
    if trace.has_transitions:  # the v1 objective after this stage (the traffic stage's cost is before it)
        node_stage["traffic_cost"] = weighted_cost(rows, trace.transitions, problem)
    return rows, node_stage


def expert_caps(trace: Trace, problem: PlacementProblem, layers: list[LayerBalance], max_imbalance: float | None,
                expert_groups: int | None) -> np.ndarray:
    """Per-layer cap of the ``expert`` model: the balance optimum, loosened to ``max_imbalance`` x
    the mean or (default) to EPLB's max load on the layer."""
    caps = np.array([r.max_load for r in layers])
    if max_imbalance is not None:
        return np.maximum(caps, max_imbalance * trace.loads.sum(axis=1) / problem.num_gpus)
    check_groups(problem, expert_groups)
    eplb = eplb_policy_rows(trace.loads, problem, expert_groups)[0]
    return np.maximum(caps, [gpu_loads(trace.loads[l], eplb[l], problem.num_gpus).max() for l in range(trace.num_layers)])


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False)
