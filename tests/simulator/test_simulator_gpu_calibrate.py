"""``simulate calibrate --device cuda``: the fit recovers a known curve (CPU), the command refuses
cleanly without CUDA, and on a GPU it measures and fits (gpu-marked)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tokenloom.cli import main
from tokenloom.simulator.calibrate_gpu import SEQS, fit_curve, predicted_tflops
from tokenloom.simulator.hardware import CATALOG

torch = pytest.importorskip("torch")


def test_fit_recovers_a_known_curve():
    truth = replace(CATALOG["h100-sxm"].device, attn_eff_fwd=0.45, attn_kv_half=120.0, attn_eff_bwd=0.3,
                    attn_kv_half_bwd=250.0, attn_kv_half_causal=400.0, attn_causal_eff=0.85)
    rows = [(p, c, s, predicted_tflops(truth, s, c, p == "bwd")) for p in ("fwd", "bwd") for c in (False, True)
            for s in SEQS]
    start = replace(truth, attn_eff_fwd=0.3, attn_kv_half=10.0, attn_eff_bwd=0.5, attn_kv_half_bwd=10.0,
                    attn_kv_half_causal=10.0, attn_causal_eff=1.0)
    fitted, worst = fit_curve(start, rows)
    assert worst < 0.03
    # the grid is a quarter octave apart: 120 -> 128, 250 -> 256, 400 -> 406 (or a neighbour)
    assert fitted.attn_kv_half == pytest.approx(120, rel=0.2) and fitted.attn_kv_half_bwd == pytest.approx(250, rel=0.2)
    assert fitted.attn_causal_eff == pytest.approx(0.85, rel=0.05)
    assert fitted.attn_eff_fwd == pytest.approx(0.45, rel=0.05)


# Measured on one NVIDIA H200 with `tokenloom simulate calibrate --device cuda` (block_attention sdpa,
# bf16, batch x seq = 16K, 16 heads x 128; 2026-12-04): TFLOP/s by sequence length; GEMM peak 800.
H200_MEASURED = {
    ("fwd", False): (69.5, 118.7, 179.4, 239.5, 288.7, 322.0),
    ("bwd", False): (50.4, 88.4, 137.7, 192.3, 238.8, 268.7),
    ("fwd", True): (36.7, 65.6, 112.9, 166.8, 220.3, 265.4),
    ("bwd", True): (27.4, 50.6, 86.8, 137.2, 187.8, 242.8),
}


def test_fit_matches_the_rows_measured_on_an_h200():
    """The grid stopped at 400 keys and reported a 245% worst error on these rows; they follow
    eff * s / (s + h) with h ~ 2K keys (hand check: fwd full 322 / 288.7 at 16K / 8K = 1.115, and
    (16384 / 18432) / (8192 / 10240) = 1.111)."""
    rows = [(p, c, s, t) for (p, c), ts in H200_MEASURED.items() for s, t in zip(SEQS, ts)]
    start = replace(CATALOG["h200-sxm"].device, flops=800e12)
    fitted, worst = fit_curve(start, rows)
    assert worst < 0.10
    assert 1400 <= fitted.attn_kv_half <= 3000 and 0.40 <= fitted.attn_eff_fwd <= 0.50


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_calibration_without_cuda_is_refused(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["simulate", "calibrate", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.gpu
def test_cuda_calibration_measures_and_fits(tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "gpu.json"
    assert main(["simulate", "calibrate", "--device", "cuda", "--quick", "--out", str(out), "--json"]) == 0
    entry = json.loads(out.read_text())["this-gpu"]
    assert entry["measured"]["fit_worst_rel_error"] < 0.25 and entry["device"]["flops"] > 1e12
    assert main(["simulate", "attention", "--hardware-file", str(out), "--hardware", "this-gpu", "--gpus", "1",
                 "--seq", "8K", "--heads", "16", "--head-dim", "128", "--causal", "--json"]) == 0


def test_profile_report_includes_the_gemm_curve_fitted_to_its_shapes():
    from tokenloom.simulator.calibrate_gpu import GEMM_SHAPES, GEMM_TOKENS, format_profile
    from tokenloom.simulator.gemm import TIMED_CALL_S, fit_gemm_curve, gemm_seconds

    dev = CATALOG["h100-sxm"].device
    shapes = [(m, n, k, 2.0 * m * n * k / gemm_seconds(dev, m, n, k, call_s=TIMED_CALL_S) / 1e12)
              for k, n in GEMM_SHAPES for m in GEMM_TOKENS]
    fit, worst = fit_gemm_curve(dev, shapes)  # rows made by the model itself: recovered exactly
    assert worst < 1e-9 and fit["eff"] == 0.88 and fit["tile"] == (64, 128)
    entry = {"device": {"attn_eff_fwd": 0.4, "attn_kv_half": 2048, "attn_eff_bwd": 0.3, "attn_kv_half_bwd": 2048,
                        "attn_causal_eff": 1.0, "attn_kv_half_causal": 4096},
             "measured": {"gpu": "test", "gemm_tflops": {"8192": 800.0}, "hbm_gbs": 4190.0, "attention_tflops": [],
                          "fit_worst_rel_error": 0.05,
                          "gemm_shapes": [{"m": m, "n": n, "k": k, "tflops": t} for m, n, k, t in shapes],
                          "gemm_curve": {**fit, "tile": list(fit["tile"]), "worst_rel_error": worst}}}
    assert "GEMM curve (simulator/gemm.py form): eff 0.88" in format_profile(entry)
