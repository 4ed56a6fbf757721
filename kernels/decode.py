"""Attention of a few new queries over a KV cache in either storage order: the decode block kernel.

Decode is memory-bound: one step reads the whole cache once. So the cache keeps each head's keys
contiguous (:mod:`tokenloom.parallel.kv_cache`), and the ``group`` query heads that share a kv head
are folded into query rows, so K and V are never copied or repeated (GQA). Two storage orders:

* heads-first ``(batch, kv_heads, seq, head_dim)`` ("BHSD"), what the fused ops read fastest (3x
  faster than BSHD views at 32K keys on this CPU);
* keys-last ``(batch, kv_heads, head_dim, seq)``, the CPU fp32/fp64 cache: with a few query rows
  per kv head the step is two batched matrix-vector products, ``q @ K^T`` and ``p @ V`` over
  keys-last rows, which run at the memory's read rate where the fused CPU op does not (one thread,
  32K keys, 8 heads, d=64: 6.6 ms against 12.4 ms; ``benchmarks/bench_decode.py``). Many rows
  (a chunked prefill) are compute-bound: they copy the block heads-first and run the fused op.

:func:`cache_block` takes q ``(batch, t, heads, head_dim)`` (BSHD, as everywhere) and k/v as
``(batch, kv_heads, seq, head_dim)`` views of either storage (keys-last: ``stride(-2) == 1``), and
returns ``(out, lse)`` like :func:`tokenloom.kernels.block_forward`: ``out`` ``(batch, t, heads,
head_dim)`` in the accumulation dtype, ``lse`` ``(batch, heads, t)``.

Paths:

* a full block (no window, no soft-cap): on CPU the fused op that returns the log-sum-exp, on CUDA
  torch's fused SDPA ops (:mod:`tokenloom.kernels.sdpa`). **Non-finite inputs** (the guarantee of
  :mod:`tokenloom.kernels.masks`) are caught without scanning the cache, which would double a
  memory-bound step: in a block with no masked pair the fused result equals plain softmax
  attention whenever it is finite, and a nan or inf that reaches any visible pair makes ``out`` or
  ``lse`` non-finite (or, on the CPU op, a row whose scores are all -inf comes back as exact
  zeros); so the small q, ``out`` and ``lse`` are checked and only such a result reruns the block
  on the exact visible-pairs path.
* the causal square of the new tokens against themselves and soft-capped blocks: the dispatched
  block kernel (:func:`tokenloom.kernels.block_forward`, which scans its inputs itself).
* a sliding window (``left >= 0``; decode is causal, so a query at position i sees keys at
  positions ``i - left .. i``): keys are chosen by their stored positions. Keys no row sees are
  never read (a rank whose whole shard is outside the window returns an empty partial at once);
  keys every row sees run the full-block path; a block whose rows see different keys runs with an
  explicit visibility matrix (the exact path when an input is non-finite).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

from tokenloom.kernels.masks import all_finite, exact_forward
from tokenloom.kernels.reference import acc_dtype

_CPU_FUSED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_GEMV_DTYPES = (torch.float32, torch.float64)
# query rows per kv head up to which the matrix-vector path beats copy + fused op on a keys-last
# block (one CPU thread, 8 heads x 32K keys x 64: 64 rows ~105 ms against ~130; 256 rows ~400
# against ~290)
GEMV_ROWS = 64


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


def _empty(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(q.dtype)
    b, t, h, d = q.shape
    return (torch.zeros(b, t, h, d, dtype=acc, device=q.device),
            torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device))


def cache_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                impl: str | None = None, softcap: float | None = None, q_pos: int = 0,
                k_pos: torch.Tensor | None = None, left: int = -1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of new queries over cached keys (see module docstring). ``causal``: the
    bottom-right causal mask (the new tokens against themselves). ``left >= 0``: a causal sliding
    window; ``q_pos`` is the position of query row 0 (rows consecutive) and ``k_pos`` ``(seq_k,)``
    int64 the keys' positions (``causal`` is then implied by the positions)."""
    if left >= 0:
        return _windowed(q, k, v, scale, impl, softcap, q_pos, k_pos, left)
    if causal or softcap is not None or scale == 0.0:
        return _dispatched(q, k, v, causal, scale, impl, softcap)
    return _full(q, k, v, scale, impl)


