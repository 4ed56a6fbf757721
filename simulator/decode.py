"""Decode scenario: one step of new tokens over a sharded KV cache, priced from the runtime's own
decode schedules (:mod:`tokenloom.parallel.decode_schedule`).

Decode is memory-bound: a step reads every cached key and value once, so a rank's block time is
``max(bytes read / HBM bandwidth, FLOPs / (peak * attention efficiency)) + launch``. Each step of the
schedule runs in lockstep: its time is the slowest rank's ``max(compute, communication)`` plus its
merges, where communication is the per-message latency of the link plus the larger of the bytes it
sends and receives over that link's rate (NVLink/NVSwitch inside a node, the NIC across nodes).
Every call also pays one small argument all-gather (the runtime agrees arguments before any
transfer), and ring/pass-KV on replicated queries an output all-gather. Layers multiply.

:func:`min_gpus_for` answers the capacity question: the fewest GPUs whose per-token time meets a
target and whose cache share fits in memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tokenloom.common.errors import UsageError
from tokenloom.parallel.decode_schedule import DECODE_STRATEGIES, build_decode_schedule, part_lens, part_of
from tokenloom.parallel.schedule import Compute, Recv, Send
from tokenloom.simulator.hardware import Cluster

# HBM per GPU in GB (datasheets); the catalog's Device has no capacity field
HBM_GB = {"h100-sxm": 80, "h200-sxm": 141, "a100-sxm": 80, "a10-pcie": 24, "mi300x": 192}
MAX_CONTEXT = 1 << 34


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


def _link(cluster: Cluster, a: int, b: int):
    node = cluster.node
    return node.link if cluster.node_of(a) == cluster.node_of(b) else node.nic


def _buf_bytes(buf, lens: dict[int, int], sh: DecodeShape, memo: dict | None = None) -> float:
    key = (buf.kind, buf.chunks)
    if memo is not None and key in memo:  # replicated buffers name all N chunks: N^3 without this
        return memo[key]
    n = sum(lens[c] for c in buf.chunks)
    per = sh.batch * sh.head_dim
    if buf.kind == "q":
        size = n * per * sh.heads * sh.dtype_bytes
    elif buf.kind == "kv":
        size = 2 * n * per * sh.kv_heads * sh.dtype_bytes
    else:
        size = n * sh.batch * sh.heads * (sh.head_dim + 1) * 4  # out + lse travel in fp32
    if memo is not None:
        memo[key] = size
    return size


def _compute_s(op: Compute, lens: dict[int, int], sh: DecodeShape, cluster: Cluster) -> float:
    dev = cluster.node.device
    total = 0.0
    for blk in op.blocks:
        nq = sum(lens[c] for c in blk.q_chunks)
        nk = sum(lens[c] for c in blk.kv_chunks)
        if not nq or not nk:
            continue
        read = 2 * nk * sh.batch * sh.kv_heads * sh.head_dim * sh.dtype_bytes
        read += 2 * nq * sh.batch * sh.heads * sh.head_dim * sh.dtype_bytes
        flops = 4.0 * nq * nk * sh.batch * sh.heads * sh.head_dim * (0.5 if blk.causal else 1.0)
        total += max(read / dev.hbm_bw, flops / (dev.flops * dev.attn_eff_fwd)) + dev.launch_s
    return total


def _comm_s(ops, rank: int, lens, sh: DecodeShape, cluster: Cluster, memo: dict) -> float:
    out: dict[int, float] = {}
    inn: dict[int, float] = {}
    latency = 0.0
    for op in ops:
        if not isinstance(op, (Send, Recv)) or op.peer == rank:
            continue
        link = _link(cluster, rank, op.peer)
        side = out if isinstance(op, Send) else inn
        side[id(link)] = side.get(id(link), 0.0) + _buf_bytes(op.buf, lens, sh, memo) / link.rate
        latency = max(latency, link.latency_s)
    busiest = max([*out.values(), *inn.values(), 0.0])
    return latency + busiest if (out or inn) else 0.0


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
    compute = comm = step = 0.0
    memo: dict = {}
    for s in range(sched.num_steps):
        worst = (0.0, 0.0, 0.0)
        for r in range(n):
            steps = sched.ranks[r]
            if s >= len(steps):
                continue
            c = sum(_compute_s(op, lens, sh, cluster) for op in steps[s].computes)
            m = _comm_s(steps[s].comms, r, lens, sh, cluster, memo)
            merge = len(steps[s].merges) * sh.new_tokens * sh.batch * sh.heads * sh.head_dim * 12 \
                / cluster.node.device.hbm_bw
            t = max(c, m) + merge
            if t > worst[0]:
                worst = (t, c, m)
        step += worst[0]
        compute += worst[1]
        comm += worst[2]
    extra = _allgather_s(14 * 8, cluster)  # the argument agreement
    if replicated and not native:
        extra += _allgather_s(max(part_lens(sh.new_tokens, n)) * sh.batch * sh.heads
                              * (sh.head_dim + 1) * 4, cluster)
    layers = sh.layers
    per_gpu = sh.cache_bytes(math.ceil((sh.context + sh.new_tokens) / n))
    hbm = HBM_GB.get(cluster.node.name)
    return DecodeResult(strategy, cluster.node.name, n, (step + extra) * layers * 1e3,
                        compute * layers * 1e3, (comm + extra) * layers * 1e3, per_gpu / 1e9,
                        hbm is None or per_gpu <= 0.9 * hbm * 1e9)


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
