"""The calibration set and ``simulate validate``: rows cite sources, predictions follow the model's
formulas (checked by hand here), and the fitted catalog keeps every row within +-15% except the
ones docs/calibration.md reports as off."""

from __future__ import annotations

import json
import math

import pytest

from tokenloom.cli import main
from tokenloom.common.errors import UsageError
from tokenloom.simulator import collectives
from tokenloom.simulator.cost import AttentionShape, CostModel, head_dim_efficiency
from tokenloom.simulator.hardware import CATALOG, Cluster, Device, Link, NodeSpec, load_hardware_file, make_cluster
from tokenloom.simulator.validate import GOAL, load_rows, predict, validate

# docs/calibration.md: one user-reported A100 figure (not fitted); DeepEP's EP32 'logical' bandwidth;
# two of the 44 H200 GEMM shapes the curve was fitted to (worst -16.5 % / +16.3 %); A40 peer copies
# across sockets (no socket-to-socket link in the model) and staged through host memory both ways at once
KNOWN_OFF = {"a100-ar-8", "h800-deepep-dispatch-ep32", "h800-deepep-combine-ep32", "h200-gemm-qkv-128",
             "h200-gemm-down-16384", "a40-copy-p2p-bidir-cross-socket", "a40-copy-nop2p-bidir"}


def test_every_row_cites_a_source_and_has_a_unit():
    rows = load_rows()
    assert len({r["id"] for r in rows}) == len(rows) >= 60
    for r in rows:
        assert r["source"].strip() and r["unit"].strip() and r["published"] > 0, r["id"]


def test_ring_busbw_is_the_alpha_beta_formula():
    node = CATALOG["h100-sxm"]
    nbytes, n = 4 << 30, 8
    # one message latency per call (NCCL pipelines the ring's steps), then 2(n-1) steps of bytes/n
    t = node.link.latency_s + 2 * (n - 1) * nbytes / n / (node.link.bw * node.link.efficiency)
    assert collectives.busbw(node, "allreduce", nbytes, n) == pytest.approx(nbytes / t * 2 * (n - 1) / n, rel=1e-12)
    t_ag = node.link.latency_s + (n - 1) * nbytes / n / node.link.rate
    assert collectives.busbw(node, "allgather", nbytes, n) == pytest.approx(nbytes / t_ag * (n - 1) / n, rel=1e-12)


def test_small_messages_cost_the_calibrated_latencies():
    """Per-message latency from small-message rows (nccl#1984: 1 KB sendrecv 3.7 us on H800's
    NVSwitch; nccl#1259: NVLS AllReduce ~6 us on 2 x H100), not a guess."""
    h100 = CATALOG["h100-sxm"]
    assert h100.link.latency_s == CATALOG["h200-sxm"].link.latency_s == pytest.approx(3.7e-6)
    assert collectives.op_time(h100, "sendrecv", 8, 2) == pytest.approx(3.7e-6 + 8 / h100.link.rate)
    assert collectives.op_time(h100, "allreduce", 128, 2, "nvls") == pytest.approx(6e-6 + 128 / 270e9)
    # a 4-rank ring AllReduce of 1 KB: one latency plus 6 steps of 256 B
    assert collectives.op_time(h100, "allreduce", 1024, 4) == pytest.approx(3.7e-6 + 6 * 256 / h100.link.rate)
    for r in validate()["results"]:
        if r["unit"] == "us":
            assert abs(r["rel_error"]) < 0.1, r["id"]


def test_nvls_only_where_it_beats_the_ring_and_only_on_nvswitch_3():
    h100, a100 = CATALOG["h100-sxm"], CATALOG["a100-sxm"]
    big = 4 << 30
    assert collectives.busbw(h100, "allreduce", big, 8, "auto") > collectives.busbw(h100, "allreduce", big, 8) * 1.2
    assert collectives.busbw(h100, "allreduce", big, 2, "auto") == collectives.busbw(h100, "allreduce", big, 2)
    assert collectives.nvls_time(a100, big, 8) is None
    with pytest.raises(UsageError, match="op"):
        collectives.ring_time(h100, "broadcast", big, 8)


