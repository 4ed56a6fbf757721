"""Sliding windows (issue 18 part 1) on every strategy against the fp64 per-pair reference.

Windows straddle chunks, ranks and documents; left and right windows, causal and not; GQA with kv
replication; forward and every gradient. Also: the schedules skip hidden pairs (proved by the
checker, which derives the required pairs from token positions itself), a short causal window on
a contiguous ring talks only to its neighbour, and bad windows are refused naming the argument.
"""

import pytest
import torch
from mask_ref import dense_visible, plain_attention

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.parallel import ring_attention, shard_sequence, sp_attention, token_ring_attention, ulysses_attention
from tokenloom.parallel.builders import build_schedule
from tokenloom.parallel.check import check_schedule
from tokenloom.parallel.schedule import Compute, Send

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
H, HKV, D = 12, 4, 8
CASES = [  # (causal, window)
    (True, (3, -1)), (True, (13, 0)), (False, (7, 2)), (False, (0, 0)), (False, (-1, 4)),
]


def _cu(docs):
    return None if docs is None else torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)


def _errors(rank, n, dtype=torch.float64, impls=("torch", "sdpa"), strategies=tuple(FN)):
    total = 12 * n
    docs_options = (None, (5, 9 * n - 6, 1, 3 * n))
    rows = []
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, total, h, D, generator=g, dtype=torch.float64)
                     for h in (H, HKV, HKV, H))
    for docs in docs_options:
        for causal, window in CASES:
            vis = dense_visible(total, causal=causal, window=window, doc_lens=docs)
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            ref, ref_lse = plain_attention(qr, kr, vr, vis, D ** -0.5)
            ref.backward(dout)
            refs = (ref.detach(), qr.grad, kr.grad, vr.grad)
            for strategy in strategies:
                for impl in impls:
                    for layout in ("zigzag", "contiguous"):
                        sh = [shard_sequence(t, rank, n, layout, cu_seqlens=_cu(docs)) for t in (q, k, v, dout)]
                        ql, kl, vl = (t.to(dtype).requires_grad_() for t in sh[:3])
                        out, lse = FN[strategy](ql, kl, vl, causal=causal, layout=layout, impl=impl,
                                                window_size=window, cu_seqlens=_cu(docs), return_lse=True)
                        out.backward(sh[3].to(dtype))
                        got = (out, ql.grad, kl.grad, vl.grad)
                        err = max((a.double() - shard_sequence(b, rank, n, layout, cu_seqlens=_cu(docs))).abs().max().item()
                                  for a, b in zip(got, refs))
                        want_lse = shard_sequence(ref_lse.detach(), rank, n, layout, dim=2, cu_seqlens=_cu(docs))
                        err = max(err, (lse.double() - want_lse).abs().max().item())
                        rows.append((f"{strategy} {impl} {layout} causal={causal} window={window} "
                                     f"docs={docs}", err))
    return rows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_window_matches_fp64_reference(world_size):
    per_rank = spawn_ranks(world_size, _errors, timeout=300)
    bad = [(r, what, err) for r, rows in enumerate(per_rank) for what, err in rows if not err < 1e-10]
    assert not bad, bad[:10]


def test_window_fp32_within_tolerance_on_five_ranks():
    per_rank = spawn_ranks(5, _errors, torch.float32, ("sdpa",), ("tokenring", "ring"), timeout=300)
    bad = [(r, what, err) for r, rows in enumerate(per_rank) for what, err in rows if not err < 2e-5]
    assert not bad, bad[:10]


def _mesh(rank, n):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    total = 48
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, total, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV, H))
    sinks = torch.randn(H, generator=g, dtype=torch.float64)
    errs = []
    for strategy in ("tokenring", "ring"):
        for causal, window, extra in [(c, w, {}) for c, w in CASES[:3]] + [
                (True, (5, -1), {"softcap": 0.8, "sinks": sinks})]:
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            ref, _ = plain_attention(qr, kr, vr, dense_visible(total, causal=causal, window=window),
                                     D ** -0.5, **extra)
            ref.backward(dout)
            sh = [shard_sequence(t, group=mesh) for t in (q, k, v, dout)]
            ql, kl, vl = (t.requires_grad_() for t in sh[:3])
            out = sp_attention(ql, kl, vl, group=mesh, strategy=strategy, causal=causal, window_size=window,
                               **extra)
            out.backward(sh[3])
            for a, b in zip((out, ql.grad, kl.grad, vl.grad), (ref.detach(), qr.grad, kr.grad, vr.grad)):
                errs.append((a - shard_sequence(b, group=mesh)).abs().max().item())
    return max(errs)


def test_window_softcap_sinks_on_a_2d_mesh():
    assert max(spawn_ranks(4, _mesh, timeout=300)) < 1e-10


