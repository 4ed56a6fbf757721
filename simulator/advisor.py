"""Advisor: rank (strategy, layout) pairs by simulated time and say why the winner wins.

``choose_strategy`` is what ``sp_attention(strategy="auto")`` calls; it is cached per arguments so
repeated layers cost a dictionary lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

from tokenloom.common.checks import check_choice, check_int
from tokenloom.common.errors import UsageError
from tokenloom.common.vocab import LAYOUTS, PREFERRED_LAYOUTS, RING_STRATEGIES, STRATEGIES
from tokenloom.parallel.dims import AttentionProblem, describe_strategy, effective_window, hybrid_name, parse_strategy
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import LOCAL_CPU, MAX_CLUSTER_GPUS, Cluster, make_cluster
from tokenloom.simulator.scenario import (LOCKSTEP_WEIGHT, MAX_SIM_TRANSFERS, AttentionResult, check_feasible,
                                          check_work, estimated_transfers, simulate_attention, uses_lockstep)

# Substrings of torch.cuda.get_device_name() -> catalog name; first match wins (A100 before A10).
_DEVICE_NAMES = (("h200", "h200-sxm"), ("h100", "h100-sxm"), ("a100", "a100-sxm"), ("a10", "a10-pcie"),
                 ("mi300", "mi300x"))
DEFAULT_GPU = "h100-sxm"  # an unknown CUDA device is priced as the most common datacenter GPU
TIE = 0.01  # results closer than 1% are a tie: the cost model is not that accurate
# PREFERRED_LAYOUTS (vocab): ties (e.g. Ulysses, whose cost ignores layout) go to zigzag


@dataclass
class Advice:
    ranking: list[AttentionResult]  # fastest first
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (strategy, layout, why)
    gpus_per_node: int = 0  # to describe 2-D hybrids ("ulysses x8 inside nodes")

    @property
    def winner(self) -> AttentionResult:
        return self.ranking[0]

    @property
    def rival(self) -> AttentionResult | None:
        """The fastest result of another strategy than the winner's."""
        return next((r for r in self.ranking[1:] if r.strategy != self.winner.strategy), None)

    @property
    def is_tie(self) -> bool:
        """Winner and rival within ``TIE`` of each other: inside the model's accuracy."""
        rival = self.rival
        return rival is not None and rival.total_s <= (1 + TIE) * self.winner.total_s

    def verdict(self) -> str:
        """One sentence: who wins and by how much (or that it is a tie)."""
        best, rival = self.winner, self.rival
        name = f"{best.strategy} ({best.layout})"
        if parse_strategy(best.strategy)[1] > 1:
            name += f" [{describe_strategy(best.strategy, best.summary()['world_size'], self.gpus_per_node)}]"
        if rival is None:
            return f"{name} is the only strategy that fits: {best.total_s * 1e3:.3f} ms."
        gain = rival.total_s / best.total_s - 1 if best.total_s > 0 else 0.0
        if self.is_tie:
            return (f"{name} and {rival.strategy} tie: {best.strategy} is ahead by {gain:.1%}, inside the "
                    f"model's accuracy.")
        return f"{name} wins by {gain:.1%} over {rival.strategy} ({rival.layout})."

    def explain(self) -> str:
        """One paragraph: the verdict, the numbers behind it, and the regime."""
        s_best = self.winner.summary()
        lines = [self.verdict()]
        if self.rival is not None:
            s_riv = self.rival.summary()
            lines.append(
                f"Time {s_best['total_ms']:.3f} vs {s_riv['total_ms']:.3f} ms; bytes sent per rank "
                f"{_gb(s_best['bytes_per_rank'])} vs {_gb(s_riv['bytes_per_rank'])}; exposed communication "
                f"{s_best['exposed_comm_ms']:.3f} vs {s_riv['exposed_comm_ms']:.3f} ms; compute "
                f"{s_best['compute_ms']:.3f} vs {s_riv['compute_ms']:.3f} ms.")
            gap = s_riv["total_ms"] - s_best["total_ms"]
            if not self.is_tie:
                d_exposed = s_riv["exposed_comm_ms"] - s_best["exposed_comm_ms"]
                why = ("exposed communication" if abs(d_exposed) >= 0.5 * gap
                       else "kernel time (compute, merges, launches)")
                lines.append(f"Most of the {gap:.3f} ms gap is {why}.")
        exposed_share = s_best["exposed_comm_ms"] / s_best["total_ms"] if s_best["total_ms"] > 0 else 0.0
        regime = "compute-bound" if exposed_share < 0.05 else "communication-bound"
        lines.append(f"The winner is {regime}: {exposed_share:.1%} of its time is exposed communication, "
                     f"{s_best['overlap_fraction']:.0%} of its communication overlaps compute.")
        return " ".join(lines)

    def to_dict(self) -> dict:
        keys = ("strategy", "layout", "total_ms", "compute_ms", "exposed_comm_ms", "overlap_fraction",
                "bytes_per_rank")
        return {
            "winner": {"strategy": self.winner.strategy, "layout": self.winner.layout},
            "tie": self.is_tie,
            "verdict": self.verdict(),
            "ranking": [{k: r.summary()[k] for k in keys} for r in self.ranking],
            "skipped": [{"strategy": s, "layout": lay, "reason": why} for s, lay, why in self.skipped],
            "explanation": self.explain(),
        }


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.3f} GB"


