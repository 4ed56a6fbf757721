"""Block attention on torch's fused SDPA ops that return the log-sum-exp (``impl="sdpa"``).

Ops (the ones PyTorch's own context parallel wraps, REFERENCE.md §1); they take ``(b, h, s, d)``
tensors, ours are BSHD, so we pass transposed views:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``
  (fp32, fp64, fp16, bf16; fp32 softmax statistics for the half types).
- CUDA: ``aten._scaled_dot_product_flash_attention`` (fp16/bf16, head_dim <= 256, sm80+) else
  ``aten._scaled_dot_product_efficient_attention`` (fp32 too), each with its backward. head_dim is
  zero-padded to a multiple of 8 (zeros change no score). These paths have not run on a GPU yet.
- Anything else (other devices, fp64 on CUDA, empty tensors, on which the CPU op dies with
  SIGFPE): the pure-torch reference.

Masks. The ops' ``is_causal`` is aligned top-left; tokenloom's causal mask is aligned bottom-right
(query ``i`` sees key ``j`` iff ``j <= i + seq_k - seq_q``). The two agree on a square, so a
rectangular causal block is cut into squares and fully visible parts, exactly:

- ``seq_k > seq_q``: keys ``[0, seq_k - seq_q)`` are visible to every query (one non-causal call)
  and the last ``seq_q`` keys form a causal square; the two partials are lse-merged.
- ``seq_k < seq_q``: the first ``seq_q - seq_k`` queries see no key (``lse = -inf``, output 0, no
  gradient, as the merge expects) and the rest form a causal square.

GQA. A non-causal block folds the ``group`` query heads of a kv head into its rows (``(b, hkv,
group * seq_q, d)``), so k and v are never copied; a causal square repeats k and v per query head
and sums dk/dv over the group.

Backward with the global statistics (the ring-attention identity): the ops take ``out`` and derive
``delta = rowsum(dO * out)`` from it. Our block backward gets the *global* ``delta`` instead (the
runtime ships delta, not out), so we pass a stand-in ``out`` with exactly that row sum,
``dO * delta / |dO|^2`` (scaled by the row's max |dO| against underflow; 0 where dO is 0): the ops
use ``out`` for nothing else.
"""

from __future__ import annotations

import functools
import warnings

import torch

from tokenloom.kernels import reference
from tokenloom.kernels.reference import acc_dtype, merge_into_

_aten = torch.ops.aten  # one indirection, so tests can stand CPU fakes in for the CUDA ops
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supported(q: torch.Tensor) -> bool:
    """True when a fused op serves this device and dtype (else the reference runs)."""
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES
    if q.device.type == "cuda":
        return q.dtype in _CUDA_DTYPES
    return False


# ---------------------------------------------------------------------------- block decomposition
def _pieces(seq_q: int, seq_k: int, causal: bool) -> tuple[int, list[tuple[int, int, bool]]]:
    """``(empty_rows, [(q_start, k_start, k_end, causal)])`` covering a block with op-sized calls.

    Every piece runs queries ``[q_start, seq_q)`` against keys ``[k_start, k_end)``; a causal piece
    is square. ``empty_rows`` leading queries see no key.
    """
    if seq_k == 0:
        return seq_q, []
    if not causal:
        return 0, [(0, 0, seq_k, False)]
    off = seq_k - seq_q
    if off < 0:
        return -off, [(-off, 0, seq_k, True)]
    return 0, ([(0, 0, off, False)] if off else []) + [(0, off, seq_k, True)]


