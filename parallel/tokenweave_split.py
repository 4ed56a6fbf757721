"""TokenWeave split planner: split / fuse-only / plain, and where to split, from a wave model.

TokenWeave (arXiv 2505.11329) splits a batch's tokens into two halves so that one half's
AllReduce runs while the other half computes. A naive 50/50 cut can cost up to ~22% more GEMM time
because each half's GEMMs end in a partly filled *wave* of thread blocks; the paper picks the cut
``round_up(n, 256)/2 + offset`` (offset 0, 128 or 256) by a day-long offline sweep and gets the
cost down to ~3-6% (REFERENCE.md §4). This module derives the cut from a wave-quantisation model
instead, in microseconds and without a GPU:

- a GEMM of ``M x N`` (reduction ``K``) runs ``tiles = ceil(M/tile_m) * ceil(N/tile_n)`` thread
  blocks in ``waves = ceil(tiles / sms)`` waves, each costing time proportional to ``K``;
- the layer's GEMMs per rank (tensor parallel ``tp``): QKV ``(n, (H + 2 H_kv) d / tp, h)``, O
  ``(n, h, H d / tp)``, gate+up ``(n, 2 f / tp, h)``, down ``(n, h, f / tp)``;
- a cut at ``k`` costs ``sum_g K_g * (waves_g(k) + waves_g(n - k))`` on the SMs left to compute
  while the communication kernels run (``sms - comm_sms``), against ``sum_g K_g * waves_g(n)`` on
  all SMs unsplit. The penalty is their ratio minus one.

The cost only changes where ``k`` or ``n - k`` crosses a multiple of ``tile_m``, so the minimum
over a window of cuts lies at such a crossing or at a window end: :func:`plan_split` searches
exactly those candidates (tests compare it with a brute force over every integer cut). Piece 0
is never the smaller piece (see :func:`split_window`); ties go to the most balanced cut, which
leaves the most compute to hide each piece's communication.

Thresholds (the paper's): split at >= 1024 tokens for dense layers, >= 2048 for MoE layers; below
that *fuse-only* (one piece, the fused AllReduce+residual+RMSNorm, tokens padded to a multiple of
``tp``); with ``tp == 1`` *plain* (no communication at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenloom.common.errors import UsageError

DENSE_SPLIT_THRESHOLD = 1024
MOE_SPLIT_THRESHOLD = 2048
MODES = ("split", "fuse-only", "plain")


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def check_layer_sizes(hidden: int, ffn: int, heads: int, kv_heads: int, num_experts: int = 0, top_k: int = 0, *,
                      tp: int | None = None, rotary: bool = False) -> None:
    """The one validation of a TokenWeave layer's sizes, for the planner and simulator
    (:class:`LayerShape`, with ``tp``) and the layers (``LayerConfig``, ``rotary``: even head
    dims); UsageError naming the field."""
    sizes = {"hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": kv_heads}
    for name, value in {**sizes, **({} if tp is None else {"tp": tp})}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}", field=name)
    if hidden % heads:
        raise UsageError(f"hidden ({hidden}) must be divisible by heads ({heads})", field="hidden")
    if rotary and (hidden // heads) % 2:
        raise UsageError(f"head dim hidden/heads ({hidden // heads}) must be even for rotary embeddings",
                         field="hidden")
    if heads % kv_heads:
        raise UsageError(f"kv_heads ({kv_heads}) must divide heads ({heads})", field="kv_heads")
    if tp is not None:
        check_tp_sizes(heads, ffn, tp)
    if num_experts < 0 or (num_experts and not 1 <= top_k <= num_experts):
        raise UsageError(f"top_k ({top_k}) must be in 1..num_experts ({num_experts}) for a MoE layer",
                         field="top_k")


def check_tp_sizes(heads: int, ffn: int, tp: int) -> None:
    """UsageError unless heads and ffn divide over ``tp`` tensor-parallel ranks."""
    if heads % tp:
        raise UsageError(f"heads ({heads}) must be divisible by the tensor-parallel size tp ({tp})", field="heads")
    if ffn % tp:
        raise UsageError(f"ffn ({ffn}) must be divisible by the tensor-parallel size tp ({tp})", field="ffn")


@dataclass(frozen=True)
class GemmShape:
    """One GEMM of a rank: ``rows`` = tokens (M), ``cols`` = output features (N), ``depth`` = K."""

    name: str
    cols: int
    depth: int
    groups: int = 1  # grouped GEMM (MoE experts): ``groups`` GEMMs launched as one
    rows_scale: float = 1.0  # rows of each group per token (top_k / experts for MoE)


@dataclass(frozen=True)
class LayerShape:
    """A transformer layer as the planner sees it (global sizes; ``tp`` shards them)."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    tp: int
    num_experts: int = 0  # 0: dense SwiGLU MLP
    top_k: int = 0

    def __post_init__(self) -> None:
        check_layer_sizes(self.hidden, self.ffn, self.heads, self.kv_heads, self.num_experts, self.top_k, tp=self.tp)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads a rank holds: its share, or one replicated head when ``kv_heads < tp``."""
        return max(1, self.kv_heads // self.tp)

    def gemms(self) -> list[GemmShape]:
        """Every GEMM one rank runs per layer (global token count is the row dimension)."""
        d, t = self.head_dim, self.tp
        out = [GemmShape("qkv", (self.heads // t + 2 * self.kv_heads_per_rank) * d, self.hidden),
               GemmShape("o", self.hidden, self.heads // t * d)]
        if self.moe:
            scale = self.top_k / self.num_experts
            out += [GemmShape("router", self.num_experts, self.hidden),
                    GemmShape("experts_gate_up", 2 * self.ffn // t, self.hidden, self.num_experts, scale),
                    GemmShape("experts_down", self.hidden, self.ffn // t, self.num_experts, scale)]
        else:
            out += [GemmShape("gate_up", 2 * self.ffn // t, self.hidden),
                    GemmShape("down", self.hidden, self.ffn // t)]
        return out


@dataclass(frozen=True)
class GpuShape:
    """What the wave model needs of a GPU: SM count, GEMM tile, SMs the comm kernels occupy."""

    sms: int = 132  # H100 SXM
    tile_m: int = 128
    tile_n: int = 128
    comm_sms: int = 8  # CTAs of the overlapped communication kernel (TokenWeave: 2-8)

    def __post_init__(self) -> None:
        for name in ("sms", "tile_m", "tile_n"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if not 0 <= self.comm_sms < self.sms:
            raise UsageError(f"comm_sms must be in 0..{self.sms - 1}, got {self.comm_sms}", field="comm_sms")


def gemm_tiles(g: GemmShape, tokens: int, gpu: GpuShape) -> int:
    """Thread blocks of GEMM ``g`` over ``tokens`` rows (a grouped GEMM sums its groups)."""
    rows = math.ceil(tokens * g.rows_scale) if g.groups > 1 else tokens
    return g.groups * math.ceil(rows / gpu.tile_m) * math.ceil(g.cols / gpu.tile_n) if rows else 0


def gemm_waves(g: GemmShape, tokens: int, gpu: GpuShape, sms: int) -> int:
    return math.ceil(gemm_tiles(g, tokens, gpu) / sms)


def wave_cost(layer: LayerShape, tokens: int, gpu: GpuShape, sms: int) -> float:
    """Relative GEMM time of one layer over ``tokens`` rows on ``sms`` SMs: ``sum K * waves``."""
    return float(sum(g.depth * gemm_waves(g, tokens, gpu, sms) for g in layer.gemms()))


def split_cost(layer: LayerShape, tokens: int, cut: int, gpu: GpuShape) -> float:
    """Relative GEMM time of two pieces ``[0, cut)`` and ``[cut, tokens)`` on the compute SMs."""
    sms = gpu.sms - gpu.comm_sms
    return wave_cost(layer, cut, gpu, sms) + wave_cost(layer, tokens - cut, gpu, sms)


def split_window(tokens: int, window: float = 0.125) -> tuple[int, int]:
    """Cuts the planner considers: piece 0 holds from half the tokens to ``window * tokens`` more.

    Piece 0 is never the smaller one, as in the paper (``round_up(n, 256)/2 + offset``, offset
    >= 0): piece 1's causal attention reads every earlier key, and its fused communication must
    hide behind piece 0's MLP; within the window, balance is what the overlap needs.
    """
    half = (tokens + 1) // 2
    reach = max(1, int(window * tokens))
    return min(half, tokens - 1), max(1, min(tokens - 1, half + reach))


@dataclass(frozen=True)
class SplitPlan:
    """The planner's decision for one token count (all counts are real tokens, before padding)."""

    mode: str  # "split" | "fuse-only" | "plain"
    tokens: int
    tp: int
    cut: int  # tokens of piece 0 (== tokens unless mode == "split")
    unsplit_cost: float = 0.0
    naive_cost: float = 0.0
    cost: float = 0.0
    waves: dict = field(default_factory=dict)  # gemm name -> (unsplit, naive halves, chosen halves)
    reason: str = ""

    @property
    def pieces(self) -> tuple[tuple[int, int], ...]:
        """Token ranges ``(start, end)`` of the pieces, in order."""
        if self.mode == "split":
            return ((0, self.cut), (self.cut, self.tokens))
        return ((0, self.tokens),)

    @property
    def padded(self) -> tuple[int, ...]:
        """Rows of each piece after padding to a multiple of ``tp`` (what the collectives move)."""
        return tuple(round_up(e - s, self.tp) for s, e in self.pieces)

    @property
    def penalty(self) -> float:
        """Extra GEMM time of the chosen pieces over the unsplit layer (0.05 = +5%)."""
        return self.cost / self.unsplit_cost - 1.0 if self.unsplit_cost else 0.0

    @property
    def naive_penalty(self) -> float:
        return self.naive_cost / self.unsplit_cost - 1.0 if self.unsplit_cost else 0.0

    def explain(self) -> str:
        """Printable account of the decision: mode, cut, waves before/after, penalty avoided."""
        lines = [f"{self.mode}: {self.tokens} tokens, tp {self.tp}; {self.reason}"]
        if self.mode != "split":
            lines.append(f"  one piece of {self.tokens} tokens padded to {self.padded[0]} rows")
            return "\n".join(lines)
        naive = self.tokens // 2
        lines.append(f"  cut at {self.cut} ({self.cut / self.tokens:.1%}): pieces {self.cut} + "
                     f"{self.tokens - self.cut} tokens, padded to {self.padded[0]} + {self.padded[1]} rows")
        lines.append(f"  {'gemm':<16}{'waves unsplit':>14}{f'naive {naive}+{self.tokens - naive}':>22}"
                     f"{'chosen':>10}")
        for name, (unsplit, naive_w, chosen_w) in self.waves.items():
            lines.append(f"  {name:<16}{unsplit:>14}{naive_w:>22}{chosen_w:>10}")
        lines.append(f"  GEMM time vs unsplit: naive 50/50 {self.naive_penalty:+.1%}, chosen "
                     f"{self.penalty:+.1%} (avoided {self.naive_penalty - self.penalty:.1%})")
        return "\n".join(lines)


