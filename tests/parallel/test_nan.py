"""A nan or inf is never swallowed, never spread (issue 16 parts 3 and 4).

For every strategy, block impl and layout, dense and packed, a non-finite value in q, k, v or the
output gradient must poison exactly the outputs and gradients that plain attention over the
visible pairs poisons (``mask_ref.plain_attention``, fp64: the dependence through visible pairs;
torch's own SDPA backends also spread nan through masked pairs, ``0 * nan``, and disagree with each
other there, so they are not the yardstick for gradients). And ``softmax_scale=0`` with a causal
mask is uniform attention over the visible keys, not nan.
"""

import pytest
import torch
from mask_ref import dense_visible, plain_attention

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.kernels import block_attention
from tokenloom.parallel import ring_attention, shard_sequence, token_ring_attention, ulysses_attention

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
S, H, HKV, D = 32, 4, 2, 16
DOCS = (5, 19, 8)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, S, h, D, generator=g) for h in (H, HKV, HKV, H)]


def _cu(docs):
    return torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32) if docs else None


def _plain_pattern(tensors, docs, scale, window=(-1, -1)):
    q, k, v, dout = (t.double().requires_grad_(i < 3) for i, t in enumerate(tensors))
    vis = dense_visible(S, causal=True, doc_lens=docs, window=window)
    out, _ = plain_attention(q, k, v, vis, scale)
    out.backward(dout)
    return [~torch.isfinite(t) for t in (out, q.grad, k.grad, v.grad)]


def _mismatches(rank, n):
    bad = []
    scale = D ** -0.5
    for docs in (None, DOCS):
        for which, tok, value in (("q", 3, "nan"), ("q", 20, "inf"), ("k", 9, "nan"), ("k", 27, "-inf"),
                                  ("v", 14, "nan"), ("dout", 30, "nan"), ("dout", 6, "inf")):
            tensors = _inputs()
            idx = "q k v dout".split().index(which)
            tensors[idx][0, tok, 1, 5] = float(value)
            want = _plain_pattern(tensors, docs, scale)
            for strategy in FN:
                for impl in ("sdpa", "torch"):
                    for layout in ("zigzag", "contiguous"):
                        shard = [shard_sequence(t, rank, n, layout, cu_seqlens=_cu(docs)) for t in tensors]
                        ql, kl, vl = (t.requires_grad_() for t in shard[:3])
                        out = FN[strategy](ql, kl, vl, causal=True, layout=layout, impl=impl,
                                           cu_seqlens=_cu(docs))
                        out.backward(shard[3])
                        for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad),
                                                  want):
                            mine = shard_sequence(ref, rank, n, layout, cu_seqlens=_cu(docs))
                            if not torch.equal(~torch.isfinite(got), mine):
                                bad.append(f"{which}[{tok}]={value} docs={bool(docs)} {strategy} {impl} "
                                           f"{layout} {name}: {int(mine.sum())} poisoned in plain, "
                                           f"{int((~torch.isfinite(got)).sum())} here")
    return bad


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_nonfinite_poisons_exactly_what_plain_attention_poisons(world_size):
    per_rank = spawn_ranks(world_size, _mismatches, timeout=240)
    bad = [f"rank {r}: {m}" for r, rows in enumerate(per_rank) for m in rows]
    assert not bad, "\n".join(bad[:20])


def test_the_issue_case_one_nan_token_in_q():
    """The case the issue reported (2 ranks, causal, zigzag, S=32, 4 heads, d=16, default impl)."""
    def run(rank, n):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, S, 4, 16, generator=g) for _ in range(3))
        q[0, 21] = float("nan")
        rows = []
        for fn in (token_ring_attention, ring_attention, ulysses_attention):
            out = fn(*(shard_sequence(t, rank, n, "zigzag") for t in (q, k, v)), causal=True)
            rows.append(torch.isnan(out[0]).all(-1).any(-1).nonzero().flatten().tolist())
        return rows
    per_rank = spawn_ranks(2, run, timeout=60)
    # token 21 is the 5th token of chunk 2 (zigzag chunks of 8: rank 1 holds chunks 1 and 2)
    assert per_rank[0] == [[], [], []]
    assert per_rank[1] == [[13]] * 3


@pytest.mark.parametrize("impl", ["sdpa", "torch"])
def test_block_kernel_nonfinite_pattern_single_process(impl):
    tensors = _inputs(3)
    tensors[1][0, 4, 0, 2] = float("nan")
    want = _plain_pattern(tensors, None, D ** -0.5)
    q, k, v = (t.clone().requires_grad_() for t in tensors[:3])
    out, _ = block_attention(q, k, v, causal=True, impl=impl)
    out.backward(tensors[3])
    for got, ref in zip((out, q.grad, k.grad, v.grad), want):
        assert torch.equal(~torch.isfinite(got), ref)


