"""Decode scenario: one step of new tokens over a sharded KV cache, priced from the runtime's own
decode schedules (:mod:`tokenloom.parallel.decode_schedule`) by the shared discrete-event engine
(:func:`tokenloom.simulator.engine.simulate`: the same step phases, P2P rendezvous, link latencies
and fluid link sharing as every training schedule), with :class:`DecodeCost` pricing its ops.

Decode is memory-bound: a kernel over ``nk`` cached keys streams their K and V once. Its time is
``max(FLOPs / (peak * attention efficiency), read)`` where ``read`` combines a fixed cost F with
the streaming time ``bytes / (HBM bandwidth * e)`` as a p-norm, ``(F^p + stream^p)^(1/p)``: short
contexts are dominated by F, long ones stream at ``e`` of the datasheet bandwidth, in between the
two overlap. F, e and p are :data:`DECODE_FIXED_S`, :data:`DECODE_HBM_EFF`, :data:`DECODE_OVERLAP_P`,
fitted (:func:`fit_decode_kernel`) to :data:`H200_DECODE_ROWS`, torch SDPA decode steps measured on
one H200 (``benchmarks/gpu_shapes.py``); docs/decode.md lists the rows and the fit's error.
Messages: the engine's links (NVLink/NVSwitch inside a node, the NIC across nodes). Every call also
agrees its arguments in one fixed-size message; for replicated queries under pass-Q gather the
partials ride that message, so the agreement costs nothing beyond the schedule's exchange (as the
runtime does, :mod:`tokenloom.parallel.decode_agree`, sized in ``decode_schedule``); ring/pass-KV on replicated queries add an
output all-gather. Layers multiply.

:func:`min_gpus_for` answers the capacity question: the fewest GPUs whose per-token time meets a
target and whose cache share fits in memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tokenloom.common.errors import UsageError
from tokenloom.parallel.decode_schedule import (DECODE_STRATEGIES, MESSAGE_BYTES, build_decode_schedule, part_lens,
                                                 part_of, payload_fits_bytes)
from tokenloom.parallel.schedule import Compute, Merge
from tokenloom.simulator.engine import simulate
from tokenloom.simulator.hardware import Cluster, Device
from tokenloom.simulator.lockstep import lockstep_supported, plan_from_schedule, simulate_plan

# HBM per GPU in GB (datasheets); the catalog's Device has no capacity field
HBM_GB = {"h100-sxm": 80, "h200-sxm": 141, "a100-sxm": 80, "a10-pcie": 24, "mi300x": 192}
MAX_CONTEXT = 1 << 34

# One decode step (1 new token, batch 1, 8 query = 8 kv heads, head_dim 128, bf16) of torch 2.11
# SDPA on one NVIDIA H200, measured 2026-12-04 with benchmarks/gpu_shapes.py (copy bandwidth
# 4167 GB/s measured the same day): (cached tokens, ms)
H200_DECODE_ROWS = ((4096, 0.0355), (16384, 0.0426), (65536, 0.0849), (262144, 0.2597),
                    (1048576, 0.9971))
H200_DECODE_SHAPE = dict(heads=8, kv_heads=8, head_dim=128, batch=1, dtype_bytes=2)
# fit_decode_kernel on the rows at 4K, 64K and 1M (16K and 256K held out; docs/decode.md)
DECODE_FIXED_S = 33.75e-6  # F: launch, split-KV combine and dispatch of one decode kernel call
DECODE_HBM_EFF = 0.902  # e: share of the datasheet HBM bandwidth a long decode read streams at
DECODE_OVERLAP_P = 1.25  # p: how F and the stream overlap (1: added, inf: fully overlapped)


@dataclass(frozen=True)
class DecodeShape:
    context: int  # cached tokens before the step
    new_tokens: int = 1  # tokens per step (1: decode)
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 1
    batch: int = 1
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name, hi in (("context", MAX_CONTEXT), ("new_tokens", 1 << 24), ("heads", 1 << 16),
                         ("kv_heads", 1 << 16), ("head_dim", 1 << 16), ("layers", 1 << 12),
                         ("batch", 1 << 20), ("dtype_bytes", 8)):
            v = getattr(self, name)
            lo = 0 if name == "context" else 1
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise UsageError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", field=name)
        if self.heads % self.kv_heads:
            raise UsageError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})",
                             field="kv_heads")

    def cache_bytes(self, tokens: int) -> float:
        """K and V bytes of ``tokens`` tokens, all layers."""
        return 2.0 * self.layers * self.batch * tokens * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass
class DecodeResult:
    strategy: str
    hardware: str
    gpus: int
    step_ms: float  # one step of new_tokens through every layer
    compute_ms: float
    comm_ms: float
    cache_gb_per_gpu: float
    fits: bool

    def summary(self) -> dict:
        return asdict(self)


def read_s(num_bytes: float, dev: Device, fixed_s: float = DECODE_FIXED_S,
           eff: float = DECODE_HBM_EFF, p: float = DECODE_OVERLAP_P) -> float:
    """Seconds of one decode kernel that streams ``num_bytes`` (module docstring)."""
    stream = num_bytes / (dev.hbm_bw * eff)
    return (fixed_s ** p + stream ** p) ** (1.0 / p)


def fit_decode_kernel(rows, dev: Device, shape: dict = H200_DECODE_SHAPE) -> tuple[float, float, float, float]:
    """``(F, e, p, worst relative error)`` minimising the worst error of :func:`read_s` over
    ``rows`` ((cached tokens, ms)) on a grid: how the committed constants were found."""
    best = None
    for p in (1.0, 1.25, 1.5, 1.75, 2.0):
        for fi in range(80):
            fixed = 20e-6 + fi * 0.25e-6
            for ei in range(100):
                eff = 0.80 + ei * 0.002
                worst = max(abs(read_s(_kv_bytes(ctx, shape), dev, fixed, eff, p) * 1e3 / ms - 1)
                            for ctx, ms in rows)
                if best is None or worst < best[3] - 1e-12:
                    best = (fixed, eff, p, worst)
    return best


def _kv_bytes(tokens: int, shape: dict) -> float:
    return 2.0 * tokens * shape["batch"] * shape["kv_heads"] * shape["head_dim"] * shape["dtype_bytes"]


def _buf_bytes(buf, lens: dict[int, int], sh: DecodeShape) -> float:
    n = sum(lens[c] for c in buf.chunks)
    per = sh.batch * sh.head_dim
    if buf.kind == "q":
        return n * per * sh.heads * sh.dtype_bytes
    if buf.kind == "kv":
        return 2 * n * per * sh.kv_heads * sh.dtype_bytes
    return n * sh.batch * sh.heads * (sh.head_dim + 1) * 4  # out + lse travel in fp32


class DecodeCost:
    """The engine's cost model for a decode schedule (the interface of
    :class:`~tokenloom.simulator.cost.CostModel` the engine calls): chunk lengths are the agreed
    per-call sizes (old shards, new-token parts), not one dense chunk length."""

    def __init__(self, sh: DecodeShape, cluster: Cluster, lens: dict[int, int],
                 merges_per_kernel: int = 1) -> None:
        self.shape, self.cluster, self.lens = sh, cluster, lens
        self.merges_per_kernel = max(1, merges_per_kernel)  # > 1: partials merged in one stacked op
        self.world_size = cluster.num_gpus
        self._memo: dict = {}

    def buf_bytes(self, buf, kv_repeat: int = 1) -> float:
        key = (buf.kind, buf.chunks)
        if key not in self._memo:  # replicated buffers name all N chunks: N^3 without this
            self._memo[key] = _buf_bytes(buf, self.lens, self.shape)
        return self._memo[key]

    def compute_s(self, op: Compute) -> float:
        """One kernel per runtime call: full blocks of the same queries over adjacent keys are one
        read of the shard (:func:`tokenloom.parallel.decode_runtime._calls`)."""
        sh, dev, lens = self.shape, self.cluster.node.device, self.lens
        calls: dict = {}  # kernel call -> [query tokens, key tokens, flops]
        for i, blk in enumerate(op.blocks):
            nq = sum(lens[c] for c in blk.q_chunks)
            nk = sum(lens[c] for c in blk.kv_chunks)
            if not nq or not nk:
                continue
            causal = blk.causal and nq > 1
            rows = tuple(c for c in blk.q_chunks if lens[c])  # the runtime merges by row range
            call = calls.setdefault(i if causal else rows, [nq, 0, 0.0])
            call[1] += nk
            call[2] += 4.0 * nq * nk * sh.batch * sh.heads * sh.head_dim * (0.5 if causal else 1.0)
        total = 0.0
        for nq, nk, flops in calls.values():
            read = 2 * (nk * sh.kv_heads + nq * sh.heads) * sh.batch * sh.head_dim * sh.dtype_bytes
            total += max(read_s(read, dev), flops / (dev.flops * dev.attn_eff_fwd))
        return total

    def merge_s(self, op: Merge) -> float:
        dev = self.cluster.node.device
        return dev.launch_s / self.merges_per_kernel + 3 * self.buf_bytes(op.src) / dev.hbm_bw

    def a2a_pair_bytes(self, op) -> float:
        raise AssertionError("decode schedules have no all-to-all")


def _allgather_s(bytes_each: float, cluster: Cluster) -> float:
    n = cluster.num_gpus
    if n == 1:
        return 0.0
    link = cluster.node.nic if cluster.num_nodes > 1 else cluster.node.link
    return math.ceil(math.log2(n)) * link.latency_s + (n - 1) * bytes_each / link.rate


def simulate_decode(cluster: Cluster, sh: DecodeShape, strategy: str = "auto",
                    replicated: bool = True) -> DecodeResult:
    """Price one step of ``sh.new_tokens`` tokens (all layers); ``auto``: the fastest strategy."""
    if strategy == "auto":
        results = [simulate_decode(cluster, sh, s, replicated) for s in DECODE_STRATEGIES]
        return min(results, key=lambda r: r.step_ms)
    n = cluster.num_gpus
    native = replicated and strategy == "gather"
    sched = build_decode_schedule(strategy, n, start=sh.context, replicated=native)
    old = part_lens(sh.context, n)
    lens = {r: old[part_of(r, n, 0)] for r in range(n)}
    lens.update({n + j: c for j, c in enumerate(part_lens(sh.new_tokens, n))})
    partial = sh.new_tokens * sh.batch * sh.heads * (sh.head_dim + 1) * 4
    rides = native and n > 1 and payload_fits_bytes(partial)  # then merged in one stacked op
    cost = DecodeCost(sh, cluster, lens, n - 1 if rides else 1)
    plan = plan_from_schedule(sched, cost) if lockstep_supported(cluster) else None
    step = (simulate_plan(plan, cluster, cost) if plan is not None else simulate(sched, cost)).total_s
    compute = 0.0  # along the steps: each step's busiest rank (computes and merges)
    for s in range(sched.num_steps):
        compute += max((sum(cost.compute_s(op) for op in steps[s].computes)
                        + sum(cost.merge_s(m) for m in steps[s].merges))
                       for steps in sched.ranks if s < len(steps))
    extra = 0.0 if rides else _allgather_s(MESSAGE_BYTES if n > 1 else 0, cluster)  # the agreement
    if replicated and not native:
        extra += _allgather_s(max(part_lens(sh.new_tokens, n)) * sh.batch * sh.heads
                              * (sh.head_dim + 1) * 4, cluster)
    layers = sh.layers
    per_gpu = sh.cache_bytes(math.ceil((sh.context + sh.new_tokens) / n))
    hbm = HBM_GB.get(cluster.node.name)
    return DecodeResult(strategy, cluster.node.name, n, (step + extra) * layers * 1e3,
                        compute * layers * 1e3, (max(0.0, step - compute) + extra) * layers * 1e3,
                        per_gpu / 1e9, hbm is None or per_gpu <= 0.9 * hbm * 1e9)


def min_gpus_for(make_cluster, sh: DecodeShape, target_ms: float, *, strategy: str = "auto",
                 max_gpus: int = 256) -> tuple[DecodeResult | None, list[DecodeResult]]:
    """The fewest GPUs (powers of two up to ``max_gpus``) meeting ``target_ms`` per step with the
    cache fitting in memory; also every count tried. ``make_cluster(n)`` builds the cluster."""
    tried = []
    n = 1
    while n <= max_gpus:
        res = simulate_decode(make_cluster(n), sh, strategy)
        tried.append(res)
        if res.fits and res.step_ms <= target_ms:
            return res, tried
        n *= 2
    return None, tried
