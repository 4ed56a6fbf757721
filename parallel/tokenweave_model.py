"""The transformer layer TokenWeave runs: config, weights, tensor-parallel shards, fp64 oracle.

Llama-style layer (pre-norm): ``h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h))`` with GQA
attention, rotary position embeddings and a causal prefill mask; the MLP is SwiGLU, or a
Mixtral-style MoE (a router over ``num_experts`` SwiGLU experts, the top ``top_k`` per token,
weights = softmax over the chosen logits). A stack ends with a final RMSNorm.

Tensor parallel shards (Megatron): QKV, gate and up are column-parallel (rank ``r`` holds its
``heads / tp`` query heads, the kv heads they use, ``ffn / tp`` columns of every expert); O and
down are row-parallel, so each rank's output is a partial sum that one AllReduce completes. When
``kv_heads < tp`` a kv head is replicated on the ranks whose query heads use it (as vLLM does).
The router and the norms are replicated.

:func:`reference_stack` is the single-device oracle, written with plain torch ops (a softmax
over a masked score matrix, per-expert loops), independent of the sharded code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenloom.parallel.tokenweave_split import LayerShape, check_layer_sizes, check_tp_sizes


@dataclass(frozen=True)
class LayerConfig:
    """Sizes of one layer; validated on construction (UsageError naming the field)."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    num_experts: int = 0  # 0: dense SwiGLU
    top_k: int = 0
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:  # the planner's rules (LayerShape's), plus rotary's even head dims
        check_layer_sizes(self.hidden, self.ffn, self.heads, self.kv_heads, self.num_experts, self.top_k,
                          rotary=True)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    def check_tp(self, tp: int) -> None:
        """UsageError unless heads and ffn divide over ``tp`` ranks."""
        check_tp_sizes(self.heads, self.ffn, tp)

    def shape(self, tp: int) -> LayerShape:
        """The planner's view of this layer on ``tp`` ranks (validated by the same rules)."""
        return LayerShape(self.hidden, self.ffn, self.heads, self.kv_heads, tp, self.num_experts, self.top_k)


