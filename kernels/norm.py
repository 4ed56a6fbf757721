"""Residual add + RMSNorm: the pure-torch reference and CPU path.

The fused step every transformer layer ends with (and the one TokenWeave reorders around its
reduce-scatter / all-gather, REFERENCE.md §4): ``new_residual = x + residual`` and
``normed = rmsnorm(new_residual) * weight``. As vLLM's ``fused_add_rms_norm``, the sum is formed in
fp32, stored in ``x``'s dtype, and the norm is taken of that stored value, so a caller that keeps
only ``new_residual`` can recompute ``normed`` bit for bit.
"""

from __future__ import annotations

import torch

from tokenloom.common.errors import UsageError


def check_norm_args(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> None:
    """Validate shapes: ``x`` ``(..., hidden)``, ``residual`` like ``x`` or None, ``weight`` ``(hidden,)``."""
    if x.dim() < 1:
        raise UsageError(f"x must have a hidden dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise UsageError(f"weight must be 1-D of size hidden={x.shape[-1]}, got shape {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise UsageError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not (eps > 0):
        raise UsageError(f"eps must be > 0, got {eps!r}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, in fp32 (fp64 for fp64), cast to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv * weight.to(acc)).to(x.dtype)


def residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(normed, new_residual)``; both ``x``'s shape and dtype.

    ``new_residual = x + residual`` summed in fp32 and rounded to ``x.dtype`` (``x`` itself when
    ``residual`` is None); ``normed = rmsnorm(new_residual) * weight``.
    """
    check_norm_args(x, residual, weight, eps)
    if residual is None:
        new_residual = x
    else:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        new_residual = (x.to(acc) + residual.to(acc)).to(x.dtype)
    return rmsnorm(new_residual, weight, eps), new_residual
