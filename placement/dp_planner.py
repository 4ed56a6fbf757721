"""The ``dp`` planner over all layers (``token_home="dp"``, method ``ilp``; DeepEP with DP attention).

Per layer: EPLB's replica counts and the balanced greedy packing improved by swaps (the first
start), a cap on the busiest GPU (default: EPLB's own max load on that layer, so the plan is
never less balanced than EPLB; or ``max_imbalance`` x the mean), then the node-level
co-activation search of colocate.py under that cap. Layers are independent when tokens return to
their DP rank, so each is a pure function of its inputs (:func:`dp_layer`) and ``map_fn`` may run
them as Ray tasks. The search gets ``DP_SEARCH_SHARE`` of the time limit, split evenly per layer
against one wall-clock deadline.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from tokenloom.placement.balance import improve_by_swaps, layer_bounds
from tokenloom.placement.colocate import plan_layer
from tokenloom.placement.eplb import eplb_policy_rows
from tokenloom.placement.greedy import eplb_replica_counts, greedy_layer
from tokenloom.placement.metrics import gpu_loads
from tokenloom.placement.options import PlanOptions
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.starts import group_start
from tokenloom.placement.trace import Trace, coactivation

DP_SEARCH_SHARE = 0.7  # of the time budget for the dp layer searches (the rest: metrics, writing)


class DpLayer(NamedTuple):
    """One dp layer's inputs (picklable, for Ray tasks)."""

    loads: np.ndarray  # (E,)
    routing: np.ndarray | None  # the layer's ids (T, K), or its co-activation (E, E), or None
    eplb_row: np.ndarray  # (num_slots,) EPLB's row for the layer
    problem: PlacementProblem
    max_imbalance: float | None
    budget: float  # seconds for this layer
    wall_deadline: float  # time.time() deadline of the whole search
    groups: int | None  # the model's routing groups


def plan_dp(trace: Trace, problem: PlacementProblem, options: PlanOptions, start: float) -> tuple[np.ndarray, dict]:
    """(rows (L, num_slots), solver record); ``start``: the ``perf_counter`` the time limit counts from.

    ``options.expert_groups`` has passed :func:`~tokenloom.placement.eplb.check_groups` (the caller checks it
    before any work).
    """
    time_limit, max_imbalance, expert_groups = float(options.time_limit), options.max_imbalance, options.expert_groups
    eplb, policy = eplb_policy_rows(trace.loads, problem, expert_groups)
    wall_deadline = time.time() + max(0.0, start + time_limit * DP_SEARCH_SHARE - time.perf_counter())
    budget = max(0.0, wall_deadline - time.time()) / trace.num_layers
    items = [DpLayer(trace.loads[l], layer_routing(trace, l), eplb[l], problem, max_imbalance, budget, wall_deadline,
                     expert_groups) for l in range(trace.num_layers)]
    map_fn = options.map_fn
    results = list(map_fn(dp_layer, items)) if map_fn is not None else [dp_layer(item) for item in items]
    rows = np.stack([r[0] for r in results])
    caps = [r[1] for r in results]
    solver = {"name": "colocate", "status": "heuristic", "gap": None, "bound": layer_bounds(trace.loads, rows, problem),
              "cap": caps, "cap_rule": f"eplb {policy}" if max_imbalance is None else f"max_imbalance {max_imbalance:g}",
              "eplb_policy": policy, "expert_groups": expert_groups, "coactivation": layer_routing(trace, 0) is not None,
              "time_limit": time_limit}
    return rows, solver


def layer_routing(trace: Trace, layer: int) -> np.ndarray | None:
    """What a dp layer needs to build its co-activation: the layer's ids (small), else a stored matrix."""
    if trace.topk_ids is not None:
        return trace.topk_ids[layer]
    return None if trace.coactivations is None else trace.coactivations[layer]


def dp_layer(item: DpLayer) -> tuple[np.ndarray, float]:
    """One dp layer (a pure function of its inputs, so it can run as a Ray task): (row, cap)."""
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
