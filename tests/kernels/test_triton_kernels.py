"""Triton kernels under TRITON_INTERPRET=1 (tiny shapes, fp32/fp16) against the references, plus
GPU-marked tests (bf16, long sequences) that skip without CUDA.

Without a GPU the kernels only run interpreted, and ``TRITON_INTERPRET=1`` must be set before
*triton itself* is first imported in the process (its own ``tl`` helpers are jitted at import; an
interpreted kernel calling a compiled helper fails, and triton cannot be re-imported). Any earlier
test may have imported triton, so on CPU this file runs its cases in a fresh subprocess with the
variable set (tests/kernels/test_triton_interpreter.py) and skips them in the parent process.
"""

import importlib
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from tokenloom.kernels import block_attention, block_backward, block_forward, merge_into_, residual_rmsnorm  # noqa: E402
from tokenloom.kernels.masks import PositionMask  # noqa: E402
from tokenloom.kernels.norm import residual_rmsnorm as norm_ref  # noqa: E402
from tokenloom.kernels.reference import (  # noqa: E402
    attention_backward,
    attention_delta,
    attention_with_lse,
    merge_partials,
    tolerance,
)

MODULES = ("tokenloom.kernels.triton_attention", "tokenloom.kernels.triton_merge", "tokenloom.kernels.triton_norm")
HERE = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
pytestmark = pytest.mark.skipif(HERE, reason="runs in the TRITON_INTERPRET=1 subprocess")


@pytest.fixture(scope="module")
def tk():
    mods = [importlib.import_module(m) for m in MODULES]
    return dict(zip(("attn", "merge", "norm"), mods))


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, seed, dtype):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(dtype).to(dev())


