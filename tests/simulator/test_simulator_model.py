"""The simulator on the runtime's real schedules: bytes (REFERENCE.md §2), FLOPs, balance, determinism."""

from __future__ import annotations

import json

import pytest

from tokenloom.parallel.builders import STRATEGIES, build_schedule
from tokenloom.simulator import (AttentionShape, Cluster, CostModel, Device, Link, NodeSpec, make_cluster,
                                 simulate, simulate_attention)
from tokenloom.simulator.export import chrome_trace

F = 1e12


def ideal_cluster(gpus: int) -> Cluster:
    """Every kernel costs exactly FLOPs / F: no launch cost, free memory traffic, one SM (util 1)."""
    dev = Device("ideal", 1, F, 1e30, 1.0, 1.0, launch_s=0.0)
    return Cluster(NodeSpec("ideal", dev, gpus, "switch", link=Link(1e11, 1e-6), nic=Link(1e10, 1e-5)), gpus)


@pytest.mark.parametrize("kv_heads, dtype_bytes", [(32, 2), (8, 2), (4, 4)])
def test_tokenring_over_ring_bytes_match_reference(kv_heads, dtype_bytes):
    """REFERENCE.md §2: TokenRing/Ring bytes = g (1 + 2/(d b)) (contiguous, full mask, forward)."""
    n, d = 4, 128
    shape = AttentionShape(4096, 32, d, kv_heads, dtype_bytes=dtype_bytes)
    cluster = make_cluster("h100-sxm", n)
    got = {}
    for strategy in ("tokenring", "ring"):
        res = simulate_attention(strategy, cluster, shape, causal=False, layout="contiguous")
        got[strategy] = res.summary()["bytes_per_rank"]
    g = 32 // kv_heads
    assert got["tokenring"] / got["ring"] == pytest.approx(g * (1 + 2 / (d * dtype_bytes)), rel=1e-12)
    c = 4096 // n  # ring: K and V of one chunk, N-1 times
    assert got["ring"] == (n - 1) * c * 2 * kv_heads * d * dtype_bytes


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout, causal", [("zigzag", True), ("contiguous", True), ("contiguous", False)])
@pytest.mark.parametrize("backward", [False, True])
def test_kernel_time_adds_up_to_the_attention_flops(strategy, layout, causal, backward):
    n, seq, heads, d = 4, 2048, 4, 32
    shape = AttentionShape(seq, heads, d)
    sched = build_schedule(strategy, n, layout=layout, causal=causal, backward=backward, num_heads=heads)
    tl = simulate(sched, CostModel(shape, ideal_cluster(n), layout))
    flops = 4 * seq ** 2 * heads * d * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)
    assert tl.busy_s.sum() == pytest.approx(flops / F, rel=1e-9)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_rank_is_pure_compute(strategy):
    """The degenerate case: nothing to send, every strategy is the single-device kernel time."""
    res = simulate_attention(strategy, ideal_cluster(1), AttentionShape(4096, 8, 64), causal=True, backward=True)
    s = res.summary()
    assert s["bytes_per_rank"] == 0 and s["exposed_comm_ms"] == 0
    assert s["total_ms"] == pytest.approx(2 * 4096 ** 2 * 8 * 64 * 3.5 / F * 1e3, rel=1e-9)


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    n, shape = 8, AttentionShape(8192, 8, 64)
    busy = {}
    for layout in ("zigzag", "contiguous"):
        sched = build_schedule("tokenring", n, layout=layout, causal=True)
        busy[layout] = simulate(sched, CostModel(shape, ideal_cluster(n), layout)).busy_s
    assert busy["zigzag"].max() / busy["zigzag"].min() == pytest.approx(1.0, abs=1e-9)
    assert busy["contiguous"].max() / busy["contiguous"].min() > 10


def test_multi_node_ring_is_slower_than_one_node():
    shape = AttentionShape(32768, 32, 128)
    one = simulate_attention("ring", make_cluster("h100-sxm", 8), shape, causal=True).summary()
    two = simulate_attention("ring", make_cluster("h100-sxm", 8, 2), shape, causal=True).summary()
    assert two["exposed_comm_ms"] > one["exposed_comm_ms"]
    assert two["total_ms"] > one["total_ms"]


