"""Attention of a few new queries over a KV cache stored heads-first: the decode block kernel.

Decode is memory-bound: one step reads the whole cache once. So the cache is stored
``(batch, kv_heads, seq, head_dim)`` ("BHSD": each head's keys contiguous, what the fused ops read
fastest; 3x faster than BSHD views at 32K keys on this CPU) and the ``group`` query heads that share
a kv head are folded into query rows, so K and V are never copied or repeated (GQA).

:func:`cache_block` takes q ``(batch, t, heads, head_dim)`` (BSHD, as everywhere) and k/v BHSD, and
returns ``(out, lse)`` like :func:`tokenloom.kernels.block_forward`: ``out`` ``(batch, t, heads,
head_dim)`` in the accumulation dtype, ``lse`` ``(batch, heads, t)``. On CPU it calls the fused op
that returns the log-sum-exp; elsewhere, and for the causal square of the new tokens against
themselves (small), the dispatched block kernel on transposed views.
"""

from __future__ import annotations

import torch

from tokenloom.kernels.reference import acc_dtype

_CPU_FUSED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _fold(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(b, t, h, d)`` -> ``(b, kv_heads, group * t, d)``, rows ordered (group, t)."""
    b, t, h, d = q.shape
    g = h // kv_heads
    return q.reshape(b, t, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)


def _unfold(out: torch.Tensor, lse: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, hkv, rows, d = out.shape
    g = rows // t
    out = out.reshape(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d)
    return out, lse.reshape(b, hkv * g, t)


def cache_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of new queries over cached keys (see module docstring). ``causal``: the
    bottom-right causal mask (the new tokens against themselves)."""
    acc = acc_dtype(q.dtype)
    t = q.shape[1]
    if (not causal and q.device.type == "cpu" and q.dtype in _CPU_FUSED and scale != 0.0
            and impl in (None, "sdpa") and k.stride(-1) == 1):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = op(_fold(q, k.shape[1]), k, v, 0.0, False, attn_mask=None, scale=scale)[:2]
        out, lse = _unfold(out, lse, t)
        return out.to(acc), lse.to(acc)
    from tokenloom import kernels

    return kernels.block_forward(q, k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                 softmax_scale=scale, impl=impl)