def plain_errors(q, k, v, dout, causal, refs):
    """Error of textbook attention in the inputs' dtype (autograd through it) vs fp64 refs."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    if causal:
        i, j = torch.arange(q.shape[1], device=q.device).unsqueeze(1), torch.arange(k.shape[1], device=q.device)
        s = s.masked_fill(j > i + k.shape[1] - q.shape[1], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.float(), -1).to(q.dtype).nan_to_num(0.0), vv)
    out.backward(dout)
    return [(a.detach().double().cpu() - r).abs().max().item() for a, r in zip((out, q.grad, k.grad, v.grad), refs)]


def check_block(tk, sq, sk, hq, hkv, d, causal, dtype, seed=0):
    q, dout = rand(1, sq, hq, d, seed=seed, dtype=dtype), rand(1, sq, hq, d, seed=seed + 1, dtype=dtype)
    k, v = rand(1, sk, hkv, d, seed=seed + 2, dtype=dtype), rand(1, sk, hkv, d, seed=seed + 3, dtype=dtype)
    q64, k64, v64, do64 = (t.double().cpu() for t in (q, k, v, dout))
    ref_out, ref_lse = attention_with_lse(q64, k64, v64, causal=causal)
    delta = attention_delta(ref_out, do64)
    refs = [ref_out, *attention_backward(do64, q64, k64, v64, ref_lse, delta, causal=causal)]
    plain = plain_errors(q, k, v, dout, causal, refs) if dtype != torch.float32 else [0.0] * 4
    out, lse = tk["attn"].forward(q, k, v, causal=causal, softmax_scale=None)
    grads = tk["attn"].backward(dout, q, k, v, ref_lse.float().to(q.device), delta.float().to(q.device),
                                causal=causal, softmax_scale=None)
    empty = torch.isneginf(ref_lse)
    lse = lse.cpu()
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    assert (out.cpu().transpose(1, 2)[empty] == 0).all()
    if (~empty).any():
        assert (lse.double() - ref_lse)[~empty].abs().max() <= tolerance(torch.float32, 0.0, 10.0)
    for name, got, ref, p in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, plain):
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        err = (got.double().cpu() - ref).abs().max().item()
        assert err <= tolerance(dtype, p, ref.abs().max().item()), (name, err, p)


# (seq_q, seq_k, causal): diagonal, causal (full..., diag), full, zigzag halves, rows without keys,
# lengths that are not tile multiples
BLOCKS = [(16, 16, True), (16, 32, True), (32, 16, False), (16, 32, False), (20, 9, True), (13, 29, True),
          (21, 21, False)]


@pytest.mark.parametrize("sq,sk,causal", BLOCKS)
def test_attention_fp32_gqa_odd_head_dim(tk, sq, sk, causal):
    check_block(tk, sq, sk, 4, 2, 12, causal, torch.float32)


@pytest.mark.parametrize("d", [16, 64])
def test_attention_fp16_head_dims(tk, d):
    check_block(tk, 16, 32, 2, 1, d, True, torch.float16, seed=4)


def test_selector_routes_to_triton_and_autograd(tk):
    q, k, v, dout = (rand(1, 16, 2, 8, seed=s, dtype=torch.float32) for s in range(4))
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    attention_with_lse(q64, k64, v64, causal=True)[0].backward(dout.double().cpu())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = block_attention(ql, kl, vl, causal=True, impl="triton")
    out.backward(dout)
    for got, ref in ((ql.grad, q64.grad), (kl.grad, k64.grad), (vl.grad, v64.grad)):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=0, atol=2e-5)
    o1, l1 = block_forward(q, k, v, causal=False, softmax_scale=0.5, impl="triton")
    o2, l2 = attention_with_lse(q, k, v, causal=False, softmax_scale=0.5, out_dtype=torch.float32)
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-5)
    g = block_backward(dout, q, k, v, l2, attention_delta(o2, dout), causal=False, softmax_scale=0.5, impl="triton")
    r = attention_backward(dout, q, k, v, l2, attention_delta(o2, dout), causal=False, softmax_scale=0.5)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def window_visible(sq, sk, mask):
    """``(sq, sk)`` bool from global positions, written out here (independent of the kernels)."""
    i = torch.arange(mask.q_start, mask.q_start + sq).unsqueeze(1)
    j = torch.arange(mask.k_start, mask.k_start + sk).unsqueeze(0)
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if mask.left >= 0:
        vis &= j >= i - mask.left
    if mask.right >= 0:
        vis &= j <= i + mask.right
    return vis


def textbook(q, k, v, vis, softcap=None):
    """Dense attention in the inputs' dtype (softmax in fp32 for low precision), differentiable:
    ``(out, lse)``; rows that see no key give 0 and -inf."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s if s.dtype == torch.float64 else s.float()
    vis = vis.to(q.device)
    has = vis.any(-1)
    safe = torch.where(vis, s, float("-inf")).where(has[:, None], 0.0)
    p = torch.where(vis & has[:, None], torch.softmax(safe, -1), 0.0)
    lse = torch.where(has, torch.logsumexp(safe, -1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), vv), lse


def check_masked(tk, sq, sk, hq, hkv, d, dtype, *, mask=None, causal=False, softcap=None, seed=0, amp=1.0):
    """Triton forward and every gradient under ``mask``/``causal``/``softcap`` against fp64, within
    2x the error of textbook attention in ``dtype`` plus the floor (fp32: the floor alone)."""
    q, dout = rand(1, sq, hq, d, seed=seed, dtype=dtype) * amp, rand(1, sq, hq, d, seed=seed + 1, dtype=dtype)
    k, v = rand(1, sk, hkv, d, seed=seed + 2, dtype=dtype) * amp, rand(1, sk, hkv, d, seed=seed + 3, dtype=dtype)
    vis = window_visible(sq, sk, mask) if mask is not None else torch.ones(sq, sk, dtype=torch.bool)
    if mask is None and causal:
        vis = vis.tril(sk - sq)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = textbook(*leaves, vis, softcap)
    ref_out.backward(dout.double())
    refs = [ref_out.detach()] + [t.grad for t in leaves]
    plain = [0.0] * 4
    if dtype != torch.float32:
        low = [t.clone().requires_grad_() for t in (q, k, v)]
        out_low, _ = textbook(*low, vis, softcap)
        out_low.backward(dout)
        plain = [(a.double() - r).abs().max().item() for a, r in zip((out_low, *(t.grad for t in low)), refs)]
    delta = (ref_out.detach() * dout.double()).sum(-1).transpose(1, 2)
    out, lse = tk["attn"].forward(q, k, v, causal=causal, softmax_scale=None, mask=mask, softcap=softcap)
    grads = tk["attn"].backward(dout, q, k, v, ref_lse.float(), delta.float(), causal=causal,
                                softmax_scale=None, mask=mask, softcap=softcap)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    assert (out.transpose(1, 2)[empty] == 0).all()
    if (~empty).any():
        assert (lse.double() - ref_lse)[~empty].abs().max() <= tolerance(torch.float32, 0.0, 10.0)
    for name, got, ref, p in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, plain):
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        err = (got.double() - ref).abs().max().item()
        assert err <= tolerance(dtype, p, ref.abs().max().item()), (name, err, p)