def hybrid_candidates(cluster: Cluster) -> tuple[str, ...]:
    """2-D hybrids worth pricing on a multi-node cluster: Ulysses over a node (or half of one),
    TokenRing or Ring across (``"ulysses8+tokenring"``; needs a 2-D DeviceMesh to run)."""
    per_node, n = cluster.gpus_per_node, cluster.num_gpus
    if n <= per_node:
        return ()
    sizes = [u for u in (per_node, per_node // 2) if 1 < u < n and n % u == 0]
    return tuple(hybrid_name(u, ring) for u in sizes for ring in RING_STRATEGIES)


def advise_attention(cluster: Cluster, shape: AttentionShape, *, causal: bool, backward: bool = True,
                     strategies: tuple[str, ...] | None = None,
                     layouts: tuple[str, ...] = PREFERRED_LAYOUTS, max_transfers: int | None = None,
                     window_size=None) -> Advice:
    """Simulate every feasible (strategy, layout); UsageError if none fits the shape or the
    simulations together exceed the work limit (checked before any is run). ``strategies``
    None: the three flat strategies plus, across nodes, the 2-D hybrids (:func:`hybrid_candidates`).
    ``window_size``: a sliding window ``(left, right)`` as the API takes it (priced, not ignored)."""
    auto_hybrids = strategies is None
    windowed = effective_window(window_size, causal, shape.seq_len) is not None
    weight = LOCKSTEP_WEIGHT if uses_lockstep(cluster, windowed=windowed) else 1  # what simulating costs
    if strategies is None:
        strategies = STRATEGIES + hybrid_candidates(cluster)
    feasible, skipped, fields = [], [], []
    for strategy in strategies:
        for layout in layouts:
            try:  # the API's rules (ParallelDims): heads, kv heads, sequence vs layout, window
                check_feasible(strategy, cluster.num_gpus, shape, layout=layout, causal=causal,
                               window_size=window_size)
            except UsageError as exc:
                skipped.append((strategy, layout, str(exc)))
                fields.append(exc.field or _field_of(str(exc)))
                continue
            feasible.append((strategy, layout))
    if not feasible:
        raise UsageError(f"no strategy fits this shape: {skipped[0][2]}", field=fields[0])
    if auto_hybrids:  # the hybrids were added here: drop them rather than refuse the flat ones
        limit = (MAX_SIM_TRANSFERS if max_transfers is None else max_transfers) * weight
        while sum(estimated_transfers(st, cluster.num_gpus, backward) for st, _ in feasible) > limit \
                and parse_strategy(feasible[-1][0])[1] > 1:
            st, lay = feasible.pop()
            skipped.append((st, lay, "over the simulation work limit together with the others; "
                                     f"try: simulate attention --strategy {st}"))
    check_work([(strategy, cluster.num_gpus, backward) for strategy, _ in feasible], limit=max_transfers,
               weight=weight)
    results = [simulate_attention(strategy, cluster, shape, causal=causal, backward=backward, layout=layout,
                                  max_transfers=max_transfers, window_size=window_size)
               for strategy, layout in feasible]
    order = {(s, lay): i for i, (s, lay) in enumerate((s, lay) for s in strategies for lay in layouts)}
    results.sort(key=lambda r: (r.total_s, order[(r.strategy, r.layout)]))
    return Advice(results, skipped, cluster.gpus_per_node)


def _field_of(message: str) -> str:
    return message.split(" ", 1)[0].strip(":")


@functools.lru_cache(maxsize=1)
def detect_hardware() -> str:
    """Name of this machine's node for the simulator, or ``local-cpu`` without CUDA. Never raises.

    With CUDA the node is read through NVML (as ``tokenloom topo`` does) and registered in the
    catalog as ``this-node``: its real GPU count, SM count and NVLink/PCIe fabric are priced, so
    ``advise`` and ``strategy="auto"`` answer for the machine they run on. If NVML cannot read the
    node, the catalog entry of the GPU model is used.
    """
    try:
        import torch

        if torch.cuda.is_available():
            from tokenloom.comm.nodes import read_topology

            node = hardware_from_topology(read_topology())
            if node is not None:
                return node
            name = torch.cuda.get_device_name(0).lower()
            return next((cat for key, cat in _DEVICE_NAMES if key in name), DEFAULT_GPU)
    except (ImportError, RuntimeError, AssertionError):
        pass  # a broken CUDA install is priced like no CUDA at all
    return LOCAL_CPU


def hardware_from_topology(topology: dict) -> str | None:
    """Register the node an NVML topology describes (``tokenloom.comm.nodes.read_topology``) and
    return its catalog name; None when it lists no GPUs."""
    from tokenloom.simulator.discovered import node_spec
    from tokenloom.simulator.hardware import register_node

    spec = node_spec(topology)
    if spec is None:
        return None
    register_node(spec)
    _choose.cache_clear()  # answers cached under the same name priced another node
    return spec.name


def choose_strategy(problem: AttentionProblem | None = None, *, hardware: str | None = None,
                    **shape: Any) -> tuple[str, str]:
    """``(strategy, layout)`` with the least simulated time for one attention layer, ``problem``
    (:class:`~tokenloom.parallel.dims.AttentionProblem`, the object the API resolves "auto" with;
    the keyword form ``world_size=, seq_len=, num_heads=, num_kv_heads=, head_dim=, causal=,
    dtype_bytes=, batch=, backward=, layout=, ulysses=, window_size=`` builds one).

    ``seq_len`` is the global sequence length (all ranks together); ``hardware`` a catalog name,
    ``None`` to detect it; ``layout`` fixes the layout when the data is already sharded (``None``:
    rank both). ``ulysses`` > 1: a 2-D mesh with Ulysses groups of that size; the answer is then
    the ring dim's strategy ("tokenring" or "ring"). A window is priced: hidden blocks cost
    nothing, so a short window favours the rings. Cached per problem.
    """
    if problem is None:
        problem = AttentionProblem.of(**shape)
    elif shape:
        raise TypeError(f"choose_strategy: pass a problem or its keywords, not both ({sorted(shape)})")
    world_size = check_int(problem.world_size, "world_size", lo=1, hi=MAX_CLUSTER_GPUS)
    hw = hardware if hardware is not None else detect_hardware()
    layouts = PREFERRED_LAYOUTS if problem.layout is None else (check_choice(problem.layout, "layout", LAYOUTS),)
    problem = dataclasses.replace(problem, world_size=world_size, kv_heads=problem.kv_heads or problem.heads,
                                  causal=bool(problem.causal), backward=bool(problem.backward), layout=None)
    return _choose(problem, hw, layouts)


@functools.lru_cache(maxsize=256)
def _choose(problem: AttentionProblem, hardware: str, layouts: tuple[str, ...]) -> tuple[str, str]:
    p = problem
    cluster = _cluster_for(hardware, p.world_size)
    shape = AttentionShape(p.seq_len, p.heads, p.head_dim, p.kv_heads, p.batch, p.dtype_bytes)
    weight = LOCKSTEP_WEIGHT if uses_lockstep(cluster, windowed=p.window is not None) else 1
    ask = functools.partial(advise_attention, cluster, shape, causal=p.causal, backward=p.backward,
                            layouts=layouts, window_size=p.window)
    if p.ulysses > 1:  # a 2-D mesh: Ulysses is fixed on the inner dim, rank the ring dim's strategies
        hybrids = tuple(hybrid_name(p.ulysses, ring) for ring in RING_STRATEGIES)
        if estimated_transfers(hybrids[0], p.world_size, p.backward) * 2 * len(layouts) > MAX_SIM_TRANSFERS * weight:
            return "tokenring", layouts[0]
        best = ask(strategies=hybrids).winner
        return parse_strategy(best.strategy)[0], best.layout
    runs = [(s, p.world_size, p.backward) for s in STRATEGIES for _ in layouts]
    if sum(estimated_transfers(*run) for run in runs) > MAX_SIM_TRANSFERS * weight:
        # Too many ranks to simulate every candidate in a call's time budget: TokenRing is the
        # default (no head divisibility needed, both link directions busy), priced by nothing.
        check_feasible("tokenring", p.world_size, shape, layout=layouts[0])  # still refuse a bad sequence
        warnings.warn(f"strategy='auto': {p.world_size} ranks are too many to simulate every strategy "
                      f"quickly; using tokenring ({layouts[0]}). Pass strategy= to choose.", stacklevel=3)
        return "tokenring", layouts[0]
    best = ask(strategies=STRATEGIES).winner  # a flat group cannot run a 2-D hybrid
    return best.strategy, best.layout


def _cluster_for(hardware: str, world_size: int) -> Cluster:
    """Fill whole nodes first: ``world_size`` ranks over as few nodes as the node size allows."""
    node = make_cluster(hardware, 1).node
    per_node = node.gpus_per_node
    num_nodes = -(-world_size // per_node)
    if world_size % num_nodes:
        num_nodes = world_size  # uneven split: price it as one rank per node (pessimistic)
    return make_cluster(hardware, world_size, num_nodes)
