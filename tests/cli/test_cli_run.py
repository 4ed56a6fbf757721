"""`tokenloom run attention` under torchrun and the local launcher, `topo`, and error paths."""

import json
import os
import sys

import pytest

from tokenloom.cli import main
from procs import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SMALL = ["--seq", "96", "--heads", "6", "--kv-heads", "3", "--head-dim", "8", "--causal", "--iters", "1"]


def _cli(*args, timeout=120):
    return run([sys.executable, "-m", "tokenloom", *args], timeout=timeout, env=ENV)


def test_torchrun_two_ranks_check():
    proc = run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "tokenloom",
                "run", "attention", "--check", "--seq", "256", "--heads", "4",
                "--kv-heads", "2", "--causal", "--json", "--iters", "1"], timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    rep = json.loads(lines[0])
    assert rep["world_size"] == 2 and rep["backend"] == "gloo" and rep["config"]["dtype"] == "fp32"
    assert set(rep["check"]) == {"out", "lse", "dq", "dk", "dv"}
    assert all(c["ok"] and c["max_abs_err"] < 1e-4 for c in rep["check"].values())
    assert len(rep["forward_ms"]) == 2 and all(t > 0 for t in rep["forward_ms"])


def test_local_launcher_table(capsys):
    rc = main(["run", "attention", "--launcher", "local", "--world-size", "3", "--seq", "96",
               "--heads", "6", "--strategy", "ulysses", "--check", "--iters", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "ulysses attention on 3 rank(s) (gloo, cpu)" in out
    assert out.count(" ok") == 5 and "FAILED" not in out


@pytest.mark.parametrize("args,message", [
    # the API's own rules (ParallelDims), the flag in front
    (["--seq", "100", "--world-size", "3"], "--seq: seq (100) must be a multiple of 2 * world_size = 6"),
    (["--heads", "6", "--kv-heads", "4"], "--kv-heads: kv_heads (4) must be >= 1 and divide heads (6)"),
    (["--strategy", "ulysses", "--heads", "3"], "--heads: ulysses needs heads (3) divisible by world_size (2)"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    proc = _cli("run", "attention", "--launcher", "local", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenloom run: error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag,value", [
    ("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "1e-9"),
    ("--timeout", "0.5"),
    ("--world-size", "0"), ("--kv-heads", "0"), ("--seq", "1e12"), ("--iters", "-3"),
    ("--launcher", "slurm"),
])
def test_bad_flag_values_exit_2(flag, value):
    proc = _cli("run", "attention", flag, value)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and flag in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tokenloom run attention: error: argument")


def test_not_under_torchrun_is_a_usage_error():
    proc = _cli("run", "attention", "--launcher", "torchrun")
    assert proc.returncode == 2 and "not under torchrun" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_argparse_errors_exit_2():
    proc = _cli("run", "attention", "--strategy", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_help_lists_every_command_and_job():
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in ("demo", "run", "simulate", "advise", "trace", "plan", "evaluate", "topo"):
        assert name in proc.stdout
    proc = _cli("run", "--help")
    assert proc.returncode == 0 and "attention" in proc.stdout and "drill" in proc.stdout


@pytest.mark.gpu
def test_torchrun_on_gpus_uses_nccl_and_bf16():
    import torch

    n = min(2, torch.cuda.device_count())
    proc = run([TORCHRUN, "--standalone", "--nproc-per-node", str(n), "-m", "tokenloom", "run",
                "attention", "--check", "--seq", "1024", "--heads", "4", "--causal", "--json",
                "--iters", "1"], timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][0])
    assert rep["backend"] == "nccl" and rep["config"]["dtype"] == "bf16"
    assert all(c["ok"] for c in rep["check"].values())
