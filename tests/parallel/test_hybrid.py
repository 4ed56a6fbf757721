"""2-D hybrid (USP): Ulysses inside each group, TokenRing or Ring across, on a real 2x2 DeviceMesh
of 4 gloo ranks against fp64; the schedule checker on 2-D schedules up to 4x4."""

import itertools

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.kernels.reference import attention_with_lse
from tokenloom.parallel import build_schedule, check_schedule, gather_sequence, shard_sequence, sp_attention
from tokenloom.parallel.check import ScheduleError

HEADS, KV_HEADS, DIM = 4, 1, 6  # one kv head: replicated over the Ulysses dim


def _mesh(order=("ring", "ulysses")):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=order)


def _errors(rank, n, order, docs):
    mesh = _mesh(order)
    g = torch.Generator().manual_seed(1)
    total = sum(docs) if docs else 16
    cu = torch.tensor([0, *itertools.accumulate(docs)], dtype=torch.int32) if docs else None
    q, dout = (torch.randn(1, total, HEADS, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, total, KV_HEADS, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    bounds = cu.tolist() if docs else [0, total]
    rows = []
    for strategy, causal, layout in itertools.product(("tokenring", "ring"), (True, False),
                                                      ("zigzag", "contiguous")):
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        parts = [attention_with_lse(qr[:, a:b], kr[:, a:b], vr[:, a:b], causal=causal)
                 for a, b in zip(bounds, bounds[1:])]
        ref_out = torch.cat([p[0] for p in parts], 1)
        ref_out.backward(dout)
        ref = {"out": ref_out.detach(), "lse": torch.cat([p[1] for p in parts], 2), "dq": qr.grad,
               "dk": kr.grad, "dv": vr.grad}
        ql, kl, vl = (shard_sequence(t, group=mesh, layout=layout, cu_seqlens=cu).requires_grad_()
                      for t in (q, k, v))
        out, lse = sp_attention(ql, kl, vl, strategy=strategy, group=mesh, causal=causal, layout=layout,
                                cu_seqlens=cu, return_lse=True)
        out.backward(shard_sequence(dout, group=mesh, layout=layout, cu_seqlens=cu))
        got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        for name, value in got.items():
            want = shard_sequence(ref[name], group=mesh, layout=layout, dim=2 if name == "lse" else 1,
                                  cu_seqlens=cu)
            rows.append((f"{strategy} causal={causal} {layout} {name}", (value.detach() - want).abs().max().item()))
        full = gather_sequence(out.detach(), group=mesh, layout=layout, cu_seqlens=cu)
        rows.append((f"{strategy} causal={causal} {layout} gathered", (full - ref["out"]).abs().max().item()))
    return rows


@pytest.mark.parametrize("order,docs", [(("ring", "ulysses"), ()), (("ulysses", "ring"), (1, 9, 2, 20))])
def test_2x2_mesh_matches_fp64(order, docs):
    for rows in spawn_ranks(4, _errors, order, docs, timeout=120):
        assert len(rows) == 8 * 6
        bad = [(what, err) for what, err in rows if not err < 1e-10]
        assert not bad, bad[:6]


def test_checker_proves_2d_schedules_up_to_4x4():
    for strategy, (u, r), layout, causal, backward in itertools.product(
            ("tokenring", "ring"), ((2, 2), (4, 1), (1, 4), (2, 3), (4, 2), (2, 4), (4, 4)),
            ("zigzag", "contiguous"), (False, True), (False, True)):
        check_schedule(build_schedule(strategy, u * r, layout=layout, causal=causal, backward=backward,
                                      num_heads=8, num_kv_heads=2, ulysses=u))
    for docs in ((1, 30, 2), (5,)):
        check_schedule(build_schedule("tokenring", 16, causal=True, backward=True, num_heads=8,
                                      ulysses=4, doc_lens=docs))


def test_checker_rejects_a_2d_schedule_with_a_missing_all_to_all():
    from dataclasses import replace

    sched = build_schedule("tokenring", 4, causal=True, num_heads=4, ulysses=2)
    ranks = list(sched.ranks)
    ranks[3] = ranks[3][:-1]  # rank 3 never sends its outputs home
    with pytest.raises(ScheduleError, match="different numbers of all-to-alls"):
        check_schedule(replace(sched, ranks=tuple(ranks)))


def test_2d_ulysses_runs_inside_the_group_and_the_ring_across():
    sched = build_schedule("tokenring", 8, causal=True, num_heads=8, ulysses=4)
    assert sched.strategy == "ulysses+tokenring" and sched.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    peers = {(r, op.peer) for r, steps in enumerate(sched.ranks) for st in steps for op in st.comms
             if hasattr(op, "peer")}
    assert peers and all(a % 4 == b % 4 and a // 4 != b // 4 for a, b in peers)  # same head shard, other group


def test_2d_rules():
    from tokenloom.common.errors import UsageError
    from tokenloom.parallel import ParallelDims

    with pytest.raises(UsageError, match=r"heads \(6\) divisible by ulysses mesh dim size \(4\)"):
        ParallelDims("tokenring", 8, ulysses=4, heads=6)
    with pytest.raises(UsageError, match="ring dim's strategy"):
        ParallelDims("ulysses", 8, ulysses=4, heads=8)
    dims = ParallelDims("ring", 8, ulysses=4, heads=8, kv_heads=2)
    assert dims.kv_repeat == 2 and dims.head_shards == 4 and dims.ring == 2


def _mesh_disagreement(rank, n):
    from tokenloom.comm.communicator import Communicator
    from tokenloom.common.errors import UsageError

    mesh = _mesh()
    gathers = []
    real = Communicator.all_gather

    def counted(self, tensor, what="all_gather"):
        gathers.append(what)
        return real(self, tensor, what)

    Communicator.all_gather = counted
    q = torch.randn(1, 8, 4, 4)
    sp_attention(q, q, q, group=mesh, strategy="ring", causal=True)
    first = len(gathers)
    try:
        sp_attention(q, q, q, group=mesh, strategy="ring", softmax_scale=0.25 if rank == 3 else None)  # default: 0.5
    except UsageError as exc:
        return first, str(exc)
    return first, None


def test_2d_mesh_agrees_in_one_collective_and_names_the_rank():
    for first, err in spawn_ranks(4, _mesh_disagreement, timeout=60):
        assert first == 1  # one all-gather over the default group the mesh spans
        assert err is not None and "disagree on softmax_scale" in err and "rank 3: 0.25" in err, err


def _auto_on_mesh(rank, n):
    from tokenloom.parallel import resolve_strategy

    mesh = _mesh()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 16, 4, 8, generator=g, dtype=torch.float64)
    out = sp_attention(shard_sequence(q, group=mesh), shard_sequence(q, group=mesh),
                       shard_sequence(q, group=mesh), group=mesh, strategy="auto", causal=True,
                       hardware="h100-sxm")
    chosen = resolve_strategy("auto", world_size=4, ulysses=2, seq_len=16, heads=4, kv_heads=4, head_dim=8,
                              causal=True, dtype_bytes=8, batch=1, hardware="h100-sxm", backward=False,
                              layout="zigzag")
    ref = attention_with_lse(q, q, q, causal=True)[0]
    return (gather_sequence(out, group=mesh) - ref).abs().max().item(), chosen


def test_auto_on_a_mesh_picks_the_ring_dim_strategy_by_the_advisor():
    res = spawn_ranks(4, _auto_on_mesh, timeout=60)
    assert all(err < 1e-12 for err, _ in res)
    assert len({c for _, c in res}) == 1 and res[0][1] in ("tokenring", "ring")


def _mesh3x2(rank, n):
    """A ring of 3 Ulysses pairs, packed documents, both ring strategies, causal and not."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (3, 2), mesh_dim_names=("ring", "ulysses"))
    docs = (7, 1, 30, 5)
    cu = torch.tensor([0, *itertools.accumulate(docs)], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(1, sum(docs), 4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, sum(docs), 2, 6, generator=g, dtype=torch.float64) for _ in range(2))
    errs = []
    for strategy, causal in itertools.product(("tokenring", "ring"), (True, False)):
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        b = cu.tolist()
        ref = torch.cat([attention_with_lse(qr[:, a:c], kr[:, a:c], vr[:, a:c], causal=causal)[0]
                         for a, c in zip(b, b[1:])], 1)
        ref.backward(dout)
        ql, kl, vl = (shard_sequence(t, group=mesh, cu_seqlens=cu).requires_grad_() for t in (q, k, v))
        out = sp_attention(ql, kl, vl, strategy=strategy, group=mesh, causal=causal, cu_seqlens=cu)
        out.backward(shard_sequence(dout, group=mesh, cu_seqlens=cu))
        for got, want in ((out, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)):
            errs.append((got.detach() - shard_sequence(want.detach(), group=mesh, cu_seqlens=cu)).abs().max().item())
    return max(errs)


def test_3x2_mesh_packed_matches_fp64():
    assert max(spawn_ranks(6, _mesh3x2, timeout=120)) < 1e-10