# (seq_q, seq_k, mask): windows straddling the 16-row interpreter tiles, causal (right 0), left and
# right, right only, left only, rows that see no key, a block wholly before its keys
WINDOWS = [(40, 56, PositionMask(30, 14, 9, 0)), (33, 47, PositionMask(5, 0, 6, 11)),
           (35, 35, PositionMask(0, 0, -1, 3)), (21, 50, PositionMask(20, 0, 4, -1)),
           (30, 20, PositionMask(0, 20, 5, 2)), (16, 16, PositionMask(0, 40, 3, 0))]


@pytest.mark.parametrize("sq,sk,mask", WINDOWS)
def test_window_fp32_gqa(tk, sq, sk, mask):
    check_masked(tk, sq, sk, 4, 2, 12, torch.float32, mask=mask)


@pytest.mark.parametrize("sq,sk,mask,causal", [(24, 40, None, True), (21, 21, None, False),
                                               (40, 56, PositionMask(30, 14, 9, 0), False)])
def test_softcap_fp32_gqa(tk, sq, sk, mask, causal):
    check_masked(tk, sq, sk, 4, 2, 12, torch.float32, mask=mask, causal=causal, softcap=1.5, amp=2.0)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_window_fp16(tk, softcap):
    check_masked(tk, 48, 64, 4, 2, 64, torch.float16, mask=PositionMask(100, 84, 20, 0), softcap=softcap,
                 seed=5, amp=2.0)


def test_hidden_tiles_are_never_loaded(tk):
    """Key tiles outside every row's window hold nan and must not reach any kernel (a loaded tile
    leaks nan through ``0 * nan`` in P @ V even when masked); same for hidden query tiles in the
    dk/dv kernel (rows before the window of every key of the block)."""
    d = 8
    q, dout = rand(1, 16, 2, d, seed=1, dtype=torch.float32), rand(1, 16, 2, d, seed=2, dtype=torch.float32)
    k, v = rand(1, 256, 1, d, seed=3, dtype=torch.float32), rand(1, 256, 1, d, seed=4, dtype=torch.float32)
    mask = PositionMask(200, 0, 20, 0)  # rows see keys 180..215: tiles [176, 224)
    for t in (k, v):
        t[:, :176] = float("nan")
        t[:, 224:] = float("nan")
    out, lse = tk["attn"].forward(q, k, v, causal=False, softmax_scale=None, mask=mask)
    ref_out, ref_lse = textbook(q.double(), k[:, 176:224].double(), v[:, 176:224].double(),
                                window_visible(16, 48, PositionMask(200, 176, 20, 0)))
    assert (out.double() - ref_out).abs().max() < 1e-5
    dq, dk, dv = tk["attn"].backward(dout, q, k, v, lse, attention_delta(out, dout), causal=False,
                                     softmax_scale=None, mask=mask)
    assert dq.isfinite().all() and dk[:, 176:224].isfinite().all() and dv[:, 176:224].isfinite().all()
    # the transposed case: 256 query rows, 16 keys at positions 200..215
    q2, do2 = rand(1, 256, 2, d, seed=5, dtype=torch.float32), rand(1, 256, 2, d, seed=6, dtype=torch.float32)
    k2, v2 = k[:, 180:196].clone(), v[:, 180:196].clone()
    mask2 = PositionMask(0, 200, 20, 0)  # rows 200..235 see some key: tiles [192, 240)
    for t in (q2, do2):
        t[:, :192] = float("nan")
        t[:, 240:] = float("nan")
    zeros = torch.zeros(1, 2, 256, device=dev())
    dq2, dk2, dv2 = tk["attn"].backward(do2, q2, k2, v2, zeros, zeros, causal=False,
                                        softmax_scale=None, mask=mask2)
    assert dk2.isfinite().all() and dv2.isfinite().all() and (dq2[:, :192] == 0).all()