def candidate_cuts(tokens: int, tile_m: int, lo: int, hi: int) -> list[int]:
    """Window ends, the middle, and every cut where ``k`` or ``tokens - k`` is a multiple of
    ``tile_m`` (the cost is constant between those, so the middle only matters for ties)."""
    out = {lo, hi} | {k for k in (tokens // 2, (tokens + 1) // 2) if lo <= k <= hi}
    for j in range(lo // tile_m, hi // tile_m + 2):
        for k in (j * tile_m, tokens - j * tile_m):
            if lo <= k <= hi:
                out.add(k)
    return sorted(out)


def best_cut(layer: LayerShape, tokens: int, gpu: GpuShape, window: float = 0.125) -> int:
    """Cheapest cut in the window; ties to the cut nearest the middle, then the smaller."""
    lo, hi = split_window(tokens, window)
    half = tokens / 2
    return min(candidate_cuts(tokens, gpu.tile_m, lo, hi),
               key=lambda k: (split_cost(layer, tokens, k, gpu), abs(k - half), k))


def plan_split(layer: LayerShape, tokens: int, gpu: GpuShape | None = None, *,
               threshold: int | None = None, window: float = 0.125) -> SplitPlan:
    """Decide split / fuse-only / plain for ``tokens`` tokens and, when splitting, where."""
    gpu = gpu or GpuShape()
    if not isinstance(tokens, int) or tokens < 1:
        raise UsageError(f"tokens must be an integer >= 1, got {tokens!r}", field="tokens")
    if threshold is None:
        threshold = MOE_SPLIT_THRESHOLD if layer.moe else DENSE_SPLIT_THRESHOLD
    if layer.tp == 1:
        return SplitPlan("plain", tokens, 1, tokens, reason="tp 1: no communication to hide")
    if tokens < max(threshold, 2):
        kind = "MoE" if layer.moe else "dense"
        return SplitPlan("fuse-only", tokens, layer.tp, tokens,
                         reason=f"below the {kind} split threshold of {threshold} tokens: no split, "
                                f"fused communication only")
    cut = best_cut(layer, tokens, gpu, window)
    naive = tokens // 2
    sms = gpu.sms - gpu.comm_sms
    waves = {g.name: (gemm_waves(g, tokens, gpu, gpu.sms),
                      f"{gemm_waves(g, naive, gpu, sms)}+{gemm_waves(g, tokens - naive, gpu, sms)}",
                      f"{gemm_waves(g, cut, gpu, sms)}+{gemm_waves(g, tokens - cut, gpu, sms)}")
             for g in layer.gemms()}
    return SplitPlan("split", tokens, layer.tp, cut, unsplit_cost=wave_cost(layer, tokens, gpu, gpu.sms),
                     naive_cost=split_cost(layer, tokens, naive, gpu), cost=split_cost(layer, tokens, cut, gpu),
                     waves=waves, reason=f"at or above the split threshold of {threshold} tokens; "
                                         f"wave-aware cut on {sms} of {gpu.sms} SMs "
                                         f"({gpu.comm_sms} run the communication)")