# ---------------------------------------------------------------------------- op calls (BHSD)
def _inner(t: torch.Tensor) -> torch.Tensor:
    """The ops read any outer strides but silently assume a unit stride in head_dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _pad_dim(x: torch.Tensor, to: int) -> torch.Tensor:
    return x if x.shape[-1] == to else torch.nn.functional.pad(x, (0, to - x.shape[-1]))


@functools.lru_cache(maxsize=None)
def _flash_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # FA2 in torch needs sm80+


_FLASH_FAILED: set[torch.device] = set()


def _no_flash(device: torch.device, exc: Exception) -> None:
    """The flash op refused a call (a build without it, an unexpected constraint): say so once and
    use the memory-efficient op on this device from now on."""
    if device not in _FLASH_FAILED:
        warnings.warn(f"tokenloom sdpa: the flash op failed on {device} ({str(exc).splitlines()[0]}); "
                      "using the memory-efficient op instead", RuntimeWarning, stacklevel=3)
    _FLASH_FAILED.add(device)


def _cuda_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """"flash" for fp16/bf16 with padded head_dim <= 256 on sm80+, else "efficient"."""
    padded = -(-head_dim // 8) * 8
    if (dtype in (torch.float16, torch.bfloat16) and padded <= 256 and device not in _FLASH_FAILED
            and _flash_capable(device)):
        return "flash"
    return "efficient"


@functools.lru_cache(maxsize=None)
def _cuda_aux(device: torch.device, dtype: torch.dtype, backend: str) -> tuple:
    """The auxiliary tensors a dropout-free forward hands its backward (philox state, cumulative
    lengths): taken from a one-token forward so their form is exactly what the op produces."""
    x = torch.zeros(1, 1, 1, 8, device=device, dtype=dtype)
    if backend == "flash":
        r = _aten._scaled_dot_product_flash_attention(x, x, x, 0.0, False, False, scale=1.0)
        return r[2], r[3], r[6], r[7]  # cum_seq_q, cum_seq_k, philox_seed, philox_offset
    r = _aten._scaled_dot_product_efficient_attention(x, x, x, None, True, 0.0, False, scale=1.0)
    return r[2], r[3]  # philox_seed, philox_offset


def _op_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on ``(b, h, s, d)`` tensors (equal heads): ``out`` in q's dtype, ``lse`` fp32.
    ``bias``: an additive ``(s_q, s_k)`` mask (0 / -inf), CPU only."""
    q, k, v = _inner(q), _inner(k), _inner(v)
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _on_cuda(q, lambda backend: _cuda_forward(backend, q, k, v, causal, scale))


def _on_cuda(q: torch.Tensor, call):
    """``call(backend)`` on the CUDA backend chosen for ``q``; when flash refuses a call (not for
    lack of memory), warn once and run it on the memory-efficient op instead."""
    backend = _cuda_backend(q.device, q.dtype, q.shape[-1])
    try:
        return call(backend)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        if backend != "flash":
            raise
        _no_flash(q.device, exc)
        return call("efficient")


def _cuda_forward(backend: str, q, k, v, causal: bool, scale: float):
    d, seq_q = q.shape[-1], q.shape[-2]
    dp = -(-d // 8) * 8
    qp, kp, vp = (_pad_dim(t, dp) for t in (q, k, v))
    if backend == "flash":
        r = _aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, causal, False, scale=scale)
    else:
        r = _aten._scaled_dot_product_efficient_attention(qp, kp, vp, None, True, 0.0, causal,
                                                                   scale=scale)
    out, lse = r[0], r[1]
    return out[..., :d], lse[..., :seq_q]  # efficient pads lse rows to a multiple of 32


