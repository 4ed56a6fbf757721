"""TokenRing, Ring and Ulysses on real gloo ranks against the fp64 single-process reference."""

import itertools

import pytest
import torch

from tokenloom.comm.launch.local import RankError, spawn_ranks
from tokenloom.kernels.reference import acc_dtype, attention_with_lse, tolerance, torch_sdpa
from tokenloom.parallel import (
    gather_sequence,
    ring_attention,
    shard_sequence,
    sp_attention,
    token_ring_attention,
    ulysses_attention,
)

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
HEADS = 12  # divisible by world sizes 1..4 (Ulysses); GQA with 4 kv heads needs kv replication at 3


def _inputs(batch, seq, heads, kv_heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim),
              (batch, seq, kv_heads, head_dim), (batch, seq, heads, head_dim)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _errors(rank, n, strategy, causal, layout, kv_heads, dtype, batch=2, head_dim=24, seed=0):
    """(name, error, tolerance) of out, lse, dq, dk, dv on this rank's shard."""
    q, k, v, dout = _inputs(batch, 8 * n, HEADS, kv_heads, head_dim, seed)
    # fp64 reference with autograd
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_with_lse(qr, kr, vr, causal=causal)
    ref_out.backward(dout)
    refs = {"out": ref_out.detach(), "lse": ref_lse.detach(), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}
    # plain torch in the same dtype: how much error that precision costs anyway
    qp, kp, vp = (t.to(dtype, copy=True).requires_grad_() for t in (q, k, v))
    plain_out = torch_sdpa(qp, kp, vp, causal)
    plain_out.backward(dout.to(dtype))
    plain = {"out": plain_out, "dq": qp.grad, "dk": kp.grad, "dv": vp.grad}
    # the distributed run
    ql, kl, vl = (shard_sequence(t, rank, n, layout).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = FN[strategy](ql, kl, vl, causal=causal, layout=layout, return_lse=True)
    out.backward(shard_sequence(dout, rank, n, layout).to(dtype))
    got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    assert out.dtype == dtype and lse.dtype == acc_dtype(dtype) and lse.shape == (batch, HEADS, 8)
    rows = []
    for name, ref in refs.items():
        dim = 2 if name == "lse" else 1
        mine = shard_sequence(ref, rank, n, layout, dim=dim)
        plain_err = 0.0
        if name in plain:
            plain_err = (shard_sequence(plain[name].detach().double(), rank, n, layout, dim=dim)
                         - mine).abs().max().item()
        err = (got[name].detach().double() - mine).abs().max().item()
        rows.append((name, err, tolerance(dtype, plain_err, mine.abs().max().item())))
    return rows


def _matrix(rank, n, strategy):
    """Every (causal, layout, MHA/GQA) combination; the dtype alternates so that every pair of
    factor values, dtype included, is covered (8 runs instead of 16)."""
    results = []
    for i, (causal, layout, kv_heads) in enumerate(itertools.product(
            (False, True), ("contiguous", "zigzag"), (HEADS, 4))):
        dtype = (torch.float32, torch.bfloat16)[(i ^ (i >> 1) ^ (i >> 2)) & 1]
        for name, err, tol in _errors(rank, n, strategy, causal, layout, kv_heads, dtype):
            results.append((f"causal={causal} {layout} kv={kv_heads} {dtype} {name}", err, tol))
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses"])
def test_matches_fp64_reference(strategy, world_size):
    """out, lse, dq, dk, dv for causal/non-causal x both layouts x MHA/GQA, fp32 and bf16."""
    per_rank = spawn_ranks(world_size, _matrix, strategy, timeout=120)
    bad = [(r, what, err, tol) for r, rows in enumerate(per_rank) for what, err, tol in rows
           if not err <= tol]
    assert not bad, bad[:5]
    assert len(per_rank[0]) == 8 * 5


def _world5(rank, n):
    return _errors(rank, n, "tokenring", True, "zigzag", 3, torch.float32, batch=1, head_dim=7)


def test_tokenring_on_five_ranks_gqa_causal():
    for rows in spawn_ranks(5, _world5, timeout=60):
        for name, err, tol in rows:
            assert err <= tol, (name, err, tol)


def test_fp64_is_exact_to_rounding():
    for strategy in FN:
        rows = spawn_ranks(2, _errors, strategy, True, "zigzag", 4, torch.float64)[0]
        assert max(err for _, err, _ in rows) < 1e-12, rows


def test_world_of_one_without_process_group():
    q, k, v, dout = _inputs(1, 16, 4, 2, 8, seed=3)
    ref = attention_with_lse(q, k, v, causal=True)[0]
    for fn in FN.values():
        out = fn(q, k, v, causal=True)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_uneven_sequence_says_what_must_divide():
    q = torch.randn(1, 7, 2, 4)
    with pytest.raises(ValueError, match=r"seq_local \(q.shape\[1\]=7\) must be a positive multiple of 2"):
        token_ring_attention(q, q, q, layout="zigzag")
    token_ring_attention(q, q, q, layout="contiguous")  # one chunk per rank: any length


def test_bad_arguments():
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="dtype"):
        ring_attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="heads of q"):
        ring_attention(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="strategy must be"):
        sp_attention(q, q, q, strategy="magic")


