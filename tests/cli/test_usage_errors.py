"""The error policy across packages: every bad-input path below raises UsageError
naming the argument (API) or exits 2 with one stderr line naming the flag (CLI), never a plain
ValueError (a bug: exit 1) and never a run that does not finish.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from tokenloom.cli import main
from tokenloom.comm.communicator import P2P, Communicator, resolve_group
from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from no_work import no_work


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


def assert_refused(capsys, argv: list[str], *needles: str, work: tuple[str, ...] = ()) -> str:
    """exit 2, nothing on stdout, ONE stderr line containing every needle, no traceback, and no
    work started (:func:`no_work`; ``work``: more steps that must not run)."""
    with no_work(work) as started:
        code = run_main(argv)
    out, err = capsys.readouterr()
    assert started == [], f"work started before the refusal: {started}"
    assert code == 2, (code, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _usage(exc_info, field: str) -> None:
    assert type(exc_info.value) is UsageError
    assert exc_info.value.field == field
    assert len(str(exc_info.value).splitlines()) == 1
    assert field.split(".")[-1] in str(exc_info.value)


# ------------------------------------------------------------------ 1. library user-input errors
def test_tokenweave_schedule_arguments():
    from tokenloom.parallel.tokenweave_schedule import build_steps

    with pytest.raises(UsageError) as e:
        build_steps(0, 1, fused=False)
    _usage(e, "num_layers")
    for pieces, fused in ((3, True), (2, False), (0, True)):
        with pytest.raises(UsageError) as e:
            build_steps(1, pieces, fused=fused)
        _usage(e, "num_pieces")
    assert len(build_steps(1, 2, fused=True)) > 0  # the valid ones still build


def test_tokenweave_layer_run_arguments():
    from tokenloom.parallel.tokenweave_layer import Pieces, TPStack
    from tokenloom.parallel.tokenweave_model import LayerConfig, make_weights, shard_weights

    cfg = LayerConfig(48, 12, 4, 24)
    full = make_weights(cfg, 1, seed=0)
    stack = TPStack(cfg, shard_weights(full, cfg, 0, 1, torch.float64, torch.device("cpu")), Communicator())
    x = torch.zeros(8, cfg.hidden, dtype=torch.float64)
    with pytest.raises(UsageError) as e:
        stack.run(x, "fastest")
    _usage(e, "mode")
    with pytest.raises(UsageError) as e:
        stack.run(x, "tokenweave", Pieces(((0, 3), (3, 6)), (3, 3)))
    _usage(e, "pieces")


def test_tokenweave_comm_path_and_shapes_one_rank():
    from tokenloom.parallel.tokenweave_comm import fused_allreduce_residual_rmsnorm, select_path

    comm = Communicator()
    cpu = torch.device("cpu")
    with pytest.raises(UsageError) as e:
        select_path(comm, cpu, torch.float32, 16, path="carrier-pigeon")
    _usage(e, "path")
    with pytest.raises(UsageError) as e:
        select_path(comm, cpu, torch.bfloat16, 16, path="multimem")  # CPU, one rank: not usable
    _usage(e, "path")
    assert select_path(comm, cpu, torch.float32, 16) == "gloo"
    partial, weight = torch.ones(4, 8), torch.ones(8)
    with pytest.raises(UsageError) as e:
        fused_allreduce_residual_rmsnorm(partial, torch.ones(3, 8), weight, 1e-6, comm)
    _usage(e, "residual")


def test_spawn_and_group_arguments():
    with pytest.raises(UsageError) as e:
        spawn_ranks(0, lambda rank, world: None)
    _usage(e, "world_size")
    with pytest.raises(UsageError) as e:
        resolve_group("world")
    _usage(e, "group")
    mesh_2d = types.SimpleNamespace(ndim=2, get_group=lambda: None)  # duck-typed like a DeviceMesh
    with pytest.raises(UsageError) as e:
        resolve_group(mesh_2d)
    _usage(e, "group")
    with pytest.raises(UsageError) as e:  # the op is checked before anything is posted
        Communicator().batch_p2p([P2P("broadcast", 1, torch.zeros(2))])
    _usage(e, "P2P.op")


def _disagree(rank, world):
    from tokenloom.parallel.tokenweave_comm import fused_allreduce_residual_rmsnorm

    comm = Communicator()
    seen = []
    for what, values in (("shape", [4, rank]), ("dims", [1] * (rank + 1))):
        try:
            comm.check_agree(what, values)
            seen.append(None)
        except UsageError as exc:
            seen.append((type(exc).__name__, exc.field, str(exc)))
    comm.check_agree("same", [7, 8])  # agreeing values pass
    try:  # 3 rows over 2 ranks: refused before any collective
        fused_allreduce_residual_rmsnorm(torch.ones(3, 8), torch.ones(1, 8), torch.ones(8), 1e-6, comm)
        seen.append(None)
    except UsageError as exc:
        seen.append((type(exc).__name__, exc.field, str(exc)))
    return seen


def test_values_that_differ_across_ranks_are_usage_errors():
    for rank_seen in spawn_ranks(2, _disagree, timeout=60):
        (k1, f1, m1), (k2, f2, m2), (k3, f3, m3) = rank_seen
        assert (k1, f1) == ("UsageError", "shape") and "differs across ranks" in m1
        assert (k2, f2) == ("UsageError", "dims") and "different numbers of values" in m2
        assert (k3, f3) == ("UsageError", "partial") and "multiple of the group size" in m3


def test_atomic_write_mode(tmp_path):
    from tokenloom.common.files import atomic_write

    with pytest.raises(UsageError) as e:
        with atomic_write(tmp_path / "x", "a"):
            pass
    _usage(e, "mode")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ 2. simulate tokenweave bounds
TW = ["simulate", "tokenweave", "--hardware", "h100-sxm", "--tp", "8", "--tokens", "8K", "--model",
      "llama-3.1-8b", "--json"]


@pytest.mark.parametrize("extra, needles", [
    (["--layers", "100000000"], ("--layers", "1024", "step by step")),
    (["--layers", "1025"], ("--layers", "1024")),
    (["--tokens", "1024M"], ("--tokens", "16777216", "cuts")),
    (["--tokens", str(1 << 40)], ("--tokens", "16777216")),
    (["--hidden", "100000000"], ("--hidden", "1048576")),
    (["--ffn", "100000000"], ("--ffn", "1048576")),
    (["--heads", "10000000"], ("--heads", "65536")),
    (["--kv-heads", "10000000"], ("--kv-heads", "65536")),
    (["--experts", "100000", "--top-k", "2"], ("--experts", "4096")),
    (["--experts", "8", "--top-k", "100000"], ("--top-k", "4096")),
])
def test_simulate_tokenweave_size_flags_are_bounded(capsys, extra, needles):
    assert_refused(capsys, TW + extra, *needles)


def test_simulate_tokenweave_at_the_limits_runs(capsys):
    assert run_main(TW + ["--layers", "64"]) == 0
    assert '"layers": 64' in capsys.readouterr().out


def test_simulate_tokenweave_api_refuses_the_same_limits():
    from tokenloom.commands import simulate_tokenweave as cli
    from tokenloom.parallel.tokenweave_split import LayerShape
    from tokenloom.simulator import tokenweave as sim
    from tokenloom.simulator.hardware import make_cluster

    for name in ("MAX_LAYERS", "MAX_TOKENS", "MAX_HIDDEN", "MAX_FFN", "MAX_HEADS", "MAX_EXPERTS"):
        assert getattr(cli, name) == getattr(sim, name), name  # the CLI repeats them (startup time)
    cluster = make_cluster("h100-sxm", 8, 1)
    layer = LayerShape(4096, 14336, 32, 8, 8)
    for kwargs, field in (({"num_layers": 10**8}, "layers"), ({"num_layers": 0}, "layers"),
                          ({"num_layers": 10**8, "comm_ctas": "auto"}, "layers")):
        with no_work() as started, pytest.raises(UsageError) as e:  # refused before planning or walking
            sim.simulate_tokenweave(cluster, layer, 4096, **kwargs)
        assert e.value.field == field and started == []
    with pytest.raises(UsageError) as e:
        sim.simulate_tokenweave(cluster, layer, 1 << 30)
    assert e.value.field == "tokens"
    with pytest.raises(UsageError) as e:
        sim.simulate_tokenweave(cluster, LayerShape(1 << 21, 8, 8, 8, 8), 4096)
    assert e.value.field == "hidden"


# ------------------------------------------------------------------ 3. simulate sweep: the sum
SWEEP = ["simulate", "sweep", "--hardware", "h100-sxm", "--nodes-of", "8", "--seq", "32K", "--heads", "32",
         "--head-dim", "128"]


def test_sweep_refuses_points_that_pass_alone_but_not_together(capsys):
    # 256 GPUs, one ring: ~131K transfers, under the 150K limit alone; three of them are ~393K
    err = assert_refused(capsys, SWEEP + ["--gpus", "256,256,256", "--strategies", "tokenring"],
                         "--gpus", "3 simulations", "150,000", "--max-transfers")
    assert "393,216" in err
    assert_refused(capsys, SWEEP + ["--gpus", "128", "--seq", "1K,2K,4K,8K", "--strategies", "tokenring",
                                    "--max-transfers", "100000"], "--gpus", "4 simulations", "100,000")
    assert_refused(capsys, SWEEP + ["--gpus", "8", "--max-transfers", "2000001"], "--max-transfers",
                   "2000000")


def test_sweep_counts_only_points_that_would_run(capsys):
    from tokenloom.commands.simulate_sweep import check_sweep_work

    # ulysses over 256 GPUs cannot split 32 heads: every point is skipped at once, none is counted
    assert run_main(SWEEP + ["--gpus", "256,256,256", "--strategies", "ulysses", "--json"]) == 0
    assert capsys.readouterr().out.count('"skipped"') == 3
    point = {"strategy": "tokenring", "gpus": 8, "backward": False, "seq": 1024, "heads": 8, "head_dim": 64,
             "kv_heads": None, "batch": 1, "dtype": "bf16"}
    assert check_sweep_work([point, {**point, "backward": True}]) == 2 * 8 * 8 * 3
    with pytest.raises(UsageError) as e:
        check_sweep_work([point] * 4, limit=500)
    assert e.value.field.startswith("--gpus")


# ------------------------------------------------------------------ 4. JSON size limits
def _sparse(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: costs no disk, stat says ``size``
    return str(path)


def test_read_json_default_limit_is_256_mib(tmp_path):
    from tokenloom.common.files import MAX_INPUT_BYTES, MAX_JSON_BYTES, read_json

    assert MAX_JSON_BYTES == 256 << 20 < MAX_INPUT_BYTES
    with pytest.raises(UsageError) as e:
        read_json(_sparse(tmp_path / "big.json", (256 << 20) + 1), "--trace")
    assert e.value.field == "--trace" and "256.0 MiB" in str(e.value)


def test_placement_json_loaders_pass_a_limit(tmp_path, capsys):
    trace = _sparse(tmp_path / "trace.json", 300 << 20)
    unread = ("pathlib.Path.read_text", "pathlib.Path.read_bytes")  # refused by its size, never read
    assert_refused(capsys, ["plan", "--trace", trace, "--gpus", "4", "--out", str(tmp_path / "p.json")],
                   "--trace", "256.0 MiB", work=unread)
    plan = _sparse(tmp_path / "plan.json", 65 << 20)
    assert_refused(capsys, ["evaluate", "--plan", plan, "--trace", trace], "--plan", "64.0 MiB", work=unread)
    assert sorted(os.listdir(tmp_path)) == ["plan.json", "trace.json"]  # nothing written
