"""Ctrl-C and a killed launcher leave no rank running (local launcher, real processes).

The launcher starts through ``procs``: SIGINT at its default disposition whatever this process
inherited (a suite started in the background ignores SIGINT), and its whole process group killed
when the test ends, passed or not.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

from procs import started

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


@contextlib.contextmanager
def _launcher_with_ranks():
    with started(LONG_DRILL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) as proc:
        yield proc, _wait_for_ranks(proc)


def _wait_for_ranks(proc: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the ranks are inside the job now
    ranks = _children(proc.pid)
    assert len(ranks) >= 3, ranks
    return ranks


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def test_ctrl_c_stops_every_rank_and_exits_130():
    with _launcher_with_ranks() as (proc, ranks):
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err[-2000:]
        assert "interrupted" in err
        assert _wait_gone(ranks, 5) == []


def test_a_killed_launcher_takes_its_ranks_with_it():
    with _launcher_with_ranks() as (proc, ranks):
        proc.kill()
        proc.communicate(timeout=30)
        assert _wait_gone(ranks, 10) == []


def test_sigterm_stops_every_rank():
    with _launcher_with_ranks() as (proc, ranks):
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert _wait_gone(ranks, 10) == []


def test_an_inherited_ignored_sigint_is_honoured_like_other_unix_tools():
    # Started with SIGINT ignored (nohup, a background job of a script), `tokenloom run` keeps it
    # ignored, as Python and other Unix tools do; SIGTERM still stops it (run --help says so).
    wrapper = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])", *LONG_DRILL[1:]]
    with started(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) as proc:
        ranks = _wait_for_ranks(proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None and len(_alive(ranks)) == len(ranks)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert _wait_gone(ranks, 10) == []
