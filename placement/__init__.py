"""MoE expert placement: balance token load per GPU (with redundant experts, as DeepSeek EPLB does)
and cut the tokens that cross GPUs and nodes between consecutive layers (MoETuner).

Data flow: trace -> problem -> planner (contiguous / round_robin / greedy / ilp) -> plan -> metrics.

    from tokenloom.placement import load_trace, plan_placement, evaluate_plan
    trace = load_trace("trace.npz")
    plan = plan_placement(trace, num_gpus=32, gpus_per_node=8, num_redundant=32)
    plan.save("plan.json"); print(evaluate_plan(plan, trace).max_mean_load)
"""

from tokenloom.placement.metrics import PlanMetrics
from tokenloom.placement.plan import Plan, load_plan
from tokenloom.placement.planner import METHODS, baseline_metrics, evaluate_plan, plan_placement
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.synth import SynthConfig, synth_topk
from tokenloom.placement.trace import Trace, load_trace, save_aggregated, save_topk, trace_from_topk

__all__ = [
    "METHODS",
    "Plan",
    "PlanMetrics",
    "PlacementProblem",
    "SynthConfig",
    "Trace",
    "baseline_metrics",
    "evaluate_plan",
    "load_plan",
    "load_trace",
    "plan_placement",
    "save_aggregated",
    "save_topk",
    "synth_topk",
    "trace_from_topk",
]
