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
    assert fitted.attn_kv_half == 120 and fitted.attn_kv_half_bwd == 250 and fitted.attn_causal_eff == 0.85
    assert fitted.attn_eff_fwd == pytest.approx(0.45, rel=0.03)


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
