"""Ctrl-C and a killed launcher leave no rank running (local launcher, real processes)."""

import os
import signal
import subprocess
import sys
import time

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LONG_DRILL = [sys.executable, "-m", "tokenloom", "run", "drill", "--world-size", "3", "--steps", "100000",
              "--step-ms", "10"]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _start_and_wait_for_ranks() -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(LONG_DRILL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the ranks are inside the job now
    ranks = _children(proc.pid)
    assert len(ranks) >= 3, ranks
    return proc, ranks


def test_ctrl_c_stops_every_rank_and_exits_130():
    proc, ranks = _start_and_wait_for_ranks()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    time.sleep(0.5)
    assert _alive(ranks) == []


def test_a_killed_launcher_takes_its_ranks_with_it():
    proc, ranks = _start_and_wait_for_ranks()
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(ranks) == []