def _scale_zero(rank, n):
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, S, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = plain_attention(qr, kr, vr, dense_visible(S, causal=True), 0.0)
    ref.backward(dout)
    errs = []
    for strategy in FN:
        for impl in ("sdpa", "torch"):
            for dtype in (torch.float32, torch.float64):
                ql, kl, vl = (shard_sequence(t, rank, n, "zigzag").to(dtype).requires_grad_() for t in (q, k, v))
                out = FN[strategy](ql, kl, vl, causal=True, softmax_scale=0.0, impl=impl)
                out.backward(shard_sequence(dout, rank, n, "zigzag").to(dtype))
                for got, want in zip((out, ql.grad, kl.grad, vl.grad), (ref, qr.grad, kr.grad, vr.grad)):
                    mine = shard_sequence(want.detach(), rank, n, "zigzag")
                    errs.append((strategy, impl, str(dtype), (got.double() - mine).abs().max().item()))
    return errs


def test_softmax_scale_zero_is_uniform_attention_over_visible_keys():
    """torch's fused CPU op returns nan there (masked -inf times 0); the blocks route such calls to
    the reference, which computes the exact answer."""
    one = torch.ones(1, 4, 1, 2)
    out, _ = block_attention(one, one, torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 1, 2),
                             causal=True, softmax_scale=0.0, impl="sdpa")
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.5]))
    for rows in spawn_ranks(2, _scale_zero, timeout=120):
        for strategy, impl, dtype, err in rows:
            assert err < (1e-5 if "32" in dtype else 1e-12), (strategy, impl, dtype, err)


def test_triton_blocks_route_nonfinite_and_scale_zero_away_from_the_kernel(monkeypatch):
    """Whatever impl is selected (Triton here: it cannot run on this CPU, so any call into it would
    fail), a non-finite block runs the exact path and a softmax_scale=0 block the reference."""
    import tokenloom.kernels as kernels

    monkeypatch.setattr(kernels, "select_impl", lambda device, impl=None: "triton")
    tensors = _inputs(6)
    tensors[0][0, 7, 1, 2] = float("nan")
    q, k, v, dout = tensors
    out, lse = kernels.block_forward(q, k, v, causal=True, softmax_scale=None)
    assert torch.equal(~torch.isfinite(out), _plain_pattern(tensors, None, D ** -0.5)[0])
    grads = kernels.block_backward(dout, q, k, v, lse, torch.zeros_like(lse), causal=True, softmax_scale=None)
    assert all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))
    ok = _inputs(7)
    out0, _ = kernels.block_forward(*ok[:3], causal=True, softmax_scale=0.0)
    ref0, _ = plain_attention(*(t.double() for t in ok[:3]), dense_visible(S, causal=True), 0.0)
    assert (out0.double() - ref0).abs().max() < 1e-5


def _windowed_and_mesh(rank, n):
    """Windows (the masked-tile path) on a flat group, and the 2-D mesh, under nan and inf."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    bad = []
    for which, tok, value in (("q", 11, "nan"), ("k", 9, "inf"), ("v", 26, "nan"), ("dout", 17, "nan")):
        tensors = _inputs(8)
        tensors["q k v dout".split().index(which)][0, tok, 0, 3] = float(value)
        for window in ((5, -1), (-1, -1)):
            want = _plain_pattern(tensors, None, D ** -0.5, window)
            runs = [("flat", dict(rank=rank, world_size=n), None, s) for s in ("tokenring", "ring")]
            runs += [("mesh", dict(group=mesh), mesh, s) for s in ("tokenring", "ring")]
            for where, where_kw, group, strategy in runs:
                for impl in ("sdpa", "torch"):
                    shard = [shard_sequence(t, **where_kw) for t in tensors]
                    ql, kl, vl = (t.requires_grad_() for t in shard[:3])
                    out = FN[strategy](ql, kl, vl, causal=True, impl=impl, group=group,
                                       window_size=None if window == (-1, -1) else window)
                    out.backward(shard[3])
                    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), want):
                        if not torch.equal(~torch.isfinite(got), shard_sequence(ref, **where_kw)):
                            bad.append(f"{which}[{tok}]={value} window={window} {where} {strategy} {impl} {name}")
    return bad


def test_nonfinite_pattern_under_windows_and_on_a_2d_mesh():
    per_rank = spawn_ranks(4, _windowed_and_mesh, timeout=240)
    bad = [f"rank {r}: {m}" for r, rows in enumerate(per_rank) for m in rows]
    assert not bad, "\n".join(bad[:20])
