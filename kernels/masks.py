"""Block masks by token position, and the exact path for blocks with non-finite inputs.

**Position masks** (sliding windows). A block whose mask is not one of the shapes the kernels
know natively (none, bottom-right causal) carries the global positions of its query and key rows
and a window ``(left, right)`` (flash-attn's convention, -1 unbounded): query at position i sees a
key at position j iff ``i - left <= j <= i + right``. Causal attention with a window is
``right = 0``. Positions are those of the packed sequence; the runtime never puts two documents in
one kernel call, so a window never crosses a document.

**Non-finite inputs** (issue 16). A NaN or inf must poison exactly what plain attention over the
*visible* (query, key) pairs poisons: the output rows whose softmax touches it and the gradients
that flow through a visible pair. Matmul-based kernels (ours, torch's fused ops, flash) also
multiply the zero weights of masked pairs by the masked keys/values (``0 * nan = nan``), and some
treat a row whose scores are all ``-inf`` as empty; torch's own backends disagree with each other
there. So a block whose inputs are not all finite runs :func:`exact_forward` /
:func:`exact_backward` instead: per-pair products with ``where`` after every multiplication, so a
masked pair contributes an exact zero whatever its inputs hold, and the softmax follows
``torch.softmax`` on the visible scores (a row with a ``nan`` or ``+inf`` score is ``nan``; a row
whose visible scores are all ``-inf`` contributes nothing to the block, and :func:`poison_dead_rows`
turns a row that ends with ``lse = -inf`` although it sees a key into ``nan``, as plain softmax
does). It is slower than the fast kernels (elementwise, tiled to 4M products) and runs
only on blocks that hold a non-finite value; finite inputs never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MAX_PRODUCTS = 1 << 22


@dataclass(frozen=True)
class PositionMask:
    """A block whose query rows sit at global positions ``q_start, q_start + 1, ...`` and whose
    key rows at ``k_start, ...``, under the window ``(left, right)`` (-1: unbounded on that side).
    (The runtime only masks blocks of one chunk piece against one chunk piece: runs of positions.)"""

    q_start: int
    k_start: int
    left: int
    right: int

    def visible(self, seq_q: int, seq_k: int, device: torch.device | None = None) -> torch.Tensor:
        """``(seq_q, seq_k)`` bool: which keys each query sees."""
        qp = torch.arange(self.q_start, self.q_start + seq_q, device=device).unsqueeze(1)
        kp = torch.arange(self.k_start, self.k_start + seq_k, device=device).unsqueeze(0)
        vis = torch.ones((seq_q, seq_k), dtype=torch.bool, device=device)
        if self.left >= 0:
            vis &= kp >= qp - self.left
        if self.right >= 0:
            vis &= kp <= qp + self.right
        return vis

    def key_range(self, r0: int, r1: int, seq_k: int) -> tuple[int, int, bool]:
        """Keys ``[k0, k1)`` that query rows ``[r0, r1)`` can see, and whether every one of those
        rows sees every one of those keys (then the sub-block needs no mask)."""
        lo = 0 if self.left < 0 else self.q_start + r0 - self.left - self.k_start
        hi = seq_k if self.right < 0 else self.q_start + r1 - 1 + self.right - self.k_start + 1
        k0, k1 = max(0, lo), min(seq_k, hi)
        if k1 <= k0:
            return 0, 0, True
        full_lo = 0 if self.left < 0 else self.q_start + r1 - 1 - self.left - self.k_start
        full_hi = seq_k if self.right < 0 else self.q_start + r0 + self.right - self.k_start + 1
        return k0, k1, full_lo <= k0 and k1 <= full_hi

    def shifted(self, dq: int, dk: int) -> "PositionMask":
        return PositionMask(self.q_start + dq, self.k_start + dk, self.left, self.right)


def block_visible(seq_q: int, seq_k: int, causal: bool, mask: PositionMask | None,
                  device: torch.device) -> torch.Tensor:
    """The block's ``(seq_q, seq_k)`` visibility: the position mask, else bottom-right causal,
    else everything."""
    if mask is not None:
        return mask.visible(seq_q, seq_k, device)
    vis = torch.ones((seq_q, seq_k), dtype=torch.bool, device=device)
    return vis.tril(seq_k - seq_q) if causal else vis


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when no tensor holds a nan or inf: one read-only sum per tensor and one host sync.

    A sum is finite only when every term is (a nan gives nan; an inf gives inf, or nan beside an
    inf of the other sign). A sum of finite terms that overflows says False, which only sends the
    block down the exact path: right, slower. (``isfinite(t).all()`` per tensor wrote a bool copy
    of each and synced once per tensor: on an H200 a third of a flash forward at 8K tokens.)
    """
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
            for t in tensors if t is not None and t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def lse_ok(lse: torch.Tensor) -> bool:
    """A global lse may be -inf (a row with no visible key) but never nan or +inf (``amax``
    propagates a nan)."""
    if not lse.numel():
        return True
    top = lse.amax()
    return not bool(torch.isnan(top) | torch.isposinf(top))


