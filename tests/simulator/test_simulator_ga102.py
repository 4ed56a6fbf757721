"""The A10's attention curve comes from FlashAttention-2 on an RTX A5000 (same GA102 die, 64 of its
72 SMs at the same clock; gpu-mode/ring-attention#10): rerun the fit on the calibration rows and price
an A10 kernel by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokenloom.simulator.calibrate_gpu import fit_curve, predicted_tflops
from tokenloom.simulator.hardware import CATALOG
from tokenloom.simulator.validate import a5000, load_rows


def _rows() -> list[tuple[str, bool, int, float]]:
    return [(r["pass"], r["causal"], r["seq"], r["published"]) for r in load_rows() if r["hardware"] == "rtx-a5000"]


def test_a5000_is_the_a10_die_with_fewer_sms():
    a10, a5k = CATALOG["a10-pcie"].device, a5000().device
    assert a5k.flops / a5k.sms == pytest.approx(a10.flops / a10.sms, rel=1e-3)  # 1695 MHz both
    assert (a5k.attn_eff_fwd, a5k.attn_kv_half_bwd) == (a10.attn_eff_fwd, a10.attn_kv_half_bwd)


def test_fit_on_the_a5000_rows_gives_the_committed_a10_curve():
    rows = _rows()
    assert len(rows) == 10
    start = replace(a5000().device, attn_eff_fwd=0.5, attn_eff_bwd=0.4, attn_kv_half=0.0, attn_kv_half_bwd=0.0)
    dev, worst = fit_curve(start, rows, head_dim=64)
    a10 = CATALOG["a10-pcie"].device
    assert worst < 0.03
    assert (dev.attn_kv_half, dev.attn_kv_half_bwd) == (a10.attn_kv_half, a10.attn_kv_half_bwd)
    assert dev.attn_eff_fwd == pytest.approx(a10.attn_eff_fwd, abs=0.005)
    assert dev.attn_eff_bwd == pytest.approx(a10.attn_eff_bwd, abs=0.005)


def test_a10_forward_priced_by_hand():
    # 8K keys, head dim 128 (HEAD_DIM_EFF 1): 125 TFLOP/s x 0.86 x 8192 / (8192 + 8), times the wave
    # fill of 64 row tiles x 16 heads x batch 2 = 2048 tiles on 72 SMs: 2048 / (29 x 72); plus 8 us launch
    dev = CATALOG["a10-pcie"].device
    rate = 125e12 * 0.86 * 8192 / (8192 + 8) * 2048 / (29 * 72)
    flops = 4.0 * 2 * 8192 ** 2 * 16 * 128
    assert predicted_tflops(dev, 8192, False, False, 128) == pytest.approx(flops / (8e-6 + flops / rate) / 1e12)
