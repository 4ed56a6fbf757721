"""Faults under torchrun (4 ranks, one agent) and a 2-node torchrun on one machine (two agents,
one c10d rendezvous endpoint on localhost, gloo)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from procs import run, started
from bounds import COLD_START_S

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
BOUND = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_every_survivor_names_the_lost_rank(mode):
    t0 = time.monotonic()
    proc = run([TORCHRUN, "--standalone", "--nproc-per-node", "4", "-m", "tokenloom", "run",
                "drill", "--steps", "40", "--step-ms", "5", "--fail-rank", "2", "--fail-at", "3",
                "--mode", mode, "--reap-after", str(BOUND + 3), "--timeout", str(BOUND)], timeout=180, env=ENV)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenloom run: error:")]
    assert len(errors) == 3, proc.stderr[-3000:]  # ranks 0, 1, 3
    for line in errors:
        assert "rank 2" in line and ("lost" in line or "not responding" in line), line
        assert "drill step" in line, line
    assert elapsed < COLD_START_S, elapsed


def test_two_nodes_on_one_machine():
    port = _free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"tl{port}", "-m", "tokenloom",
              "run", "attention", "--check", "--seq", "128", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "16", "--causal", "--iters", "1", "--json"]
    with contextlib.ExitStack() as stack:
        agents = [stack.enter_context(started([TORCHRUN, "--node-rank", str(n), *common], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, env=ENV)) for n in range(2)]
        outs = [a.communicate(timeout=180) for a in agents]
    for a, (out, err) in zip(agents, outs):
        assert a.returncode == 0, err[-3000:]
    reports = [json.loads(ln) for out, _ in outs for ln in out.splitlines() if ln.startswith("{")]
    assert len(reports) == 1  # global rank 0 only
    rep = reports[0]
    assert rep["world_size"] == 2 and rep["backend"] == "gloo"
    assert all(c["ok"] and c["max_abs_err"] < 1e-4 for c in rep["check"].values())


def test_max_restarts_recovers_from_a_transient_loss():
    """Attempt 0 loses rank 1 (SIGKILL); the agent restarts every worker; attempt 1 is clean."""
    proc = run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                "-m", "tokenloom", "run", "drill", "--steps", "6", "--step-ms", "5",
                "--fail-rank", "1", "--fail-at", "2", "--mode", "kill", "--first-attempt-only",
                "--timeout", str(BOUND), "--json"], timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"world_size": 2, "steps": 6, "ok": True}
    lost = [ln for ln in proc.stderr.splitlines() if ln.startswith("tokenloom run: error:")]
    assert len(lost) == 1 and "rank 1" in lost[0]  # attempt 0's survivor named it


def test_hand_started_ranks_name_the_lost_rank():
    """Ranks started by hand with the torchrun variables (rank 0 hosts the store, no agent)."""
    port = _free_port()
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(3):
            env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(stack.enter_context(started(
                [sys.executable, "-m", "tokenloom", "run", "drill", "--launcher", "torchrun", "--steps", "40",
                 "--step-ms", "5", "--fail-rank", "2", "--fail-at", "3", "--mode", "kill", "--timeout", str(BOUND)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
        outs = [p.communicate(timeout=120) for p in procs]
    assert procs[2].returncode == -9
    for rank in (0, 1):
        assert procs[rank].returncode == 1, outs[rank][1][-2000:]
        line = outs[rank][1].strip().splitlines()[-1]
        assert line.startswith("tokenloom run: error:") and "rank 2" in line and "drill step" in line, line
