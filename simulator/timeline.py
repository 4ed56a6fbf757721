"""What a simulation produces: per-rank, per-step times and the summary numbers derived from them.

Per rank and step ``s`` (seconds from the start; one compute stream, communication in flight
beside it, exactly the four phases of ``tokenloom.parallel.schedule.Step``):

- ``post``: the step's communication is posted and its computes start;
- ``compute_end``: the computes are done; ``comm_end``: the step's last transfer is done;
- ``wait_end = max(compute_end, comm_end)``; ``step_end = wait_end + merges``.

So a rank's time is ``busy + exposed`` exactly, with ``busy`` its kernel time and ``exposed`` the
time its compute stream waited on communication (``sum(max(0, comm_end - compute_end))``, which
includes waiting for a late peer). ``tail`` is the idle time after it finished, until the slowest
rank finished (load imbalance bubbles).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenloom.parallel.schedule import Schedule


@dataclass(frozen=True)
class Transfer:
    """One point-to-point transfer or one pair of an all-to-all, as it ran."""

    src: int
    dst: int
    channel: str
    label: str
    num_bytes: float
    ready: float  # both sides posted
    start: float  # ready + route latency: bytes start to flow
    end: float


@dataclass
class Timeline:
    schedule: Schedule
    cluster_name: str
    post: np.ndarray  # (ranks, steps), NaN where a rank has no such step
    compute_end: np.ndarray
    comm_end: np.ndarray
    wait_end: np.ndarray
    step_end: np.ndarray
    has_comm: np.ndarray  # (ranks, steps) bool
    bytes_sent: np.ndarray  # (ranks,)
    transfers: list[Transfer] = field(default_factory=list)
    peak_active_transfers: int = 0
    cost: Any = None  # the CostModel that priced it (per-op durations for traces)

    @property
    def world_size(self) -> int:
        return self.schedule.world_size

    @property
    def rank_end(self) -> np.ndarray:
        return np.nanmax(self.step_end, axis=1, initial=0.0)

    @property
    def total_s(self) -> float:
        return float(self.rank_end.max(initial=0.0))

    @property
    def critical_rank(self) -> int:
        return int(np.argmax(self.rank_end))

    @property
    def exposed_s(self) -> np.ndarray:
        """Per rank: time the compute stream waited on communication."""
        return np.nansum(np.maximum(self.comm_end - self.compute_end, 0.0), axis=1)

    @property
    def busy_s(self) -> np.ndarray:
        """Per rank: kernel time (attention blocks, packs, merges)."""
        return self.rank_end - self.exposed_s

    @property
    def comm_s(self) -> np.ndarray:
        """Per rank: time with communication outstanding (post to last transfer, per step)."""
        return np.nansum(np.where(self.has_comm, self.comm_end - self.post, 0.0), axis=1)

    @property
    def tail_s(self) -> np.ndarray:
        return self.total_s - self.rank_end

    @property
    def step_s(self) -> np.ndarray:
        """Per step: the longest any rank spent in it."""
        return np.nanmax(self.step_end - self.post, axis=0, initial=0.0)

    @property
    def overlap_fraction(self) -> float:
        """Share of communication time hidden behind compute, over all ranks (1.0: all hidden)."""
        comm = float(self.comm_s.sum())
        return 1.0 if comm <= 0 else max(0.0, 1.0 - float(self.exposed_s.sum()) / comm)

    def summary(self) -> dict:
        """JSON-ready numbers (milliseconds, bytes); compute + exposed = total on the critical rank."""
        sched, crit = self.schedule, self.critical_rank
        ms = 1e3
        return {
            "strategy": sched.strategy,
            "layout": sched.layout,
            "causal": sched.causal,
            "backward": sched.backward,
            "world_size": sched.world_size,
            "hardware": self.cluster_name,
            "num_steps": sched.num_steps,
            "total_ms": self.total_s * ms,
            "step_ms": [float(x) * ms for x in self.step_s],
            "compute_ms": float(self.busy_s[crit]) * ms,
            "exposed_comm_ms": float(self.exposed_s[crit]) * ms,
            "comm_ms": float(self.comm_s[crit]) * ms,
            "overlap_fraction": self.overlap_fraction,
            "bubble_ms": float(self.tail_s.max(initial=0.0)) * ms,
            "critical_rank": crit,
            "bytes_per_rank": float(self.bytes_sent.max(initial=0.0)),
            "bytes_total": float(self.bytes_sent.sum()),
            "per_rank": {
                "end_ms": [float(x) * ms for x in self.rank_end],
                "compute_ms": [float(x) * ms for x in self.busy_s],
                "exposed_comm_ms": [float(x) * ms for x in self.exposed_s],
                "bytes_sent": [float(x) for x in self.bytes_sent],
            },
        }
