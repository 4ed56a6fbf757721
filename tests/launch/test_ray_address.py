"""The Ray launcher against a cluster that already runs (``--address HOST:PORT``), as on a real
cluster started with ``ray start --head``: the driver connects instead of starting its own Ray, runs
the ranks there, and leaves the cluster running (nothing of the job left on it).

Runs after tests/launch/test_ray.py (whose in-process session has shut down by then); everything here is
in subprocesses, and the head is killed by its process group, never by ``ray stop`` (which would
kill every Ray on the machine).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from procs import kill_group, popen, run

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

FLAGS = ["--strategy", "ring", "--seq", "64", "--heads", "4", "--head-dim", "8", "--causal", "--check",
         "--iters", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launcher_joins_an_existing_cluster():
    # a short temp dir: Ray puts unix sockets there, and pytest's tmp paths overflow their 107 bytes
    tmp = tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    head = popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                  "--include-dashboard=false", f"--temp-dir={tmp}", "--node-ip-address=127.0.0.1"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # the GCS is up when its port accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "ray head did not come up within 60 s"
                time.sleep(0.5)
        proc = run([sys.executable, "-m", "tokenloom", "run", "--launcher", "ray", "--address",
                    address, "--world-size", "2", "attention", *FLAGS, "--json"], timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        assert report["world_size"] == 2 and all(c["ok"] for c in report["check"].values())
        assert head.poll() is None  # the user's cluster is still running after the job
    finally:
        kill_group(head)
        shutil.rmtree(tmp, ignore_errors=True)
