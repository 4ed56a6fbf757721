"""Simulator scenario invariants and the `simulate tokenweave` command."""

import dataclasses
import json

import pytest

from tokenloom.cli import main
from tokenloom.parallel.tokenweave_split import LayerShape
from tokenloom.simulator.hardware import CATALOG, Cluster, make_cluster
from tokenloom.simulator.tokenweave import MODELS, model_shape, simulate_tokenweave

H100 = make_cluster("h100-sxm", 8)


def _with_link(scale: float, latency_scale: float = 1.0) -> Cluster:
    node = CATALOG["h100-sxm"]
    link = dataclasses.replace(node.link, bw=node.link.bw * scale, latency_s=node.link.latency_s * latency_scale)
    return Cluster(dataclasses.replace(node, link=link), 8)


@pytest.mark.parametrize("model", list(MODELS))
def test_no_comm_is_a_lower_bound(model):
    layer, _ = model_shape(model, 8)
    for tokens in (100, 1024, 3000, 8192, 40000):
        s = simulate_tokenweave(H100, layer, tokens, num_layers=3).summary()
        assert s["no_comm_ms"] <= s["tokenweave_ms"] + 1e-12
        assert s["no_comm_ms"] <= s["baseline_ms"] + 1e-12
        assert (s["naive_split_ms"] is None) == (s["split"]["mode"] != "split")
        assert s["naive_split_ms"] is None or s["no_comm_ms"] <= s["naive_split_ms"]


def test_tokenweave_can_beat_the_baseline_without_communication():
    """The paper's observation: with the norm on 1/TP of the rows, TokenWeave can be faster than
    the baseline whose AllReduces cost nothing (but which still normalises every row)."""
    layer, _ = model_shape("llama-3.3-70b", 8)
    s = simulate_tokenweave(H100, layer, 8192, num_layers=3).summary()
    assert s["no_comm_ms"] <= s["no_comm_norm_ms"] <= s["baseline_ms"]
    assert s["tokenweave_ms"] < s["no_comm_norm_ms"]


def test_monotone_in_link_bandwidth():
    layer, _ = model_shape("llama-3.3-70b", 8)
    prev = None
    for scale in (0.25, 0.5, 1.0, 2.0, 8.0):
        s = simulate_tokenweave(_with_link(scale), layer, 8192, num_layers=3).summary()
        if prev is not None:
            assert s["baseline_ms"] <= prev["baseline_ms"] and s["tokenweave_ms"] <= prev["tokenweave_ms"]
            assert s["no_comm_ms"] == pytest.approx(prev["no_comm_ms"])
        prev = s


def test_speedup_falls_to_one_as_communication_vanishes():
    layer, _ = model_shape("llama-3.3-70b", 8)
    # Free links: TokenWeave costs its compute on the SMs the comm kernel leaves (the split's wave
    # penalty, 124 of 132 SMs for attention too); the baseline pays its full-row RMSNorms.
    s = simulate_tokenweave(_with_link(1e6, 0.0), layer, 8192, num_layers=3).summary()
    assert s["tokenweave_exposed_comm_ms"] < 1e-3
    assert s["tokenweave_ms"] <= s["no_comm_ms"] * (1 + s["split"]["gemm_penalty"] + 0.05)
    assert 0.95 <= s["speedup"] <= 1.15
    # Long prompts: attention grows as n^2, communication as n, the gain shrinks towards 1.
    speedups = [simulate_tokenweave(H100, layer, n, num_layers=2).summary()["speedup"]
                for n in (8192, 65536, 262144)]
    assert speedups[0] > speedups[1] > speedups[2] and abs(speedups[2] - 1) < 0.1
    # One GPU: nothing to communicate, both modes are the same layer.
    one = simulate_tokenweave(make_cluster("h100-sxm", 1), dataclasses.replace(layer, tp=1), 8192)
    assert one.summary()["speedup"] == pytest.approx(1.0)


def test_split_modes_follow_the_planner():
    dense, _ = model_shape("llama-3.1-8b", 8)
    moe, _ = model_shape("mixtral-8x22b", 8)
    assert simulate_tokenweave(H100, dense, 1024).plan.mode == "split"
    assert simulate_tokenweave(H100, moe, 1024).plan.mode == "fuse-only"
    s = simulate_tokenweave(make_cluster("a100-sxm", 8), dense, 4096).summary()
    assert s["comm_path"] == "nccl" and s["speedup"] > 1