def _op_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward on ``(b, h, s, d)`` tensors given ``out`` and ``lse`` ``(b, h, s)`` (fp32;
    fp64 for fp64 on CPU)."""
    dout, q, k, v, out = (_inner(t) for t in (dout, q, k, v, out))
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal, attn_mask=bias, scale=scale)
    return _on_cuda(q, lambda backend: _cuda_backward(backend, dout, q, k, v, out, lse, causal, scale))


def _cuda_backward(backend: str, dout, q, k, v, out, lse, causal: bool, scale: float):
    d, seq_q, seq_k = q.shape[-1], q.shape[-2], k.shape[-2]
    dp = -(-d // 8) * 8
    dop, qp, kp, vp, outp = (_pad_dim(t, dp) for t in (dout, q, k, v, out))
    aux = _cuda_aux(q.device, q.dtype, backend)
    if backend == "flash":
        cum_q, cum_k, seed, offset = aux
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dop, qp, kp, vp, outp, lse.contiguous(), cum_q, cum_k, seq_q, seq_k, 0.0, causal,
            seed, offset, scale=scale)
    else:
        seed, offset = aux
        rows = -(-seq_q // 32) * 32  # the op's own lse is padded to a multiple of 32 rows
        lse_p = torch.zeros(lse.shape[:-1] + (rows,), dtype=torch.float32, device=lse.device)
        lse_p[..., :seq_q] = lse
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dop, qp, kp, vp, None, outp, lse_p, seed, offset, 0.0, [True, True, True, False],
            causal, scale=scale)
    return dq[..., :d], dk[..., :d], dv[..., :d]


# ---------------------------------------------------------------------------- GQA layout
def _fold_q(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """BSHD ``(b, s, hq, d)`` -> ``(b, hkv, group * s, d)``: a kv head's query heads as extra rows."""
    b, s, hq, d = x.shape
    g = hq // heads_kv
    if g == 1:
        return x.transpose(1, 2)
    return x.view(b, s, heads_kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, heads_kv, g * s, d)


def _unfold_q(x: torch.Tensor, seq: int) -> torch.Tensor:
    """Inverse of :func:`_fold_q`: ``(b, hkv, group * s, d)`` -> BSHD ``(b, s, hq, d)``."""
    b, hkv, gs, d = x.shape
    g = gs // seq
    return x.view(b, hkv, g, seq, d).permute(0, 3, 1, 2, 4).reshape(b, seq, hkv * g, d)


def _bhsd_qkv(q, k, v, causal):
    """Op-ready ``(q, k, v)`` and whether the group was folded into the query rows."""
    g = q.shape[2] // k.shape[2]
    if g == 1 or not causal:
        return _fold_q(q, k.shape[2]), k.transpose(1, 2), v.transpose(1, 2), True
    k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), False


