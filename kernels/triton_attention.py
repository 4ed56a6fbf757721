"""Triton block attention (``impl="triton"``): forward ``(out, lse)`` and backward given lse, delta.

FlashAttention-2 (Dao, arXiv 2307.08691) tiling: the forward keeps a running max and sum per query
row in fp32 and never stores scores; the backward recomputes ``P = exp(S - lse)`` from the *global*
lse, so a ring's blocks add up exactly. Backward runs two kernels without atomics: one per key block
(dK, dV; the query heads of a GQA group are looped inside, so each kv head is written once) and one
per query block (dQ).

Conventions as :mod:`tokenloom.kernels.reference`: BSHD tensors (any strides, last dim contiguous
not required), GQA by ``kv head = q head // group``, causal aligned bottom-right (``j <= i + seq_k -
seq_q``), rows with no visible key give ``lse = -inf`` and 0.

Masks are one rule, ``lo <= j - i <= hi`` on local row i and key j (:func:`mask_bounds`): bottom-right
causal and sliding windows by position (:class:`~tokenloom.kernels.masks.PositionMask`) alike. Each
program loops only over the tiles its rows can see (a tile wholly outside the window is never loaded)
and masks the pairs of the tiles it visits exactly. Logit soft-capping (Gemma 2) applies
``c * tanh(s / c)`` to the scaled scores and multiplies the score gradient by ``1 - tanh^2``. Two
constexpr flags (MASKED, SOFTCAP) and the fp32 flag make every variant: at most 8 per kernel.
Sinks never reach a block kernel (they join the final statistics: :mod:`tokenloom.parallel.sinks`). head_dim is padded to a power of two
>= 16 inside the kernel with masks. fp32 inputs use IEEE fp32 dots (not TF32).

This module holds only ``@triton.jit`` kernels and their launchers; importing it needs the triton
package (``tokenloom.kernels`` imports it lazily). Without a GPU it runs under ``TRITON_INTERPRET=1``
(set before this module is imported), where one small tile configuration is used.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tokenloom.kernels.masks import PositionMask

_LOG2E = 1.4426950408889634


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def usable(device: torch.device | None = None) -> bool:
    """Triton kernels can run on ``device`` (CUDA, or any device under the interpreter)."""
    if interpreted():
        return device is None or torch.device(device).type == "cpu"
    if not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


def _tiles(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes: tiny under the interpreter; FA2-like on GPUs (smaller key tiles for big heads and
    for fp32, whose tiles take twice the shared memory: fp32 d=128 stays under sm86's 99 KB)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        if block_d > 128:
            return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=1)


def _bwd_tiles(head_dim: int, dtype: torch.dtype) -> dict:
    t = _tiles(head_dim, dtype)
    if not interpreted():
        wide = t["BLOCK_D"] > 128 or dtype == torch.float32
        t.update(BLOCK_M=32 if wide else 64, BLOCK_N=32 if wide else 64, num_stages=1 if wide else 2)
        if t["BLOCK_D"] > 128 and dtype == torch.float32:
            t.update(BLOCK_M=16, BLOCK_N=16)
    return t


@triton.jit
def _capped(s, cap):
    """``(cap * tanh(s / cap), tanh(s / cap))`` in fp32 (triton has no tanh): the exp of a
    non-positive number, so nothing overflows; absolute error ~ cap * eps."""
    x = s / cap
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return cap * t, t


@triton.jit
def _scores(q, k, scale, cap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """Scores in base 2 (``log2(e) * c tanh(scale q.k / c)``) and the tanh (1.0 without a cap)."""
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * scale
    t = s
    if SOFTCAP:
        s, t = _capped(s, cap)
    return s * 1.4426950408889634, t


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                slb, slh, H, GROUP, SEQ_Q, SEQ_K, HEAD_DIM, scale, cap, LO, HI,
                MASKED: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SEQ_Q
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = SEQ_K
    if MASKED:  # key tiles no row of this tile sees are never loaded
        lo = tl.maximum(0, m0 + LO) // BLOCK_N * BLOCK_N
        hi = tl.minimum(SEQ_K, m0 + BLOCK_M + HI)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < SEQ_K
        k = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s, _t = _scores(q, k, scale, cap, SOFTCAP, IEEE)
        visible = n_ok[None, :]
        if MASKED:
            rel = cols[None, :] - offs_m[:, None]
            visible = visible & (rel >= LO) & (rel <= HI)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out,
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                     sdob, sdos, sdoh, slb, slh, sdkb, sdks, sdkh, HKV, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
                     scale, cap, LO, HI, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < SEQ_K
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = SEQ_Q
    if MASKED:  # row i sees key j iff LO <= j - i <= HI: rows n0 - HI .. n0 + BLOCK_N - 1 - LO
        lo = tl.maximum(0, n0 - HI) // BLOCK_M * BLOCK_M
        hi = tl.minimum(SEQ_Q, n0 + BLOCK_N - LO)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        stat = b * slb + h * slh
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            m_ok = rows < SEQ_Q
            q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_base + rows[:, None] * sdos + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + stat + rows, mask=m_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: P = 0
            delta = tl.load(DELTA + stat + rows, mask=m_ok, other=0.0)
            st, tt = _scores(k, tl.trans(q), scale, cap, SOFTCAP, IEEE)  # S^T: (BLOCK_N, BLOCK_M)
            visible = n_ok[:, None] & m_ok[None, :]
            if MASKED:
                rel = offs_n[:, None] - rows[None, :]
                visible = visible & (rel >= LO) & (rel <= HI)
            pt = tl.where(visible, tl.exp2(st - lse[None, :] * 1.4426950408889634), 0.0)
            dv += _mm(pt.to(do.dtype), do, IEEE)
            dst = pt * (_mm(v, tl.trans(do), IEEE) - delta[None, :])
            if SOFTCAP:  # d(c tanh(s/c))/ds = 1 - tanh^2
                dst = dst * (1.0 - tt * tt)
            dk += _mm(dst.to(q.dtype), q, IEEE)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :], dk, mask=kv_mask)
    tl.store(DV + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :], dv, mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                   sdob, sdos, sdoh, slb, slh, sdqb, sdqs, sdqh, H, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
                   scale, cap, LO, HI, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SEQ_Q
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = SEQ_K
    if MASKED:
        lo = tl.maximum(0, m0 + LO) // BLOCK_N * BLOCK_N
        hi = tl.minimum(SEQ_K, m0 + BLOCK_M + HI)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < SEQ_K
        kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * svs + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s, t = _scores(q, kt, scale, cap, SOFTCAP, IEEE)
        visible = m_ok[:, None] & n_ok[None, :]
        if MASKED:
            rel = cols[None, :] - offs_m[:, None]
            visible = visible & (rel >= LO) & (rel <= HI)
        p = tl.where(visible, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        ds = p * (_mm(do, vt, IEEE) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _mm(ds.to(kt.dtype), tl.trans(kt), IEEE)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :], dq, mask=q_mask)


def _prep(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def mask_bounds(seq_q: int, seq_k: int, causal: bool, mask: PositionMask | None) -> tuple[bool, int, int]:
    """``(masked, lo, hi)``: local query row i sees local key j iff ``lo <= j - i <= hi``.

    A position mask gives ``lo = q_start - k_start - left`` and ``hi = q_start - k_start + right``;
    bottom-right causal is the same rule with ``hi = seq_k - seq_q`` and no lower bound. Unbounded
    sides (and far-off values, which cannot overflow int32 then) are clamped to +-(seq_q + seq_k + 1);
    ``masked`` is False when every pair is visible (the kernels then skip the mask arithmetic)."""
    far = seq_q + seq_k + 1
    lo, hi = -far, far
    if mask is not None:
        shift = mask.q_start - mask.k_start
        if mask.left >= 0:
            lo = shift - mask.left
        if mask.right >= 0:
            hi = shift + mask.right
    elif causal:
        hi = seq_k - seq_q
    lo, hi = min(max(lo, -far), far), min(max(hi, -far), far)
    return not (lo <= 1 - seq_q and hi >= seq_k - 1), lo, hi


def _cap(softcap: float | None) -> tuple[bool, float]:
    return (False, 1.0) if softcap is None else (True, float(softcap))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
            softmax_scale: float | None, mask: PositionMask | None = None,
            softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` BSHD fp32, ``lse`` ``(b, hq, seq_q)`` fp32 (q, k, v fp32/fp16/bf16).

    ``mask``: query/key positions and a window (``causal`` is then ignored: the window holds it);
    ``softcap``: scores ``c * tanh(s / c)``."""
    q, k, v = _prep(q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out = torch.empty((b, sq, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0 or b * hq == 0:
        return out, lse
    masked, lo, hi = mask_bounds(sq, sk, causal, mask)
    capped, cap = _cap(softcap)
    t = _tiles(d, q.dtype)
    grid = (triton.cdiv(sq, t["BLOCK_M"]), b * hq)
    _fwd_kernel[grid](q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                      k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                      out.stride(2), lse.stride(0), lse.stride(1), hq, hq // hkv, sq, sk, d, scale, cap, lo,
                      hi, MASKED=masked, SOFTCAP=capped, IEEE=q.dtype == torch.float32, **t)
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
             delta: torch.Tensor, *, causal: bool, softmax_scale: float | None,
             mask: PositionMask | None = None, softcap: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (fp32, shaped like q, k, v) of one block given the global lse and delta
    (``mask``, ``softcap`` as :func:`forward`)."""
    dout, q, k, v = _prep(dout.to(q.dtype), q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    dq = torch.empty((b, sq, hq, d), dtype=torch.float32, device=q.device)
    dk = torch.empty((b, sk, hkv, d), dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    if sq == 0 or sk == 0 or b * hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    masked, lo, hi = mask_bounds(sq, sk, causal, mask)
    capped, cap = _cap(softcap)
    t = _bwd_tiles(d, q.dtype)
    flags = dict(MASKED=masked, SOFTCAP=capped, IEEE=q.dtype == torch.float32, **t)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
              lse.stride(0), lse.stride(1))
    _bwd_dkdv_kernel[(triton.cdiv(sk, t["BLOCK_N"]), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, *common, dk.stride(0), dk.stride(1), dk.stride(2),
        hkv, hq // hkv, sq, sk, d, scale, cap, lo, hi, **flags)
    _bwd_dq_kernel[(triton.cdiv(sq, t["BLOCK_M"]), b * hq)](
        q, k, v, dout, lse, delta, dq, *common, dq.stride(0), dq.stride(1), dq.stride(2),
        hq, hq // hkv, sq, sk, d, scale, cap, lo, hi, **flags)
    return dq, dk, dv
