"""Packed sequences (cu_seqlens) for every strategy on 1-4 gloo ranks against an fp64 per-document
reference: out, lse, dq, dk, dv; plus the per-document layout and its schedules."""

import itertools

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.kernels.reference import attention_with_lse
from tokenloom.parallel import SeqLayout, build_schedule, check_schedule, gather_sequence, shard_sequence
from tokenloom.parallel.attention import ring_attention, token_ring_attention, ulysses_attention

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
HEADS, KV_HEADS, DIM = 12, 4, 6
# uneven documents: length 1 (twice), short ones, and one that spans every rank
DOCS = (1, 5, 40, 1, 3, 9)


def _cu(docs):
    return torch.tensor([0, *itertools.accumulate(docs)], dtype=torch.int32)


def _reference(q, k, v, dout, docs, causal):
    """fp64 attention document by document, with autograd: global out, lse, dq, dk, dv."""
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    outs, lses = [], []
    for a, b in zip(_cu(docs).tolist(), _cu(docs).tolist()[1:]):
        o, lse = attention_with_lse(qr[:, a:b], kr[:, a:b], vr[:, a:b], causal=causal)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 1)
    out.backward(dout)
    return {"out": out.detach(), "lse": torch.cat(lses, 2), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}


def _inputs(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, total, HEADS, DIM), (2, total, KV_HEADS, DIM), (2, total, KV_HEADS, DIM),
              (2, total, HEADS, DIM)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _errors(rank, n, docs=DOCS):
    """Max error of every (strategy, causal, layout) x (out, lse, dq, dk, dv) on this rank."""
    cu = _cu(docs)
    q, k, v, dout = _inputs(sum(docs))
    rows = []
    for causal in (True, False):
        ref = _reference(q, k, v, dout, docs, causal)
        for strategy, layout in itertools.product(FN, ("zigzag", "contiguous")):
            ql, kl, vl = (shard_sequence(t, rank, n, layout, cu_seqlens=cu).requires_grad_() for t in (q, k, v))
            out, lse = FN[strategy](ql, kl, vl, causal=causal, layout=layout, cu_seqlens=cu, return_lse=True)
            out.backward(shard_sequence(dout, rank, n, layout, cu_seqlens=cu))
            got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
            for name, value in got.items():
                dim = 2 if name == "lse" else 1
                want = shard_sequence(ref[name], rank, n, layout, dim=dim, cu_seqlens=cu)
                err = (value.detach() - want).abs().max().item()
                rows.append((f"{strategy} causal={causal} {layout} {name}", err))
            # shard -> attention -> gather is the single-device result
            full = gather_sequence(out.detach(), layout=layout, cu_seqlens=cu)
            rows.append((f"{strategy} causal={causal} {layout} gathered", (full - ref["out"]).abs().max().item()))
    return rows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_varlen_matches_per_document_reference(world_size):
    for rows in spawn_ranks(world_size, _errors, timeout=120):
        assert len(rows) == 2 * 6 * 6
        bad = [(what, err) for what, err in rows if not err < 1e-10]
        assert not bad, bad[:6]


def _tiny_docs(rank, n):
    """Every document shorter than the number of chunks: most blocks are empty."""
    return _errors(rank, n, docs=(1, 1, 2, 1, 3))


def test_varlen_documents_shorter_than_the_chunks():
    for rows in spawn_ranks(3, _tiny_docs, timeout=60):
        assert all(err < 1e-10 for _, err in rows), [r for r in rows if r[1] >= 1e-10][:4]


def test_per_document_layout_is_balanced_and_a_permutation():
    for n, layout in itertools.product((1, 2, 3, 4, 8), ("zigzag", "contiguous")):
        seq = SeqLayout(n, layout, 1, DOCS)
        lens = [seq.local_len(r) for r in range(n)]
        assert sum(lens) == sum(DOCS)
        per = 2 if layout == "zigzag" else 1
        assert max(lens) - min(lens) <= per, (n, layout, lens)
        positions = sorted(p for r in range(n) for a, m in seq.global_ranges(r) for p in range(a, a + m))
        assert positions == list(range(sum(DOCS)))
    # one document of a length the chunks divide is exactly the dense layout
    x = torch.arange(24.0).view(1, 24)
    for r in range(3):
        assert torch.equal(shard_sequence(x, r, 3, cu_seqlens=[0, 24]), shard_sequence(x, r, 3))


def test_shard_gather_roundtrip_is_exact_in_one_process():
    x = torch.arange(2 * sum(DOCS) * 3.0).view(2, sum(DOCS), 3)
    for layout in ("zigzag", "contiguous"):
        one = shard_sequence(x, 0, 1, layout, cu_seqlens=_cu(DOCS))
        assert torch.equal(gather_sequence(one, layout=layout, cu_seqlens=_cu(DOCS)), x)