def test_selector_sends_windows_and_softcap_to_triton(tk, monkeypatch):
    """block_forward/backward with impl='triton' run the Triton kernels for a position mask and a
    softcap (not the tiled torch path, not the reference); a nan input still takes the exact path."""
    import tokenloom.kernels as K

    calls = []
    for name in ("forward", "backward"):
        real = getattr(tk["attn"], name)
        monkeypatch.setattr(tk["attn"], name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    q, k, v, dout = (rand(1, 20, 2, 8, seed=s, dtype=torch.float32) for s in range(4))
    mask = PositionMask(4, 0, 6, 1)
    vis = window_visible(20, 20, mask)
    ref_out, ref_lse = textbook(q.double(), k.double(), v.double(), vis, 1.2)
    out, lse = block_forward(q, k, v, causal=True, softmax_scale=None, impl="triton", mask=mask, softcap=1.2)
    assert (out.double() - ref_out).abs().max() < 2e-5
    block_backward(dout, q, k, v, lse, attention_delta(out, dout), causal=True, softmax_scale=None,
                   impl="triton", mask=mask, softcap=1.2)
    assert calls == ["forward", "backward"]
    bad = k.clone()
    bad[:, 19] = float("nan")  # key 19 is seen by rows 14..19 (positions 18..23, window (6, 1))
    out, _ = K.block_forward(q, bad, v, causal=False, softmax_scale=None, impl="triton", mask=mask)
    assert calls == ["forward", "backward"]  # exact path
    assert out[:, :14].isfinite().all() and out[:, 14:].isnan().all()


def test_merge_in_place_into_a_zigzag_half(tk):
    """Merge a partial into the late half of the accumulators (views), empty sides included."""
    acc_out = rand(2, 12, 3, 10, seed=1, dtype=torch.float32)
    acc_lse = rand(2, 3, 12, seed=2, dtype=torch.float32)
    out, lse = rand(2, 6, 3, 10, seed=3, dtype=torch.float32), rand(2, 3, 6, seed=4, dtype=torch.float32)
    acc_lse[0, 0, 6] = float("-inf")  # accumulator side empty
    lse[0, 1, 1] = float("-inf")  # new side empty
    acc_lse[1, 2, 8] = lse[1, 2, 2] = float("-inf")  # both empty
    expect_o, expect_l = acc_out.clone(), acc_lse.clone()
    mo, ml = merge_partials(expect_o[:, 6:], expect_l[..., 6:], out, lse)
    expect_o[:, 6:], expect_l[..., 6:] = mo, ml
    tk["merge"].merge_into_(acc_out[:, 6:], acc_lse[..., 6:], out, lse)
    assert not acc_out.isnan().any() and not acc_lse.isnan().any()
    torch.testing.assert_close(acc_out, expect_o, rtol=0, atol=1e-6)
    torch.testing.assert_close(acc_lse, expect_l, rtol=0, atol=1e-6)
    assert torch.isneginf(acc_lse[1, 2, 8])


def test_merge_selector(tk, monkeypatch):
    acc_out, acc_lse = torch.zeros(1, 4, 2, 3, device=dev()), torch.full((1, 2, 4), float("-inf"), device=dev())
    out, lse = rand(1, 4, 2, 3, seed=1, dtype=torch.float32), rand(1, 2, 4, seed=2, dtype=torch.float32)
    calls = []
    monkeypatch.setattr(tk["merge"], "merge_into_", lambda *a: calls.append(1))
    merge_into_(acc_out, acc_lse, out, lse, impl="triton")
    assert calls == [1]
    merge_into_(acc_out, acc_lse, out, lse, impl="torch")
    torch.testing.assert_close(acc_out, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_residual_rmsnorm(tk, dtype, with_residual):
    x = rand(3, 5, 40, seed=1, dtype=dtype)  # hidden not a power of two
    r = rand(3, 5, 40, seed=2, dtype=dtype) if with_residual else None
    w = rand(40, seed=3, dtype=torch.float32)
    normed, new_r = residual_rmsnorm(x, r, w, 1e-5, impl="triton")
    ref_n, ref_r = norm_ref(x, r, w, 1e-5)
    assert normed.dtype == dtype and new_r.dtype == dtype and normed.shape == x.shape
    torch.testing.assert_close(new_r, ref_r, rtol=0, atol=0)  # the fp32 sum rounds the same way
    # fp64 truth of the norm of the stored residual; allow 2 ulps of the output dtype
    x64 = ref_r.double()
    truth = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert (normed.double() - truth).abs().max().item() <= 2 * ulp + 1e-6


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq,sk,causal,d", [(1024, 1024, True, 128), (512, 1536, True, 64), (1024, 512, False, 128),
                                            (384, 640, True, 96), (700, 700, False, 80)])
