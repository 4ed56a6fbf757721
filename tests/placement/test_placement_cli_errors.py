"""Bad inputs to trace/plan/evaluate (issue 9): exit 2, one stderr line naming the field, no traceback,
inputs untouched, no output (nor temp file) left, refused before any work. Run in-process through
tokenloom.cli.main."""

import hashlib
import json
import os

import numpy as np
import pytest

from tokenloom.cli import main

GOOD_IDS = np.random.default_rng(0).integers(0, 8, size=(2, 40, 2))


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    good = d / "good.npz"
    np.savez(good, topk_ids=GOOD_IDS, num_experts=np.int64(8))
    assert main(["plan", "--trace", str(good), "--gpus", "4", "--gpus-per-node", "2", "--time-limit", "5",
                 "--out", str(d / "plan.json")]) == 0
    plan = json.loads((d / "plan.json").read_text())

    def put(name, text):
        (d / name).write_text(text) if isinstance(text, str) else (d / name).write_bytes(text)
        return str(d / name)

    def loads(value):
        return json.dumps({"loads": value})

    def plan_with(**changes):
        return json.dumps({**plan, **changes})

    f = {
        "good": str(good), "plan": str(d / "plan.json"), "dir": str(d),
        "null": put("null.json", loads(None)),
        "list": put("list.json", json.dumps([1, 2])),
        "fast": put("fast.json", loads([["fast", 1]])),
        "huge_int": put("huge_int.json", loads([[10**30, 1]])),
        "nan": put("nan.json", '{"loads": [[NaN, 1]]}'),
        "inf": put("inf.json", '{"loads": [[Infinity, 1]]}'),
        "e308": put("e308.json", loads([[1e308, 1e308]])),
        "ragged": put("ragged.json", loads([[1, 2], [3]])),
        "latin1": put("latin1.json", b'{"loads": [[1, 2]], "x": "\xe9"}'),
        "experts_1e12": put("experts.json", json.dumps({"topk_ids": [[[0]]], "num_experts": 10**12})),
        "ids_ragged": put("ids_ragged.json", json.dumps({"topk_ids": [[[0, 1]], [[0]]], "num_experts": 2})),
        "coact_shape": put("coact.json", json.dumps({"loads": [[1, 2]], "coactivation": [[[1]]]})),
        "plan_gbps_null": put("p_null.json", plan_with(intra_node_gbps=None)),
        "plan_gbps_str": put("p_str.json", plan_with(inter_node_gbps="fast")),
        "plan_gbps_big": put("p_big.json", plan_with(inter_node_gbps=10**30)),
        "plan_phy_ragged": put("p_ragged.json", plan_with(phy2log=[[0, 1], [2]])),
        "plan_gpus_1e5": put("p_gpus.json", plan_with(num_gpus=100000)),
        "plan_experts_1e12": put("p_experts.json", plan_with(num_experts=10**12)),
        "plan_home": put("p_home.json", plan_with(token_home="gpu")),
        "plan_list": put("p_list.json", json.dumps([plan])),
        "plan_latin1": put("p_latin1.json", b'{"method": "\xe9"}'),
    }
    fifo = d / "fifo.npz"
    os.mkfifo(fifo)
    f["fifo"] = str(fifo)
    return f


