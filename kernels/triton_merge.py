"""Triton in-place log-sum-exp merge of an attention partial into fp32 accumulators.

``acc_out <- acc_out - sigmoid(lse - acc_lse) * (acc_out - out)``, ``acc_lse <- logaddexp(acc_lse,
lse)`` (REFERENCE.md §1, the stable form ring-flash-attention uses), in one pass over memory. Every
tensor may be a strided view, so a partial over the late half of a zigzag query (``narrow`` of the
accumulators) merges in place without copies. A side with ``lse = -inf`` contributes nothing; two
empty sides stay empty (no NaN). Only ``@triton.jit`` code and its launcher; see
:func:`tokenloom.kernels.reference.merge_into_` for the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenloom.common.errors import UsageError
from tokenloom.kernels.triton_attention import interpreted


@triton.jit
def _merge_kernel(AO, AL, O, L, sao_b, sao_s, sao_h, sal_b, sal_h, sal_s, so_b, so_s, so_h,
                  sl_b, sl_h, sl_s, H, SEQ, HEAD_DIM, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < SEQ
    mask = r_ok[:, None] & (cols[None, :] < HEAD_DIM)
    la = tl.load(AL + b * sal_b + h * sal_h + rows * sal_s, mask=r_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(L + b * sl_b + h * sl_h + rows * sl_s, mask=r_ok, other=float("-inf")).to(tl.float32)
    both_empty = (la == float("-inf")) & (lb == float("-inf"))
    hi = tl.maximum(la, lb)
    lo = tl.minimum(la, lb)
    hi_safe = tl.where(both_empty, 0.0, hi)
    lse = tl.where(both_empty, float("-inf"), hi_safe + tl.log(1.0 + tl.exp(lo - hi_safe)))
    la_s = tl.where(both_empty, 0.0, la)  # keeps -inf - -inf (NaN) out of the arithmetic
    lb_s = tl.where(both_empty, 0.0, lb)
    w = tl.where(both_empty, 0.0, 1.0 / (1.0 + tl.exp(la_s - lb_s)))
    ao_ptr = AO + b * sao_b + h * sao_h + rows[:, None] * sao_s + cols[None, :]
    oa = tl.load(ao_ptr, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(ao_ptr, oa - w[:, None] * (oa - ob), mask=mask)
    tl.store(AL + b * sal_b + h * sal_h + rows * sal_s, lse, mask=r_ok)


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: ``acc_out`` ``(b, s, h, d)`` fp32 and ``acc_lse`` ``(b, h, s)`` fp32 absorb the
    partial ``(out, lse)`` over disjoint keys. Views with a contiguous last dim are fine."""
    if acc_out.dtype != torch.float32 or acc_lse.dtype != torch.float32:
        raise UsageError(f"accumulators must be fp32, got {acc_out.dtype} and {acc_lse.dtype}")
    if acc_out.shape != out.shape or acc_lse.shape != lse.shape:
        raise UsageError(f"shapes differ: {tuple(acc_out.shape)}/{tuple(out.shape)}, "
                         f"{tuple(acc_lse.shape)}/{tuple(lse.shape)}")
    if acc_out.stride(-1) != 1:
        raise UsageError("acc_out needs a contiguous last dim to merge in place")
    out = out if out.stride(-1) == 1 else out.contiguous()
    b, s, h, d = acc_out.shape
    if b * s * h == 0:
        return
    block_s = 16 if interpreted() else 64
    grid = (triton.cdiv(s, block_s), b * h)
    _merge_kernel[grid](acc_out, acc_lse, out, lse, *acc_out.stride()[:3], *acc_lse.stride(),
                        *out.stride()[:3], *lse.stride(), h, s, d, BLOCK_S=block_s,
                        BLOCK_D=triton.next_power_of_2(d))
