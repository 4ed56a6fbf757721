"""``tokenloom simulate`` / ``tokenloom advise``: exit codes, JSON, trace and PNG files, calibration."""

from __future__ import annotations

import json

import pytest

from tokenloom.cli import main
from tokenloom.simulator.hardware import CATALOG, PROFILE_ENV, make_cluster, node_to_dict

BASE = ["simulate", "attention", "--hardware", "h100-sxm", "--gpus", "8", "--seq", "16K", "--heads", "16",
        "--head-dim", "64"]


def run_json(argv, capsys) -> dict:
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    return json.loads(out)


def test_simulate_json_has_the_documented_fields(capsys):
    s = run_json(BASE + ["--causal", "--backward", "--kv-heads", "4"], capsys)
    for key in ("strategy", "total_ms", "step_ms", "compute_ms", "exposed_comm_ms", "bytes_per_rank"):
        assert key in s
    assert s["strategy"] == "tokenring" and s["seq"] == 16384 and s["kv_heads"] == 4
    assert len(s["step_ms"]) == 18 and s["total_ms"] > 0  # 9 steps forward, 9 backward


@pytest.mark.parametrize("argv, field", [
    (["--hardware", "tpu-v9"], "hardware"),
    (["--seq", "1000"], "seq"),
    (["--strategy", "ulysses", "--heads", "12"], "heads"),
    (["--kv-heads", "5"], "kv-heads"),
    (["--gpus", "16"], "gpus"),
    (["--gpus", "16", "--nodes", "3"], "nodes"),
])
def test_bad_input_exits_2_naming_the_field(argv, field, capsys):
    assert main(BASE + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err


def test_multi_node(capsys):
    s = run_json(BASE[:-6] + ["--gpus", "32", "--nodes", "4", "--seq", "1M", "--heads", "32", "--head-dim", "128",
                              "--causal", "--strategy", "ring"], capsys)
    assert s["hardware"] == "4 nodes x 8 x h100-sxm" and s["world_size"] == 32


def test_chrome_trace_and_png(tmp_path, capsys):
    trace, png = tmp_path / "t.json", tmp_path / "g.png"
    assert main(BASE + ["--gpus", "4", "--causal", "--backward", "--chrome-trace", str(trace), "--png", str(png)]) == 0
    data = json.loads(trace.read_text())
    events = data["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2, 3}
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"compute", "send:q", "send:out", "send:qg", "send:dq"} <= names
    assert all(e["dur"] >= 0 and "pass" in e["args"] for e in spans)
    fwd_end = max(e["ts"] + e["dur"] for e in spans if e["args"]["pass"] == "forward")
    assert min(e["ts"] for e in spans if e["args"]["pass"] == "backward") >= fwd_end - 1e-6
    total_us = data["otherData"]["total_ms"] * 1e3
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(total_us, rel=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_output_leaves_no_file(tmp_path, capsys):
    missing_dir = tmp_path / "nope" / "t.json"
    assert main(BASE + ["--chrome-trace", str(missing_dir)]) == 2
    assert not missing_dir.parent.exists()


def test_advise_ranks_and_explains(capsys):
    out = run_json(["advise", "attention", "--hardware", "h100-sxm", "--gpus", "8", "--seq", "32K", "--heads", "12",
                    "--head-dim", "128", "--causal"], capsys)
    totals = [r["total_ms"] for r in out["ranking"]]
    assert totals == sorted(totals) and len(out["ranking"]) == 4  # ulysses skipped: 12 heads on 8 GPUs
    assert {s["strategy"] for s in out["skipped"]} == {"ulysses"}
    assert out["winner"]["strategy"] in out["explanation"] and "bytes" in out["explanation"].lower()
    assert main(["advise", "attention", "--hardware", "h100-sxm", "--gpus", "8", "--seq", "32K", "--heads", "16",
                 "--head-dim", "128"]) == 0
    assert "wins" in capsys.readouterr().out


def test_hardware_file_adds_an_entry(tmp_path, capsys):
    spec = node_to_dict(CATALOG["h100-sxm"])
    spec["link"]["bw"] = spec["link"]["bw"] / 100  # a much slower switch
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"slow-h100": spec}))
    fast = run_json(BASE, capsys)
    slow = run_json(BASE + ["--hardware", "slow-h100", "--hardware-file", str(path)], capsys)
    assert slow["exposed_comm_ms"] > fast["exposed_comm_ms"]
    path.write_text(json.dumps({"bad": {"device": {"sms": 1}}}))
    assert main(BASE + ["--hardware", "bad", "--hardware-file", str(path)]) == 2
    assert "bad" in capsys.readouterr().err


def test_calibrate_writes_a_profile_the_catalog_reads(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cpu.json"
    out = run_json(["simulate", "calibrate", "--quick", "--out", str(path)], capsys)
    assert out["path"] == str(path)
    monkeypatch.setenv(PROFILE_ENV, str(path))
    node = make_cluster("local-cpu", 2).node
    assert node.device.flops == out["local-cpu"]["device"]["flops"] > 0
    assert node.link.latency_s > 0 and node.fabric == "bus"
    assert main(["simulate", "attention", "--hardware", "local-cpu", "--gpus", "4", "--seq", "4096", "--heads", "4",
                 "--head-dim", "64", "--causal"]) == 0
