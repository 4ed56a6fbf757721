"""Triton residual add + RMSNorm (TokenWeave's per-shard step, REFERENCE.md §4).

One program per row: ``new_residual = x + residual`` summed in fp32 and stored in x's dtype, then
``normed = new_residual * rsqrt(mean(new_residual^2) + eps) * weight`` from the stored value, as
:func:`tokenloom.kernels.norm.residual_rmsnorm` (the reference) defines it. Only ``@triton.jit``
code and its launcher; callers go through :func:`tokenloom.kernels.residual_rmsnorm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _residual_rmsnorm_kernel(X, R, W, OUT, NEWR, sx, sr, so, snr, N, eps,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
        xr = x.to(NEWR.dtype.element_ty)
        tl.store(NEWR + row * snr + cols, xr, mask=mask)
        x = xr.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * so + cols, (x * inv * w).to(OUT.dtype.element_ty), mask=mask)


def residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)`` like x (arguments already validated by the caller)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        r2, new_r = x2, x2
    else:
        r2 = residual.reshape(-1, n)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        new_r = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        warps = 1 if block <= 512 else (4 if block <= 4096 else 8)
        _residual_rmsnorm_kernel[(rows,)](x2, r2, weight.contiguous(), out, new_r, x2.stride(0),
                                          r2.stride(0), out.stride(0), new_r.stride(0), n, float(eps),
                                          HAS_RES=residual is not None, BLOCK=block, num_warps=warps)
    normed = out.view(x.shape)
    return normed, (x if residual is None else new_r.view(x.shape))