def test_cli_json_and_outputs(tmp_path, capsys):
    trace, png = tmp_path / "t.json", tmp_path / "g.png"
    rc = main(["simulate", "tokenweave", "--hardware", "h100-sxm", "--tp", "8", "--tokens", "4K",
               "--model", "llama-3.1-8b", "--layers", "2", "--json", "--chrome-trace", str(trace),
               "--png", str(png)])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("baseline_ms", "tokenweave_ms", "no_comm_ms", "speedup", "split"):
        assert key in s
    assert s["split"]["mode"] == "split" and s["layers"] == 2
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "comm" for e in events) and png.stat().st_size > 1000


@pytest.mark.parametrize("argv, field", [
    (["--tokens", "8", "--model", "gpt-5"], "--model"),
    (["--tokens", "0", "--model", "llama-3.1-8b"], "--tokens"),
    (["--tokens", "8", "--hidden", "100", "--heads", "8", "--ffn", "64"], "hidden"),
    (["--tokens", "8", "--hidden", "96", "--heads", "12", "--ffn", "64"], "heads"),
    (["--tokens", "8"], "--model"),
    (["--tokens", "8", "--model", "llama-3.1-8b", "--tp", "16"], "--tp"),
])
def test_cli_bad_input_exit_2(argv, field, capsys):
    with pytest.raises(SystemExit) if "0" in argv else _nothing():
        rc = main(["simulate", "tokenweave", "--tp", "8", *argv])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert field in err[-1]


def test_cli_refuses_a_device_as_output(capsys):
    assert main(["simulate", "tokenweave", "--tp", "8", "--tokens", "8", "--model", "llama-3.1-8b",
                 "--chrome-trace", "/dev/null"]) == 2
    assert "--chrome-trace" in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_custom_layer_shape_is_used():
    layer = LayerShape(5120, 13824, 40, 8, 4)
    s = simulate_tokenweave(make_cluster("h100-sxm", 4), layer, 16384).summary()
    assert s["hidden"] == 5120 and s["tp"] == 4


def test_auto_comm_ctas_is_the_best_fixed_count():
    layer, _ = model_shape("llama-3.1-8b", 8)
    for tokens in (4096, 262144):
        auto = simulate_tokenweave(H100, layer, tokens, num_layers=2, comm_ctas="auto")
        fixed = [simulate_tokenweave(H100, layer, tokens, num_layers=2, comm_ctas=k) for k in (2, 4, 8, 16)]
        assert auto.modes["tokenweave"].total_s == min(r.modes["tokenweave"].total_s for r in fixed)
    # long prompts: lending fewer SMs to communication that hides anyway keeps TokenWeave ahead
    assert auto.comm_ctas < 8 and auto.summary()["speedup"] > 1


def test_prefill_attention_priced_at_the_causal_curve_of_the_calibration_rows():
    """TokenWeave's causal prefill attention uses the device's causal curve, as the attention engine
    does (H100: FlashAttention-2 causal, 333 TFLOP/s at 8K keys in the calibration set): at 8192 keys
    0.39 x 8192 / (8192 + 300) x 0.92 of 989 TFLOP/s = 339 TFLOP/s, not the flat 0.39 (386)."""
    from tokenloom.simulator.tokenweave import Pricer, causal_shape_eff

    h100 = CATALOG["h100-sxm"].device
    assert causal_shape_eff(h100, 8192, 128) == pytest.approx(8192 / 8492 * 0.92)
    assert causal_shape_eff(h100, 8192, 64) == pytest.approx(8192 / 8492 * 0.92 * 0.88)
    assert causal_shape_eff(CATALOG["mi300x"].device, 8192, 128) == 1.0  # no curve: flat
    layer, _ = model_shape("llama-3.3-70b", 8)
    pricer = Pricer(make_cluster("h100-sxm", 8), layer, 8192)
    flops = 2.0 * 8 * 128 * 8192 ** 2  # 8 heads per GPU, causal
    tiles = 64 * 8  # 128-row query tiles x heads: 512 tiles on 132 SMs = 4 waves
    eff = 0.39 * 8192 / 8492 * 0.92
    expected = h100.launch_s + flops * 4 * 132 / (989e12 * eff * tiles)
    assert pricer.attention_s(0, 8192, False) == pytest.approx(expected)
