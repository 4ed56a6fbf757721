"""The SP attention strategies on 2-3 gloo ranks with each block kernel forced, against fp64.

tests/parallel/test_sp_attention.py runs the full matrix with the device default; this file pins
``impl="sdpa"`` (and ``impl="torch"`` through TOKENLOOM_ATTN_IMPL) so a change of default cannot
leave a kernel untested inside the runtime: forward merges, query-moving and kv-moving backward,
Ulysses' all-to-all, zigzag half blocks, GQA.
"""

import itertools
import os

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.kernels.reference import attention_with_lse, tolerance, torch_sdpa
from tokenloom.parallel import ring_attention, shard_sequence, token_ring_attention, ulysses_attention

FN = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}
HEADS = 6


def _errors(rank, n, strategy, causal, layout, kv_heads, dtype, impl, head_dim=12, seed=0):
    """(what, error, tolerance) for out, lse, dq, dk, dv on this rank's shard."""
    g = torch.Generator().manual_seed(seed)
    seq = 8 * n
    q, dout = (torch.randn(2, seq, HEADS, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, seq, kv_heads, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_with_lse(qr, kr, vr, causal=causal)
    ref_out.backward(dout)
    refs = {"out": ref_out.detach(), "lse": ref_lse.detach(), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}
    qp, kp, vp = (t.to(dtype).requires_grad_() for t in (q, k, v))
    plain_out = torch_sdpa(qp, kp, vp, causal)
    plain_out.backward(dout.to(dtype))
    plain = {"out": plain_out.detach(), "dq": qp.grad, "dk": kp.grad, "dv": vp.grad}
    ql, kl, vl = (shard_sequence(t, rank, n, layout).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = FN[strategy](ql, kl, vl, causal=causal, layout=layout, return_lse=True, impl=impl)
    out.backward(shard_sequence(dout, rank, n, layout).to(dtype))
    got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    rows = []
    for name, ref in refs.items():
        dim = 2 if name == "lse" else 1
        mine = shard_sequence(ref, rank, n, layout, dim=dim)
        p_err = 0.0
        if name in plain:
            p_err = (shard_sequence(plain[name].double(), rank, n, layout, dim=dim) - mine).abs().max().item()
        err = (got[name].detach().double() - mine).abs().max().item()
        rows.append((f"{strategy} causal={causal} {layout} kv={kv_heads} {dtype} {name}", err,
                     tolerance(dtype, p_err, mine.abs().max().item())))
    return rows


def _matrix(rank, n, impl, dtypes):
    rows = []
    for strategy, causal, layout, kv in itertools.product(FN, (True, False), ("zigzag", "contiguous"),
                                                          (HEADS, 3)):
        if strategy == "ulysses" and HEADS % n:
            continue
        for dtype in dtypes:
            rows += _errors(rank, n, strategy, causal, layout, kv, dtype, impl)
    return rows


def _check(per_rank):
    bad = [(r, *row) for r, rows in enumerate(per_rank) for row in rows if not row[1] <= row[2]]
    assert not bad, bad[:5]
    assert per_rank[0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_strategy_with_sdpa_blocks(world_size):
    """TokenRing, Ring, Ulysses x causal/non-causal x zigzag/contiguous x MHA/GQA, fp32, impl='sdpa'."""
    _check(spawn_ranks(world_size, _matrix, "sdpa", (torch.float32,), timeout=180))


def test_bf16_with_sdpa_blocks():
    _check(spawn_ranks(2, _matrix, "sdpa", (torch.bfloat16,), timeout=180))


def _env_forced(rank, n):
    os.environ["TOKENLOOM_ATTN_IMPL"] = "torch"  # this forked rank only
    import tokenloom.kernels.sdpa as sdpa

    def boom(*a, **k):
        raise AssertionError("sdpa used although TOKENLOOM_ATTN_IMPL=torch")

    sdpa.forward = sdpa.backward = boom
    return _errors(rank, n, "tokenring", True, "zigzag", 3, torch.float32, None)


def test_environment_variable_reaches_the_runtime():
    _check(spawn_ranks(2, _env_forced, timeout=120))
