"""MoE dispatch/combine priced under a placement plan: the formula on the placement package's own
message counts, the three plans side by side, and the command's exit paths."""

from __future__ import annotations

import json

import pytest

from tokenloom.cli import main
from tokenloom.simulator.hardware import make_cluster
from tokenloom.simulator.moe import COMBINE_BYTES, DISPATCH_BYTES, price_messages, price_plan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    trace, plan = str(d / "t.npz"), str(d / "p.json")
    assert main(["trace", "synth", "--layers", "2", "--experts", "16", "--top-k", "4", "--tokens", "1024",
                 "--seed", "3", "--out", trace]) == 0
    assert main(["plan", "--trace", trace, "--gpus", "16", "--gpus-per-node", "8", "--method", "greedy",
                 "--out", plan]) == 0
    return d, trace, plan


def test_price_is_the_busiest_nic_over_its_rate():
    cluster = make_cluster("h100-sxm", 16, 2)
    nic = cluster.node.nic
    got = price_messages({"busiest_nic": [100.0, 300.0]}, cluster, 4096)
    for busiest, d, c in zip((100.0, 300.0), got["dispatch_ms"], got["combine_ms"]):
        assert d == pytest.approx((nic.latency_s + busiest / 2 * 4096 * DISPATCH_BYTES / (nic.bw * nic.efficiency)) * 1e3)
        assert c == pytest.approx((nic.latency_s + busiest / 2 * 4096 * COMBINE_BYTES / (nic.bw * nic.efficiency)) * 1e3)
    assert got["mean_dispatch_ms"] == pytest.approx(sum(got["dispatch_ms"]) / 2)


def test_plan_and_baselines_priced_from_their_message_counts(files, capsys):
    from tokenloom.placement import load_plan, load_trace
    from tokenloom.placement.evaluate import evaluate_messages

    _, trace_path, plan_path = files
    plan, trace = load_plan(plan_path), load_trace(trace_path)
    prices = price_plan(plan, trace, make_cluster("h100-sxm", 16, 2), 7168)
    assert set(prices) == {"plan", "eplb", "greedy"}
    assert prices["plan"]["busiest_nic_messages"] == evaluate_messages(plan, trace)["busiest_nic"]
    for p in prices.values():
        assert len(p["dispatch_ms"]) == 2 and all(c > d > 0 for d, c in zip(p["dispatch_ms"], p["combine_ms"]))


def test_command_prints_a_table_and_json(files, capsys):
    _, trace, plan = files
    assert main(["simulate", "moe", "--plan", plan, "--trace", trace, "--hardware", "h100-sxm", "--nodes", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "plan disp" in out[1] and "eplb disp" in out[1] and "greedy disp" in out[1] and out[-1].split()[0] == "mean"
    assert main(["simulate", "moe", "--plan", plan, "--trace", trace, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hardware"] == "2 nodes x 8 x h100-sxm" and set(report["prices"]) == {"plan", "eplb", "greedy"}


def test_command_refuses_a_mismatched_cluster_and_an_aggregated_trace(files, capsys):
    d, trace, plan = files
    assert main(["simulate", "moe", "--plan", plan, "--trace", trace, "--nodes", "4"]) == 2
    assert "--nodes" in capsys.readouterr().err
    agg = d / "agg.json"
    agg.write_text(json.dumps({"loads": [[1.0] * 16, [1.0] * 16]}))
    assert main(["simulate", "moe", "--plan", plan, "--trace", str(agg)]) == 2
    assert "--trace" in capsys.readouterr().err


def test_evaluate_prices_the_plan_beside_eplb_and_greedy(files, capsys):
    """`tokenloom evaluate --hardware --nodes` prints the same per-layer times as `simulate moe`."""
    _, trace, plan = files
    assert main(["simulate", "moe", "--plan", plan, "--trace", trace, "--nodes", "2", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--plan", plan, "--trace", trace, "--hardware", "h100-sxm", "--nodes", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["moe_time"] == alone
    assert main(["evaluate", "--plan", plan, "--trace", trace, "--hardware", "h100-sxm", "--nodes", "2"]) == 0
    text = capsys.readouterr().out
    assert "plan disp" in text and "eplb disp" in text and "greedy disp" in text
    assert main(["evaluate", "--plan", plan, "--trace", trace, "--json"]) == 0  # without --hardware: not priced
    assert "moe_time" not in json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--plan", plan, "--trace", trace, "--hardware", "h100-sxm", "--nodes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nodes" in err
