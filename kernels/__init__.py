"""tokenloom.kernels: attention block kernels and residual+RMSNorm behind one selector.

``reference`` holds the pure-torch kernels (the oracle, and the path for any device without a
fused one); ``sdpa`` runs torch's fused SDPA ops that return the log-sum-exp; ``triton_*`` hold the
Triton kernels. Importing this package never needs Triton or a GPU. :func:`select_impl` (attention)
and :func:`select_norm_impl` are the one place that picks an implementation: the ``impl=``
argument, else the environment variable, else the device default. Tests force each with ``impl=``.
"""

from __future__ import annotations

from tokenloom.common.shadow import hand_back

hand_back(__name__, __file__)  # imported by its bare name from the checkout: the installed package wins

import os

import torch

from tokenloom.common.errors import UsageError
from tokenloom.kernels import norm as _norm
from tokenloom.kernels import reference, windowed
from tokenloom.kernels.masks import (
    PositionMask,
    all_finite,
    block_visible,
    exact_backward,
    exact_forward,
    lse_ok,
)
from tokenloom.kernels.reference import (
    attention_backward,
    attention_delta,
    attention_with_lse,
    merge_partials,
)

IMPLS = ("torch", "sdpa", "triton")
NORM_IMPLS = ("torch", "triton")
ATTN_ENV = "TOKENLOOM_ATTN_IMPL"
NORM_ENV = "TOKENLOOM_NORM_IMPL"
# Device defaults. CPU: the fused op (as fast as torch SDPA; the reference took 2.3x its time fwd+bwd at
# S=8192 and made 2-rank strategies 1.6-2.4x slower than torch SDPA instead of 0.9-1.1x; docs/kernels.md).
# CUDA: sdpa until bench_kernels.py has been run on a GPU and says Triton wins (not measured yet).
DEFAULT_IMPL = {"cpu": "sdpa", "cuda": "sdpa"}
DEFAULT_NORM_IMPL = {"cpu": "torch", "cuda": "torch"}


def triton_available(device: torch.device | None = None) -> bool:
    """True when the Triton kernels can run here: the triton package is importable and there is a
    CUDA device (or ``TRITON_INTERPRET=1`` with CPU tensors)."""
    try:
        from tokenloom.kernels import triton_attention
    except ImportError:
        return False
    return triton_attention.usable(device)


def _requested(device: torch.device, impl: str | None, env: str, choices: tuple[str, ...],
               what: str) -> str | None:
    """``impl`` validated, else the environment variable's value validated, else None."""
    source = "impl"
    if impl is None:
        impl = os.environ.get(env, "").strip() or None
        source = env
    if impl is not None and impl not in choices:
        raise UsageError(f"{source} must be one of {', '.join(choices)} ({what}), got {impl!r}",
                         field=source)
    if impl == "triton" and not triton_available(device):
        others = " or ".join(repr(c) for c in choices if c != "triton")
        raise UsageError(f"{source}='triton' is not available here: it needs the triton package and "
                         f"a CUDA device (or TRITON_INTERPRET=1); use {others}", field=source)
    return impl


def select_impl(device: torch.device, impl: str | None = None) -> str:
    """Attention kernel: ``impl`` if given, else ``$TOKENLOOM_ATTN_IMPL``, else the device default
    (``DEFAULT_IMPL``; "torch" on devices it does not list)."""
    chosen = _requested(device, impl, ATTN_ENV, IMPLS, "attention block kernel")
    return chosen or DEFAULT_IMPL.get(torch.device(device).type, "torch")


def select_norm_impl(device: torch.device, impl: str | None = None) -> str:
    """Residual+RMSNorm kernel: ``impl``, else ``$TOKENLOOM_NORM_IMPL``, else the device default."""
    chosen = _requested(device, impl, NORM_ENV, NORM_IMPLS, "residual+RMSNorm kernel")
    return chosen or DEFAULT_NORM_IMPL.get(torch.device(device).type, "torch")


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                *, impl: str | None = None) -> None:
    """In-place lse merge of a partial into fp32 accumulators (views allowed, e.g. one zigzag half).

    The Triton kernel when the attention selector picks "triton" for this device, else the
    reference (:func:`reference.merge_into_`).
    """
    if (acc_out.dtype == torch.float32 and acc_out.stride(-1) == 1
            and select_impl(acc_out.device, impl) == "triton"):
        from tokenloom.kernels import triton_merge

        triton_merge.merge_into_(acc_out, acc_lse, out, lse)
        return
    reference.merge_into_(acc_out, acc_lse, out, lse)


def residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float = 1e-6, *, impl: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)``: ``new_residual = x + residual`` (fp32 sum, stored in x's dtype;
    ``x`` when ``residual`` is None), ``normed = rmsnorm(new_residual) * weight``.

    ``x``, ``residual`` ``(..., hidden)``, ``weight`` ``(hidden,)``; both results like ``x``.
    ``impl``: "torch" | "triton" | None (``$TOKENLOOM_NORM_IMPL``, then the device default).
    """
    if select_norm_impl(x.device, impl) == "triton":
        from tokenloom.kernels import triton_norm

        _norm.check_norm_args(x, residual, weight, eps)
        return triton_norm.residual_rmsnorm(x, residual, weight, eps)
    return _norm.residual_rmsnorm(x, residual, weight, eps)


def _route(q: torch.Tensor, impl: str | None, scale: float, softcap) -> str:
    """The impl that runs a block with finite inputs: softmax_scale == 0 runs the reference (the
    fused ops multiply the masked -inf scores by 0 and return nan, where the exact answer is
    uniform attention over the visible keys), and so does ``softcap`` where torch's fused ops were
    chosen (they cannot soft-cap scores; the Triton kernels can)."""
    chosen = select_impl(q.device, impl)
    if scale == 0.0 or (softcap is not None and chosen == "sdpa"):
        return "torch"
    return chosen


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  softmax_scale: float | None, impl: str | None = None,
                  mask: PositionMask | None = None, softcap: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention block, not differentiable: ``out`` in the accumulation dtype, ``lse``.

    ``mask``: query/key positions and a window (then ``causal`` is ignored: the window holds it).
    A block whose inputs hold a nan or inf runs the exact visible-pairs path
    (:mod:`tokenloom.kernels.masks`), whatever ``impl`` says.
    """
    scale = reference._scale(softmax_scale, q.shape[-1])
    if mask is not None:
        causal = False
    if not all_finite(q, k, v):
        vis = block_visible(q.shape[1], k.shape[1], causal, mask, q.device)
        return exact_forward(q, k, v, vis, scale, softcap)
    chosen = _route(q, impl, scale, softcap)
    if chosen == "triton":  # masks by position natively: skips hidden tiles itself
        from tokenloom.kernels import triton_attention

        return triton_attention.forward(q, k, v, causal=causal, softmax_scale=scale, mask=mask,
                                        softcap=softcap)
    if mask is not None:
        return windowed.forward(lambda *a: _forward(chosen, *a, False, scale, softcap), q, k, v, mask)
    return _forward(chosen, q, k, v, None, causal, scale, softcap)


def _forward(chosen: str, q, k, v, vis, causal: bool, scale: float, softcap: float | None = None):
    if chosen == "sdpa":
        from tokenloom.kernels import sdpa

        return sdpa.forward(q, k, v, causal=causal, softmax_scale=scale, mask=vis)
    acc = reference.acc_dtype(q.dtype)
    return attention_with_lse(q, k, v, causal=causal, softmax_scale=scale, out_dtype=acc, mask=vis,
                              softcap=softcap)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   lse: torch.Tensor, delta: torch.Tensor, *, causal: bool,
                   softmax_scale: float | None, impl: str | None = None,
                   mask: PositionMask | None = None, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the global ``lse`` and ``delta``; fp32 results (exact
    visible-pairs path when an input holds a nan or inf, as :func:`block_forward`)."""
    scale = reference._scale(softmax_scale, q.shape[-1])
    if mask is not None:
        causal = False
    if not (all_finite(dout, q, k, v, delta) and lse_ok(lse)):
        vis = block_visible(q.shape[1], k.shape[1], causal, mask, q.device)
        return exact_backward(dout, q, k, v, lse, delta, vis, scale, softcap)
    chosen = _route(q, impl, scale, softcap)
    if chosen == "triton":
        from tokenloom.kernels import triton_attention

        return triton_attention.backward(dout, q, k, v, lse, delta, causal=causal, softmax_scale=scale,
                                         mask=mask, softcap=softcap)
    if mask is not None:
        return windowed.backward(lambda *a: _backward(chosen, *a, False, scale, softcap), dout, q, k, v,
                                 lse, delta, mask)
    return _backward(chosen, dout, q, k, v, lse, delta, None, causal, scale, softcap)


def _backward(chosen: str, dout, q, k, v, lse, delta, vis, causal: bool, scale: float,
              softcap: float | None = None):
    if chosen == "sdpa":
        from tokenloom.kernels import sdpa

        return sdpa.backward(dout, q, k, v, lse, delta, causal=causal, softmax_scale=scale, mask=vis)
    return attention_backward(dout, q, k, v, lse, delta, causal=causal, softmax_scale=scale, mask=vis,
                              softcap=softcap)


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
    "torch" | "sdpa" | "triton" | None (``$TOKENLOOM_ATTN_IMPL``, then the device default).
    """
    reference.check_qkv(q, k, v)
    return _BlockAttention.apply(q, k, v, causal, softmax_scale, impl)


__all__ = [
    "ATTN_ENV",
    "DEFAULT_IMPL",
    "DEFAULT_NORM_IMPL",
    "IMPLS",
    "NORM_ENV",
    "NORM_IMPLS",
    "PositionMask",
    "attention_backward",
    "attention_delta",
    "attention_with_lse",
    "block_attention",
    "block_backward",
    "block_forward",
    "merge_into_",
    "merge_partials",
    "reference",
    "residual_rmsnorm",
    "select_impl",
    "select_norm_impl",
    "triton_available",
]