def _heads(q, k, acc):
    """``(b, hkv, g, s, d)`` queries and ``(b, hkv, 1, s, d)`` keys/values-shaped tensors."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qh = q.to(acc).view(b, sq, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)
    return qh


def _kv(t, acc):
    return t.to(acc).permute(0, 2, 1, 3).unsqueeze(2)  # (b, hkv, 1, sk, d)


def _tile(sq: int, sk: int, per_row: int) -> int:
    return max(1, min(sq, _MAX_PRODUCTS // max(1, sk * per_row)))


def _pair_scores(q_t, kh, vis_t, scale, softcap):
    """Visible-pair scores ``(b, hkv, g, t, sk)``; masked pairs -inf, never multiplied."""
    m5 = vis_t[:, :, None]
    prod = torch.where(m5, q_t.unsqueeze(-2) * kh.unsqueeze(-3), 0.0)  # (b, hkv, g, t, sk, d)
    s = prod.sum(-1) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return torch.where(vis_t, s, float("-inf"))


def exact_forward(q, k, v, vis: torch.Tensor, softmax_scale: float, softcap: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` over the visible pairs only; ``out`` in the accumulation dtype, BSHD."""
    from tokenloom.kernels.reference import acc_dtype

    acc = acc_dtype(q.dtype)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    qh, kh, vh = _heads(q, k, acc), _kv(k, acc), _kv(v, acc)
    out = torch.zeros((b, *qh.shape[1:4], d), dtype=acc, device=q.device)
    lse = torch.full(qh.shape[:4], float("-inf"), dtype=acc, device=q.device)
    tile = _tile(sq, sk, b * hq * d)
    for r0 in range(0, sq, tile):
        r1 = min(sq, r0 + tile)
        vis_t = vis[r0:r1]
        s = _pair_scores(qh[..., r0:r1, :], kh, vis_t, softmax_scale, softcap)
        m = s.amax(-1, keepdim=True)
        # a row whose visible scores are all -inf contributes nothing here, like a row without
        # keys; if that holds in every block the final lse is -inf and the API poisons the row
        live = ~torch.isneginf(m)
        m = torch.where(live, m, 0.0)
        p = torch.where(vis_t, torch.exp(s - m), 0.0)
        den = p.sum(-1, keepdim=True)
        w = p / torch.where(live, den, 1.0)
        o = torch.where(vis_t[..., None], w.unsqueeze(-1) * vh.unsqueeze(-3), 0.0).sum(-2)
        out[..., r0:r1, :] = torch.where(live, o, 0.0)
        lse[..., r0:r1] = torch.where(live, m + torch.log(den), float("-inf")).squeeze(-1)
    return out.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d), lse.reshape(b, hq, sq)


def exact_backward(dout, q, k, v, lse, delta, vis: torch.Tensor, softmax_scale: float,
                   softcap: float | None = None):
    """Block gradients ``(dq, dk, dv)`` given the global lse/delta, over the visible pairs only."""
    from tokenloom.kernels.reference import acc_dtype

    acc = acc_dtype(q.dtype)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qh, doh = _heads(q, k, acc), _heads(dout, k, acc)
    kh, vh = _kv(k, acc), _kv(v, acc)
    lse_h = lse.to(acc).view(b, hkv, g, sq)
    lse_h = torch.where(torch.isneginf(lse_h), torch.zeros_like(lse_h), lse_h)
    delta_h = delta.to(acc).view(b, hkv, g, sq)
    dq = torch.zeros_like(qh)
    dk = torch.zeros((b, hkv, sk, d), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    tile = _tile(sq, sk, b * hq * d)
    for r0 in range(0, sq, tile):
        r1 = min(sq, r0 + tile)
        vis_t, m5 = vis[r0:r1], vis[r0:r1, :, None]
        q_t, do_t = qh[..., r0:r1, :], doh[..., r0:r1, :]
        raw = torch.where(m5, q_t.unsqueeze(-2) * kh.unsqueeze(-3), 0.0).sum(-1) * softmax_scale
        s = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
        p = torch.where(vis_t, torch.exp(s - lse_h[..., r0:r1, None]), 0.0)
        dv += torch.where(m5, p.unsqueeze(-1) * do_t.unsqueeze(-2), 0.0).sum((2, 3))
        dp = torch.where(m5, do_t.unsqueeze(-2) * vh.unsqueeze(-3), 0.0).sum(-1)
        ds = torch.where(vis_t, p * (dp - delta_h[..., r0:r1, None]), 0.0)
        if softcap is not None:  # d(c tanh(x/c))/dx = 1 - tanh^2
            ds = torch.where(vis_t, ds * (1 - torch.tanh(raw / softcap) ** 2), 0.0)
        dq[..., r0:r1, :] = torch.where(m5, ds.unsqueeze(-1) * kh.unsqueeze(-3), 0.0).sum(-2) * softmax_scale
        dk += torch.where(m5, ds.unsqueeze(-1) * q_t.unsqueeze(-2), 0.0).sum((2, 3)) * softmax_scale
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


def poison_dead_rows(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final rows with ``lse = -inf`` -> nan. Every row of every mask tokenloom builds sees at least
    its own key (causal, windows with left, right >= 0, documents), so such a row had only ``-inf``
    scores (from infinite inputs), which plain softmax turns into nan. ``out`` BSHD, ``lse``
    ``(b, h, s)``; finite inputs never have such rows (returned unchanged, no copy)."""
    dead = torch.isneginf(lse)
    if not bool(dead.any()):
        return out, lse
    nan = float("nan")
    return out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), nan), lse.masked_fill(dead, nan)