def test_attention_row_is_the_cost_models_kernel_time():
    row = next(r for r in load_rows() if r["id"] == "h100-fa2-fwd-causal-d128-s2048")
    dev = CATALOG["h100-sxm"].device
    s, b, h, d = row["seq"], row["batch"], row["heads"], row["head_dim"]
    flops = 4 * b * s * s * h * d * 0.5
    tiles = math.ceil(s / 128) * h * b
    util = tiles / (math.ceil(tiles / dev.sms) * dev.sms)
    eff = dev.attn_eff_fwd * s / (s + dev.attn_kv_half_causal) * dev.attn_causal_eff
    seconds = dev.launch_s + max(flops / (dev.flops * eff * util), 2 * 2 * s * h * d * 2 * b / dev.hbm_bw)
    assert predict(row) == pytest.approx(flops / seconds / 1e12, rel=1e-9)


def test_shape_efficiency_saturates_and_a_flat_device_stays_flat():
    cost = CostModel(AttentionShape(1 << 16, 16, 128), make_cluster("h100-sxm", 1), "contiguous")
    effs = [cost.shape_efficiency(kv, False, False) for kv in (128, 512, 4096, 1 << 20)]
    assert effs == sorted(effs) and effs[-1] == pytest.approx(1.0, abs=1e-3)
    assert cost.shape_efficiency(4096, True, False) < cost.shape_efficiency(4096, False, False)
    flat = Device("flat", 8, 1e12, 1e12, 0.5, 0.5)
    node = NodeSpec("flat", flat, 1, "switch", link=Link(1e9, 1e-6), nic=Link(1e9, 1e-6))
    assert CostModel(AttentionShape(1024, 4, 64), Cluster(node, 1), "contiguous").shape_efficiency(64, True, True) == 1.0
    assert head_dim_efficiency(128) == 1.0 and head_dim_efficiency(64) == head_dim_efficiency(32) == 0.88
    assert 0.88 < head_dim_efficiency(96) < 1.0


def test_fitted_catalog_keeps_the_calibration_set_within_the_goal():
    report = validate()
    off = {r["id"] for r in report["results"] if r["rel_error"] is not None and abs(r["rel_error"]) > GOAL}
    assert off == KNOWN_OFF
    errors = sorted(abs(r["rel_error"]) for r in report["results"] if r["rel_error"] is not None)
    s = report["summary"]
    assert s["worst_abs_error"] == errors[-1] and s["priced"] == len(errors)
    assert s["not_modelled"] == 0


def test_cli_prints_every_row_and_one_json_object(capsys):
    assert main(["simulate", "validate"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == len(load_rows()) + 2 and "median" in text[-1] and "worst" in text[-1]
    assert main(["simulate", "validate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"summary", "results"} and len(report["results"]) == len(load_rows())


def test_hardware_file_takes_the_curve_fields_and_ranges_them(tmp_path):
    spec = {"device": {"sms": 8, "flops": 1e12, "hbm_bw": 1e12, "attn_eff_fwd": 0.5, "attn_eff_bwd": 0.4,
                       "attn_kv_half": 100.0, "attn_causal_eff": 0.9},
            "gpus_per_node": 2, "fabric": "switch", "link": {"bw": 1e9, "latency_s": 1e-6},
            "nic": {"bw": 1e9, "latency_s": 1e-6}}
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"mine": spec}))
    assert load_hardware_file(path)["mine"].device.attn_kv_half == 100.0
    spec["device"]["attn_causal_eff"] = 0
    path.write_text(json.dumps({"mine": spec}))
    with pytest.raises(UsageError, match="attn_causal_eff"):
        load_hardware_file(path)


def test_held_out_ranking_matches_ring_flash_attention():
    """Held out (never fitted): ring-flash-attention measures zigzag faster than the contiguous ring
    on 8 x A100 and 8 x H800 at Llama-3.1-8B attention, 8K tokens per GPU; the simulator agrees."""
    from tokenloom.simulator import simulate_attention
    from tokenloom.simulator.validate import h800

    shape = AttentionShape(8 * 8192, 32, 128, 8)
    for node in (CATALOG["a100-sxm"], h800()):
        for backward in (False, True):
            t = {lay: simulate_attention("ring", Cluster(node, 8), shape, causal=True, backward=backward,
                                         layout=lay).total_s for lay in ("zigzag", "contiguous")}
            assert t["zigzag"] < t["contiguous"]