def kv_heads_of_rank(cfg: LayerConfig, rank: int, tp: int) -> range:
    """The kv heads rank ``rank``'s query heads use (GQA group ``heads // kv_heads``)."""
    per = cfg.heads // tp
    group = cfg.heads // cfg.kv_heads
    return range(rank * per // group, ((rank + 1) * per - 1) // group + 1)


def layer_weights(cfg: LayerConfig, layer: int, seed: int = 0) -> dict:
    """Full (unsharded) weights of layer ``layer``, fp64 holding fp32-drawn values.

    Each layer has its own generator (seeded from ``seed`` and ``layer``), so a rank can build
    one layer at a time and keep only its shard; values are drawn in fp32 so that fp32 shards are
    exact copies of the fp64 oracle's weights. Linear weights are ``(out_features, in_features)``
    scaled by ``1/sqrt(in_features)`` so activations stay O(1).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer + 1)
    h, d, f = cfg.hidden, cfg.head_dim, cfg.ffn

    def lin(out_f: int, in_f: int, *lead: int) -> torch.Tensor:
        return torch.randn(*lead, out_f, in_f, generator=gen).double() / math.sqrt(in_f)

    w = {"in_norm": final_norm_weight(cfg, seed, gen), "wq": lin(cfg.heads * d, h),
         "wk": lin(cfg.kv_heads * d, h), "wv": lin(cfg.kv_heads * d, h), "wo": lin(h, cfg.heads * d),
         "post_norm": final_norm_weight(cfg, seed, gen)}
    if cfg.moe:
        w.update(router=lin(cfg.num_experts, h), w_gate=lin(f, h, cfg.num_experts),
                 w_up=lin(f, h, cfg.num_experts), w_down=lin(h, f, cfg.num_experts))
    else:
        w.update(w_gate=lin(f, h), w_up=lin(f, h), w_down=lin(h, f))
    return w


def final_norm_weight(cfg: LayerConfig, seed: int = 0, gen: torch.Generator | None = None) -> torch.Tensor:
    """An RMSNorm weight ``1 + 0.1 * N(0, 1)``; the stack's final norm when ``gen`` is None."""
    gen = gen or torch.Generator().manual_seed(seed * 1_000_003)
    return 1.0 + 0.1 * torch.randn(cfg.hidden, generator=gen).double()


def make_weights(cfg: LayerConfig, num_layers: int, seed: int = 0) -> dict:
    """Full fp64 weights of a stack: ``{"layers": [per-layer dict], "final_norm": (hidden,)}``;
    the same on every rank for the same seed (the oracle's weights)."""
    return {"layers": [layer_weights(cfg, i, seed) for i in range(num_layers)],
            "final_norm": final_norm_weight(cfg, seed)}


def shard_layer(w: dict, cfg: LayerConfig, rank: int, tp: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Rank ``rank``'s shard of one layer's full weights ``w`` (see module docstring)."""
    d = cfg.head_dim
    q_rows = slice(rank * cfg.heads // tp * d, (rank + 1) * cfg.heads // tp * d)
    kv = kv_heads_of_rank(cfg, rank, tp)
    kv_rows = slice(kv.start * d, kv.stop * d)
    f_rows = slice(rank * cfg.ffn // tp, (rank + 1) * cfg.ffn // tp)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    s = {"in_norm": put(w["in_norm"]), "post_norm": put(w["post_norm"]),
         "wqkv": put(torch.cat([w["wq"][q_rows], w["wk"][kv_rows], w["wv"][kv_rows]])),
         "wo": put(w["wo"][:, q_rows]), "kv_first": kv.start,
         "w_gate_up": put(torch.cat([w["w_gate"][..., f_rows, :], w["w_up"][..., f_rows, :]], dim=-2)),
         "w_down": put(w["w_down"][..., f_rows])}
    if cfg.moe:
        s["router"] = put(w["router"])
    return s


def shard_weights(full: dict, cfg: LayerConfig, rank: int, tp: int, dtype: torch.dtype,
                  device: torch.device) -> dict:
    """Rank ``rank``'s shard of the stack ``full`` in ``dtype`` on ``device``."""
    cfg.check_tp(tp)
    return {"layers": [shard_layer(w, cfg, rank, tp, dtype, device) for w in full["layers"]],
            "final_norm": full["final_norm"].to(device=device, dtype=dtype)}


def build_shard(cfg: LayerConfig, num_layers: int, seed: int, rank: int, tp: int, dtype: torch.dtype,
                device: torch.device) -> dict:
    """The same as ``shard_weights(make_weights(...))`` holding one full layer at a time."""
    cfg.check_tp(tp)
    return {"layers": [shard_layer(layer_weights(cfg, i, seed), cfg, rank, tp, dtype, device)
                       for i in range(num_layers)],
            "final_norm": final_norm_weight(cfg, seed).to(device=device, dtype=dtype)}


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(tokens, heads, head_dim)`` at positions ``start, start+1, ...``
    (half-split form, as Llama in Hugging Face transformers); computed in fp32 or fp64."""
    n, _, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = torch.arange(start, start + n, dtype=torch.float64, device=x.device)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(acc)[:, None, :], ang.sin().to(acc)[:, None, :]
    xf = x.to(acc)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def moe_route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: ``(weights, experts)`` both ``(tokens, top_k)``; weights = softmax of the
    chosen logits (ties broken by the lower expert index, deterministically on every rank)."""
    vals, idx = torch.topk(logits, top_k, dim=-1, sorted=True)
    return torch.softmax(vals.to(torch.float64 if logits.dtype == torch.float64 else torch.float32),
                         dim=-1).to(logits.dtype), idx


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference_stack(x: torch.Tensor, full: dict, cfg: LayerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-device stack in ``x``'s dtype: ``(final normed output, final residual)``, both
    ``(tokens, hidden)``. ``x`` is the embedding output of one causal sequence."""
    n, d, g = x.shape[0], cfg.head_dim, cfg.heads // cfg.kv_heads
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    res = x
    for w in full["layers"]:
        w = {k: v.to(x.dtype) for k, v in w.items()}
        a = _rmsnorm(res, w["in_norm"], cfg.eps)
        q = rope((a @ w["wq"].T).view(n, cfg.heads, d), 0, cfg.rope_theta)
        k = rope((a @ w["wk"].T).view(n, cfg.kv_heads, d), 0, cfg.rope_theta).repeat_interleave(g, dim=1)
        v = (a @ w["wv"].T).view(n, cfg.kv_heads, d).repeat_interleave(g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        res = res + torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1) @ w["wo"].T
        a = _rmsnorm(res, w["post_norm"], cfg.eps)
        if cfg.moe:
            weights, experts = moe_route(a @ w["router"].T, cfg.top_k)
            out = torch.zeros_like(a)
            for e in range(cfg.num_experts):
                tok, slot = (experts == e).nonzero(as_tuple=True)
                out[tok] += weights[tok, slot, None] * _swiglu(a[tok], w["w_gate"][e], w["w_up"][e],
                                                               w["w_down"][e])
        else:
            out = _swiglu(a, w["w_gate"], w["w_up"], w["w_down"])
        res = res + out
    return _rmsnorm(res, full["final_norm"].to(x.dtype), cfg.eps), res
