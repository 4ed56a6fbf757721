"""Cost model: bytes of every buffer on the wire, seconds of every kernel.

Formulas (``c`` tokens per chunk, ``B`` batch, ``H`` query heads of the op, ``d`` head_dim,
``b`` bytes per input element; fp32 accumulators and lse take 4 bytes):

- Wire bytes of a buffer: ``tokens * B * sum over its fields(heads * width * bytes)``, fields from
  ``tokenloom.parallel.schedule.WIRE_FIELDS`` (e.g. ``out`` = out in the input dtype + fp32 lse).
  Hence TokenRing/Ring bytes ~= g * (1 + 2/(d*b)) for GQA group g (REFERENCE.md §2, TokenRing,
  arXiv 2412.20501).
- Attention FLOPs of a kernel: ``B * H * d * c^2 * (4 * n_full + 2 * n_diag)`` over its (query
  chunk, key chunk) pairs: two matmuls of ``2 c^2 d`` FLOPs per head, half of them for a
  causal diagonal pair (FlashAttention-2, Dao 2023, §4 FLOP count). Backward = 2.5 x forward
  (five matmuls instead of two, the same paper).
- Kernel time (roofline with wave quantisation): ``launch + max(FLOPs / (F * eff * util),
  bytes / HBM)`` where ``F`` is peak dense FLOP/s, ``eff`` the achieved attention fraction, and
  ``util = tiles / (waves * SMs)`` for ``tiles = ceil(q_tokens / 128) * H * B`` thread blocks of
  128 query rows (FlashAttention's tiling) run in ``waves = ceil(tiles / SMs)`` waves.
- SMs lent to communication: with ``comm_sms`` > 0 the waves are counted over ``SMs - comm_sms``
  (communication kernels hold their CTAs' SMs while they overlap compute; TokenWeave's fused
  kernel 2-8 CTAs, its comm slowdown measured per CTA count: REFERENCE.md §4), at the same per-SM
  rate: ``util = tiles / (ceil(tiles / (SMs - comm_sms)) * SMs)``.
- Memory-bound ops (merge of partials, packing ``qg``): ``launch + bytes moved / HBM``; a merge
  reads the partial and the accumulator and writes the accumulator (3x the partial's bytes).
- A CPU profile (``host_cores`` > 0) whose node runs more ranks than cores slows every kernel by
  ``ranks_per_node / host_cores``: the ranks time-share the cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tokenloom.comm.topology import LAYOUTS, chunks_of_rank
from tokenloom.common.errors import UsageError
from tokenloom.parallel.dims import ParallelDims, check_gqa, kv_repeat_for
from tokenloom.parallel.schedule import WIRE_FIELDS, AllToAll, Block, Buf, Compute, Merge, Pack
from tokenloom.simulator.hardware import Cluster
from tokenloom.common.checks import check_choice, check_int

BWD_FLOP_FACTOR = 2.5
# Largest shapes priced: far beyond any real run, small enough that no product of them can
# overflow a float (2^20 batch x 2^16 heads x 2^16 dim x (2^40 tokens)^2 ~ 1e40).
SHAPE_LIMITS = {"seq_len": 1 << 40, "num_heads": 1 << 16, "head_dim": 1 << 16, "batch": 1 << 20, "dtype_bytes": 8}
TILE_ROWS = 128


@dataclass(frozen=True)
class AttentionShape:
    """Global problem: ``seq_len`` tokens over all ranks, ``(batch, seq, heads, head_dim)``."""

    seq_len: int
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    batch: int = 1
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name, hi in SHAPE_LIMITS.items():
            object.__setattr__(self, name, check_int(getattr(self, name), name, lo=1, hi=hi))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        kv = check_int(self.num_kv_heads, "kv_heads", lo=1, hi=SHAPE_LIMITS["num_heads"])
        object.__setattr__(self, "num_kv_heads", kv)
        check_gqa(self.num_heads, kv)  # the runtime's GQA rule (ParallelDims)

    @property
    def kv_heads(self) -> int:
        return int(self.num_kv_heads or self.num_heads)

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_heads


class CostModel:
    """Prices schedule ops for one shape on one cluster with a given layout (results cached)."""

    def __init__(self, shape: AttentionShape, cluster: Cluster, layout: str,
                 head_shards: int | None = None, window: tuple[int, int] | None = None, *,
                 comm_sms: int = 0) -> None:
        self.shape = shape
        self.window = window  # sliding window (left, right) of the schedules priced: masked blocks
        self.cluster = cluster
        self.world_size = cluster.num_gpus
        # all-to-all group size: world for Ulysses, the inner dim for a 2-D hybrid
        self.head_shards = head_shards or cluster.num_gpus
        self.kv_repeat = kv_repeat_for(shape.kv_heads, self.head_shards)  # the runtime's rule
        self.layout = layout
        check_choice(layout, "layout", LAYOUTS)
        # the sequence rule is the runtime's too (ParallelDims); the chunks do not depend on the strategy
        self.chunk = ParallelDims("ring", self.world_size, layout=layout).dense_chunk_len(shape.seq_len)
        self.device = cluster.node.device
        cores = cluster.node.host_cores
        self.slowdown = max(1.0, cluster.gpus_per_node / cores) if cores else 1.0
        # SMs held by communication kernels while kernels run (module docstring); 0: none. NCCL's
        # point-to-point kernels also hold SMs, but no sourced count per transfer was found, so the
        # attention schedules are priced with 0 unless a caller sets it
        self.comm_sms = check_int(comm_sms, "comm_sms", lo=0, hi=max(0, self.device.sms - 1))
        self._cache: dict[tuple, float] = {}

    @classmethod
    def for_dims(cls, shape: AttentionShape, cluster: Cluster, dims: ParallelDims) -> "CostModel":
        """The cost model of running ``shape`` as ``dims`` says (layout, head shards, window):
        the same rules object the API and the builders use."""
        return cls(shape, cluster, dims.layout, head_shards=dims.head_shards if dims.uses_a2a else None,
                   window=dims.window)

    # -- bytes ---------------------------------------------------------------------------------
    def _bytes_per_token(self, kind: str, shard: bool, kv_repeat: int) -> float:
        s = self.shape
        total = 0.0
        for _name, head_kind, width, dtype in WIRE_FIELDS[kind]:
            heads = s.num_heads if head_kind == "q" else s.kv_heads * kv_repeat
            if shard:
                heads /= self.head_shards
            total += heads * (s.head_dim if width == "d" else 1) * (s.dtype_bytes if dtype == "io" else 4)
        return total * s.batch

    def buf_bytes(self, buf: Buf, kv_repeat: int = 1) -> float:
        """Bytes of ``buf`` as it travels (all its fields)."""
        key = ("buf", buf.kind, len(buf.chunks), buf.shard >= 0, kv_repeat)
        if key not in self._cache:
            rep = kv_repeat if buf.shard < 0 else self.kv_repeat  # head-side kv: replicated heads
            self._cache[key] = len(buf.chunks) * self.chunk * self._bytes_per_token(
                buf.kind, buf.shard >= 0, rep)
        return self._cache[key]

    def a2a_pair_bytes(self, op: AllToAll) -> float:
        """Bytes one rank sends to each other rank in an equal-split all-to-all (1/N of its part)."""
        key = ("a2a", op.kind, op.kv_repeat)
        if key not in self._cache:
            tokens = len(chunks_of_rank(0, self.world_size, self.layout)) * self.chunk
            self._cache[key] = tokens * self._bytes_per_token(op.kind, False, op.kv_repeat) / self.head_shards
        return self._cache[key]

    # -- kernels -------------------------------------------------------------------------------
    def block_flops(self, block: Block, heads: float, backward: bool) -> float:
        if block.causal:  # causal_pair_kind: key chunk < query chunk is full, equal is diagonal
            q = np.asarray(block.q_chunks)[:, None]
            k = np.asarray(block.kv_chunks)[None, :]
            n_full, n_diag = int((k < q).sum()), int((k == q).sum())
        elif block.masked and self.window is not None:  # window pairs: priced by their visible share
            n_full = sum(window_share(kc - qc, self.chunk, self.window) for qc in block.q_chunks
                         for kc in block.kv_chunks)
            n_diag = 0
        else:
            n_full, n_diag = len(block.q_chunks) * len(block.kv_chunks), 0
        s = self.shape
        flops = s.batch * heads * s.head_dim * self.chunk ** 2 * (4 * n_full + 2 * n_diag)
        return flops * (BWD_FLOP_FACTOR if backward else 1.0)

    def shape_efficiency(self, kv_tokens: int, causal: bool, backward: bool) -> float:
        """Share of the device's long-sequence attention efficiency a kernel over ``kv_tokens``
        keys reaches: ``kv / (kv + half)`` (a fixed per-tile cost amortised over the key loop),
        times ``attn_causal_eff`` for causal blocks, times :data:`HEAD_DIM_EFF`. Fitted to
        FlashAttention-2 on H100 (docs/calibration.md); 1.0 for a device without a curve."""
        dev = self.device
        if dev.attn_kv_half <= 0:
            return 1.0
        half = dev.attn_kv_half_causal if causal else (dev.attn_kv_half_bwd if backward else dev.attn_kv_half)
        f = kv_tokens / (kv_tokens + half) * (dev.attn_causal_eff if causal else 1.0)
        return f * head_dim_efficiency(self.shape.head_dim)

    def _kernel_s(self, flops: float, num_bytes: float, q_tokens: int, heads: float, backward: bool,
                  shape_eff: float = 1.0) -> float:
        dev = self.device
        tiles = math.ceil(q_tokens / TILE_ROWS) * heads * self.shape.batch
        free = max(1, dev.sms - self.comm_sms)
        util = tiles / (math.ceil(tiles / free) * dev.sms) if tiles else 1.0
        eff = (dev.attn_eff_bwd if backward else dev.attn_eff_fwd) * shape_eff
        busy = max(flops / (dev.flops * eff * util), num_bytes / dev.hbm_bw)
        return (dev.launch_s + busy) * self.slowdown

    def compute_s(self, op: Compute | Pack) -> float:
        """Seconds of one Compute (one kernel per Block) or Pack on the compute stream."""
        if isinstance(op, Pack):
            key = ("pack", op.dst.kind, len(op.dst.chunks), op.dst.shard >= 0)
            if key not in self._cache:
                moved = sum(self.buf_bytes(b) for b in op.srcs) + self.buf_bytes(op.dst)
                self._cache[key] = (self.device.launch_s + moved / self.device.hbm_bw) * self.slowdown
            return self._cache[key]
        backward = op.q_src.kind == "qg"
        heads = self.shape.num_heads / op.head_shard[1]
        key = ("compute", backward, heads, op.blocks)
        if key not in self._cache:
            self._cache[key] = sum(self._block_s(b, heads, backward) for b in op.blocks)
        return self._cache[key]

    def _block_s(self, block: Block, heads: float, backward: bool) -> float:
        s = self.shape
        q_tokens, kv_tokens = len(block.q_chunks) * self.chunk, len(block.kv_chunks) * self.chunk
        kv_heads = heads / s.group
        io = (2 * q_tokens * heads + 2 * kv_tokens * kv_heads) * s.head_dim * s.dtype_bytes * s.batch
        moved = io * (BWD_FLOP_FACTOR if backward else 1.0)
        return self._kernel_s(self.block_flops(block, heads, backward), moved, q_tokens, heads, backward,
                              self.shape_efficiency(kv_tokens, block.causal, backward))

    def merge_s(self, op: Merge) -> float:
        """Seconds to fold a received partial into its accumulator (memory-bound)."""
        key = ("merge", op.src.kind, len(op.src.chunks), op.src.shard >= 0)
        if key not in self._cache:
            moved = 3 * self.buf_bytes(op.src)
            self._cache[key] = (self.device.launch_s + moved / self.device.hbm_bw) * self.slowdown
        return self._cache[key]


# FlashAttention-2 on H100 reaches ~0.88 of its head-dim-128 rate at head dim 64 and 256 (324 and 326
# vs 370 TFLOP/s forward, 16K tokens; docs/calibration.md); log-linear between, flat outside.
HEAD_DIM_EFF = {64: 0.88, 128: 1.0, 256: 0.88}


def head_dim_efficiency(head_dim: int) -> float:
    dims = sorted(HEAD_DIM_EFF)
    if head_dim <= dims[0]:
        return HEAD_DIM_EFF[dims[0]]
    if head_dim >= dims[-1]:
        return HEAD_DIM_EFF[dims[-1]]
    lo = max(d for d in dims if d <= head_dim)
    hi = min(d for d in dims if d >= head_dim)
    if lo == hi:
        return HEAD_DIM_EFF[lo]
    t = (math.log2(head_dim) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return HEAD_DIM_EFF[lo] + t * (HEAD_DIM_EFF[hi] - HEAD_DIM_EFF[lo])


def window_share(chunk_offset: int, chunk: int, window: tuple[int, int]) -> float:
    """Visible share of a (query chunk, key chunk) pair of dense ``chunk``-token chunks whose key
    chunk starts ``chunk_offset`` chunks after the query chunk, under ``window = (left, right)``
    (-1 unbounded): pairs with key - query offset t in [-left, right]; offset t occurs
    ``chunk - |t - chunk_offset * chunk|`` times."""
    left, right = window
    shift = chunk_offset * chunk
    lo = -(chunk - 1) if left < 0 else max(-(chunk - 1), -left - shift)
    hi = chunk - 1 if right < 0 else min(chunk - 1, right - shift)

    def ramp(a: int, b: int) -> int:  # sum of (chunk - u) for u in [a, b], 0 <= a
        return 0 if b < a else (b - a + 1) * chunk - (a + b) * (b - a + 1) // 2

    count = ramp(max(lo, 0), hi) + ramp(max(-hi, 1), -lo)  # u >= 0, then u < 0 mirrored
    return count / chunk ** 2
