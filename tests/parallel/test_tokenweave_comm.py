"""Fused AllReduce + residual + RMSNorm against AllReduce-then-norm, its path selector, its stream."""

import pytest
import torch

from tokenloom.comm.communicator import Communicator
from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.parallel.tokenweave_comm import (CommStream, fused_allreduce_residual_rmsnorm,
                                                select_path)

ROWS, HIDDEN, EPS = 12, 16, 1e-6


def _partial(rank):
    return torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def _residual():
    return torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _weight():
    return 1 + 0.1 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(8), dtype=torch.float64)


def _fused_rank(rank, world, use_stream):
    comm = Communicator()
    m = ROWS // world
    residual = _residual()[rank * m:(rank + 1) * m]
    if use_stream:
        with CommStream(torch.device("cpu")) as stream:
            pending = stream.submit(fused_allreduce_residual_rmsnorm, _partial(rank), residual, _weight(), EPS, comm)
            normed, new_res = pending.wait()
    else:
        normed, new_res = fused_allreduce_residual_rmsnorm(_partial(rank), residual, _weight(), EPS, comm)
    return {"normed": normed, "res": new_res, "path": select_path(comm, torch.device("cpu"), torch.float64, HIDDEN)}


@pytest.mark.parametrize("world, use_stream", [(1, False), (2, True), (3, False), (4, True)])
def test_fused_equals_allreduce_then_norm(world, use_stream):
    results = spawn_ranks(world, _fused_rank, use_stream, timeout=60)
    total = sum(_partial(r) for r in range(world)) + _residual()
    ref = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + EPS) * _weight()
    m = ROWS // world
    for rank, res in enumerate(results):
        assert res["path"] == "gloo"
        assert torch.allclose(torch.as_tensor(res["normed"]), ref, atol=1e-12, rtol=0)
        assert torch.allclose(torch.as_tensor(res["res"]), total[rank * m:(rank + 1) * m], atol=1e-12, rtol=0)


def test_selector_and_shape_errors():
    comm = Communicator()
    assert select_path(comm, torch.device("cpu"), torch.bfloat16, 64) == "gloo"
    with pytest.raises(ValueError, match="multimem"):
        select_path(comm, torch.device("cpu"), torch.bfloat16, 64, path="multimem")
    with pytest.raises(ValueError, match="path"):
        select_path(comm, torch.device("cpu"), torch.bfloat16, 64, path="mpi")
    with pytest.raises(ValueError, match="residual"):
        fused_allreduce_residual_rmsnorm(torch.zeros(4, 8), torch.zeros(3, 8), torch.ones(8), EPS, comm)


def test_comm_stream_runs_in_order_beside_the_caller():
    seen = []
    with CommStream(torch.device("cpu")) as stream:
        handles = [stream.submit(lambda i=i: seen.append(i) or i * i) for i in range(5)]
        assert [h.wait() for h in handles] == [0, 1, 4, 9, 16]
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.gpu
def test_cuda_stream_stack_matches_oracle():
    """One GPU: the high-priority comm stream and the Triton norm walk the TokenWeave schedule."""
    from tokenloom.parallel.tokenweave_layer import Pieces, TPStack
    from tokenloom.parallel.tokenweave_model import LayerConfig, make_weights, reference_stack, shard_weights

    cfg = LayerConfig(64, 8, 2, 64)
    full = make_weights(cfg, 2, seed=0)
    dev = torch.device("cuda")
    stack = TPStack(cfg, shard_weights(full, cfg, 0, 1, torch.float32, dev), Communicator())
    x = torch.randn(300, 64, dtype=torch.float64)
    out, _ = stack.run(x.to(dev, torch.float32), "tokenweave", Pieces(((0, 140), (140, 300)), (140, 160)))
    ref, _ = reference_stack(x, full, cfg)
    assert (out.double().cpu() - ref).abs().max().item() < 1e-3


@pytest.mark.gpu
def test_multimem_path_needs_hopper_multicast():
    if torch.cuda.device_count() < 2 or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the multimem path needs >= 2 Hopper GPUs with NVLink multicast (run "
                    "'torchrun --nproc-per-node 8 -m tokenloom run tokenweave --dtype bf16 --check')")
    comm = Communicator()  # world of one here: the selector must not pick multimem
    assert select_path(comm, torch.device("cuda"), torch.bfloat16, 64) == "nccl"
