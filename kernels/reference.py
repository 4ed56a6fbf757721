"""Pure-torch attention kernels: the single-device oracle and the CPU path.

Conventions (as flash-attn): tensors are ``(batch, seq, heads, head_dim)`` ("BSHD"); ``lse`` is
``(batch, heads, seq_q)`` in fp32 (fp64 for fp64 inputs). ``k``/``v`` may have fewer heads than
``q`` (GQA): ``heads_q = group * heads_kv``, query head ``h`` uses kv head ``h // group``.
Causal masks are aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + seq_k - seq_q``
(flash-attn >= 2.1), which is the usual lower triangle when the lengths are equal. A query row
that sees no key has ``lse = -inf`` and output 0.

Work is tiled over queries so that no score matrix exceeds ``_MAX_SCORE_ELEMS`` elements: the
oracle can then run on long sequences without materialising ``S x S`` at once.
"""

from __future__ import annotations

import math

import torch

from tokenloom.common.errors import UsageError

_MAX_SCORE_ELEMS = 1 << 22  # 4M fp32 scores = 16 MiB per tile: cache-friendly, 2x faster than 128 MiB tiles on CPU


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate BSHD shapes; return the GQA group size ``heads_q // heads_kv``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise UsageError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise UsageError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise UsageError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise UsageError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hkv}) for GQA")
    return hq // hkv


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _tile_rows(seq_q: int, seq_k: int, batch_heads: int) -> int:
    return max(1, min(seq_q, _MAX_SCORE_ELEMS // max(1, seq_k * batch_heads)))


def _tiles(seq_q: int, seq_k: int, batch_heads: int, causal: bool):
    """Query tiles ``(r0, r1, k_end)``: rows ``[r0, r1)`` see at most keys ``[0, k_end)``.

    Causal work is cut into at least ~8 tiles so that keys past a tile's last visible one are
    never touched: about half the FLOPs of the full square.
    """
    tile = _tile_rows(seq_q, seq_k, batch_heads)
    if causal:
        tile = min(tile, max(64, -(-seq_q // 8)))
    for r0 in range(0, seq_q, tile):
        r1 = min(seq_q, r0 + tile)
        yield r0, r1, (seq_k if not causal else max(0, min(seq_k, r1 + seq_k - seq_q)))


def _heads_first(x: torch.Tensor, heads_kv: int, acc: torch.dtype) -> torch.Tensor:
    """``(b, s, heads, d)`` -> ``(b, heads_kv, group, s, d)`` in ``acc`` (a view when possible)."""
    b, s, h, d = x.shape
    return x.to(acc).view(b, s, heads_kv, h // heads_kv, d).permute(0, 2, 3, 1, 4)


def _scores(q_t: torch.Tensor, k_t: torch.Tensor, scale: float, row0: int, causal: bool,
            offset: int, inplace: bool = True, vis: torch.Tensor | None = None,
            softcap: float | None = None) -> torch.Tensor:
    """Scaled, masked scores of a query tile: ``(batch, heads_kv, group, tile, keys)``.

    ``q_t`` is ``(b, hkv, g, tile, d)``, ``k_t`` the transposed key prefix ``(b, hkv, 1, d, keys)``;
    ``offset = seq_k - seq_q`` of the whole block (bottom-right alignment). ``vis``: an explicit
    ``(seq_q, seq_k)`` visibility (position masks, :mod:`tokenloom.kernels.masks`) instead.
    ``softcap``: scores ``c * tanh(s / c)`` (Gemma 2), applied after scaling, before masking.
    """
    s = torch.matmul(q_t, k_t)
    s = s.mul_(scale) if inplace else s * scale
    if softcap is not None:
        s = s.div_(softcap).tanh_().mul_(softcap) if inplace else torch.tanh(s / softcap) * softcap
    if vis is not None:
        hide = ~vis[row0:row0 + q_t.shape[-2], :k_t.shape[-1]]
        return s.masked_fill_(hide, float("-inf")) if inplace else s.masked_fill(hide, float("-inf"))
    if causal:
        rows = torch.arange(row0, row0 + q_t.shape[-2], device=s.device).unsqueeze(1)
        cols = torch.arange(k_t.shape[-1], device=s.device).unsqueeze(0)
        mask = cols > rows + offset
        s = s.masked_fill_(mask, float("-inf")) if inplace else s.masked_fill(mask, float("-inf"))
    return s


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       softmax_scale: float | None = None, out_dtype: torch.dtype | None = None,
                       mask: torch.Tensor | None = None, softcap: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp; the oracle and the CPU block kernel.

    Args:
        q: ``(batch, seq_q, heads_q, head_dim)``; k, v: ``(batch, seq_k, heads_kv, head_dim)``.
    Returns:
        ``out`` ``(batch, seq_q, heads_q, head_dim)`` in ``out_dtype`` (default ``q.dtype``) and
        ``lse`` ``(batch, heads_q, seq_q)`` in the accumulation dtype (fp32, fp64 for fp64).
        ``mask``: optional ``(seq_q, seq_k)`` bool visibility replacing ``causal``.
    """
    check_qkv(q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    scale = _scale(softmax_scale, d)
    # in-place arithmetic on the score tiles saves memory traffic, but only when no autograd graph
    # is being recorded through this function (the oracle is also differentiated directly)
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    qh = _heads_first(q, hkv, acc)
    k_t = k.to(acc).permute(0, 2, 3, 1).unsqueeze(2).contiguous()  # (b, hkv, 1, d, sk)
    vh = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2).contiguous()  # (b, hkv, 1, sk, d)
    out_h = torch.empty((b, hkv, hq // hkv, sq, d), dtype=acc, device=q.device)
    lse_h = torch.empty((b, hkv, hq // hkv, sq), dtype=acc, device=q.device)
    for r0, r1, kend in _tiles(sq, sk, b * hq, causal and mask is None):
        if kend == 0:  # no visible key: empty rows
            out_h[..., r0:r1, :] = 0
            lse_h[..., r0:r1] = float("-inf")
            continue
        p = _scores(qh[..., r0:r1, :], k_t[..., :kend], scale, r0, causal, sk - sq, inplace, mask,
                    softcap)
        m = p.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # fully masked rows
        p = p.sub_(m).exp_() if inplace else torch.exp(p - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vh[..., :kend, :]) / denom.clamp_min(torch.finfo(acc).tiny)
        out_h[..., r0:r1, :] = o
        lse_h[..., r0:r1] = (m + torch.log(denom)).squeeze(-1)
    out = out_h.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    lse = lse_h.reshape(b, hq, sq)
    return out.to(out_dtype or q.dtype), lse


def merge_partials(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention partials over disjoint key sets (REFERENCE.md §1).

    ``out*`` are ``(batch, seq, heads, head_dim)``, ``lse*`` ``(batch, heads, seq)``. Uses
    ``out = out1 - sigmoid(lse2 - lse1) * (out1 - out2)``; a side whose lse is ``-inf`` (no visible
    key) contributes nothing, and two empty sides stay empty with no NaN. Returns fp32 (fp64 for
    fp64) results.
    """
    acc = acc_dtype(out1.dtype)
    lse1, lse2 = lse1.to(acc), lse2.to(acc)
    lse = torch.logaddexp(lse1, lse2)
    both_empty = torch.isneginf(lse1) & torch.isneginf(lse2)
    w2 = torch.sigmoid(lse2 - lse1).masked_fill(both_empty, 0.0)  # weight of side 2
    w2 = w2.transpose(1, 2).unsqueeze(-1)  # (b, s, h, 1)
    o1, o2 = out1.to(acc), out2.to(acc)
    return o1 - w2 * (o1 - o2), lse


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """In-place :func:`merge_partials` into fp32 accumulators (views allowed)."""
    new_out, new_lse = merge_partials(acc_out, acc_lse, out, lse)
    acc_out.copy_(new_out)
    acc_lse.copy_(new_lse)


def attention_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO * O)`` per query and head: ``(batch, heads, seq)`` in fp32/fp64."""
    acc = acc_dtype(out.dtype)
    return (out.to(acc) * dout.to(acc)).sum(-1).transpose(1, 2).contiguous()


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lse: torch.Tensor, delta: torch.Tensor, *, causal: bool = False,
                       softmax_scale: float | None = None, mask: torch.Tensor | None = None,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one attention block given the *global* row statistics.

    ``lse`` and ``delta`` (``(batch, heads_q, seq_q)``) are those of the full attention the block
    is part of, so block gradients add up exactly: ``P = exp(s - lse)``, ``dV = P^T dO``,
    ``dS = P * (dO V^T - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q`` (FlashAttention-2).
    Returns ``dq, dk, dv`` in fp32 (fp64 for fp64), shaped like q, k, v.
    """
    check_qkv(q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    scale = _scale(softmax_scale, d)
    qh, doh = _heads_first(q, hkv, acc), _heads_first(dout, hkv, acc)
    kh = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2).contiguous()  # (b, hkv, 1, sk, d)
    k_t = kh.transpose(-1, -2)
    v_t = v.to(acc).permute(0, 2, 3, 1).unsqueeze(2)  # (b, hkv, 1, d, sk)
    lse_h = lse.to(acc).view(b, hkv, g, sq)
    lse_h = torch.where(torch.isneginf(lse_h), torch.zeros_like(lse_h), lse_h)  # empty rows: p = 0
    delta_h = delta.to(acc).view(b, hkv, g, sq)
    dq = torch.empty((b, hkv, g, sq, d), dtype=acc, device=q.device)
    dk = torch.zeros((b, hkv, sk, d), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    for r0, r1, kend in _tiles(sq, sk, b * hq, causal and mask is None):
        if kend == 0:  # rows that see no key have no gradient
            dq[..., r0:r1, :] = 0
            continue
        t = r1 - r0
        q_t, do_t = qh[..., r0:r1, :], doh[..., r0:r1, :]
        p = _scores(q_t, k_t[..., :kend], scale, r0, causal, sk - sq, vis=mask, softcap=softcap)
        # d(c tanh(x / c))/dx = 1 - tanh^2 (masked entries: -inf -> factor 1, their p is 0)
        cap = None if softcap is None else 1 - (p / softcap).masked_fill(torch.isneginf(p), 0.0) ** 2
        p.sub_(lse_h[..., r0:r1].unsqueeze(-1)).exp_()
        # the (group, tile) rows of one kv head fold together for dK and dV
        dv[:, :, :kend] += torch.matmul(p.reshape(b, hkv, g * t, kend).transpose(-1, -2),
                                        do_t.reshape(b, hkv, g * t, d))
        ds = torch.matmul(do_t, v_t[..., :kend]).sub_(delta_h[..., r0:r1].unsqueeze(-1)).mul_(p)
        if cap is not None:
            ds.mul_(cap)
        dq[..., r0:r1, :] = torch.matmul(ds, kh[..., :kend, :]).mul_(scale)
        dk[:, :, :kend] += torch.matmul(ds.reshape(b, hkv, g * t, kend).transpose(-1, -2),
                                        q_t.reshape(b, hkv, g * t, d)).mul_(scale)
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


# Error floors (relative to the reference's magnitude) added to "2x plain PyTorch's error in the same
# dtype" when judging a result against fp64 (STYLE.md §5).
ERROR_FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tolerance(dtype: torch.dtype, plain_err: float, ref_absmax: float) -> float:
    """Acceptable max |error| against fp64: ``2 * plain_err + floor * max(1, |ref|max)``."""
    return 2.0 * plain_err + ERROR_FLOORS[dtype] * max(1.0, ref_absmax)


def torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """torch's own SDPA in the input dtype (BSHD, GQA by repetition): the yardstick for how much
    error plain PyTorch makes in a low precision."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)
