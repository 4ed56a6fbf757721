"""The Ray launcher and Ray fan-out on one real local Ray session shared by these tests.

Ray starts once (dashboard off, small object store, temp dir under pytest's tmp path,
RAY_AUTH_MODE=disabled); rank actors take 0.01 CPU each, so they never starve the tasks.
"""

import json
import os
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from tokenloom.jobs import drill  # noqa: E402
from tokenloom.comm.launch import run_job  # noqa: E402
from tokenloom.comm.launch.summary import JobError  # noqa: E402
from procs import run
from bounds import COLD_START_S

BOUND = 5.0
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield
    ray.shutdown()


def _nothing_left_running():
    from ray.util import placement_group_table

    groups = [g["state"] for g in placement_group_table().values()]
    actors = [a["State"] for a in ray._private.state.actors().values()]
    assert all(s == "REMOVED" for s in groups), groups
    assert all(s == "DEAD" for s in actors), actors


def test_map_tasks_keeps_order(ray_session):
    from tokenloom.comm.launch.ray import map_tasks

    items = [5, -3, 0, 7, -1]
    assert map_tasks(abs, items) == [abs(x) for x in items]
    assert map_tasks(abs, []) == []


def _cli_json(*launch):
    """The same job through the CLI in a fresh process (forking ranks from a process that runs
    Ray's threads is unsafe, so the local and torchrun runs are not done in this one)."""
    cmd = [*launch, "run", "attention", *FLAGS, "--json"] if launch else None
    proc = run(cmd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][0])


FLAGS = ["--strategy", "tokenring", "--seq", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
         "--causal", "--check", "--iters", "1"]


def test_attention_on_ray_ranks_equals_local_and_torchrun(ray_session, capsys):
    from tokenloom.cli import main

    rc = main(["run", "--launcher", "ray", "--world-size", "2", "attention", *FLAGS, "--json"])
    assert rc == 0
    on_ray = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert on_ray["world_size"] == 2 and on_ray["backend"] == "gloo"
    _nothing_left_running()
    local = _cli_json(sys.executable, "-m", "tokenloom")  # --launcher auto: local, 2 ranks
    torchrun = _cli_json(os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                         "--nproc-per-node", "2", "-m", "tokenloom")
    for name, check in on_ray["check"].items():
        assert check["ok"], (name, check)
        for other in (local, torchrun):
            assert check["max_abs_err"] == pytest.approx(other["check"][name]["max_abs_err"], rel=1e-6,
                                                         abs=1e-9), (name, other["check"][name])


def test_a_killed_rank_actor_is_named_and_nothing_is_left(ray_session):
    cfg = drill.Drill(steps=40, step_ms=5, fail_rank=2, fail_at=3, mode="kill")
    t0 = time.monotonic()
    with pytest.raises(JobError) as info:
        run_job(drill.job, cfg, launcher="ray", world_size=4, timeout_s=BOUND)
    elapsed = time.monotonic() - t0
    err = info.value
    head = str(err).splitlines()[0]
    assert err.lost == [2], str(err)
    assert "rank 2" in head and "drill step" in head and "pid" in head, head
    for r in (0, 1, 3):
        assert "rank 2" in err.lines[r], err.lines
    assert elapsed < COLD_START_S, elapsed
    _nothing_left_running()


def test_advise_on_ray_ranks_like_the_serial_advisor(ray_session):
    from tokenloom.commands.advise import advise_on_ray
    from tokenloom.simulator.advisor import advise_attention
    from tokenloom.simulator.cost import AttentionShape
    from tokenloom.simulator.hardware import make_cluster

    cluster = make_cluster("h100-sxm", 16, 2)
    shape = AttentionShape(64 * 1024, 16, 128, 4, 1, 2)
    serial = advise_attention(cluster, shape, causal=True, backward=False)
    fanned = advise_on_ray(cluster, shape, causal=True, backward=False)
    assert fanned.to_dict() == serial.to_dict()
    assert len(fanned.ranking) >= 4 and fanned.skipped == serial.skipped


def test_simulate_sweep_on_ray_equals_serial(ray_session):
    import argparse

    from tokenloom.commands.simulate_sweep import points_from_args, run_sweep

    args = argparse.Namespace(hardware="a10-pcie", hardware_file=None, gpus=[2, 4], nodes_of=0,
                              seq=[8192, 16384], heads=8, kv_heads=None, head_dim=64, batch=1, dtype="bf16",
                              causal=True, backward=True, strategies=["tokenring", "ring", "ulysses"],
                              layouts=["zigzag"], max_transfers=None)
    points = points_from_args(args)
    assert len(points) == 12
    assert run_sweep(points, ray=True) == run_sweep(points)


@pytest.mark.gpu
def test_ray_ranks_use_nccl_on_gpus(ray_session):
    import torch

    world = min(2, torch.cuda.device_count())
    if ray.cluster_resources().get("GPU", 0) < world:
        pytest.skip("the test's Ray session sees no GPUs")
    cfg = drill.Drill(steps=3, step_ms=1)
    res = run_job(drill.job, cfg, launcher="ray", world_size=world, backend="nccl", timeout_s=60)
    assert [r["sums"] for r in res] == [drill.expected(cfg, world, r) for r in range(world)]
