"""residual_rmsnorm (the torch path and the selector) against fp64."""

import pytest
import torch

from tokenloom.common.errors import UsageError
from tokenloom.kernels import residual_rmsnorm, select_norm_impl


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_fp64(dtype):
    x, r, w = rand(2, 7, 48, seed=1, dtype=dtype), rand(2, 7, 48, seed=2, dtype=dtype), rand(48, seed=3)
    normed, new_r = residual_rmsnorm(x, r, w, 1e-5, impl="torch")
    assert normed.dtype == new_r.dtype == dtype and normed.shape == new_r.shape == x.shape
    s = x.double() + r.double()
    # the sum is formed in fp32 (fp64 for fp64) and rounded once to x's dtype
    assert torch.equal(new_r, s.to(dtype)) if dtype != torch.float64 else torch.equal(new_r, s)
    stored = new_r.double()
    truth = stored * torch.rsqrt(stored.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert (normed.double() - truth).abs().max().item() <= 2 * ulp


def test_fp32_sum_beats_a_half_precision_sum():
    """bf16 x + residual summed in bf16 loses what the fp32 sum keeps (the test can tell them apart)."""
    x = torch.full((1, 4), 256.0, dtype=torch.bfloat16)
    r = torch.tensor([[0.5, 0.75, 1.5, 2.5]], dtype=torch.bfloat16)
    _, new_r = residual_rmsnorm(x, r, torch.ones(4), impl="torch")
    assert torch.equal(new_r, (x.float() + r.float()).bfloat16())


def test_without_residual_returns_x():
    x, w = rand(3, 16, seed=1), rand(16, seed=2)
    normed, new_r = residual_rmsnorm(x, None, w)
    assert new_r is x
    truth = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(normed.double(), truth, rtol=0, atol=1e-5)


def test_bad_arguments_name_the_field():
    x = torch.zeros(2, 8)
    with pytest.raises(UsageError, match="weight must be 1-D of size hidden=8"):
        residual_rmsnorm(x, None, torch.ones(7))
    with pytest.raises(UsageError, match="residual must have x's shape"):
        residual_rmsnorm(x, torch.zeros(2, 7), torch.ones(8))
    with pytest.raises(UsageError, match="eps must be > 0"):
        residual_rmsnorm(x, None, torch.ones(8), eps=0.0)


def test_norm_selector(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TOKENLOOM_NORM_IMPL", raising=False)
    assert select_norm_impl(cpu) == "torch"
    monkeypatch.setenv("TOKENLOOM_NORM_IMPL", "sdpa")
    with pytest.raises(UsageError, match="TOKENLOOM_NORM_IMPL must be one of torch, triton"):
        select_norm_impl(cpu)
    assert select_norm_impl(cpu, "torch") == "torch"
