"""MoE expert placement: balance token load per GPU (with redundant experts, as DeepSeek EPLB does)
and cut the messages the serving system sends: distinct remote nodes per token and layer when
tokens return to their DP rank (DeepEP; ``token_home="dp"``), or tokens crossing nodes between
consecutive layers when they stay where they were combined (MoETuner; ``token_home="expert"``).

Data flow: trace -> problem -> planner (contiguous / round_robin / greedy / ilp) -> plan -> metrics;
docs/placement.md ("Code layout") lists the files, data at the bottom, algorithms above.
Names are imported on first use, so ``import tokenloom.placement`` is free.

    from tokenloom.placement import load_trace, plan_placement, evaluate_plan
    trace = load_trace("trace.npz")
    plan = plan_placement(trace, num_gpus=32, gpus_per_node=8, num_redundant=32)
    plan.save("plan.json"); print(evaluate_plan(plan, trace).max_mean_load)
"""

from tokenloom.common.shadow import hand_back

hand_back(__name__, __file__)  # imported by its bare name from the checkout: the installed package wins

from tokenloom.common.lazy import lazy_exports

_LAZY = {
    "METHODS": "tokenloom.placement.options",
    "PlacementProblem": "tokenloom.placement.problem",
    "Plan": "tokenloom.placement.plan",
    "PlanMetrics": "tokenloom.placement.metrics",
    "PlanOptions": "tokenloom.placement.options",
    "RouterConfig": "tokenloom.placement.router",
    "SynthConfig": "tokenloom.placement.synth",
    "Trace": "tokenloom.placement.trace",
    "baseline_messages": "tokenloom.placement.evaluate",
    "baseline_metrics": "tokenloom.placement.evaluate",
    "coactivation": "tokenloom.placement.trace",
    "evaluate_messages": "tokenloom.placement.evaluate",
    "evaluate_plan": "tokenloom.placement.evaluate",
    "load_plan": "tokenloom.placement.plan",
    "load_trace": "tokenloom.placement.trace",
    "message_metrics": "tokenloom.placement.dispatch",
    "plan_placement": "tokenloom.placement.planner",
    "rebalance_experts": "tokenloom.placement.eplb",
    "router_topk": "tokenloom.placement.router",
    "save_aggregated": "tokenloom.placement.trace",
    "save_topk": "tokenloom.placement.trace",
    "synth_topk": "tokenloom.placement.synth",
    "trace_from_topk": "tokenloom.placement.trace",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