def test_gpu_attention_large(tk, sq, sk, causal, d, dtype):
    check_block(tk, sq, sk, 8, 2, d, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq,sk,mask,softcap,d", [
    (1024, 1024, PositionMask(0, 0, 255, 0), None, 128), (512, 1536, PositionMask(1024, 0, 700, 0), 30.0, 64),
    (700, 900, PositionMask(100, 0, 300, 50), None, 80), (1024, 1024, PositionMask(4096, 4096, -1, 0), 50.0, 128)])
def test_gpu_window_softcap_large(tk, sq, sk, mask, softcap, d, dtype):
    check_masked(tk, sq, sk, 8, 2, d, dtype, mask=mask, softcap=softcap, amp=2.0)


@pytest.mark.gpu
def test_gpu_residual_rmsnorm_bf16(tk):
    x, r = rand(4096, 8192, seed=1, dtype=torch.bfloat16), rand(4096, 8192, seed=2, dtype=torch.bfloat16)
    w = rand(8192, seed=3, dtype=torch.bfloat16)
    normed, new_r = residual_rmsnorm(x, r, w, impl="triton")
    ref_n, ref_r = norm_ref(x, r, w)
    torch.testing.assert_close(new_r, ref_r, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref_n, rtol=1.6e-2, atol=1e-2)


def _ring_with_triton(rank, n, strategy, layout="zigzag", window=None, softcap=None):
    os.environ["TOKENLOOM_ATTN_IMPL"] = "triton"  # this rank only: merges go through Triton too
    from tokenloom.parallel import shard_sequence, sp_attention

    g = torch.Generator().manual_seed(7)
    q, dout = (torch.randn(1, 16 * n, 4, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 16 * n, 2, 8, generator=g) for _ in range(2))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    vis = torch.ones(16 * n, 16 * n, dtype=torch.bool).tril()
    if window is not None:
        vis &= window_visible(16 * n, 16 * n, PositionMask(0, 0, window[0], 0))
    ref_out, _ = textbook(q64, k64, v64, vis, softcap)
    ref_out.backward(dout.double())
    ql, kl, vl = (shard_sequence(t, rank, n, layout).requires_grad_() for t in (q, k, v))
    out = sp_attention(ql, kl, vl, strategy=strategy, causal=True, layout=layout, window_size=window,
                       softcap=softcap)
    out.backward(shard_sequence(dout, rank, n, layout))
    return [(shard_sequence(r.detach(), rank, n, layout) - got.double()).abs().max().item()
            for r, got in ((ref_out, out.detach()), (q64.grad, ql.grad), (k64.grad, kl.grad), (v64.grad, vl.grad))]


@pytest.mark.parametrize("strategy,layout,window,softcap", [
    ("tokenring", "zigzag", None, None), ("ring", "zigzag", None, None),
    ("tokenring", "zigzag", (11, 0), 1.5), ("ring", "contiguous", (5, 0), None), ("ring", "zigzag", (9, 0), 2.0)])
def test_strategies_on_triton_blocks(tk, strategy, layout, window, softcap):
    """The runtime on 2 gloo ranks with every block and merge in Triton (GQA, causal), with windows
    that straddle chunks and ranks, and soft-capping."""
    from tokenloom.comm.launch.local import spawn_ranks

    if torch.cuda.is_available():
        pytest.skip("gloo ranks hold CPU tensors")
    for errs in spawn_ranks(2, _ring_with_triton, strategy, layout, window, softcap, timeout=300):
        assert max(errs) < 2e-5, errs
