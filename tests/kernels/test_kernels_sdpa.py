"""impl="sdpa" (torch's fused LSE ops) against fp64 on every block shape the schedules produce,
and the selector (argument > TOKENLOOM_ATTN_IMPL > device default)."""

import math

import pytest
import torch

from tokenloom.common.errors import UsageError
from tokenloom.kernels import (
    block_attention,
    block_backward,
    block_forward,
    merge_partials,
    sdpa,
    select_impl,
)
from tokenloom.kernels.reference import attention_backward, attention_delta, attention_with_lse, tolerance

C = 8  # chunk length
# (seq_q, seq_k, causal) as the builders emit them for chunk length C, plus the public API's
# rectangular cases: diagonal block, causal (full..., diag) lists, full blocks, zigzag halves
# (two q chunks x early kv chunk; late q chunk x two kv chunks), queries without keys.
SHAPES = [(C, C, True), (C, 2 * C, True), (C, 3 * C, True), (2 * C, C, False), (C, 2 * C, False),
          (2 * C, 2 * C, False), (2 * C, C, True), (3, 11, True), (11, 3, False)]


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def plain(q, k, v, causal):
    """Textbook attention in the inputs' own dtype (no upcast): plain PyTorch's error yardstick."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        i, j = torch.arange(q.shape[1]).unsqueeze(1), torch.arange(k.shape[1]).unsqueeze(0)
        s = s.masked_fill(j > i + k.shape[1] - q.shape[1], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0.0), v)


def _case(sq, sk, hq, hkv, d, dtype, seed=0):
    """Inputs rounded to ``dtype`` and their fp64 copies (the reference sees the same numbers)."""
    q, k, v = rand(2, sq, hq, d, seed=seed), rand(2, sk, hkv, d, seed=seed + 1), rand(2, sk, hkv, d, seed=seed + 2)
    dout = rand(2, sq, hq, d, seed=seed + 3)
    low = [t.to(dtype) for t in (q, k, v, dout)]
    return low, [t.double() for t in low]


def _plain_errors(low, causal, refs):
    """Max error of plain PyTorch in the low dtype for out, dq, dk, dv (autograd through it)."""
    q, k, v = (t.clone().requires_grad_() for t in low[:3])
    out = plain(q, k, v, causal)
    out.backward(low[3])
    return [(a.detach().double() - r).abs().max().item() for a, r in zip((out, q.grad, k.grad, v.grad), refs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sq,sk,causal", SHAPES)
def test_forward_and_backward_match_fp64(sq, sk, causal, dtype):
    hq, hkv, d = 4, 2, 5  # GQA, head_dim not a power of two
    low, (q, k, v, dout) = _case(sq, sk, hq, hkv, d, dtype)
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=causal)
    delta = attention_delta(ref_out, dout)
    refs = [ref_out, *attention_backward(dout, q, k, v, ref_lse, delta, causal=causal)]
    plain_err = _plain_errors(low, causal, refs) if dtype != torch.float64 else [0.0] * 4
    out, lse = sdpa.forward(*low[:3], causal=causal, softmax_scale=None)
    grads = sdpa.backward(low[3], *low[:3], ref_lse.to(lse.dtype), delta.to(lse.dtype),
                          causal=causal, softmax_scale=None)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    assert (out.transpose(1, 2)[empty] == 0).all() and (grads[0].transpose(1, 2)[empty] == 0).all()
    lse_err = (lse.double() - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0
    assert lse_err <= tolerance(dtype, 0.0, ref_lse[~empty].abs().max().item()), lse_err
    for name, got, ref, p_err in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, plain_err):
        assert got.dtype == lse.dtype and got.shape == ref.shape, name
        err = (got.double() - ref).abs().max().item()
        assert err <= tolerance(dtype, p_err, ref.abs().max().item()), (name, err, p_err)


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_with_global_statistics_add_up(causal):
    """The ring identity: split the keys into an early and a late block, run each with the
    global lse/delta; merged outputs and summed/concatenated gradients equal the whole."""
    low, (q, k, v, dout) = _case(2 * C, 3 * C, 6, 3, 8, torch.float32, seed=5)
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=causal)
    ref = attention_backward(dout, q, k, v, ref_lse, attention_delta(ref_out, dout), causal=causal)
    ql, kl, vl, dl = low
    cut = C  # early block fully visible to every query; late block carries the causal mask
    o1, l1 = sdpa.forward(ql, kl[:, :cut], vl[:, :cut], causal=False, softmax_scale=None)
    o2, l2 = sdpa.forward(ql, kl[:, cut:], vl[:, cut:], causal=causal, softmax_scale=None)
    out, lse = merge_partials(o1, l1, o2, l2)
    delta = attention_delta(out, dl)
    g1 = sdpa.backward(dl, ql, kl[:, :cut], vl[:, :cut], lse, delta, causal=False, softmax_scale=None)
    g2 = sdpa.backward(dl, ql, kl[:, cut:], vl[:, cut:], lse, delta, causal=causal, softmax_scale=None)
    got = [g1[0] + g2[0], torch.cat([g1[1], g2[1]], 1), torch.cat([g1[2], g2[2]], 1)]
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=2e-5)


def test_softmax_scale_fp16_and_mha():
    low, (q, k, v, dout) = _case(C, 2 * C, 2, 2, 16, torch.float16, seed=9)
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=True, softmax_scale=0.7)
    out, lse = block_forward(*low[:3], causal=True, softmax_scale=0.7, impl="sdpa")
    assert (out.double() - ref_out).abs().max() < 4e-3 and (lse.double() - ref_lse).abs().max() < 4e-3


def test_block_attention_autograd_with_sdpa():
    low, (q, k, v, dout) = _case(C, 2 * C, 4, 1, 6, torch.float32, seed=3)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    attention_with_lse(qr, kr, vr, causal=True)[0].backward(dout)
    ql, kl, vl = (t.clone().requires_grad_() for t in low[:3])
    out, lse = block_attention(ql, kl, vl, causal=True, impl="sdpa")
    out.backward(low[3])
    for got, ref in ((ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_sdpa_runs_the_fused_op_not_the_reference(monkeypatch):
    """On CPU fp32 the fused op must do the work: the reference is made to fail."""
    import tokenloom.kernels.reference as ref

    def boom(*a, **k):
        raise AssertionError("reference called")

    low, _ = _case(C, 2 * C, 2, 1, 8, torch.float32)
    monkeypatch.setattr(ref, "attention_with_lse", boom)
    monkeypatch.setattr(ref, "attention_backward", boom)
    out, lse = block_forward(*low[:3], causal=True, softmax_scale=None, impl="sdpa")
    block_backward(low[3], *low[:3], lse, attention_delta(out, low[3]), causal=True,
                   softmax_scale=None, impl="sdpa")
    calls = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(sdpa, "_op_forward", lambda *a: calls.append(1) or real(*a[:3], 0.0, a[3], scale=a[4]))
    sdpa.forward(*low[:3], causal=True, softmax_scale=None)
    assert len(calls) == 2  # the fully visible part and the causal square


def test_stand_in_out_has_the_row_sums():
    dout = rand(2, 5, 3, 7, seed=1)
    dout[0, 1, 2] = 0  # a row without gradient
    dout[1, 2, 0] *= 1e-30  # a tiny one
    delta = rand(2, 3, 5, seed=2)
    delta[0, 2, 1] = 0
    o = sdpa._stand_in_out(dout, delta)
    got = (o * dout).sum(-1).transpose(1, 2)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(got, delta, rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------------------- selector
def test_selector_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TOKENLOOM_ATTN_IMPL", raising=False)
    assert select_impl(cpu) == "sdpa"  # the CPU default
    assert select_impl(torch.device("meta")) == "torch"  # a device without a fused path
    monkeypatch.setenv("TOKENLOOM_ATTN_IMPL", "torch")
    assert select_impl(cpu) == "torch"
    assert select_impl(cpu, "sdpa") == "sdpa"  # the argument wins over the environment
    monkeypatch.setenv("TOKENLOOM_ATTN_IMPL", "")
    assert select_impl(cpu) == "sdpa"


def test_selector_errors_name_the_source(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TOKENLOOM_ATTN_IMPL", "flash")
    with pytest.raises(UsageError, match="TOKENLOOM_ATTN_IMPL must be one of torch, sdpa, triton"):
        select_impl(cpu)
    with pytest.raises(UsageError, match="impl must be one of"):
        select_impl(cpu, "cuda")
    monkeypatch.delenv("TOKENLOOM_ATTN_IMPL")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="not available here"):
            select_impl(cpu, "triton")


def test_env_var_reaches_block_attention(monkeypatch):
    """TOKENLOOM_ATTN_IMPL=torch routes around the fused op (which is made to fail)."""
    low, _ = _case(C, C, 2, 2, 4, torch.float32)
    monkeypatch.setattr(sdpa, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sdpa")))
    monkeypatch.setenv("TOKENLOOM_ATTN_IMPL", "torch")
    block_attention(*low[:3], causal=True)
    monkeypatch.setenv("TOKENLOOM_ATTN_IMPL", "sdpa")
    with pytest.raises(AssertionError, match="sdpa"):
        block_attention(*low[:3], causal=True)


# ---------------------------------------------------------------------------- CUDA (not run here)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sq,sk,causal,d", [(256, 256, True, 128), (256, 512, True, 64), (512, 256, False, 80),
                                            (128, 384, True, 96), (300, 300, False, 72)])
def test_cuda_ops_match_fp64(sq, sk, causal, d, dtype):
    low, (q, k, v, dout) = _case(sq, sk, 8, 2, d, dtype)
    low = [t.cuda() for t in low]
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=causal)
    delta = attention_delta(ref_out, dout)
    refs = [ref_out, *attention_backward(dout, q, k, v, ref_lse, delta, causal=causal)]
    plain_err = _plain_errors([t.cpu().float().to(dtype) for t in low], causal, refs)
    out, lse = sdpa.forward(*low[:3], causal=causal, softmax_scale=None)
    grads = sdpa.backward(low[3], *low[:3], ref_lse.float().cuda(), delta.float().cuda(),
                          causal=causal, softmax_scale=None)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=0, atol=tolerance(dtype, 0, 10))
    for got, ref, p in zip((out, *grads), refs, plain_err):
        err = (got.double().cpu() - ref).abs().max().item()
        assert err <= tolerance(dtype, p, ref.abs().max().item()), err


@pytest.mark.parametrize("sq,sk", [(0, 4), (4, 0), (0, 0)])
def test_empty_blocks(sq, sk):
    """Empty query or key sets never reach the CPU op (it dies with SIGFPE on them)."""
    q, k = rand(1, sq, 2, 4, seed=1, dtype=torch.float32), rand(1, sk, 2, 4, seed=2, dtype=torch.float32)
    for causal in (False, True):
        out, lse = block_forward(q, k, k, causal=causal, softmax_scale=None, impl="sdpa")
        assert out.shape == q.shape and lse.shape == (1, 2, sq) and torch.isneginf(lse).all()
        dq, dk, dv = block_backward(q, q, k, k, lse, lse, causal=causal, softmax_scale=None, impl="sdpa")
        assert dq.shape == q.shape and dk.shape == k.shape and not dk.abs().sum()


@pytest.mark.parametrize("layout", ["head_dim_strided", "broadcast_kv", "every_other_feature"])
def test_strided_inputs(layout):
    """The ops silently assume a unit stride in head_dim (wrong numbers otherwise): any view works."""
    q, dout = rand(2, 6, 2, 8, seed=1, dtype=torch.float32), rand(2, 6, 2, 8, seed=2, dtype=torch.float32)
    k = rand(2, 10, 2, 8, seed=3, dtype=torch.float32)
    if layout == "head_dim_strided":
        q, dout = (t.transpose(1, 3).contiguous().transpose(1, 3) for t in (q, dout))
    elif layout == "broadcast_kv":
        k = rand(1, 10, 1, 8, seed=3, dtype=torch.float32).expand(2, 10, 2, 8)
    else:
        q, dout, k = (rand(*t.shape[:3], 16, seed=s, dtype=torch.float32)[..., ::2] for s, t in enumerate((q, dout, k)))
    for causal in (False, True):
        out, lse = sdpa.forward(q, k, k, causal=causal, softmax_scale=None)
        ref_out, ref_lse = attention_with_lse(q, k, k, causal=causal)
        delta = attention_delta(ref_out, dout)
        got = sdpa.backward(dout, q, k, k, ref_lse, delta, causal=causal, softmax_scale=None)
        ref = attention_backward(dout, q, k, k, ref_lse, delta, causal=causal)
        for a, b in zip((out, lse, *got), (ref_out, ref_lse, *ref)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


class _FakeCudaOps:
    """CPU stand-ins for the CUDA SDPA ops with their exact schemas (names, positions, outputs):
    the plumbing around them (argument order, head_dim padding, lse padding, aux tensors) is then
    checked here although the real ops need a GPU."""

    cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def __init__(self):
        self.calls = []

    def flash(self, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        assert query.shape[-1] % 8 == 0 and dropout_p == 0.0 and not return_debug_mask
        self.calls.append("flash")
        out, lse = self.cpu_fwd(query, key, value, 0.0, is_causal, scale=scale)
        none = torch.empty(0)
        return out, lse, None, None, query.shape[2], key.shape[2], torch.empty(2), none, none

    def flash_bwd(self, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                  dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
        assert (max_q, max_k) == (query.shape[2], key.shape[2]) and cum_seq_q is None and cum_seq_k is None
        assert logsumexp.shape == query.shape[:3] and philox_seed.shape == (2,)
        self.calls.append("flash_bwd")
        return self.cpu_bwd(grad_out, query, key, value, out, logsumexp, 0.0, is_causal, scale=scale)

    def efficient(self, query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                  scale=None):
        assert attn_bias is None and compute_log_sumexp and query.shape[-1] % 8 == 0
        self.calls.append("efficient")
        out, lse = self.cpu_fwd(query, key, value, 0.0, is_causal, scale=scale)
        rows = -(-query.shape[2] // 32) * 32
        padded = torch.full(lse.shape[:2] + (rows,), 123.0)  # garbage beyond the real rows
        padded[..., :query.shape[2]] = lse
        return out, padded, torch.empty(()), torch.empty(())

    def efficient_bwd(self, grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                      dropout_p, grad_input_mask, is_causal=False, *, scale=None):
        assert logsumexp.shape[-1] % 32 == 0 and list(grad_input_mask) == [True, True, True, False]
        self.calls.append("efficient_bwd")
        lse = logsumexp[..., :query.shape[2]].contiguous()
        return (*self.cpu_bwd(grad_out_, query, key, value, out, lse, 0.0, is_causal, scale=scale), None)


@pytest.mark.parametrize("backend", ["flash", "efficient"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_plumbing_with_fake_ops(monkeypatch, backend, causal):
    from types import SimpleNamespace

    fake = _FakeCudaOps()
    monkeypatch.setattr(sdpa, "_aten", SimpleNamespace(
        _scaled_dot_product_flash_attention=fake.flash,
        _scaled_dot_product_flash_attention_backward=fake.flash_bwd,
        _scaled_dot_product_efficient_attention=fake.efficient,
        _scaled_dot_product_efficient_attention_backward=fake.efficient_bwd))
    sdpa._cuda_aux.cache_clear()
    low, (q, k, v, dout) = _case(C, C, 2, 2, 5, torch.float32, seed=11)  # head_dim 5: padded to 8
    qh, kh, vh, dh = (t.transpose(1, 2) for t in low)
    out, lse = sdpa._cuda_forward(backend, qh, kh, vh, causal, 0.4)
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=causal, softmax_scale=0.4)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    delta = attention_delta(ref_out, dout)
    stand_in = sdpa._stand_in_out(low[3], delta.float()).transpose(1, 2)
    grads = sdpa._cuda_backward(backend, dh, qh, kh, vh, stand_in, ref_lse.float(), causal, 0.4)
    refs = attention_backward(dout, q, k, v, ref_lse, delta, causal=causal, softmax_scale=0.4)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.transpose(1, 2).double(), r, rtol=0, atol=1e-5)
    assert fake.calls[0] == backend and fake.calls[-1] == f"{backend}_bwd"
    sdpa._cuda_aux.cache_clear()