def _roundtrip(rank, n):
    x = torch.arange(2 * sum(DOCS) * 3.0).view(2, 3, sum(DOCS))
    local = shard_sequence(x, rank, n, "zigzag", dim=2, cu_seqlens=_cu(DOCS))
    return bool(torch.equal(gather_sequence(local, layout="zigzag", dim=2, cu_seqlens=_cu(DOCS)), x))


def test_shard_gather_roundtrip_is_exact_on_ranks():
    assert spawn_ranks(3, _roundtrip) == [True] * 3


@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses"])
def test_varlen_schedules_check_and_skip_empty_blocks(strategy):
    for n, layout, causal, backward in itertools.product((1, 2, 3, 4), ("zigzag", "contiguous"),
                                                         (False, True), (False, True)):
        for docs in (DOCS, (1,), (1, 1, 1), (64,)):
            check_schedule(build_schedule(strategy, n, layout=layout, causal=causal, backward=backward,
                                          num_heads=HEADS, num_kv_heads=KV_HEADS, doc_lens=docs))
    # eight one-token documents on 4 ranks: each only meets itself, no block crosses documents
    sched = build_schedule(strategy, 4, causal=True, num_heads=HEADS, doc_lens=(1,) * 8)
    dense = build_schedule(strategy, 4, causal=True, num_heads=HEADS)

    def pairs(s):
        return sum(len(b.pairs()) for steps in s.ranks for st in steps for op in st.computes
                   if hasattr(op, "blocks") for b in op.blocks)

    assert pairs(sched) < pairs(dense)


def test_bad_cu_seqlens_are_usage_errors():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(UsageError, match="cu_seqlens must start at 0"):
        token_ring_attention(q, q, q, cu_seqlens=torch.tensor([1, 8], dtype=torch.int32))
    with pytest.raises(UsageError, match="strictly increasing"):
        token_ring_attention(q, q, q, cu_seqlens=torch.tensor([0, 5, 5, 8], dtype=torch.int32))
    with pytest.raises(UsageError, match="gives rank 0 6 tokens"):
        token_ring_attention(q, q, q, cu_seqlens=[0, 6])
    with pytest.raises(UsageError, match="1-D int32"):
        token_ring_attention(q, q, q, cu_seqlens=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(UsageError, match="ends at 6"):
        shard_sequence(q, 0, 1, cu_seqlens=[0, 6])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [None, "torch"])
def test_varlen_on_cuda_world_of_one(impl):
    """One CUDA rank (no process group): every strategy, packed, bf16, against fp64 on CPU."""
    cu = _cu(DOCS)
    q, k, v, dout = _inputs(sum(DOCS))
    ref = _reference(q, k, v, dout, DOCS, True)
    for strategy, fn in FN.items():
        ql, kl, vl = (shard_sequence(t, 0, 1, cu_seqlens=cu).cuda().bfloat16().requires_grad_() for t in (q, k, v))
        out = fn(ql, kl, vl, causal=True, cu_seqlens=cu, impl=impl)
        out.backward(shard_sequence(dout, 0, 1, cu_seqlens=cu).cuda().bfloat16())
        for name, got in (("out", out), ("dq", ql.grad), ("dk", kl.grad), ("dv", vl.grad)):
            want = shard_sequence(ref[name], 0, 1, cu_seqlens=cu)
            err = (got.detach().double().cpu() - want).abs().max().item()
            assert err < 0.05 * max(1.0, want.abs().max().item()), (strategy, name, err)


def _fewer_tokens_than_ranks(rank, n):
    """3 tokens on 4 ranks: two ranks hold nothing and still take part (fwd and bwd)."""
    cu = [0, 1, 3]
    q = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.cat([attention_with_lse(q[:, :1], q[:, :1], q[:, :1], causal=True)[0],
                     attention_with_lse(q[:, 1:], q[:, 1:], q[:, 1:], causal=True)[0]], 1)
    rows = []
    for strategy, fn in FN.items():
        ql = shard_sequence(q, rank, n, cu_seqlens=cu).requires_grad_()
        out = fn(ql, ql, ql, causal=True, cu_seqlens=cu)
        out.sum().backward()
        rows.append((ql.shape[1], (gather_sequence(out.detach(), cu_seqlens=cu) - ref).abs().max().item()))
    return rows


def test_ranks_without_tokens_take_part():
    per_rank = spawn_ranks(4, _fewer_tokens_than_ranks, timeout=60)
    assert [rows[0][0] for rows in per_rank].count(0) == 2
    assert all(err < 1e-12 for rows in per_rank for _, err in rows)
