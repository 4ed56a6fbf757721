"""How to plan: one typed, validated options object for :func:`~tokenloom.placement.plan_placement`.

Every keyword ``plan_placement`` took before maps onto a field of the same name, so
``plan_placement(trace, 32, gpus_per_node=8, time_limit=60)`` and
``plan_placement(trace, 32, PlanOptions(gpus_per_node=8, time_limit=60))`` are the same call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.placement.dispatch import REPLICA_CHOICES, TOKEN_HOMES
from tokenloom.placement.plan import Plan
from tokenloom.placement.problem import DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS

METHODS = ("ilp", "greedy", "round_robin", "contiguous")

MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class PlanOptions:
    """Cluster details, execution model, method and budget of one planning run.

    Cluster (with ``num_gpus``, they build the :class:`PlacementProblem`): ``gpus_per_node``
    (default ``min(num_gpus, 8)``), ``num_redundant`` extra slots per layer (default: the fewest
    that make the slots divide the GPUs), link bandwidths in GB/s.
    Execution model (dispatch.py): ``token_home`` (``dp`` | ``expert``), ``replica_choice``
    (``uniform`` | ``local``).
    Method: ``method`` (one of ``METHODS``), ``time_limit`` seconds for the whole call,
    ``max_imbalance`` cap on each layer's busiest GPU / mean (default: EPLB's on that layer),
    ``expert_groups`` the model's routing groups as handed to EPLB (default 1; DeepSeek-V3: 8).
    Re-planning: ``previous`` plan with ``max_moves`` per layer (both or neither).
    Held-out tokens: ``holdout`` fraction seeded by ``seed`` (raw traces only).
    Running: ``map_fn(fn, items)`` solves the dp layers (default: a loop; Ray tasks from the CLI);
    ``progress`` shows a tqdm bar (default: when stdout is a terminal).
    """

    gpus_per_node: int | None = None
    num_redundant: int | None = None
    method: str = "ilp"
    time_limit: float = 60.0
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS
    previous: Plan | None = None
    max_moves: int | None = None
    progress: bool | None = None
    token_home: str = "dp"
    replica_choice: str = "uniform"
    max_imbalance: float | None = None
    expert_groups: int | None = None
    holdout: float = 0.0
    seed: int = 0
    map_fn: MapFn | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"method: unknown {self.method!r}; valid: {', '.join(METHODS)}")
        if self.token_home not in TOKEN_HOMES:
            raise UsageError(f"token_home: unknown {self.token_home!r}; valid: {', '.join(TOKEN_HOMES)}")
        if self.replica_choice not in REPLICA_CHOICES:
            raise UsageError(f"replica_choice: unknown {self.replica_choice!r}; valid: {', '.join(REPLICA_CHOICES)}")
        limit = self.time_limit
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not np.isfinite(limit) or limit <= 0:
            raise UsageError(f"time_limit: must be a positive number of seconds, got {limit!r}")
        cap = self.max_imbalance
        if cap is not None and (not np.isfinite(cap) or not 1.0 <= cap <= 1e6):
            raise UsageError(f"max_imbalance: must be a number >= 1 (busiest GPU / mean), got {cap!r}")
        if not (isinstance(self.holdout, (int, float)) and 0.0 <= self.holdout < 1.0):
            raise UsageError(f"holdout: must be in [0, 1), got {self.holdout!r}")

    def replace(self, **changes: Any) -> "PlanOptions":
        """A copy with ``changes`` (field names as keywords); an unknown name is a TypeError naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"plan_placement() got an unexpected keyword argument {unknown[0]!r}")
        return dataclasses.replace(self, **changes) if changes else self


__all__ = ["METHODS", "PlanOptions"]
