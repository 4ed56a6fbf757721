"""kernels.reference against independent fp64 computations (explicit softmax + autograd)."""

import math

import pytest
import torch

from tokenloom.kernels import block_attention
from tokenloom.kernels.reference import (
    attention_backward,
    attention_delta,
    attention_with_lse,
    merge_partials,
)


def naive(q, k, v, causal, scale=None):
    """Textbook attention in fp64 with explicit GQA expansion and a bottom-right causal mask."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(sk).unsqueeze(0)
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,hq,hkv,d", [(7, 7, 4, 4, 5), (6, 11, 4, 2, 3), (300, 300, 2, 1, 8),
                                            (130, 200, 3, 3, 4)])
def test_forward_matches_naive(causal, sq, sk, hq, hkv, d):
    q, k, v = rand(2, sq, hq, d, seed=1), rand(2, sk, hkv, d, seed=2), rand(2, sk, hkv, d, seed=3)
    out, lse = attention_with_lse(q, k, v, causal=causal)
    ref_out, ref_lse = naive(q, k, v, causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_tiling_and_causal_skipping_are_exact(monkeypatch):
    """Many query tiles (each seeing a key prefix) give the same result as one big tile."""
    import tokenloom.kernels.reference as ref

    q, k, v = rand(1, 131, 2, 4, seed=1), rand(1, 131, 2, 4, seed=2), rand(1, 131, 2, 4, seed=3)
    whole = attention_with_lse(q, k, v, causal=True)
    monkeypatch.setattr(ref, "_MAX_SCORE_ELEMS", 2 * 131 * 3)  # 3-row tiles
    tiled = attention_with_lse(q, k, v, causal=True)
    torch.testing.assert_close(tiled, whole, rtol=1e-13, atol=1e-13)


def test_softmax_scale_and_rows_without_keys():
    q, k, v = rand(1, 6, 2, 4, seed=1), rand(1, 3, 2, 4, seed=2), rand(1, 3, 2, 4, seed=3)
    out, lse = attention_with_lse(q, k, v, causal=True, softmax_scale=0.3)
    ref_out, ref_lse = naive(q, k, v, True, scale=0.3)
    # bottom-right alignment: the first 3 of 6 queries see no key
    assert torch.isneginf(lse[..., :3]).all() and (out[:, :3] == 0).all()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse[..., 3:], ref_lse[..., 3:])


@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_autograd(causal):
    q, k, v = (rand(2, 9, 4, 6, seed=s).requires_grad_() for s in (1, 2, 3))
    k2, v2 = (rand(2, 9, 2, 6, seed=s).requires_grad_() for s in (4, 5))
    dout = rand(2, 9, 4, 6, seed=7)
    ref_out, _ = naive(q, k2, v2, causal)
    ref_out.backward(dout)
    out, lse = attention_with_lse(q.detach(), k2.detach(), v2.detach(), causal=causal)
    dq, dk, dv = attention_backward(dout, q.detach(), k2.detach(), v2.detach(), lse,
                                    attention_delta(out, dout), causal=causal)
    for got, want in ((dq, q.grad), (dk, k2.grad), (dv, v2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_block_attention_is_differentiable_and_matches_naive():
    q, k, v = (rand(1, 9, 2, 3, seed=s).requires_grad_() for s in (1, 2, 3))
    out, lse = block_attention(q, k, v, causal=True)
    assert not lse.requires_grad
    assert torch.autograd.gradcheck(lambda a, b, c: block_attention(a, b, c, causal=True)[0],
                                    (q, k, v), eps=1e-6, atol=1e-6)


def test_merge_equals_attention_over_concatenated_keys():
    q = rand(2, 5, 3, 4, seed=1)
    k, v = rand(2, 12, 3, 4, seed=2), rand(2, 12, 3, 4, seed=3)
    o1, l1 = attention_with_lse(q, k[:, :7], v[:, :7])
    o2, l2 = attention_with_lse(q, k[:, 7:], v[:, 7:])
    out, lse = merge_partials(o1, l1, o2, l2)
    ref_out, ref_lse = naive(q, k, v, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_merge_with_empty_sides_has_no_nan():
    o = rand(1, 4, 2, 3, seed=1)
    lse = rand(1, 2, 4, seed=2)
    empty_o = torch.zeros_like(o)
    empty_l = torch.full_like(lse, float("-inf"))
    out, l_out = merge_partials(o, lse, empty_o, empty_l)  # empty side changes nothing
    assert torch.equal(out, o) and torch.equal(l_out, lse)
    out, l_out = merge_partials(empty_o, empty_l, o, lse)
    assert torch.equal(out, o) and torch.equal(l_out, lse)
    out, l_out = merge_partials(empty_o, empty_l, empty_o, empty_l)  # both empty stay empty
    assert torch.equal(out, empty_o) and torch.isneginf(l_out).all()


def test_merge_with_huge_logits_is_stable():
    """lse near 1e4 in fp32: exp() of it overflows, the sigmoid form must not."""
    q = rand(1, 3, 1, 4, seed=1, dtype=torch.float32) * 3000
    k, v = rand(1, 8, 1, 4, seed=2, dtype=torch.float32), rand(1, 8, 1, 4, seed=3, dtype=torch.float32)
    o1, l1 = attention_with_lse(q, k[:, :4], v[:, :4])
    o2, l2 = attention_with_lse(q, k[:, 4:], v[:, 4:])
    assert l1.abs().max() > 1000
    out, lse = merge_partials(o1, l1, o2, l2)
    ref_out, ref_lse = naive(q.double(), k.double(), v.double(), False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-2)


def test_shape_errors_name_the_tensor():
    with pytest.raises(ValueError, match="heads of q"):
        attention_with_lse(rand(1, 4, 3, 2), rand(1, 4, 2, 2), rand(1, 4, 2, 2))
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention_with_lse(rand(4, 3, 2), rand(1, 4, 3, 2), rand(1, 4, 3, 2))
