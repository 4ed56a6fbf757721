"""Scenarios: one sequence-parallel attention layer (forward, optionally backward) on a cluster.

The schedules are the runtime's own (``tokenloom.parallel.builders.build_schedule``); this module
only builds them, prices each pass with :func:`~tokenloom.simulator.engine.simulate` and adds the
passes up: the backward pass starts after the forward pass ends (other layers run in between).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.parallel.builders import schedule_for
from tokenloom.parallel.dims import ParallelDims, effective_window, parse_strategy
from tokenloom.parallel.schedule import Schedule
from tokenloom.simulator.cost import AttentionShape, CostModel
from tokenloom.simulator.engine import no_gc, simulate
from tokenloom.simulator.hardware import Cluster
from tokenloom.simulator.lockstep import lockstep_supported, simulate_plan
from tokenloom.simulator.ringfast import compile_ring
from tokenloom.simulator.timeline import Timeline
from tokenloom.common.checks import check_choice, check_int
from tokenloom.common.vocab import LAYOUTS, Strategy


@dataclass
class AttentionResult:
    strategy: str
    layout: str
    shape: AttentionShape
    passes: list[Timeline]  # forward, then backward if simulated
    window: tuple[int, int] | None = None  # the effective sliding window priced (None: none)

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
        if self.window is not None:  # absent without a window: unwindowed summaries stay as they were
            out["window"] = list(self.window)
        return out


@functools.lru_cache(maxsize=64)
def _schedule(dims: ParallelDims, causal: bool, backward: bool) -> Schedule:
    """Schedules are pure data (sizes only through a window): build each once (the advisor asks often)."""
    return schedule_for(dims, causal=causal, backward=backward)


# Work limit. A pass of N ranks moves about 2 N^2 point-to-point transfers (TokenRing, Ring) or
# 3 N^2 all-to-all pair transfers (Ulysses), and the engine spends ~0.1 ms per transfer (build,
# route, price, record; measured on one 2.x GHz core), so 1024 GPUs would take many minutes and
# gigabytes. Refuse up front instead; the limit admits 256 GPUs for one forward pass (~25 s here).
MAX_SIM_TRANSFERS = 150_000
_TRANSFERS_PER_RANK_SQUARED = {Strategy.TOKENRING: 2, Strategy.RING: 2, Strategy.ULYSSES: 3}


def estimated_transfers(strategy: str, world_size: int, backward: bool) -> int:
    """Upper estimate of the transfers the engine walks for ``strategy`` (forward [+ backward])."""
    base, ulysses = parse_strategy(strategy)
    passes = 2 if backward else 1
    if ulysses > 1:  # rings of R ranks per head shard (2 R^2 U) + all-to-alls inside R groups (3 R U^2)
        return world_size * (2 * (world_size // ulysses) + 3 * ulysses) * passes
    return _TRANSFERS_PER_RANK_SQUARED[base] * world_size * world_size * passes


MAX_SIM_TRANSFERS_CEILING = 2_000_000  # ~8 GB and ~5 min: the most ``max_transfers`` may ask for


def check_work(runs: list[tuple[str, int, bool]], field: str = "gpus", *, limit: int | None = None,
               weight: int = 1) -> int:
    """Refuse (UsageError naming ``field``) simulations of ``(strategy, world_size, backward)``
    that together exceed ``limit`` (default :data:`MAX_SIM_TRANSFERS`); return the estimate.
    ``weight``: transfers that cost one event-engine transfer (:data:`LOCKSTEP_WEIGHT` on the
    lockstep path)."""
    limit = MAX_SIM_TRANSFERS if limit is None else check_int(limit, "max_transfers", lo=1,
                                                               hi=MAX_SIM_TRANSFERS_CEILING)
    total = -(-sum(estimated_transfers(*run) for run in runs) // weight)
    if total > limit:
        n = max(run[1] for run in runs)
        what = f"{len(runs)} simulations" if len(runs) > 1 else "the simulation"
        raise_it = (f", or raise --max-transfers (at most {MAX_SIM_TRANSFERS_CEILING:,})"
                    if total <= MAX_SIM_TRANSFERS_CEILING else "")
        per = ("~0.1-0.2 ms and ~4 KB each" if weight == 1 else
               f"the lockstep path counts 1/{weight} of each")
        raise UsageError(f"{field}: {n} ranks need ~{total:,} simulated transfers for {what} (~2-3 x "
                         f"gpus^2 per pass, {per}); the limit is {limit:,}: use fewer "
                         f"gpus or passes{raise_it}", field=field)
    return total


def attention_dims(strategy: str, world_size: int, shape: AttentionShape, *, layout: str = "zigzag",
                   causal: bool = False, window_size=None) -> ParallelDims:
    """The rules object of simulating ``strategy`` on ``shape``: the same :class:`ParallelDims` the
    API builds for the call (head shards, kv replication, the Ulysses heads rule, the sequence
    rule, the effective window). UsageError naming the field the API names."""
    base, ulysses = parse_strategy(strategy)  # also "ulysses<N>+tokenring|ring" (2-D hybrid)
    if ulysses > 1 and (world_size % ulysses or ulysses >= world_size):
        # a 1-rank ring dim is plain Ulysses: the simulator prices it under that name
        raise UsageError(f"{strategy}: the Ulysses size {ulysses} must divide gpus ({world_size}) and be "
                         f"smaller", field="strategy")
    check_choice(layout, "layout", LAYOUTS)
    window = effective_window(window_size, causal, shape.seq_len)
    dims = ParallelDims(base, world_size, layout=layout, ulysses=ulysses, heads=shape.num_heads,
                        kv_heads=shape.kv_heads, window=window, seq_len=shape.seq_len if window else None)
    dims.dense_chunk_len(shape.seq_len)
    return dims


def check_feasible(strategy: str, world_size: int, shape: AttentionShape, *, layout: str = "zigzag",
                   causal: bool = False, window_size=None) -> None:
    """UsageError if ``strategy`` cannot run ``shape`` on ``world_size`` ranks (before building)."""
    attention_dims(strategy, world_size, shape, layout=layout, causal=causal, window_size=window_size)


ENGINES = ("auto", "event", "lockstep")
# The lockstep path (compile_ring + simulate_plan) spends ~1-2 us per transfer instead of ~0.1 ms
# (benchmarks/bench_simulator.py): it counts 1/64 of a transfer against the same work limit.
LOCKSTEP_WEIGHT = 64


def uses_lockstep(cluster: Cluster, engine: str = "auto", windowed: bool = False) -> bool:
    """Whether :func:`simulate_attention` prices on the step-by-step path (same semantics,
    :mod:`.lockstep`): every route rank-owned, no window (its compiled rings are unmasked), and no
    per-transfer record asked for."""
    check_choice(engine, "engine", ENGINES)
    ok = lockstep_supported(cluster)
    if engine == "lockstep" and not ok:
        raise UsageError(f"engine: lockstep needs rank-owned links (fabric switch or mesh, or PCIe without "
                         f"shared switch uplinks); {cluster.node.name} has {cluster.node.fabric}", field="engine")
    if engine == "lockstep" and windowed:
        raise UsageError("engine: lockstep prices unwindowed schedules only; use --engine event or auto with "
                         "a window", field="engine")
    return ok and not windowed and engine != "event"


def simulate_attention(strategy: str, cluster: Cluster, shape: AttentionShape, *, causal: bool,
                       backward: bool = False, layout: str = "zigzag",
                       max_transfers: int | None = None, engine: str = "auto",
                       window_size=None) -> AttentionResult:
    """Simulate ``strategy`` on ``cluster``; UsageError for shapes the schedule cannot take or
    sizes over the work limit (:func:`check_work`, ``max_transfers``).

    ``engine``: ``"event"`` walks the built schedule event by event and records every transfer
    (traces and Gantt charts need it); ``"lockstep"`` compiles the ring schedule to arrays
    (:mod:`.ringfast`) and prices it step by step (:mod:`.lockstep`): the same times, for 1024
    ranks in seconds, without per-transfer records; ``"auto"`` takes lockstep where it applies.
    ``window_size``: a sliding window ``(left, right)`` as the API takes it (flash-attn's
    convention, -1 unbounded): hidden blocks are not in the schedule, masked ones cost their
    visible share (priced on the event engine).
    """
    dims = attention_dims(strategy, cluster.num_gpus, shape, layout=layout, causal=causal,
                          window_size=window_size)
    cost = CostModel.for_dims(shape, cluster, dims)
    fast = uses_lockstep(cluster, engine, windowed=dims.window is not None)
    check_work([(strategy, cluster.num_gpus, backward)], limit=max_transfers,
               weight=LOCKSTEP_WEIGHT if fast else 1)
    passes = []
    for bwd in ((False, True) if backward else (False,)):
        with no_gc():  # building a large schedule suffers the same collector rescans as simulating it
            if fast:
                plan = compile_ring(strategy, cluster.num_gpus, cost, layout=layout, causal=causal, backward=bwd,
                                    num_heads=shape.num_heads, num_kv_heads=shape.kv_heads)
                passes.append(simulate_plan(plan, cluster, cost))
                continue
            sched = _schedule(dims, causal, bwd)
        passes.append(simulate(sched, cost))
    return AttentionResult(strategy, layout, shape, passes, dims.window)
