"""`tokenloom run decode` on every launcher (local, torchrun, Ray) with --check, any context length."""

import json
import os
import sys

import pytest

from procs import run
from tokenloom.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SMALL = ["--context", "1001", "--new-tokens", "3", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
         "--check", "--json"]


def _report(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out  # rank 0 only
    return json.loads(lines[0])


def _ok(rep: dict, world_size: int, context: int = 1001) -> None:
    assert rep["world_size"] == world_size and rep["backend"] == "gloo"
    assert set(rep["check"]) == {"out", "cache"} and all(c["ok"] for c in rep["check"].values())
    assert sum(rep["local_tokens"]) == context + 3 * rep["config"]["step_tokens"]
    assert max(rep["local_tokens"]) - min(rep["local_tokens"]) <= 2  # balanced shards


@pytest.mark.parametrize("world_size,strategy", [(1, "auto"), (3, "gather"), (3, "ring"), (2, "passkv")])
def test_local_launcher(capsys, world_size, strategy):
    rc = main(["run", "decode", "--launcher", "local", "--world-size", str(world_size),
               "--strategy", strategy, *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err
    _ok(_report(out), world_size)


def test_chunked_prefill_steps_in_bf16(capsys):
    rc = main(["run", "decode", "--launcher", "local", "--world-size", "3", *SMALL,
               "--step-tokens", "50", "--dtype", "bf16", "--strategy", "ring"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    _ok(_report(out), 3)


@pytest.mark.parametrize("strategy", ["gather", "ring", "passkv"])
def test_chunked_prefill_with_sharded_queries(capsys, strategy):
    rc = main(["run", "decode", "--launcher", "local", "--world-size", "3", *SMALL,
               "--step-tokens", "40", "--queries", "sharded", "--strategy", strategy])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = _report(out)
    _ok(rep, 3)
    assert rep["strategy"] == strategy and rep["config"]["queries"] == "sharded"


def test_table_and_context_suffix(capsys):
    rc = main(["run", "decode", "--launcher", "local", "--world-size", "2", "--context", "2K",
               "--new-tokens", "2", "--head-dim", "8", "--check"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "decode on 2 rank(s) (gloo, cpu): context 2048" in out and out.count(" ok") == 2


def test_torchrun_two_ranks_check():
    proc = run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "tokenloom", "run", "decode",
                *SMALL], timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _ok(_report(proc.stdout), 2)


@pytest.mark.ray
def test_ray_two_ranks_check(tmp_path_factory, capsys):
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    started = not ray.is_initialized()
    if started:  # a short temp dir: Ray's socket paths must stay under 108 bytes
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    try:
        rc = main(["run", "--launcher", "ray", "--world-size", "2", "decode", *SMALL])
    finally:
        if started:
            ray.shutdown()
    out, err = capsys.readouterr()
    assert rc == 0, err
    _ok(_report(out), 2)


@pytest.mark.parametrize("args,field", [(["--context", "12Q"], "--context"),
                                        (["--heads", "6", "--kv-heads", "4"], "--kv-heads")])
def test_bad_flags_exit_2(capsys, args, field):
    try:
        rc = main(["run", "decode", "--launcher", "local", *args])
    except SystemExit as e:  # argparse type errors exit from the parser
        rc = e.code
    assert rc == 2
    assert field in capsys.readouterr().err


def test_memory_is_estimated_before_anything_is_allocated(capsys):
    rc = main(["run", "decode", "--launcher", "local", "--world-size", "64", "--context", "2M",
               "--heads", "8", "--head-dim", "128"])  # ~1.6 TB of host memory
    assert rc == 2
    assert "GiB of host memory" in capsys.readouterr().err