def _dispatched(q, k, v, causal, scale, impl, softcap):
    from tokenloom import kernels

    return kernels.block_forward(q, k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                 softmax_scale=scale, impl=impl, softcap=softcap)


def _full(q, k, v, scale, impl) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query sees every key: a fused op, its result checked instead of its inputs."""
    from tokenloom import kernels
    from tokenloom.kernels import sdpa

    if kernels.select_impl(q.device, impl) != "sdpa" or not sdpa.supported(q) or not k.shape[2]:
        return _dispatched(q, k, v, False, scale, impl, None)
    acc = acc_dtype(q.dtype)
    if q.device.type == "cpu" and q.dtype in _CPU_FUSED:
        if k.stride(-1) == 1 and v.stride(-1) == 1:
            out, lse = _fused_cpu(q, k, v, scale)
        else:
            out, lse = _keys_last_cpu(q, k, v, scale)
    else:
        out, lse = sdpa.forward(q, k.transpose(1, 2), v.transpose(1, 2), causal=False,
                                softmax_scale=scale)
    # finite and not an all-zero row: the CPU op answers a row whose scores are all -inf (infinite
    # keys) with out = 0, lse = 0 where plain softmax gives nan; a zero row reruns exactly (right,
    # only slower, for a real zero)
    checks = torch.stack([out.sum(), lse.sum(), q.sum(dtype=acc), (out == 0).all(-1).any().to(acc)])
    finite, zero_row = checks[:3].sum(), checks[3]  # one host sync for both
    if bool(torch.isfinite(finite) & (zero_row == 0)):
        return out, lse
    vis = torch.ones(q.shape[1], k.shape[2], dtype=torch.bool, device=q.device)
    return exact_forward(q, k.transpose(1, 2), v.transpose(1, 2), vis, scale)


def _fused_cpu(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(_fold(q, k.shape[1]), k, v, 0.0, False, attn_mask=None, scale=scale)[:2]
    out, lse = _unfold(out, lse, q.shape[1])
    acc = acc_dtype(q.dtype)
    return out.to(acc), lse.to(acc)


# bytes of scratch (scores, or heads-first copies of K and of V) per key chunk of a keys-last block;
# the buffers stay allocated for the next call, per thread (three slots: at most 3 x this)
SCRATCH_BYTES = 64 << 20
_local = threading.local()


def _held() -> tuple[dict, dict]:
    """This thread's scratch buffers and what each copy buffer holds now (see _heads_first)."""
    if not hasattr(_local, "scratch"):
        _local.scratch, _local.copied = {}, {}
    return _local.scratch, _local.copied


