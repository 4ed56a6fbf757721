"""tokenloom.kernels: attention block kernels behind one selector.

``reference`` holds the pure-torch kernels (the oracle and the CPU path). Importing this package
never needs Triton or a GPU. :func:`select_impl` is the one place that picks an implementation;
tests force each with ``impl=``.
"""

from __future__ import annotations

import torch

from tokenloom.kernels import reference
from tokenloom.kernels.reference import (
    attention_backward,
    attention_delta,
    attention_with_lse,
    merge_into_,
    merge_partials,
)

IMPLS = ("torch", "triton")


def triton_available() -> bool:
    """True when the Triton block kernels are present and can run here.

    They live in ``tokenloom.kernels.triton_attention`` (``usable()``, ``forward``, ``backward``);
    until that module ships, every device uses the torch path.
    """
    try:
        from tokenloom.kernels import triton_attention  # noqa: F401
    except ImportError:
        return False
    return triton_attention.usable()


def select_impl(device: torch.device, impl: str | None = None) -> str:
    """``impl`` if given (validated), else Triton on CUDA when usable, else torch."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
        if impl == "triton" and not triton_available():
            raise ValueError("impl='triton' is not available here: it needs "
                             "tokenloom.kernels.triton_attention, the triton package and a CUDA "
                             "device (or TRITON_INTERPRET=1); use impl='torch' or None")
        return impl
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  softmax_scale: float | None, impl: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention block, not differentiable: ``out`` in the accumulation dtype, ``lse``."""
    if select_impl(q.device, impl) == "triton":
        from tokenloom.kernels import triton_attention

        return triton_attention.forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    acc = reference.acc_dtype(q.dtype)
    return attention_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale, out_dtype=acc)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   lse: torch.Tensor, delta: torch.Tensor, *, causal: bool,
                   softmax_scale: float | None, impl: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the global ``lse`` and ``delta``; fp32 results."""
    if select_impl(q.device, impl) == "triton":
        from tokenloom.kernels import triton_attention

        return triton_attention.backward(dout, q, k, v, lse, delta, causal=causal,
                                         softmax_scale=softmax_scale)
    return attention_backward(dout, q, k, v, lse, delta, causal=causal, softmax_scale=softmax_scale)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, impl):
        out, lse = block_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, impl=impl)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, softmax_scale, impl)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, impl = ctx.args
        delta = attention_delta(out, dout)
        dq, dk, dv = block_backward(dout, q, k, v, lse, delta, causal=causal,
                                    softmax_scale=scale, impl=impl)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, impl: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention on one device: ``(out, lse)``.

    q ``(batch, seq_q, heads, head_dim)``; k, v ``(batch, seq_k, heads_kv, head_dim)``; ``out``
    like q in q's dtype, ``lse`` ``(batch, heads, seq_q)`` fp32 (not differentiable). ``impl``:
    "triton" | "torch" | None (choose by device).
    """
    reference.check_qkv(q, k, v)
    return _BlockAttention.apply(q, k, v, causal, softmax_scale, impl)


__all__ = [
    "IMPLS",
    "attention_backward",
    "attention_delta",
    "attention_with_lse",
    "block_attention",
    "block_backward",
    "block_forward",
    "merge_into_",
    "merge_partials",
    "reference",
    "select_impl",
    "triton_available",
]