def test_simulation_is_deterministic():
    shape = AttentionShape(65536, 16, 128, 4)
    cluster = make_cluster("a10-pcie", 4)
    runs = [simulate_attention(s, cluster, shape, causal=True, backward=True) for s in STRATEGIES for _ in range(2)]
    for a, b in zip(runs[::2], runs[1::2]):
        assert a.summary() == b.summary()
        assert json.dumps(chrome_trace(a), sort_keys=True) == json.dumps(chrome_trace(b), sort_keys=True)


def test_summary_identities():
    s = simulate_attention("tokenring", make_cluster("mi300x", 8), AttentionShape(32768, 32, 128), causal=True,
                           backward=True).summary()
    for p in s["passes"].values():
        assert p["compute_ms"] + p["exposed_comm_ms"] == pytest.approx(p["total_ms"], rel=1e-9)
        ranks = p["per_rank"]
        for end, busy, exposed in zip(ranks["end_ms"], ranks["compute_ms"], ranks["exposed_comm_ms"]):
            assert busy + exposed == pytest.approx(end, rel=1e-9) and end <= p["total_ms"] * (1 + 1e-12)
        assert max(ranks["end_ms"]) == pytest.approx(p["total_ms"]) and sum(ranks["bytes_sent"]) == p["bytes_total"]
    assert s["total_ms"] == pytest.approx(sum(p["total_ms"] for p in s["passes"].values()))
    assert len(s["step_ms"]) == sum(p["num_steps"] for p in s["passes"].values())
    assert 0.0 <= s["overlap_fraction"] <= 1.0


def test_gqa_favours_ring_on_nvswitch_when_communication_bound():
    """Short sequences on A10/PCIe are communication-bound; TokenRing moves g x more bytes."""
    from tokenloom.simulator import advise_attention

    cluster = make_cluster("h100-sxm", 8)
    gqa = advise_attention(cluster, AttentionShape(16384, 32, 128, 4), causal=False, backward=False,
                           strategies=("tokenring", "ring"), layouts=("contiguous",))
    assert gqa.winner.strategy == "ring"


def test_mha_favours_tokenring_on_a_full_mesh_when_communication_bound():
    """On a full mesh TokenRing's Q and Out use different links at once; Ring's K and V share one."""
    from tokenloom.simulator import advise_attention

    advice = advise_attention(make_cluster("mi300x", 8), AttentionShape(8192, 32, 128), causal=False,
                              backward=False, strategies=("tokenring", "ring"), layouts=("contiguous",))
    s = {r.strategy: r.summary() for r in advice.ranking}
    assert s["ring"]["exposed_comm_ms"] > 0  # the regime this test is about
    assert advice.winner.strategy == "tokenring"


def test_simulator_imports_schedules_never_the_runtime():
    """DESIGN.md: the simulator prices schedules; it must not depend on the runtime that runs them."""
    import ast
    import pathlib

    import tokenloom.simulator as pkg

    allowed = {"tokenloom.parallel.schedule", "tokenloom.parallel.builders", "tokenloom.parallel.check",
               "tokenloom.parallel.dims",  # the rules object (pure) the API and the builders use too
               # TokenWeave's step lists and split plans: pure data, like the attention schedules
               "tokenloom.parallel.tokenweave_schedule", "tokenloom.parallel.tokenweave_split",
               "tokenloom.parallel.decode_schedule"}  # decode's step lists: pure data too
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("tokenloom.parallel") or name.startswith("tokenloom.kernels"):
                    # kernels only for calibration (it measures the reference kernel itself)
                    calibration = path.name in ("calibrate.py", "calibrate_gpu.py")
                    assert name in allowed or (calibration and name.startswith("tokenloom.kernels")), \
                        f"{path.name} imports {name}"


def test_ulysses_bytes_count_replicated_kv_heads():
    """All-to-all moves (N-1)/N of each rank's part; 4 kv heads on 8 ranks are replicated to 8."""
    n, seq, heads, kv_heads, d, b = 8, 16384, 32, 4, 128, 2
    res = simulate_attention("ulysses", make_cluster("h100-sxm", n), AttentionShape(seq, heads, d, kv_heads),
                             causal=True)
    per_token = heads * d * b + 2 * 8 * d * b + heads * d * b + heads * 4  # q, k+v (x2 replicas), out+lse
    assert res.summary()["bytes_per_rank"] == pytest.approx((n - 1) / n * seq / n * per_token, rel=1e-12)