def _bias(vis: torch.Tensor | None, group: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask for the folded rows ``(group * s_q, s_k)``: 0 where visible, -inf elsewhere."""
    if vis is None:
        return None
    bias = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))
    return bias.repeat(group, 1) if group > 1 else bias


def _piece_forward(q, k, v, causal, scale, vis=None):
    """One op call on BSHD tensors: ``out`` BSHD (q's dtype), ``lse`` ``(b, hq, s)`` fp32."""
    b, sq, hq, _ = q.shape
    qh, kh, vh, folded = _bhsd_qkv(q, k, v, causal)
    out, lse = _op_forward(qh, kh, vh, causal, scale, _bias(vis, hq // k.shape[2], q.dtype))
    if folded:
        return _unfold_q(out, sq), lse.reshape(b, hq, sq)
    return out.transpose(1, 2), lse


def _stand_in_out(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A tensor ``o`` like ``dout`` with ``rowsum(dout * o) == delta`` (see the module docstring)."""
    acc = acc_dtype(dout.dtype)
    do = dout.to(acc)
    amax = do.abs().amax(dim=-1, keepdim=True)
    unit = do / amax.clamp_min(torch.finfo(acc).tiny)
    norm2 = unit.pow(2).sum(-1, keepdim=True)
    coef = delta.to(acc).transpose(1, 2).unsqueeze(-1) / (norm2 * amax).clamp_min(torch.finfo(acc).tiny)
    return (unit * torch.where(amax > 0, coef, torch.zeros_like(coef))).to(dout.dtype)


def _piece_backward(dout, q, k, v, lse, delta, causal, scale, vis=None):
    """One backward op call on BSHD tensors; dq, dk, dv like q, k, v in the op's dtype."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    out = _stand_in_out(dout, delta)
    qh, kh, vh, folded = _bhsd_qkv(q, k, v, causal)
    if folded:
        doh, oh = _fold_q(dout, hkv), _fold_q(out, hkv)
        lse_h = lse.reshape(b, hkv, -1)
    else:
        doh, oh, lse_h = dout.transpose(1, 2), out.transpose(1, 2), lse
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = _bias(vis, hq // hkv, q.dtype)
    dq, dk, dv = _op_backward(doh, qh, kh, vh, oh, lse_h.to(stat), causal, scale, bias)
    dq = _unfold_q(dq, sq) if folded else dq.transpose(1, 2)
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)
    if not folded:  # repeated kv heads: sum each group back
        g = hq // hkv
        dk, dv = (t.reshape(b, t.shape[1], hkv, g, d).sum(3) for t in (dk, dv))
    return dq, dk, dv


# ---------------------------------------------------------------------------- public
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
            softmax_scale: float | None, mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block forward: ``out`` BSHD in the accumulation dtype, ``lse`` ``(b, hq, seq_q)``.

    Same contract as :func:`reference.attention_with_lse` (bottom-right causal, GQA, rows with no
    visible key give ``lse = -inf`` and 0); the reference runs where :func:`supported` is False.
    ``mask`` (a ``(seq_q, seq_k)`` bool visibility: windows) goes to the CPU op as an additive
    mask; on CUDA such blocks run the reference (not wired to the efficient op's bias yet).
    """
    reference.check_qkv(q, k, v)
    acc = acc_dtype(q.dtype)
    if (not supported(q) or q.numel() == 0 or k.numel() == 0  # the CPU op divides by zero on empties
            or (mask is not None and q.device.type != "cpu")):
        return reference.attention_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                            out_dtype=acc, mask=mask)
    b, sq, hq, d = q.shape
    scale = reference._scale(softmax_scale, d)
    if mask is not None:  # one call with the mask; rows that see no key: 0 and -inf, as the merge wants
        out, lse = _piece_forward(q, k, v, False, scale, mask)
        empty = ~mask.any(-1)
        return (out.to(acc).masked_fill(empty[None, :, None, None], 0.0),
                lse.to(acc).masked_fill(empty, float("-inf")))
    empty, pieces = _pieces(sq, k.shape[1], causal)
    if empty == 0 and len(pieces) == 1:
        out, lse = _piece_forward(q, k, v, pieces[0][3], scale)
        return out.to(acc), lse.to(acc)
    out = torch.zeros((b, sq, hq, d), dtype=acc, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=q.device)
    for i, (q0, k0, k1, pc) in enumerate(pieces):
        o, l = _piece_forward(q[:, q0:], k[:, k0:k1], v[:, k0:k1], pc, scale)
        if i == 0:
            out[:, q0:] = o
            lse[..., q0:] = l
        else:
            merge_into_(out[:, q0:], lse[..., q0:], o, l)
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             lse: torch.Tensor, delta: torch.Tensor, *, causal: bool, softmax_scale: float | None,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block gradients given the global ``lse`` and ``delta`` ``(b, hq, seq_q)``; like
    :func:`reference.attention_backward` (fp32 results, fp64 for fp64)."""
    reference.check_qkv(q, k, v)
    acc = acc_dtype(q.dtype)
    if (not supported(q) or q.numel() == 0 or k.numel() == 0
            or (mask is not None and q.device.type != "cpu")):
        return reference.attention_backward(dout, q, k, v, lse, delta, causal=causal,
                                            softmax_scale=softmax_scale, mask=mask)
    dout = dout.to(q.dtype)  # the ops want one dtype for every tensor
    b, sq, hq, d = q.shape
    scale = reference._scale(softmax_scale, d)
    if mask is not None:
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # empty rows: p = 0
        return tuple(t.to(acc) for t in _piece_backward(dout, q, k, v, lse, delta, False, scale, mask))
    empty, pieces = _pieces(sq, k.shape[1], causal)
    if empty == 0 and len(pieces) == 1:
        return tuple(t.to(acc) for t in _piece_backward(dout, q, k, v, lse, delta, pieces[0][3], scale))
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for q0, k0, k1, pc in pieces:
        gq, gk, gv = _piece_backward(dout[:, q0:], q[:, q0:], k[:, k0:k1], v[:, k0:k1],
                                     lse[..., q0:], delta[..., q0:], pc, scale)
        dq[:, q0:] += gq
        dk[:, k0:k1] += gk
        dv[:, k0:k1] += gv
    return dq, dk, dv