@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses", "ulysses2+tokenring", "ulysses2+ring"])
def test_checker_proves_windowed_schedules(strategy):
    for n in (2, 3, 4, 5, 6):
        if "+" in strategy and n % 2:
            continue
        for layout in ("zigzag", "contiguous"):
            for causal, window in CASES + [(True, (40, -1)), (False, (1, 1))]:
                for docs in (None, (5, 19, 8, 1, 31)):
                    for backward in (False, True):
                        chunks = n * (2 if layout == "zigzag" else 1)
                        check_schedule(build_schedule(
                            strategy, n, layout=layout, causal=causal, backward=backward, num_heads=60,
                            num_kv_heads=60, window_size=window, doc_lens=docs,
                            seq_len=None if docs else 6 * chunks))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_short_window_ring_talks_to_neighbours_only_and_skips_hidden_blocks(layout):
    """Contiguous: one hop to the next rank. Zigzag: rank r's early chunk needs rank r-1 and its
    late chunk rank r+1, so blocks travel both ways at once, one hop each."""
    n, seq_len = 8, 16 * 64
    for strategy in ("ring", "tokenring"):
        for backward in (False, True):
            sched = build_schedule(strategy, n, layout=layout, causal=True, window_size=(16, -1),
                                   seq_len=seq_len, backward=backward)
            check_schedule(sched)
            assert sched.num_steps <= 3, sched  # one hop, plus the way home (TokenRing, Ring's dk/dv)
            peers = {(r, op.peer) for r, steps in enumerate(sched.ranks) for st in steps for op in st.comms
                     if isinstance(op, Send)}
            assert all((a - b) % n in (1, n - 1) for a, b in peers), peers
            full = build_schedule(strategy, n, layout=layout, causal=True, backward=backward)
            assert full.num_steps >= n
        computes = sum(len(c.blocks) for steps in build_schedule(
            strategy, n, layout=layout, causal=True, window_size=(16, -1), seq_len=seq_len).ranks
                       for st in steps for c in st.computes if isinstance(c, Compute))
        # each diagonal + the one before; zigzag's middle rank holds chunks n-1, n side by side, and
        # their three pairs are one masked block (a band of consecutive positions)
        assert computes == (2 * (2 * n) - 1 - 2 if layout == "zigzag" else 2 * n - 1)


@pytest.mark.parametrize("window", [(-2, 0), (1.5, 0), (float("nan"), 0), (3,), "3", (True, 0), (0, -7)])
def test_bad_window_is_refused_naming_it(window):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(UsageError, match="window_size") as info:
        ring_attention(q, q, q, causal=True, window_size=window)
    assert info.value.field == "window_size"


def _disagree(rank, n):
    q = torch.randn(1, 8, 2, 4)
    try:
        ring_attention(q, q, q, causal=True, window_size=(2 + rank, 0))
    except UsageError as exc:
        return str(exc)
    return "no error"


def test_ranks_that_disagree_on_the_window_all_raise():
    msgs = spawn_ranks(2, _disagree, timeout=60)
    assert all("disagree on window_size" in m for m in msgs), msgs


def test_a_window_as_long_as_the_sequence_is_the_plain_mask():
    """Mistral-style configs pass a 4096-token window over shorter sequences: the plain causal
    schedule (one causal kernel call per diagonal), not masked tiles."""
    from tokenloom.parallel.attention_plan import AttentionPlan as _Plan, CallArgs as _Args
    from tokenloom.parallel.runtime import Groups

    class One:
        rank, world_size = 0, 1

    args = dict(strategy="ring", layout="zigzag", causal=True, softmax_scale=None, impl="torch",
                cu_seqlens=None, softcap=None, hardware=None, backward=False, q_shape=(1, 16, 2, 4),
                k_shape=(1, 16, 2, 4), v_shape=(1, 16, 2, 4), dtypes=(torch.float32,) * 3,
                device=torch.device("cpu"))
    groups = Groups(0, 1, One(), One())
    long = _Plan("x", groups, _Args(window_size=(4095, 0), **args))
    plain = _Plan("x", groups, _Args(window_size=None, **args))
    assert long.fwd == plain.fwd and long.agreed.shown["window_size"] is None
    short = _Plan("x", groups, _Args(window_size=(5, 0), **args))
    assert short.fwd != plain.fwd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("impl", ["sdpa", "torch"])
def test_window_block_in_low_precision_within_twice_plain_pytorch(dtype, impl):
    """A masked block (window straddling the 256-row tiles) against fp64, within 2x the error of
    torch's own SDPA with the same dense mask in the same dtype, plus the floor (STYLE.md 5)."""
    import torch.nn.functional as F

    from tokenloom.kernels import PositionMask, attention_delta, block_backward, block_forward
    from tokenloom.kernels.reference import tolerance

    g = torch.Generator().manual_seed(3)
    sq, sk = 300, 330
    q, dout = (torch.randn(1, sq, 4, 32, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, sk, 2, 32, generator=g, dtype=torch.float64) for _ in range(2))
    mask = PositionMask(40, 10, 37, 3)
    vis = mask.visible(sq, sk)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = plain_attention(qr, kr, vr, vis, 32 ** -0.5)
    ref.backward(dout)
    out, _ = block_forward(q.to(dtype), k.to(dtype), v.to(dtype), causal=False, softmax_scale=None,
                           impl=impl, mask=mask)
    grads = block_backward(dout.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), ref_lse.float(),
                           attention_delta(ref.detach(), dout).float(), causal=False, softmax_scale=None,
                           impl=impl, mask=mask)
    qp, kp, vp = (t.to(dtype).requires_grad_() for t in (q, k, v))
    plain = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.repeat_interleave(2, 2).transpose(1, 2),
                                           vp.repeat_interleave(2, 2).transpose(1, 2), attn_mask=vis).transpose(1, 2)
    plain.backward(dout.to(dtype))
    for got, p, want in zip((out, *grads), (plain, qp.grad, kp.grad, vp.grad), (ref, qr.grad, kr.grad, vr.grad)):
        plain_err = (p.double() - want).abs().max().item()
        assert (got.double() - want).abs().max().item() <= tolerance(dtype, plain_err, want.abs().max().item())
