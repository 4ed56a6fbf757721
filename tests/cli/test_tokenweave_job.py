"""The `run tokenweave` job: direct on forked gloo ranks, and through the CLI's local launcher."""

import argparse
import json

import pytest

from tokenloom.comm.communicator import Communicator
from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.jobs import tokenweave as tw_job


def _rank(rank, world, cfg):
    return tw_job.job(Communicator(), cfg)


@pytest.mark.parametrize("world, moe", [(2, False), (3, True)])
def test_job_times_and_checks(world, moe):
    cfg = tw_job.TokenweaveRun(layers=2, tokens=45, hidden=48, heads=6, kv_heads=3, ffn=48,
                               moe_experts=4 if moe else 0, split_threshold=16, check=True, iters=1)
    cfg.validate(world)
    results = spawn_ranks(world, _rank, cfg, timeout=60)
    rep = tw_job.combine(results, cfg)
    assert rep["plan"]["mode"] == "split" and len(rep["baseline_ms"]) == world
    assert all(c["ok"] for c in rep["check"].values()), rep["check"]
    assert rep["check"]["out"]["max_abs_err"] > 0  # fp32 against fp64: a real comparison


def test_validate_names_the_flag():
    with pytest.raises(UsageError, match="heads"):
        tw_job.TokenweaveRun(heads=6).validate(4)
    with pytest.raises(UsageError, match="hidden"):
        tw_job.TokenweaveRun(hidden=100, heads=8).validate(2)
    with pytest.raises(UsageError, match="tokens"):
        tw_job.TokenweaveRun(tokens=0).validate(2)
    with pytest.raises(UsageError, match="--check"):  # the fp64 oracle would not fit
        tw_job.TokenweaveRun(tokens=8192, check=True).validate(2)


def test_report_exit_code_follows_the_check(capsys):
    args = argparse.Namespace(world_size=2, json=True, **{k: v for k, v in tw_job.TokenweaveRun().__dict__.items()})
    args.moe_experts, args.split_threshold = 0, None
    result = {"rank": 0, "device": "cpu", "backend": "gloo", "dtype": "fp32", "baseline_ms": 2.0,
              "tokenweave_ms": 1.0, "plan": {"mode": "split", "cut": 5, "pieces": [[0, 5], [5, 9]], "padded": [6, 4]},
              "check": {"out": {"ok": False}}}
    assert tw_job.report([result, dict(result)], args) == 1
    assert json.loads(capsys.readouterr().out)["speedup"] == pytest.approx(2.0)


def test_cli_local_launcher(capsys):
    from tokenloom.cli import main

    rc = main(["run", "tokenweave", "--launcher", "local", "--world-size", "2", "--layers", "1",
               "--tokens", "40", "--hidden", "32", "--heads", "4", "--ffn", "32", "--split-threshold", "16",
               "--iters", "1", "--check", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["plan"]["mode"] == "split" and rep["world_size"] == 2
