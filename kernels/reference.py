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

_MAX_SCORE_ELEMS = 1 << 25  # 32M fp32 scores = 128 MiB per tile


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate BSHD shapes; return the GQA group size ``heads_q // heads_kv``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hkv}) for GQA")
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


def _scores(q_t: torch.Tensor, k: torch.Tensor, scale: float, row0: int, causal: bool,
            offset: int) -> torch.Tensor:
    """Scaled, masked scores of a query tile: ``(batch, heads_kv, group, tile, keys)``.

    ``offset = seq_k - seq_q`` of the whole block (bottom-right alignment); ``k`` may be a prefix.
    """
    s = torch.einsum("bqhgd,bkhd->bhgqk", q_t, k) * scale
    if causal:
        rows = torch.arange(row0, row0 + q_t.shape[1], device=s.device).unsqueeze(1)
        cols = torch.arange(k.shape[1], device=s.device).unsqueeze(0)
        s = s.masked_fill(cols > rows + offset, float("-inf"))
    return s


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       softmax_scale: float | None = None, out_dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp; the oracle and the CPU block kernel.

    Args:
        q: ``(batch, seq_q, heads_q, head_dim)``; k, v: ``(batch, seq_k, heads_kv, head_dim)``.
    Returns:
        ``out`` ``(batch, seq_q, heads_q, head_dim)`` in ``out_dtype`` (default ``q.dtype``) and
        ``lse`` ``(batch, heads_q, seq_q)`` in the accumulation dtype (fp32, fp64 for fp64).
    """
    group = check_qkv(q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    scale = _scale(softmax_scale, d)
    qa, ka, va = q.to(acc).view(b, sq, hkv, group, d), k.to(acc), v.to(acc)
    out = torch.empty((b, sq, hq, d), dtype=acc, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc, device=q.device)
    for r0, r1, kend in _tiles(sq, sk, b * hq, causal):
        if kend == 0:  # no visible key: empty rows
            out[:, r0:r1] = 0
            lse[:, :, r0:r1] = float("-inf")
            continue
        s = _scores(qa[:, r0:r1], ka[:, :kend], scale, r0, causal, sk - sq)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p / denom.clamp_min(torch.finfo(acc).tiny), va[:, :kend])
        out[:, r0:r1] = o.reshape(b, r1 - r0, hq, d)
        lse[:, :, r0:r1] = (m + torch.log(denom)).squeeze(-1).reshape(b, hq, r1 - r0)
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
                       softmax_scale: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one attention block given the *global* row statistics.

    ``lse`` and ``delta`` (``(batch, heads_q, seq_q)``) are those of the full attention the block
    is part of, so block gradients add up exactly: ``P = exp(s - lse)``, ``dV = P^T dO``,
    ``dS = P * (dO V^T - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q`` (FlashAttention-2).
    Returns ``dq, dk, dv`` in fp32 (fp64 for fp64), shaped like q, k, v.
    """
    group = check_qkv(q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    scale = _scale(softmax_scale, d)
    qa, ka, va = q.to(acc).view(b, sq, hkv, group, d), k.to(acc), v.to(acc)
    doa = dout.to(acc).view(b, sq, hkv, group, d)
    lse_g = lse.to(acc).view(b, hkv, group, sq)
    delta_g = delta.to(acc).view(b, hkv, group, sq)
    dq = torch.empty((b, sq, hkv, group, d), dtype=acc, device=q.device)
    dk = torch.zeros((b, sk, hkv, d), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    for r0, r1, kend in _tiles(sq, sk, b * hq, causal):
        if kend == 0:  # rows that see no key have no gradient
            dq[:, r0:r1] = 0
            continue
        kt, vt = ka[:, :kend], va[:, :kend]
        s = _scores(qa[:, r0:r1], kt, scale, r0, causal, sk - sq)
        lse_t = lse_g[..., r0:r1].unsqueeze(-1)
        p = torch.exp(s - torch.where(torch.isneginf(lse_t), torch.zeros_like(lse_t), lse_t))
        do_t = doa[:, r0:r1]
        dv[:, :kend] += torch.einsum("bhgqk,bqhgd->bkhd", p, do_t)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", do_t, vt)
        ds = p * (dp - delta_g[..., r0:r1].unsqueeze(-1))
        dq[:, r0:r1] = torch.einsum("bhgqk,bkhd->bqhgd", ds, kt) * scale
        dk[:, :kend] += torch.einsum("bhgqk,bqhgd->bkhd", ds, qa[:, r0:r1]) * scale
    return dq.view(b, sq, hq, d), dk, dv


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
