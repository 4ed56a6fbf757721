"""SMs lent to communication slow compute (cost.py, gemm.py, tokenweave.py): kernels that overlap a
communication kernel run their waves on the SMs it leaves. Hand-computed wave counts."""

from __future__ import annotations

import pytest

from tokenloom.parallel.schedule import Block, Buf, Compute
from tokenloom.parallel.tokenweave_split import LayerShape
from tokenloom.simulator import AttentionShape, make_cluster
from tokenloom.simulator.cost import CostModel
from tokenloom.simulator.tokenweave import Pricer


def _attention_s(comm_sms: int) -> float:
    # 1024 tokens x 33 heads: 8 x 33 = 264 tiles of 128 query rows, two full waves on an H100
    # (compute-bound: 17.7 GFLOP vs 35 MB)
    shape = AttentionShape(1024, 33, 128)
    cost = CostModel(shape, make_cluster("h100-sxm", 1), "contiguous", comm_sms=comm_sms)
    op = Compute(Buf("q", 0, (0,)), Buf("kv", 0, (0,)), (Block((0,), (0,), False),), Buf("out", 0, (0,), at=0))
    return cost.compute_s(op) - cost.device.launch_s


def test_attention_kernel_needs_a_second_wave_when_sms_are_lent():
    assert _attention_s(8) == pytest.approx(1.5 * _attention_s(0), rel=1e-12)  # 264 tiles on 124 SMs: 3 waves


def test_comm_sms_is_checked():
    with pytest.raises(Exception, match="comm_sms"):
        CostModel(AttentionShape(128, 8, 64), make_cluster("h100-sxm", 1), "contiguous", comm_sms=132)


def test_tokenweave_split_pieces_run_on_the_sms_the_fused_kernel_leaves():
    layer = LayerShape(8192, 28672, 64, 8, 8)
    cluster = make_cluster("h100-sxm", 8)
    lent = Pricer(cluster, layer, 8192, comm_ctas=8).gemm_times(4096, overlapped=True)
    free = Pricer(cluster, layer, 8192, comm_ctas=8).gemm_times(4096, overlapped=False)
    # o projection: 4096 x 8192 in 64 x 128 tiles = 64 x 64 = 4096 tiles: 32 waves on 132 SMs, 34 on 124
    dev = cluster.node.device
    assert (lent["o"] - dev.launch_s) / (free["o"] - dev.launch_s) == pytest.approx(34 / 32, rel=1e-12)
