"""GEMM time by shape (simulator/gemm.py): wave quantisation, the per-tile fixed cost against K,
SMs lent to communication, hand-computed; and the fitted curve against the H200 rows."""

from __future__ import annotations

import math

import pytest

from tokenloom.simulator.gemm import GEMM_EFF, GEMM_K_HALF, TIMED_CALL_S, gemm_efficiency, gemm_seconds
from tokenloom.simulator.hardware import CATALOG
from tokenloom.simulator.validate import load_rows, validate

H100 = CATALOG["h100-sxm"].device  # 132 SMs, 989 TFLOP/s


def test_full_waves_long_k_reach_the_fitted_efficiency():
    # 64 x 128 tiles: M = 64 * 11, N = 128 * 12 -> exactly 132 tiles, one full wave (compute-bound)
    m, n, k = 64 * 11, 128 * 12, 16384
    assert gemm_efficiency(m, n, k, 132) == pytest.approx(GEMM_EFF * k / (k + GEMM_K_HALF), rel=1e-12)
    t = gemm_seconds(H100, m, n, k)
    assert t == pytest.approx(H100.launch_s + 2 * m * n * k / (H100.flops * GEMM_EFF * k / (k + GEMM_K_HALF)),
                              rel=1e-12)


def test_one_tile_more_than_the_sms_costs_a_second_wave():
    k = 8192  # 132 = 11 x 12 tiles, 133 = 7 x 19 tiles, each tile 64 x 128 x k
    full = gemm_seconds(H100, 64 * 11, 128 * 12, k) - H100.launch_s
    plus = gemm_seconds(H100, 64 * 7, 128 * 19, k) - H100.launch_s
    assert plus == pytest.approx(2 * full, rel=1e-12)


def test_short_k_pays_the_per_tile_fixed_cost():
    # the O projection under TP 8 (K = 1024) vs a K = 8192 GEMM of the same output
    ratio = gemm_efficiency(8192, 8192, 1024, 132) / gemm_efficiency(8192, 8192, 8192, 132)
    assert ratio == pytest.approx((1024 / (1024 + 256)) / (8192 / (8192 + 256)), rel=1e-12)


def test_sms_lent_to_communication_add_waves():
    # 264 tiles: 2 waves on 132 SMs, 3 on 124 (8 SMs held by a communication kernel)
    m, n, k = 64 * 12, 128 * 22, 8192
    all_sms = gemm_seconds(H100, m, n, k) - H100.launch_s
    lent = gemm_seconds(H100, m, n, k, sms=124) - H100.launch_s
    assert lent / all_sms == pytest.approx(3 / 2, rel=1e-12)


def test_a_small_gemm_is_memory_bound():
    m, n, k = 1, 8192, 8192
    t = gemm_seconds(H100, m, n, k)
    assert t == pytest.approx(H100.launch_s + (m * k + k * n + m * n) * 2 / H100.hbm_bw, rel=1e-12)


def test_the_curve_fits_the_measured_h200_rows():
    ids = {r["id"] for r in load_rows() if r["id"].startswith("h200-gemm-")}
    assert len(ids) == 44
    got = [r for r in validate()["results"] if r["id"] in ids]
    errors = sorted(abs(r["rel_error"]) for r in got)
    assert errors[-1] < 0.17 and errors[len(errors) // 2] < 0.08  # fitted: 16.5 %, 7.5 %
    # as timed, one call includes the host's dispatch: a kernel queued behind others pays launch_s
    dev = CATALOG["h200-sxm"].device
    assert gemm_seconds(dev, 128, 1280, 8192, call_s=TIMED_CALL_S) - gemm_seconds(dev, 128, 1280, 8192) == \
        pytest.approx(TIMED_CALL_S - dev.launch_s)
    assert not math.isnan(errors[0])


def test_the_committed_constants_are_what_the_fit_finds_on_the_rows():
    from tokenloom.simulator.gemm import GEMM_TILE, fit_gemm_curve

    rows = [(r["m"], r["n"], r["k"], r["published"]) for r in load_rows() if r["id"].startswith("h200-gemm-")]
    fit, worst = fit_gemm_curve(CATALOG["h200-sxm"].device, rows)
    assert (fit["eff"], fit["k_half"], fit["tile"]) == (GEMM_EFF, GEMM_K_HALF, GEMM_TILE)
    assert fit["call_s"] == pytest.approx(TIMED_CALL_S) and worst < 0.17
