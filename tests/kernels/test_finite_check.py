"""The finiteness check that sends a block down the exact path: one sum per tensor, one sync.

A sum is finite exactly when every term is, except that finite terms may overflow: then the check
says False and the block runs the exact path, which must still give the right answer.
"""

import pytest
import torch

from tokenloom.kernels import block_forward
from tokenloom.kernels.masks import all_finite, lse_ok
from tokenloom.kernels.reference import attention_with_lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_nonfinite_element_is_caught(dtype, bad):
    x = torch.randn(64, 3, dtype=dtype)
    assert all_finite(x, None, torch.randn(5))
    for at in (0, 77, 191):
        y = x.clone()
        y.view(-1)[at] = bad
        assert not all_finite(x, y)
    both = torch.tensor([float("inf"), 1.0, float("-inf")], dtype=dtype)  # inf - inf: nan, still caught
    assert not all_finite(both)


def test_empty_and_none():
    assert all_finite()
    assert all_finite(None, torch.empty(0, 4))
    assert lse_ok(torch.empty(0))


def test_lse_allows_neg_inf_only():
    assert lse_ok(torch.tensor([0.0, float("-inf"), 3.0]))
    assert lse_ok(torch.full((4,), float("-inf")))
    for bad in ([0.0, float("nan")], [float("inf"), 1.0], [float("-inf"), float("inf")], [float("nan"), float("-inf")]):
        assert not lse_ok(torch.tensor(bad))


def test_overflowing_sum_of_finite_values_still_gives_the_exact_answer():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float32) for _ in range(2))
    v = torch.full((1, 8, 2, 4), 3e37, dtype=torch.float32)  # finite; their sum overflows fp32
    v[..., 1] = -1e37
    assert not all_finite(v)  # a false alarm by design: the exact path runs
    out, lse = block_forward(q, k, v, causal=True, softmax_scale=None)
    ref_out, ref_lse = attention_with_lse(q.double(), k.double(), v.double(), causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=0)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
