"""CLI: trace synth -> plan -> evaluate end to end; every malformed input exits 2 with one line and no file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tokenloom.cli import main
from tokenloom.placement import load_plan, load_trace


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as done:  # argparse refuses a flag value before the handler runs
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    assert main(["trace", "synth", "--layers", "4", "--experts", "16", "--top-k", "2", "--tokens", "800",
                 "--skew", "0.8", "--affinity", "0.7", "--domains", "4", "--seed", "1", "--out", str(path)]) == 0
    return path


def test_synth_plan_evaluate_json(capsys, tmp_path, trace_file):
    trace = load_trace(trace_file)
    assert trace.loads.shape == (4, 16) and trace.top_k == 2
    plan_path = tmp_path / "plan.json"
    code, out, err = _run(capsys, "plan", "--trace", str(trace_file), "--gpus", "4", "--gpus-per-node", "2",
                          "--redundant", "4", "--time-limit", "3", "--holdout", "0", "--out", str(plan_path), "--json")
    assert code == 0, err
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert out.count("\n") == 1
    for key in ("method", "seconds", "max_mean_load", "cross_gpu_tokens", "cross_node_tokens"):
        assert key in summary
    assert summary["method"] == "ilp" and len(summary["max_mean_load"]) == 4 and summary["seconds"] < 4
    plan = load_plan(plan_path)
    assert plan.num_slots == 20 and plan.solver["status"] in ("optimal", "feasible", "heuristic")
    assert summary["messages"]["messages_per_token"] > 0 and summary["heldout"] is None
    png = tmp_path / "loads.png"
    code, out, err = _run(capsys, "evaluate", "--plan", str(plan_path), "--trace", str(trace_file), "--json", "--png", str(png))
    assert code == 0, err
    result = json.loads(out)
    assert result["max_mean_load"] == pytest.approx(summary["max_mean_load"])
    assert result["cross_node_tokens"] == pytest.approx(summary["cross_node_tokens"])
    assert set(result["baselines"]) == {"contiguous", "round_robin", "greedy", "eplb"}
    assert result["messages"]["messages_per_token"] == pytest.approx(summary["messages"]["messages_per_token"])
    assert result["all_to_all_seconds"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregated_json_trace_and_human_output(capsys, tmp_path):
    out_file = tmp_path / "agg.json"
    code, out, _ = _run(capsys, "trace", "synth", "--layers", "2", "--experts", "8", "--top-k", "2", "--tokens", "100",
                        "--out", str(out_file))
    assert code == 0 and "wrote" in out
    assert set(json.loads(out_file.read_text())) >= {"loads", "transitions"}
    plan_path = tmp_path / "p.json"
    code, out, _ = _run(capsys, "plan", "--trace", str(out_file), "--gpus", "4", "--method", "greedy", "--out", str(plan_path))
    assert code == 0 and "greedy" in out and plan_path.exists()
    code, out, _ = _run(capsys, "evaluate", "--plan", str(plan_path), "--trace", str(out_file))
    assert code == 0 and "round_robin" in out


def _bad_inputs(tmp_path, trace_file):
    bad_ids = tmp_path / "ids.json"
    bad_ids.write_text(json.dumps({"topk_ids": [[[0, 9]]], "num_experts": 4}))
    nan = tmp_path / "nan.npz"
    np.savez(nan, loads=np.array([[1.0, np.nan, 2.0, 3.0]]))
    neg = tmp_path / "neg.json"
    neg.write_text(json.dumps({"loads": [[1, -1, 2, 3]]}))
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"loads": [[1, 2], [3, 4]], "transitions": [[[1]]]}))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"loads": [[0, 0, 0, 0]]}))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"topk": [[[0]]]}))
    dtype = tmp_path / "dtype.json"
    dtype.write_text(json.dumps({"topk_ids": [[[0.5]]], "num_experts": 4}))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    bad_plan = tmp_path / "badplan.json"
    bad_plan.write_text(json.dumps({"num_experts": 3, "num_gpus": 2, "gpus_per_node": 1, "num_slots": 4,
                                    "method": "x", "phy2log": [[0, 0, 1, 2]] * 4}))
    plan = ["plan", "--gpus", "4", "--time-limit", "1", "--out"]
    t = str(trace_file)
    return [
        (plan + ["OUT", "--trace", str(bad_ids)], "topk_ids: expert id 9 out of range"),
        (plan + ["OUT", "--trace", str(nan)], "loads: contains NaN"),
        (plan + ["OUT", "--trace", str(neg)], "loads: contains negative counts"),
        (plan + ["OUT", "--trace", str(shape)], "transitions: shape"),
        (plan + ["OUT", "--trace", str(empty)], "loads: every count is zero (empty trace)"),
        (plan + ["OUT", "--trace", str(missing)], "loads: missing key"),
        (plan + ["OUT", "--trace", str(dtype)], "topk_ids: dtype float64"),
        (plan + ["OUT", "--trace", str(junk)], "trace: cannot read"),
        (plan + ["OUT", "--trace", str(tmp_path / "nope.npz")], "--trace: no such file"),
        (["plan", "--gpus", "3", "--redundant", "1", "--out", "OUT", "--trace", t], "num_redundant: 16 experts + 1 redundant"),
        (["plan", "--gpus", "4", "--gpus-per-node", "3", "--out", "OUT", "--trace", t], "gpus_per_node: 3 does not divide"),
        (["plan", "--gpus", "4", "--time-limit", "-1", "--out", "OUT", "--trace", t], "argument --time-limit: must be > 0"),
        (["plan", "--gpus", "4", "--max-moves", "2", "--out", "OUT", "--trace", t], "--max-moves: give both"),
        (["plan", "--gpus", "4", "--previous", str(bad_plan), "--max-moves", "1", "--out", "OUT", "--trace", t],
         "phy2log: layer 0 puts two replicas"),
        (["evaluate", "--plan", str(bad_plan), "--trace", t, "--png", "OUT"], "phy2log: layer 0 puts two replicas"),
        (["evaluate", "--plan", str(tmp_path / "none.json"), "--trace", t, "--png", "OUT"], "--plan: no such file"),
        (["trace", "synth", "--layers", "2", "--experts", "4", "--top-k", "5", "--tokens", "10", "--out", "OUT"], "top_k: 5 exceeds"),
        (["trace", "synth", "--layers", "2", "--experts", "4", "--top-k", "2", "--tokens", "10", "--affinity", "2", "--out", "OUT"],
         "argument --affinity: must be <= 1"),
        (["trace", "synth", "--layers", "0", "--experts", "4", "--top-k", "2", "--tokens", "10", "--out", "OUT"], "argument --layers: must be >= 1"),
    ]


def test_malformed_inputs_exit_2_one_line_no_file(capsys, tmp_path, trace_file):
    for argv, message in _bad_inputs(tmp_path, trace_file):
        out_file = tmp_path / ("out.png" if "--png" in argv else "out.npz" if argv[0] == "trace" else "out.json")
        argv = [str(out_file) if a == "OUT" else a for a in argv]
        code, out, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and message in err, (message, err)
        assert err.startswith(f"tokenloom {argv[0]}: error: ") or err.startswith(f"tokenloom {argv[0]} {argv[1]}: error: ")
        assert "Traceback" not in err and out == ""
        assert not out_file.exists(), argv
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp file left


def test_subprocess_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"loads": [[1, -5]]}))
    proc = subprocess.run([sys.executable, "-m", "tokenloom", "plan", "--trace", str(bad), "--gpus", "2",
                           "--out", str(tmp_path / "p.json"), "--json"], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"tokenloom plan: error: --trace {bad}: loads: contains negative counts (min -5); counts must be >= 0"]
    assert not (tmp_path / "p.json").exists()


def test_help_teaches(capsys):
    for argv in (["plan", "--help"], ["evaluate", "--help"], ["trace", "synth", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text


def test_subprocess_json_is_one_object_even_with_highs(tmp_path, trace_file):
    """HiGHS prints a banner on fd 1 on first use; --json must still be exactly one JSON object."""
    proc = subprocess.run([sys.executable, "-m", "tokenloom", "plan", "--trace", str(trace_file), "--gpus", "4",
                           "--time-limit", "2", "--out", str(tmp_path / "p.json"), "--json"],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    assert json.loads(proc.stdout)["method"] == "ilp"
    assert "\r" not in proc.stderr  # no progress bar when stdout is not a terminal


def test_demo_section_writes_a_table():
    import io

    from tokenloom.placement.demo import demo_section

    out = io.StringIO()
    demo_section(out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("MoE expert placement")
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:6]}
    assert set(rows) == {("contiguous", "dp"), ("greedy", "dp"), ("ilp", "dp"), ("ilp", "expert")}
    greedy, dp, expert = rows[("greedy", "dp")], rows[("ilp", "dp")], rows[("ilp", "expert")]
    assert float(expert[2]) <= float(greedy[2]) and float(expert[4]) < float(greedy[4])  # balance kept, fewer cross-node
    assert float(dp[3]) < float(greedy[3])  # fewer remote messages per token in its own model


def test_placement_commands_register_without_heavy_imports():
    code = ("import argparse, sys\n"
            "from tokenloom.commands import evaluate, plan, trace\n"
            "sub = argparse.ArgumentParser().add_subparsers()\n"
            "[m.register(sub) for m in (trace, plan, evaluate)]\n"
            "print(sorted(m for m in ('numpy', 'scipy', 'pulp', 'torch', 'ray', 'matplotlib') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
