"""Scenario: a TokenWeave tensor-parallel stack vs the baseline vs a no-communication layer.

The simulator prices the runtime's own step lists (:func:`tokenloom.parallel.tokenweave_schedule.
build_steps`) and the planner's split (:func:`tokenloom.parallel.tokenweave_split.plan_split`) on
the catalog's hardware, with one compute stream and one communication stream per rank (tensor
parallelism is symmetric, so one rank's timeline stands for all).

Cost model (REFERENCE.md §4; constants measured by the TokenWeave authors on 8xH100, bf16,
hidden 8192, and scaled by the catalog's link and memory numbers for other hardware):

- GEMM ``M x N x K``: :func:`tokenloom.simulator.gemm.gemm_seconds`, efficiency by shape (wave
  quantisation over 64 x 128 tiles, a fixed cost per tile against the K loop) fitted to GEMMs of
  these very projections measured on an H200 (docs/calibration.md). Split pieces run on
  ``sms - comm_ctas`` SMs while the communication kernel holds the rest (more waves). Attention:
  causal prefill FLOPs ``2 * heads/tp * d * (e^2 - s^2)`` for tokens ``[s, e)`` at ``attn_eff_fwd``
  of peak times the device's causal curve over ``e`` keys (:func:`causal_shape_eff`), with the same
  wave factor over 128-row query tiles.
- NCCL AllReduce ``64 us + M / 230 GB/s`` at TP 8 on H100 (``M`` activation bytes), i.e. the ring's
  ``2 (t-1)/t M`` bytes at ``1.75 * 230 GB/s`` of bus bandwidth; reduce-scatter and all-gather
  each half of it. Fused AllReduce+RMSNorm over multimem (Hopper): ``14 us + M / 276 GB/s``; the
  baseline's plain AllReduce runs over multimem too where the node has it (~ the same cost).
  Latencies scale with the link latency, bandwidths with the link rate relative to H100's.
- RMSNorm (with the residual add): ``8 us + M / 762 GB/s`` on H100, the bandwidth scaled by HBM.
- Communication kernels overlapping compute use ``comm_ctas`` CTAs and slow down by the measured
  factor (2: 3.1x, 4: 1.8x, 8: 1.12x, 16: 1.0x); fuse-only (nothing to overlap) uses 16.

``no_comm`` is the unsplit layer's compute kernels alone (GEMMs, attention, activations) on all
SMs: no communication and no norms, a lower bound on both modes. ``no_comm_norm`` is the baseline
with free AllReduces but its full-row norms kept, the paper's "communication removed" model,
which TokenWeave can beat because it normalises 1/TP of the rows inside the fused op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenloom.common.errors import UsageError
from tokenloom.parallel.tokenweave_schedule import Step, build_steps
from tokenloom.parallel.tokenweave_split import GpuShape, LayerShape, SplitPlan, plan_split
from tokenloom.simulator.gemm import GEMM_TILE, gemm_seconds
from tokenloom.simulator.cost import head_dim_efficiency
from tokenloom.simulator.hardware import HOPPER_MSG_LATENCY, Cluster, Device, NodeSpec
from tokenloom.common.checks import check_int

# name: (hidden, ffn, heads, kv_heads, num_experts, top_k, layers) from the public configs
MODELS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "llama-3.3-70b": (8192, 28672, 64, 8, 0, 0, 80),
    "llama-3.1-8b": (4096, 14336, 32, 8, 0, 0, 32),
    "qwen2.5-72b": (8192, 29568, 64, 8, 0, 0, 80),
    "mixtral-8x22b": (6144, 16384, 48, 8, 8, 2, 56),
}
MULTIMEM_NODES = ("h100-sxm", "h200-sxm")  # NVSwitch with NVLink SHARP multicast (sm_90)
ATTN_TILE = 128
REF_LINK_RATE = 450e9 * 0.83  # the catalog's h100-sxm NVLink rate the constants were measured on
REF_LINK_LATENCY = HOPPER_MSG_LATENCY  # the catalog's h100-sxm per-message latency
REF_HBM = 3350e9
AR_LAT, AR_BW = 64e-6, 230e9
MM_LAT, MM_BW = 14e-6, 276e9
NORM_LAT, NORM_BW = 8e-6, 762e9
CTA_SLOWDOWN = {2: 3.1, 4: 1.8, 8: 1.12, 16: 1.0}

# Work and shape limits, refused up front (the CLI repeats them: tokenloom/commands/simulate_tokenweave.py).
# Every layer's steps are walked one by one (~1 ms per layer on one core, 4x with comm_ctas="auto"),
# and the split planner prices ~tokens/512 candidate cuts (16M tokens: ~1 s); 100M layers or 1T
# tokens would run for hours. Times are per-layer averages, so more layers change little. The
# shape limits sit far above any public model (hidden <= 25600, ffn <= 73728, experts <= 384).
MAX_LAYERS = 1024
MAX_TOKENS = 1 << 24
MAX_HIDDEN = MAX_FFN = 1 << 20
MAX_HEADS = 1 << 16
MAX_EXPERTS = 1 << 12


def model_shape(name: str, tp: int) -> tuple[LayerShape, int]:
    """(layer shape, number of layers) of a catalog model; UsageError naming ``model``."""
    if name not in MODELS:
        raise UsageError(f"model must be one of {', '.join(MODELS)}, got {name!r}", field="model")
    hidden, ffn, heads, kv, experts, top_k, layers = MODELS[name]
    return LayerShape(hidden, ffn, heads, kv, tp, experts, top_k), layers


@dataclass(frozen=True)
class Span:
    stream: str  # "compute" | "comm"
    name: str
    start: float
    end: float
    kind: str  # "attn" | "mlp" | "norm" | "wait" | "comm"
    layer: int


@dataclass
class ModeTimeline:
    mode: str  # "baseline" | "tokenweave" | "no-comm"
    total_s: float
    spans: list[Span] = field(default_factory=list)

    def busy(self, stream: str) -> float:
        return sum(s.end - s.start for s in self.spans if s.stream == stream and s.kind != "wait")


class Pricer:
    """Seconds of every step kind for one layer shape, token count and cluster."""

    def __init__(self, cluster: Cluster, layer: LayerShape, tokens: int, dtype_bytes: int = 2,
                 comm_ctas: int = 8) -> None:
        if comm_ctas not in CTA_SLOWDOWN:
            raise UsageError(f"comm_ctas must be one of {sorted(CTA_SLOWDOWN)}, got {comm_ctas}", field="comm_ctas")
        self.node: NodeSpec = cluster.node
        self.dev = cluster.node.device
        self.layer, self.tokens, self.b, self.comm_ctas = layer, tokens, dtype_bytes, comm_ctas
        self.tp = layer.tp
        # the planner's wave model uses the tiles the GEMM pricing was fitted with (simulator/gemm.py)
        self.gpu = GpuShape(sms=self.dev.sms, comm_sms=comm_ctas if comm_ctas < self.dev.sms else 0,
                            tile_m=GEMM_TILE[0], tile_n=GEMM_TILE[1])
        self.multimem = self.node.name in MULTIMEM_NODES

    # -- compute -----------------------------------------------------------------------------
    def _wave_time(self, flops: float, tiles: int, sms: int, eff: float) -> float:
        if tiles == 0:
            return 0.0
        waves = math.ceil(tiles / sms)
        return flops * waves * self.dev.sms / (self.dev.flops * eff * tiles)

    def gemm_times(self, rows: int, overlapped: bool) -> dict[str, float]:
        """Seconds of each of the layer's GEMMs over ``rows`` tokens."""
        sms = self.gpu.sms - (self.gpu.comm_sms if overlapped else 0)
        out = {}
        for g in self.layer.gemms():
            m = math.ceil(rows * g.rows_scale) if g.groups > 1 else rows
            out[g.name] = gemm_seconds(self.dev, m, g.cols, g.depth, sms=sms, groups=g.groups, dtype_bytes=self.b)
        return out

    def attention_s(self, start: int, end: int, overlapped: bool) -> float:
        heads = self.layer.heads // self.tp
        flops = 2.0 * heads * self.layer.head_dim * (end * end - start * start)
        tiles = math.ceil((end - start) / ATTN_TILE) * heads
        sms = self.gpu.sms - (self.gpu.comm_sms if overlapped else 0)
        return self.dev.launch_s + self._wave_time(flops, tiles, sms, self.dev.attn_eff_fwd * causal_shape_eff(
            self.dev, end, self.layer.head_dim))

    def compute_s(self, op: str, start: int, end: int, overlapped: bool) -> float:
        rows = end - start
        times = self.gemm_times(rows, overlapped)
        attn_gemms = times["qkv"] + times["o"]
        if op == "attn":
            return attn_gemms + self.attention_s(start, end, overlapped)
        mlp_gemms = sum(times.values()) - attn_gemms
        act_cols = self.layer.ffn // self.tp * (self.layer.top_k if self.layer.moe else 1)
        act = self.dev.launch_s + 3 * rows * act_cols * self.b / self.dev.hbm_bw  # silu(g) * u
        return mlp_gemms + act

    # -- communication and norms ---------------------------------------------------------------
    def _link_rate(self) -> float:
        node, t = self.node, self.tp
        if node.fabric == "mesh":
            return node.link.rate * max(1, t - 1)
        if node.fabric == "pcie":
            return min(node.link.rate, node.uplink.rate / max(1, min(t, node.gpus_per_switch)))
        if node.fabric == "bus":
            return node.link.rate / t
        return node.link.rate

    def _scales(self) -> tuple[float, float]:
        return self.node.link.latency_s / REF_LINK_LATENCY, self._link_rate() / REF_LINK_RATE

    def act_bytes(self, rows: int) -> float:
        return rows * self.layer.hidden * self.b

    def norm_s(self, rows: int) -> float:
        return NORM_LAT + self.act_bytes(rows) / (NORM_BW * self.dev.hbm_bw / REF_HBM)

    def allreduce_s(self, rows: int) -> float:
        """The baseline's AllReduce: over multimem (NVLink SHARP) where the node has it, as the
        published baseline runs it (REFERENCE.md §4: ~14 us + M / 276 GB/s on 8 x H100, the same
        ~270 GB/s NVLS algorithm bandwidth as NCCL-tests, docs/calibration.md), else NCCL's ring."""
        if self.tp == 1:
            return 0.0
        lat, bw = self._scales()
        t = self.tp
        if self.multimem:
            return MM_LAT * lat + self.act_bytes(rows) * ((t - 1) / t) / (0.875 * MM_BW * bw)
        return AR_LAT * lat + self.act_bytes(rows) * (2 * (t - 1) / t) / (1.75 * AR_BW * bw)

    def fused_s(self, rows: int, overlapped: bool) -> float:
        """Fused ReduceScatter + add+RMSNorm (1/tp rows) + AllGather on the comm stream."""
        if self.tp == 1:
            return self.norm_s(rows)
        lat, bw = self._scales()
        t, m = self.tp, self.act_bytes(rows)
        slow = CTA_SLOWDOWN[self.comm_ctas] if overlapped else 1.0
        if self.multimem:
            return slow * (MM_LAT * lat + m * ((t - 1) / t) / (0.875 * MM_BW * bw))
        half = AR_LAT / 2 * lat + m * ((t - 1) / t) / (1.75 * AR_BW * bw)
        return slow * (2 * half + self.norm_s(rows // t))


def causal_shape_eff(dev: Device, keys: int, head_dim: int) -> float:
    """Share of ``attn_eff_fwd`` a causal prefill over ``keys`` keys reaches: the device's causal
    curve, as the attention engine prices a causal block (:meth:`CostModel.shape_efficiency`; on
    H100 the FlashAttention-2 causal rows, 333 TFLOP/s at 8K keys vs 386 at the flat efficiency)."""
    if dev.attn_kv_half <= 0:
        return 1.0
    return keys / (keys + dev.attn_kv_half_causal) * dev.attn_causal_eff * head_dim_efficiency(head_dim)


def walk(steps: list[Step], pricer: Pricer, ranges: tuple, padded: tuple, mode: str,
         free_comm: bool = False) -> ModeTimeline:
    """Two-stream timeline of ``steps`` (the runtime's order) priced by ``pricer``; with
    ``free_comm`` every AllReduce takes no time (the norms stay)."""
    overlapped = len(ranges) == 2
    t_comp = t_comm = 0.0
    done: dict[int, float] = {}
    spans: list[Span] = []
    for st in steps:
        (s, e), rows = ranges[st.piece], padded[st.piece]
        if st.kind == "compute":
            dur = pricer.compute_s(st.op, s, e, overlapped)
            spans.append(Span("compute", str(st), t_comp, t_comp + dur, st.op, st.layer))
            t_comp += dur
        elif st.kind == "allreduce":
            ar, norm = (0.0 if free_comm else pricer.allreduce_s(rows)), pricer.norm_s(rows)
            spans.append(Span("comm", str(st), t_comp, t_comp + ar, "comm", st.layer))
            spans.append(Span("compute", f"L{st.layer}.norm({st.piece})", t_comp + ar, t_comp + ar + norm,
                              "norm", st.layer))
            t_comp += ar + norm
        elif st.kind == "post":
            start = max(t_comp, t_comm)
            t_comm = done[st.piece] = start + pricer.fused_s(rows, overlapped)
            spans.append(Span("comm", str(st), start, t_comm, "comm", st.layer))
        else:
            if done[st.piece] > t_comp:
                spans.append(Span("compute", str(st), t_comp, done[st.piece], "wait", st.layer))
            t_comp = max(t_comp, done[st.piece])
    return ModeTimeline(mode, t_comp, spans)


def no_comm_timeline(pricer: Pricer, tokens: int, num_layers: int) -> ModeTimeline:
    t, spans = 0.0, []
    for layer in range(num_layers):
        for op in ("attn", "mlp"):
            dur = pricer.compute_s(op, 0, tokens, False)
            spans.append(Span("compute", f"L{layer}.{op}(0)", t, t + dur, op, layer))
            t += dur
    return ModeTimeline("no-comm", t, spans)


@dataclass
class TokenweaveResult:
    hardware: str
    model: str
    layer: LayerShape
    tokens: int
    num_layers: int
    plan: SplitPlan
    path: str
    modes: dict[str, ModeTimeline]
    comm_ctas: int = 8

    def summary(self) -> dict:
        """JSON-ready: per-layer milliseconds of each mode, speedup, the split."""
        ms = 1e3 / self.num_layers
        base, tw, nc = (self.modes[m].total_s for m in ("baseline", "tokenweave", "no-comm"))
        twl = self.modes["tokenweave"]
        waits = sum(s.end - s.start for s in twl.spans if s.kind == "wait")
        return {
            "hardware": self.hardware, "model": self.model, "tp": self.layer.tp, "tokens": self.tokens,
            "layers": self.num_layers, "hidden": self.layer.hidden, "ffn": self.layer.ffn,
            "heads": self.layer.heads, "kv_heads": self.layer.kv_heads, "experts": self.layer.num_experts,
            "top_k": self.layer.top_k, "comm_path": self.path, "comm_ctas": self.comm_ctas,
            "baseline_ms": base * ms, "tokenweave_ms": tw * ms, "no_comm_ms": nc * ms,
            "speedup": base / tw if tw > 0 else 1.0,
            "baseline_comm_share": 1.0 - nc / base if base > 0 else 0.0,
            "tokenweave_exposed_comm_ms": waits * ms,
            "no_comm_norm_ms": self.modes["no-comm+norm"].total_s * ms,
            "naive_split_ms": self.modes["naive-split"].total_s * ms if "naive-split" in self.modes else None,
            "split": {"mode": self.plan.mode, "cut": self.plan.cut, "pieces": [list(p) for p in self.plan.pieces],
                      "padded": list(self.plan.padded), "gemm_penalty": self.plan.penalty,
                      "naive_gemm_penalty": self.plan.naive_penalty},
            "model_ms": {"baseline": base * 1e3, "tokenweave": tw * 1e3, "no_comm": nc * 1e3},
        }


def check_limits(layer: LayerShape, tokens: int, num_layers: int) -> None:
    """UsageError unless tokens, layers and the layer's sizes are within the limits above."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_TOKENS:
        raise UsageError(f"tokens must be an integer in 1..{MAX_TOKENS} (16M: the split planner prices "
                         f"~tokens/512 cuts), got {tokens!r}", field="tokens")
    check_int(num_layers, "layers", lo=1)
    if num_layers > MAX_LAYERS:
        raise UsageError(f"layers must be <= {MAX_LAYERS} (every layer is simulated step by step; times are "
                         f"per-layer averages), got {num_layers}", field="layers")
    for name, value, hi in (("hidden", layer.hidden, MAX_HIDDEN), ("ffn", layer.ffn, MAX_FFN),
                            ("heads", layer.heads, MAX_HEADS), ("kv_heads", layer.kv_heads, MAX_HEADS),
                            ("experts", layer.num_experts, MAX_EXPERTS)):
        if value > hi:
            raise UsageError(f"{name} must be <= {hi} (far above any public model), got {value}", field=name)


def simulate_tokenweave(cluster: Cluster, layer: LayerShape, tokens: int, *, num_layers: int = 1,
                        model: str = "custom", dtype_bytes: int = 2,
                        comm_ctas: int | str = 8) -> TokenweaveResult:
    """Price baseline, TokenWeave and no-comm for ``num_layers`` layers of ``layer`` on ``cluster``.

    ``comm_ctas``: CTAs of the overlapped communication kernel (2, 4, 8 or 16), or ``"auto"`` for
    the count with the fastest TokenWeave time (few CTAs leave more SMs to compute when the
    communication hides anyway, as with long prompts).
    """
    if comm_ctas == "auto":
        check_limits(layer, tokens, num_layers)
        results = [simulate_tokenweave(cluster, layer, tokens, num_layers=num_layers, model=model,
                                       dtype_bytes=dtype_bytes, comm_ctas=k) for k in sorted(CTA_SLOWDOWN)]
        return min(results, key=lambda r: (r.modes["tokenweave"].total_s, -r.comm_ctas))
    check_limits(layer, tokens, num_layers)
    if layer.tp != cluster.num_gpus:
        raise UsageError(f"tp ({layer.tp}) must equal the cluster's GPUs ({cluster.num_gpus})", field="tp")
    pricer = Pricer(cluster, layer, tokens, dtype_bytes, comm_ctas)
    plan = plan_split(layer, tokens, pricer.gpu)
    base_steps = build_steps(num_layers, 1, fused=False)
    tw_steps = build_steps(num_layers, len(plan.pieces), fused=True)
    modes = {
        "baseline": walk(base_steps, pricer, ((0, tokens),), (tokens,), "baseline"),
        "tokenweave": walk(tw_steps, pricer, plan.pieces, plan.padded, "tokenweave"),
        "no-comm": no_comm_timeline(pricer, tokens, num_layers),
        "no-comm+norm": walk(base_steps, pricer, ((0, tokens),), (tokens,), "no-comm+norm", free_comm=True),
    }
    if plan.mode == "split":  # the same schedule cut 50/50: what the wave-aware cut is worth
        half = tokens // 2
        naive = ((0, half), (half, tokens))
        padded = tuple(-(-(e - s) // layer.tp) * layer.tp for s, e in naive)
        modes["naive-split"] = walk(tw_steps, pricer, naive, padded, "naive-split")
    path = ("none" if layer.tp == 1 else "multimem" if pricer.multimem else
            "gloo" if cluster.node.host_cores else "nccl")
    return TokenweaveResult(cluster.node.name, model, layer, tokens, num_layers, plan, path, modes, comm_ctas)

