"""Soft-capping and sinks with packed documents (``cu_seqlens``) on every multi-rank strategy,
against fp64 plain attention with the same document mask (issue 18 part 3).

A packed row's softmax runs over its own document only, and the sink joins that softmax once: the
document boundaries, the window and the cap must all compose, forward and every gradient (the
sink's summed over ranks, as a replicated parameter's is).
"""

import numpy as np
import pytest
import torch
from mask_ref import dense_visible, plain_attention

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.parallel import ring_attention, shard_sequence, token_ring_attention, ulysses_attention

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
H, HKV, D = 6, 2, 8
CASES = [  # (causal, window, softcap, sinks)
    (True, None, 0.9, True), (False, None, 1.3, False), (True, (4, -1), 0.6, True), (False, (3, 2), None, True),
]


def _cu(docs):
    return torch.tensor([0, *np.cumsum(docs).tolist()], dtype=torch.int32)


def _errors(rank, n, impls=("torch", "sdpa")):
    docs = (5, 7 * n - 4, 1, 4 * n - 2)  # a one-token document, documents across ranks
    total = sum(docs)
    g = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(1, total, h, D, generator=g, dtype=torch.float64) * 2 for h in (H, HKV, HKV, H))
    sinks0 = torch.randn(H, generator=g, dtype=torch.float64)
    rows = []
    for causal, window, softcap, use_sinks in CASES:
        vis = dense_visible(total, causal=causal, window=window or (-1, -1), doc_lens=docs)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        sr = sinks0.clone().requires_grad_() if use_sinks else None
        ref, ref_lse = plain_attention(qr, kr, vr, vis, D ** -0.5, softcap=softcap, sinks=sr)
        ref.backward(dout)
        for strategy, impl, layout in ((s, i, lay) for s in FN for i in impls for lay in ("zigzag", "contiguous")):
            shard = lambda t, dim=1: shard_sequence(t, rank, n, layout, dim=dim, cu_seqlens=_cu(docs))  # noqa: E731
            ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
            sl = sinks0.clone().requires_grad_() if use_sinks else None
            out, lse = FN[strategy](ql, kl, vl, causal=causal, layout=layout, impl=impl, window_size=window,
                                    softcap=softcap, sinks=sl, cu_seqlens=_cu(docs), return_lse=True)
            out.backward(shard(dout))
            pairs = [(out, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)]
            err = max((a - shard(b.detach())).abs().max().item() for a, b in pairs)
            err = max(err, (lse - shard(ref_lse.detach(), dim=2)).abs().max().item())
            rows.append((f"{strategy} {impl} {layout} causal={causal} window={window} softcap={softcap} "
                         f"sinks={use_sinks}", err, sl.grad.numpy() if use_sinks else None,
                         sr.grad.numpy() if use_sinks else None))
    return rows


@pytest.mark.parametrize("world_size", [2, 3])
def test_softcap_and_sinks_with_packed_documents_match_fp64(world_size):
    per_rank = spawn_ranks(world_size, _errors, timeout=300)
    bad = [(r, what, err) for r, rows in enumerate(per_rank) for what, err, _, _ in rows if not err < 1e-10]
    assert not bad, bad[:10]
    for i, (what, _, _, want) in enumerate(per_rank[0]):
        if want is not None:
            total = sum(rows[i][2] for rows in per_rank)  # every rank's share of d sinks
            assert np.abs(total - want).max() < 1e-10, what
