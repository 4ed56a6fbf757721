"""Logit soft-capping and attention sinks (issue 18 part 3) on every strategy, against fp64.

The sink must enter every query's denominator exactly once, however many blocks and ranks the
query visits; its gradient is checked against autograd through the plain reference (summed over
ranks: a rank's share covers its own tokens). Also windows with both, GQA, and bad values refused
naming the argument.
"""

import numpy as np
import pytest
import torch
from mask_ref import dense_visible, plain_attention

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.kernels import block_attention
from tokenloom.parallel import ring_attention, shard_sequence, token_ring_attention, ulysses_attention

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
H, HKV, D = 12, 4, 8
CASES = [  # (causal, window, softcap, with sinks)
    (True, None, 0.7, False), (True, None, None, True), (False, None, 1.5, True),
    (True, (5, -1), 0.5, True), (False, (3, 2), None, True),
]


def _errors(rank, n, dtype=torch.float64, impls=("torch", "sdpa")):
    total = 12 * n
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(1, total, h, D, generator=g, dtype=torch.float64) * 2 for h in (H, HKV, HKV, H))
    sinks0 = torch.randn(H, generator=g, dtype=torch.float64)
    rows = []
    for causal, window, softcap, use_sinks in CASES:
        vis = dense_visible(total, causal=causal, window=window or (-1, -1))
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        sr = sinks0.clone().requires_grad_() if use_sinks else None
        ref, ref_lse = plain_attention(qr, kr, vr, vis, D ** -0.5, softcap=softcap, sinks=sr)
        ref.backward(dout)
        for strategy in FN:
            for impl in impls:
                for layout in ("zigzag", "contiguous"):
                    sh = [shard_sequence(t, rank, n, layout) for t in (q, k, v, dout)]
                    ql, kl, vl = (t.to(dtype).requires_grad_() for t in sh[:3])
                    sl = sinks0.to(dtype, copy=True).requires_grad_() if use_sinks else None
                    out, lse = FN[strategy](ql, kl, vl, causal=causal, layout=layout, impl=impl,
                                            window_size=window, softcap=softcap, sinks=sl, return_lse=True)
                    out.backward(sh[3].to(dtype))
                    pairs = [(out, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)]
                    err = max((a.double() - shard_sequence(b.detach(), rank, n, layout)).abs().max().item()
                              for a, b in pairs)
                    err = max(err, (lse.double() - shard_sequence(ref_lse.detach(), rank, n, layout, dim=2)
                                    ).abs().max().item())
                    dsink = sl.grad.double() if use_sinks else None
                    rows.append((f"{strategy} {impl} {layout} causal={causal} window={window} "
                                 f"softcap={softcap} sinks={use_sinks}", err, dsink,
                                 sr.grad if use_sinks else None))
    return rows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_softcap_and_sinks_match_fp64_reference(world_size):
    per_rank = spawn_ranks(world_size, _errors, timeout=300)
    bad = [(r, what, err) for r, rows in enumerate(per_rank) for what, err, _, _ in rows if not err < 1e-10]
    assert not bad, bad[:10]
    for i, (what, _, _, want) in enumerate(per_rank[0]):
        if want is None:
            continue
        total = sum(rows[i][2] for rows in per_rank)  # every rank's share of d sinks
        assert abs(np.asarray(total) - np.asarray(want)).max() < 1e-10, what


def test_sdpa_fp32_on_two_ranks_within_tolerance():
    per_rank = spawn_ranks(2, _errors, torch.float32, ("sdpa",), timeout=300)
    bad = [(r, what, err) for r, rows in enumerate(per_rank) for what, err, _, _ in rows if not err < 5e-5]
    assert not bad, bad[:10]


def test_block_kernel_softcap_every_impl_and_nonfinite_exact_path():
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 24, h, D, generator=g, dtype=torch.float64) * 3 for h in (4, 2, 2, 4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = plain_attention(qr, kr, vr, dense_visible(24, causal=True), 0.4, softcap=2.0)
    ref.backward(dout)
    from tokenloom.kernels import attention_delta, block_backward, block_forward
    from tokenloom.kernels.masks import block_visible, exact_backward, exact_forward

    for impl in ("torch", "sdpa"):
        out, lse = block_forward(q, k, v, causal=True, softmax_scale=0.4, impl=impl, softcap=2.0)
        assert (out - ref).abs().max() < 1e-12
    vis = block_visible(24, 24, True, None, q.device)
    out, lse = exact_forward(q, k, v, vis, 0.4, 2.0)
    assert (out - ref).abs().max() < 1e-12
    delta = attention_delta(ref.detach(), dout)
    for grads in (block_backward(dout, q, k, v, lse, delta, causal=True, softmax_scale=0.4, softcap=2.0),
                  exact_backward(dout, q, k, v, lse, delta, vis, 0.4, 2.0)):
        for a, b in zip(grads, (qr.grad, kr.grad, vr.grad)):
            assert (a - b).abs().max() < 1e-12
    qa = q.clone().requires_grad_()
    o, _ = block_attention(qa, k, v, causal=True, impl="sdpa")  # differentiable path unchanged
    assert o.shape == q.shape


@pytest.mark.parametrize("softcap", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_softcap_is_refused(softcap):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(UsageError, match="softcap") as info:
        ring_attention(q, q, q, causal=True, softcap=softcap)
    assert info.value.field == "softcap"


@pytest.mark.parametrize("sinks", [torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), [0.0, 0.0]])
def test_bad_sinks_are_refused(sinks):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(UsageError, match="sinks") as info:
        ring_attention(q, q, q, causal=True, sinks=sinks)
    assert info.value.field == "sinks"


def _disagree(rank, n, what):
    q = torch.randn(1, 8, 2, 4)
    kwargs = {"softcap": {"softcap": 1.0 + rank}, "sinks": {"sinks": torch.full((2,), float(rank))}}[what]
    try:
        token_ring_attention(q, q, q, causal=True, **kwargs)
    except UsageError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("what", ["softcap", "sinks"])
def test_ranks_that_disagree_all_raise(what):
    msgs = spawn_ranks(2, _disagree, what, timeout=60)
    assert all(f"disagree on {what}" in m for m in msgs), msgs