def _ulysses_bad_heads(rank, n):
    q = torch.randn(1, 4, 3, 4)
    ulysses_attention(q, q, q)


def test_ulysses_heads_not_divisible_is_a_clear_error():
    with pytest.raises(RankError, match=r"heads \(3\) divisible by world_size \(2\)"):
        spawn_ranks(2, _ulysses_bad_heads)


def _mismatched(rank, n):
    q = torch.randn(1, 4 if rank == 0 else 6, 2, 4)
    token_ring_attention(q, q, q)


def test_mismatched_shapes_across_ranks_error_not_hang():
    with pytest.raises(RankError, match=r"ranks disagree on seq \(rank 0: 4; rank 1: 6\)"):
        spawn_ranks(2, _mismatched, timeout=30)


def _roundtrip(rank, n):
    x = torch.arange(2 * 12 * n * 3, dtype=torch.float32).view(2, 12 * n, 3)
    out = []
    for layout in ("zigzag", "contiguous"):
        local = shard_sequence(x, rank, n, layout)
        out.append(bool(torch.equal(gather_sequence(local, layout=layout), x)))
        xt = x.transpose(1, 2).contiguous()
        local_t = shard_sequence(xt, rank, n, layout, dim=2)
        out.append(bool(torch.equal(gather_sequence(local_t, layout=layout, dim=2), xt)))
    return out


def test_shard_gather_roundtrip_is_exact():
    assert spawn_ranks(3, _roundtrip) == [[True] * 4] * 3
    x = torch.arange(8.0).view(1, 8)
    assert shard_sequence(x, 1, 2, "zigzag").tolist() == [[2.0, 3.0, 4.0, 5.0]]
    assert shard_sequence(x, 0, 2, "zigzag").tolist() == [[0.0, 1.0, 6.0, 7.0]]


def _auto(rank, n):
    from tokenloom.simulator import choose_strategy

    q, k, v, dout = _inputs(1, 16 * n, 4, 2, 8, seed=5)
    ref = attention_with_lse(q, k, v, causal=True)[0]
    out = sp_attention(*(shard_sequence(t, rank, n, "zigzag") for t in (q, k, v)), causal=True,
                       strategy="auto", hardware="h100-sxm")
    chosen = choose_strategy(world_size=n, seq_len=16 * n, num_heads=4, num_kv_heads=2, head_dim=8,
                             causal=True, dtype_bytes=8, batch=1, hardware="h100-sxm", backward=False,
                             layout="zigzag")
    return (out - shard_sequence(ref, rank, n, "zigzag")).abs().max().item(), chosen[0]


def test_auto_strategy_asks_the_advisor_and_is_correct():
    res = spawn_ranks(2, _auto)
    assert all(err < 1e-12 for err, _ in res)
    assert res[0][1] == res[1][1] and res[0][1] in FN  # every rank got the same advice


def _event_log(rank, n):
    """Record, on this rank, the order of P2P posts, block computes and waits in one forward."""
    import tokenloom.parallel.runtime as rt
    from tokenloom.comm.communicator import Handle

    log = []
    post, compute, wait = rt.Communicator.batch_p2p, rt.Runner._compute, Handle.wait

    def logged_post(self, ops, what="p2p"):
        log.append(("post", sorted({(o.op, (o.peer - rank) % n) for o in ops})))
        return post(self, ops, what)

    def logged_compute(self, store, op):
        log.append(("compute", None))
        return compute(self, store, op)

    def logged_wait(self):
        if "p2p" in self._what:
            log.append(("wait", None))
        return wait(self)

    rt.Communicator.batch_p2p, rt.Runner._compute, Handle.wait = logged_post, logged_compute, logged_wait
    q = torch.randn(1, 8, 2, 4)
    token_ring_attention(q, q, q, causal=True, layout="zigzag")
    return log


def test_tokenring_overlaps_both_directions_with_compute():
    """In the middle steps one batch posts sends to r-1 (queries) and to the owner the other
    way (partial outputs) before the block compute, and waits only after it."""
    n = 4
    for log in spawn_ranks(n, _event_log):
        overlapped = 0
        for i, (kind, detail) in enumerate(log[:-2]):
            if kind == "post" and log[i + 1][0] == "compute" and log[i + 2][0] == "wait":
                sends = {hop for op, hop in detail if op == "send"}
                overlapped += (n - 1) in sends and bool(sends - {n - 1})  # to r-1 and the other way
        assert overlapped >= 1, log


def _fp16(rank, n):
    return {s: _errors(rank, n, s, True, "zigzag", 4, torch.float16) for s in FN}


def test_fp16_inputs_with_fp32_accumulation():
    for per_strategy in spawn_ranks(2, _fp16):
        for strategy, rows in per_strategy.items():
            for name, err, tol in rows:
                assert err <= tol, (strategy, name, err, tol)


def test_public_reexports():
    import tokenloom

    for name in tokenloom.__all__:
        assert getattr(tokenloom, name) is not None
    assert tokenloom.sp_attention is sp_attention
