"""Scenarios: one sequence-parallel attention layer (forward, optionally backward) on a cluster.

The schedules are the runtime's own (``tokenloom.parallel.builders.build_schedule``); this module
only builds them, prices each pass with :func:`~tokenloom.simulator.engine.simulate` and adds the
passes up: the backward pass starts after the forward pass ends (other layers run in between).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from tokenloom.parallel.builders import STRATEGIES, build_schedule
from tokenloom.parallel.schedule import Schedule
from tokenloom.simulator.cost import AttentionShape, CostModel
from tokenloom.simulator.engine import no_gc, simulate
from tokenloom.simulator.hardware import Cluster
from tokenloom.simulator.timeline import Timeline


@dataclass
class AttentionResult:
    strategy: str
    layout: str
    shape: AttentionShape
    passes: list[Timeline]  # forward, then backward if simulated

    @property
    def total_s(self) -> float:
        return sum(p.total_s for p in self.passes)

    def summary(self) -> dict:
        """JSON-ready totals over the passes plus a per-pass breakdown (``passes``)."""
        per_pass = [p.summary() for p in self.passes]
        bytes_sent = np.sum([p.bytes_sent for p in self.passes], axis=0)
        head = per_pass[0]
        out = {
            "strategy": self.strategy,
            "layout": self.layout,
            "hardware": head["hardware"],
            "world_size": head["world_size"],
            "seq": self.shape.seq_len,
            "heads": self.shape.num_heads,
            "kv_heads": self.shape.kv_heads,
            "head_dim": self.shape.head_dim,
            "batch": self.shape.batch,
            "dtype_bytes": self.shape.dtype_bytes,
            "causal": head["causal"],
            "backward": len(self.passes) > 1,
            "total_ms": sum(p["total_ms"] for p in per_pass),
            "step_ms": [x for p in per_pass for x in p["step_ms"]],
        }
        for key in ("compute_ms", "exposed_comm_ms", "comm_ms", "bubble_ms"):
            out[key] = sum(p[key] for p in per_pass)
        comm = sum(float(p.comm_s.sum()) for p in self.passes)
        exposed = sum(float(p.exposed_s.sum()) for p in self.passes)
        out["overlap_fraction"] = 1.0 if comm <= 0 else max(0.0, 1.0 - exposed / comm)
        out["bytes_per_rank"] = float(bytes_sent.max(initial=0.0))
        out["bytes_total"] = float(bytes_sent.sum())
        out["passes"] = {("backward" if p["backward"] else "forward"): p for p in per_pass}
        return out


@functools.lru_cache(maxsize=64)
def _schedule(strategy: str, world_size: int, layout: str, causal: bool, backward: bool, num_heads: int,
              num_kv_heads: int) -> Schedule:
    """Schedules are pure data and depend on no sizes: build each once (the advisor asks often)."""
    return build_schedule(strategy, world_size, layout=layout, causal=causal, backward=backward,
                          num_heads=num_heads, num_kv_heads=num_kv_heads)


def simulate_attention(strategy: str, cluster: Cluster, shape: AttentionShape, *, causal: bool,
                       backward: bool = False, layout: str = "zigzag") -> AttentionResult:
    """Simulate ``strategy`` on ``cluster``; raises ValueError for shapes the schedule cannot take."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    cost = CostModel(shape, cluster, layout)  # validates seq against the layout
    passes = []
    for bwd in ((False, True) if backward else (False,)):
        with no_gc():  # building a large schedule suffers the same collector rescans as simulating it
            sched = _schedule(strategy, cluster.num_gpus, layout, causal, bwd, shape.num_heads, shape.kv_heads)
        passes.append(simulate(sched, cost))
    return AttentionResult(strategy, layout, shape, passes)