def _keys_last_cpu(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over every key of a keys-last block on CPU, a key chunk at a time (chunks merged
    by log-sum-exp; one chunk unless the scratch would pass ``SCRATCH_BYTES``). Up to
    ``GEMV_ROWS`` rows per kv head: :func:`_gemv`. More (compute-bound): the fused op on
    heads-first copies of the chunk."""
    from tokenloom import kernels

    rows = q.shape[1] * (q.shape[2] // k.shape[1])
    gemv = rows <= GEMV_ROWS and q.dtype in _GEMV_DTYPES
    per_key = k.shape[0] * k.shape[1] * (rows if gemv else k.shape[3]) * k.element_size()
    step = max(1, SCRATCH_BYTES // per_key)
    out = lse = None
    for a in range(0, k.shape[2], step):
        kc, vc = k[:, :, a:a + step], v[:, :, a:a + step]
        if gemv:
            o, s = _gemv(q, kc, vc, scale)
        else:
            o, s = _fused_cpu(q, _heads_first(kc, "k"), _heads_first(vc, "v"), scale)
        if out is None:
            out, lse = o, s
        else:
            kernels.merge_into_(out, lse, o, s)
    assert out is not None and lse is not None
    return out, lse


def _buffer(slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reused scratch tensor (fresh pages cost more than the work here: a transposing copy of 8
    heads x 30K keys x 64 fp32 took 55 ms into new memory against 18 ms into reused)."""
    n = math.prod(shape)
    key = (slot, like.dtype, like.device)
    scratch, copied = _held()
    buf = scratch.get(key)
    if buf is None or buf.numel() < n:
        scratch.pop(key, None)  # free the old buffer before allocating the new one
        copied.pop(key, None)
        buf = scratch[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def _heads_first(t: torch.Tensor, slot: str) -> torch.Tensor:
    """A contiguous BHSD copy of a keys-last view in a reused buffer. A view copied before is not
    copied again while its storage is unchanged (the gather schedule attends its shard twice a
    call: the own queries, the peers'); the storage is held by a weak reference, so a freed cache
    can never match."""
    base = t._base if t._base is not None else t
    key = (slot, t.dtype, t.device)
    ident = (base._version, t.data_ptr(), tuple(t.shape), t.stride())
    copied = _held()[1]
    held = copied.get(key)
    if held is not None and held[0]() is base and held[1] == ident:
        return held[2]
    out = _buffer(slot, tuple(t.shape), t)
    out.copy_(t)
    copied[key] = (weakref.ref(base), ident, out)
    return out


def _gemv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A few query rows over a keys-last block: scores by one batched product over K's rows (into
    a reused buffer), an in-place softmax, the output by one over V's (each read once, in order)."""
    b, t, h, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    qf = _fold(q, hkv).reshape(b * hkv, -1, d)
    rows = qf.shape[1]
    kt = k.transpose(-1, -2).reshape(b * hkv, d, s)  # views of the keys-last storage
    vt = v.transpose(-1, -2).reshape(b * hkv, d, s)
    p = torch.bmm(qf, kt, out=_buffer("scores", (b * hkv, rows, s), q)).mul_(scale)
    m = p.amax(-1, keepdim=True)
    p.sub_(m).exp_()  # a row of -inf or +inf scores becomes nan here: caught by the caller
    denom = p.sum(-1, keepdim=True)
    out = torch.bmm(p, vt.transpose(-1, -2)).div_(denom)
    lse = (m + denom.log()).squeeze(-1)
    return _unfold(out.view(b, hkv, rows, d), lse.view(b, hkv, rows), t)


def _keys(t: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """``t[:, :, sel]`` (BHSD) as a view when the selected keys are one run, else a copy."""
    idx = sel.nonzero().view(-1)
    a, b = int(idx[0]), int(idx[-1]) + 1
    return t[:, :, a:b] if b - a == idx.numel() else t.index_select(2, idx)


def _windowed(q, k, v, scale, impl, softcap, q_pos: int, k_pos: torch.Tensor, left: int):
    t = q.shape[1]
    if k_pos is None or k_pos.shape != (k.shape[2],):
        raise AssertionError("a windowed decode block needs one position per key")
    sel = (k_pos >= q_pos - left) & (k_pos <= q_pos + t - 1)  # keys some row sees
    if not bool(sel.any()):
        return _empty(q)  # the whole block is outside the window: nothing read
    if not bool(sel.all()):
        k, v, k_pos = _keys(k, sel), _keys(v, sel), k_pos[sel]
    qp = torch.arange(q_pos, q_pos + t, device=k_pos.device)[:, None]
    vis = (k_pos[None, :] <= qp) & (k_pos[None, :] >= qp - left)
    if bool(vis.all()):
        return cache_block(q, k, v, causal=False, scale=scale, impl=impl, softcap=softcap)
    vis = vis.to(q.device)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if not all_finite(q, k, v):
        return exact_forward(q, kt, vt, vis, scale, softcap)
    from tokenloom import kernels
    from tokenloom.kernels import reference, sdpa

    if softcap is None and scale != 0.0 and kernels.select_impl(q.device, impl) == "sdpa":
        return sdpa.forward(q, kt, vt, causal=False, softmax_scale=scale, mask=vis)
    return reference.attention_with_lse(q, kt, vt, causal=False, softmax_scale=scale,
                                        out_dtype=acc_dtype(q.dtype), mask=vis, softcap=softcap)
