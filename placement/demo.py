"""The placement section of ``tokenloom demo``: planners on the bundled small trace, both execution models.

The trace (``data/demo_trace.npz``, 12 layers x 32 experts, top-4, 2000 tokens, 4 expert domains)
was made by::

    tokenloom trace synth --layers 12 --experts 32 --top-k 4 --tokens 2000 --skew 0.8 \\
        --affinity 0.7 --domains 4 --seed 7 --out placement/data/demo_trace.npz
"""

from __future__ import annotations

import time
from importlib import resources
from typing import TextIO

from tokenloom.placement.planner import plan_placement
from tokenloom.placement.trace import Trace, load_trace

DEMO_GPUS, DEMO_GPUS_PER_NODE, DEMO_REDUNDANT = 8, 4, 8
DEMO_TIME_LIMIT = 3.0
DEMO_ROWS = (("contiguous", "dp"), ("greedy", "dp"), ("ilp", "dp"), ("ilp", "expert"))


def demo_trace() -> Trace:
    """The bundled trace, loaded through the same reader users call."""
    with resources.as_file(resources.files("tokenloom.placement") / "data" / "demo_trace.npz") as path:
        return load_trace(path)


def demo_section(out: TextIO) -> None:
    """Write a title line and a table (method, token home, max/mean load, messages, cross-node tokens, seconds)."""
    trace = demo_trace()
    out.write(f"MoE expert placement: bundled trace ({trace.num_layers} layers x {trace.num_experts} experts, "
              f"top-{trace.top_k}) on {DEMO_GPUS} GPUs in {DEMO_GPUS // DEMO_GPUS_PER_NODE} nodes, "
              f"{DEMO_REDUNDANT} redundant slots\n")
    out.write(f"  {'method':<11} {'home':<7} {'max/mean load':>13} {'msgs/token':>10} {'cross-node tok':>14} {'seconds':>8}\n")
    for method, home in DEMO_ROWS:
        start = time.perf_counter()
        plan = plan_placement(trace, DEMO_GPUS, gpus_per_node=DEMO_GPUS_PER_NODE, num_redundant=DEMO_REDUNDANT,
                              method=method, time_limit=DEMO_TIME_LIMIT, progress=False, token_home=home)
        seconds = time.perf_counter() - start
        m = plan.metrics
        out.write(f"  {method:<11} {home:<7} {max(m['max_mean_load']):>13.3f} {m['messages']['messages_per_token']:>10.3f} "
                  f"{m['cross_node_tokens']:>14.0f} {seconds:>8.2f}\n")
    out.write("  (max/mean: worst layer's busiest GPU over the mean; msgs/token: remote node messages per token and\n"
              "   MoE layer under the row's token home, dispatch + combine; cross-node tok: routed between consecutive layers)\n")
