"""``tokenloom simulate check``: exit 0 within tolerance, 1 with a table on a regression, 2 on bad input."""

from __future__ import annotations

import json

import pytest

from tokenloom.cli import main
from tokenloom.simulator import AttentionShape, make_cluster, simulate_attention

BASE = {"name": "h100", "strategy": "tokenring", "hardware": "h100-sxm", "gpus": 8, "seq": "32K", "heads": 16,
        "kv_heads": 4, "head_dim": 64, "causal": True, "backward": True}


def _predicted() -> float:  # the independent reference: the library call the config describes
    res = simulate_attention("tokenring", make_cluster("h100-sxm", 8), AttentionShape(32768, 16, 64, 4),
                             causal=True, backward=True)
    return res.total_s * 1e3


def _write(tmp_path, data) -> str:
    path = tmp_path / "accepted.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_within_tolerance_exits_0(tmp_path, capsys):
    ms = _predicted()
    path = _write(tmp_path, {"tolerance": 0.02, "configs": [dict(BASE, accepted_ms=ms * 1.01),
                                                              dict(BASE, name="slack", accepted_ms=ms * 2)]})
    assert main(["simulate", "check", path]) == 0
    out = capsys.readouterr().out
    assert "all 2 predictions within tolerance" in out and "faster" in out  # 2x slack: faster, not failing


def test_regression_exits_1_with_a_table(tmp_path, capsys):
    ms = _predicted()
    path = _write(tmp_path, [dict(BASE, accepted_ms=ms / 1.2, tolerance=0.1),
                             dict(BASE, name="fine", accepted_ms=ms, tolerance=0.0)])
    assert main(["simulate", "check", path]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "strategy", "hardware"]
    assert "REGRESSED" in lines[1] and "+20.0%" in lines[1]
    assert lines[2].endswith("ok")
    assert "1 of 2 predictions regressed" in lines[-1]


def test_json_prints_one_object(tmp_path, capsys):
    ms = _predicted()
    path = _write(tmp_path, [dict(BASE, accepted_ms=ms / 2, tolerance=0.5)])
    assert main(["simulate", "check", path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["regressions"] == 1 and report["checked"] == 1
    row = report["results"][0]
    assert row["predicted_ms"] == pytest.approx(ms) and row["change"] == pytest.approx(1.0)
    assert row["status"] == "regressed"


@pytest.mark.parametrize("data,field", [
    ([dict(BASE, accepted_ms=1.0)], "configs[0].tolerance"),
    ({"tolerance": 0.1, "configs": [{k: v for k, v in BASE.items() if k != "heads"} | {"accepted_ms": 1}]},
     "configs[0].heads"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=1, seq="12Q")]}, "configs[0].seq"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=-1)]}, "configs[0].accepted_ms"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=1, causal="yes")]}, "configs[0].causal"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=1, colour=3)]}, "configs[0]"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=1, hardware="tpu")]}, "hardware"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=1, strategy="ulysses", heads=12, kv_heads=12)]},
     "heads"),
    ({"tolerance": "5%", "configs": [dict(BASE, accepted_ms=1)]}, "tolerance"),
    ({"tolerance": 0.1, "configs": []}, "configs"),
    ({"tolerance": 0.1, "configs": [dict(BASE, accepted_ms=1), dict(BASE, accepted_ms=2)]}, "twice"),
    ("{not json", "accepted.json"),
])
def test_bad_input_exits_2_naming_the_field(tmp_path, capsys, data, field):
    assert main(["simulate", "check", _write(tmp_path, data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and field in err


def test_missing_file_exits_2(tmp_path, capsys):
    assert main(["simulate", "check", str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