def _cases(f):
    p = ["plan", "--gpus", "4", "--gpus-per-node", "2", "--time-limit", "5", "--out", "OUT", "--trace"]
    e = ["evaluate", "--trace", f["good"], "--plan"]
    s = ["trace", "synth", "--layers", "2", "--experts", "8", "--top-k", "2", "--out", "OUT", "--tokens"]
    return [
        (p + [f["null"]], "loads"), (p + [f["list"]], "JSON object"), (p + [f["fast"]], "loads"),
        (p + [f["huge_int"]], "loads"), (p + [f["nan"]], "NaN"), (p + [f["inf"]], "Infinity"),
        (p + [f["e308"]], "loads"), (p + [f["ragged"]], "loads"), (p + [f["latin1"]], "UTF-8"),
        (p + [f["experts_1e12"]], "num_experts"), (p + [f["ids_ragged"]], "topk_ids"),
        (p + [f["coact_shape"]], "coactivation"), (p + [f["dir"] + "/"], "directory"),
        (p + [f["fifo"]], "not a regular file"), (p + [f["dir"] + "/missing.npz"], "no such file"),
        (e + [f["plan_gbps_null"]], "intra_node_gbps"), (e + [f["plan_gbps_str"]], "inter_node_gbps"),
        (e + [f["plan_gbps_big"]], "inter_node_gbps"), (e + [f["plan_phy_ragged"]], "phy2log"),
        (e + [f["plan_gpus_1e5"]], "num_gpus"), (e + [f["plan_experts_1e12"]], "num_experts"),
        (e + [f["plan_home"]], "token_home"), (e + [f["plan_list"]], "JSON object"), (e + [f["plan_latin1"]], "UTF-8"),
        (s + ["1000000000000"], "--tokens"), (s + ["1e12"], "--tokens"),
        (s + ["300000000"], "num_tokens"),  # 2 x 3e8 x 8 cells: refused up front, not after minutes
        (["plan", "--trace", f["good"], "--gpus", "100000", "--time-limit", "5", "--out", "OUT"], "--gpus"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--time-limit", "nan", "--out", "OUT"], "--time-limit"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--max-imbalance", "0.5", "--out", "OUT"], "--max-imbalance"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--holdout", "inf", "--out", "OUT"], "--holdout"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--expert-groups", "3", "--out", "OUT"], "expert_groups"),
        (["plan", "--trace", f["good"], "--gpus", "3", "--out", "OUT", "--redundant", "2"], "num_redundant"),
        # outputs that would destroy an input or are not files
        (["plan", "--trace", f["good"], "--gpus", "4", "--out", f["good"]], "--out"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--previous", f["plan"], "--max-moves", "1", "--out", f["plan"]],
         "--out"),
        (["evaluate", "--plan", f["plan"], "--trace", f["good"], "--png", f["plan"]], "--png"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--out", f["dir"]], "--out"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--out", f["fifo"]], "--out"),
        (["plan", "--trace", f["good"], "--gpus", "4", "--out", f["dir"] + "/no/such/dir/p.json"], "--out"),
        (["evaluate", "--plan", f["plan"], "--trace", f["good"], "--png", f["dir"] + "/no/g.png"], "--png"),
    ]


def _work_raises(monkeypatch):
    """Every piece of real work (generating a trace, a planning method, scoring a plan) raises, so an
    input refused up front is refused before any of it."""
    import tokenloom.placement.evaluate as evaluate
    import tokenloom.placement.planner as planner
    import tokenloom.placement.router as router
    import tokenloom.placement.synth as synth

    def work(*args, **kwargs):
        raise AssertionError("the work started before the input was refused")

    for module, name in ((synth, "synth_topk"), (router, "router_topk"), (planner, "plan_dp"), (planner, "plan_expert"),
                         (planner, "replan"), (planner, "baseline_plan"), (evaluate, "evaluate_layers"),
                         (evaluate, "message_metrics")):
        monkeypatch.setattr(module, name, work)


def _snapshot(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not name.endswith("fifo.npz"):
            out[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        else:
            out[name] = "special"
    return out


def test_bad_inputs_exit_2_one_line_nothing_written(capsys, tmp_path, files, monkeypatch):
    _work_raises(monkeypatch)
    before = _snapshot(files["dir"])
    for argv, field in _cases(files):
        out_file = tmp_path / ("out.npz" if argv[0] == "trace" else "out.json")
        argv = [str(out_file) if a == "OUT" else a for a in argv]
        code, out, err = _run(capsys, argv)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and field in err, (field, err)
        assert "Traceback" not in err and out == "", argv
        assert not out_file.exists() and not list(tmp_path.iterdir()), argv
        assert _snapshot(files["dir"]) == before, argv  # inputs untouched, no temp left beside them


def test_valid_edge_inputs_work(capsys, tmp_path, files):
    one = tmp_path / "one.npz"
    code, _, err = _run(capsys, ["trace", "synth", "--layers", "3", "--experts", "1", "--top-k", "1", "--tokens", "64",
                                 "--out", str(one)])
    assert code == 0 and one.exists(), err
    plan = tmp_path / "p.json"
    code, out, err = _run(capsys, ["plan", "--trace", str(one), "--gpus", "1", "--out", str(plan), "--json"])
    assert code == 0, err
    assert json.loads(out)["heldout"]["messages"]["messages_per_token"] == 0.0  # one GPU: nothing is remote


def test_plan_hands_the_planner_what_is_left_of_the_time_limit(capsys, tmp_path, files):
    trace = tmp_path / "t.npz"
    assert main(["trace", "synth", "--model", "router", "--layers", "8", "--experts", "64", "--top-k", "4",
                 "--tokens", "2000", "--groups", "4", "--topk-group", "2", "--out", str(trace)]) == 0
    capsys.readouterr()
    for home in ("dp", "expert"):
        out = tmp_path / f"{home}.json"
        code, _, err = _run(capsys, ["plan", "--trace", str(trace), "--gpus", "16", "--gpus-per-node", "4",
                                     "--token-home", home, "--time-limit", "2", "--out", str(out)])
        assert code == 0, err
        # the planner gets what is left of the command's limit after loading, less the writing reserve
        # (the wall-clock bound itself is measured by benchmarks/bench_placement.py --check-time-limit)
        assert 0 < json.loads(out.read_text())["solver"]["time_limit"] <= 2 * 0.9, home
