"""Plain attention for the tests: a dense token mask and softmax over the visible pairs, fp64.

Independent of the package's kernels: the mask comes from token positions (causal, window,
documents) written out here, and the attention is per (query, key) pair with ``where`` after every
product, so a masked pair contributes an exact zero whatever its inputs hold. That makes it the
yardstick for values (fp64) *and* for which outputs and gradients a nan or inf poisons
(autograd through it touches visible pairs only).
"""

from __future__ import annotations

import torch


def dense_visible(total: int, *, causal: bool, window=(-1, -1), doc_lens=None) -> torch.Tensor:
    """``(total, total)`` bool: query i sees key j (same document, window, causal)."""
    i = torch.arange(total).unsqueeze(1)
    j = torch.arange(total).unsqueeze(0)
    doc = torch.zeros(total, dtype=torch.long)
    if doc_lens:
        doc = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens))
    vis = doc.unsqueeze(1) == doc.unsqueeze(0)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
        vis &= j <= i
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def plain_attention(q, k, v, vis, scale, *, softcap=None, sinks=None):
    """``(out, lse)``: BSHD q ``(b, s, h, d)``, k/v ``(b, s, hkv, d)``; ``vis`` ``(s_q, s_k)``.

    ``softcap``: scores ``c * tanh(s / c)``; ``sinks`` ``(h,)``: one extra logit per head in every
    row's denominator (GPT-OSS). Rows that see nothing: out 0, lse -inf (sinks aside).
    """
    g = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    m = vis[None, None, :, :, None]
    kk = torch.where(m, kh[:, :, None, :, :], 0.0)
    vv = torch.where(m, vh[:, :, None, :, :], 0.0)
    s = (qh[:, :, :, None, :] * kk).sum(-1) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(vis, s, float("-inf"))
    if sinks is not None:
        col = sinks.to(s.dtype)[None, :, None, None].expand(s.shape[0], -1, s.shape[2], 1)
        s = torch.cat([s, col], dim=-1)
        p = torch.softmax(s, -1)[..., :-1]
        lse = torch.logsumexp(s, -1)
    else:
        has = vis.any(-1)
        safe = torch.where(has[:, None], s, 0.0)
        p = torch.where(has[:, None], torch.softmax(safe, -1), 0.0)
        lse = torch.where(has, torch.logsumexp(safe, -1), float("-inf"))
    p = torch.where(vis, p, 0.0)
    out = (p[..., None] * vv).sum(-2)
    return out.transpose(1, 2), lse


def poisoned(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else ~torch.isfinite(t)
