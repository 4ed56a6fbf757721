"""Engine and network against hand-computed answers (alpha-beta transfers, contention, regimes)."""

from __future__ import annotations

import math

import pytest

from tokenloom.parallel.schedule import Block, Buf, Compute, Recv, Schedule, Send, Step
from tokenloom.simulator import AttentionShape, Cluster, CostModel, DeadlockError, Device, Link, NodeSpec, simulate

BW, LAT, FLOPS = 1e9, 1e-5, 1e12
SHAPE = AttentionShape(seq_len=8 * 1024, num_heads=1, head_dim=64)  # contiguous on 8 ranks: 1024 tokens a chunk
Q_BYTES = 1024 * 64 * 2  # one chunk of q in bf16


def toy_cluster(fabric: str = "switch", gpus: int = 8, nodes: int = 1, bw: float = BW, nic_bw: float = BW / 4
                ) -> Cluster:
    # 8 SMs and 1024-token chunks: 8 tiles of 128 rows fill one wave exactly (util 1).
    dev = Device("toy", 8, FLOPS, 1e30, 1.0, 1.0, launch_s=0.0)
    node = NodeSpec("toy", dev, gpus // nodes, fabric, link=Link(bw, LAT), nic=Link(nic_bw, 2 * LAT),
                    uplink=Link(bw, 0.0) if fabric == "pcie" else None,
                    gpus_per_switch=2 if fabric == "pcie" else 0)
    return Cluster(node, gpus, nodes)


def sched_of(steps_per_rank: dict[int, list[Step]], n: int = 8) -> Schedule:
    ranks = tuple(tuple(steps_per_rank.get(r, [])) for r in range(n))
    return Schedule("custom", "contiguous", False, False, n, ranks, tuple(() for _ in range(n)))


def qbuf(owner: int) -> Buf:
    return Buf("q", owner, (owner,))


def p2p(pairs: list[tuple[int, int]], n: int = 8, extra: dict[int, tuple] | None = None) -> Schedule:
    """One step in which every (src, dst) pair moves src's q chunk."""
    comms: dict[int, list] = {}
    for src, dst in pairs:
        comms.setdefault(src, []).append(Send(dst, qbuf(src), "q"))
        comms.setdefault(dst, []).append(Recv(src, qbuf(src), "q"))
    extra = extra or {}
    return sched_of({r: [Step(tuple(c), extra.get(r, ()))] for r, c in comms.items()}, n)


def run(sched: Schedule, cluster: Cluster | None = None):
    return simulate(sched, CostModel(SHAPE, cluster or toy_cluster(), "contiguous"))


def test_one_transfer_is_latency_plus_bytes_over_bandwidth():
    tl = run(p2p([(0, 1)]))
    assert tl.total_s == pytest.approx(LAT + Q_BYTES / BW, rel=1e-12)
    assert tl.bytes_sent[0] == Q_BYTES and tl.bytes_sent[1] == 0
    (tr,) = tl.transfers
    assert (tr.src, tr.dst, tr.start - tr.ready) == (0, 1, pytest.approx(LAT))


def test_two_transfers_on_one_port_take_twice_as_long():
    tl = run(p2p([(0, 1), (0, 2)]))  # both leave through rank 0's NVSwitch port
    assert tl.total_s == pytest.approx(LAT + 2 * Q_BYTES / BW, rel=1e-12)
    tl = run(p2p([(1, 0), (2, 0)]))  # both enter rank 0's port
    assert tl.total_s == pytest.approx(LAT + 2 * Q_BYTES / BW, rel=1e-12)


def test_opposite_directions_and_separate_ports_do_not_interfere():
    assert run(p2p([(0, 1), (1, 0)])).total_s == pytest.approx(LAT + Q_BYTES / BW, rel=1e-12)
    assert run(p2p([(0, 1), (2, 3)])).total_s == pytest.approx(LAT + Q_BYTES / BW, rel=1e-12)


def test_full_mesh_has_a_link_per_pair():
    assert run(p2p([(0, 1), (0, 2), (0, 3)]), toy_cluster("mesh")).total_s == pytest.approx(
        LAT + Q_BYTES / BW, rel=1e-12)


def test_pcie_uplink_is_shared_across_switches_only():
    pcie = toy_cluster("pcie", gpus=4)
    same_switch = run(p2p([(0, 1), (2, 3)], n=4), pcie).total_s  # GPUs 0,1 on switch 0; 2,3 on switch 1
    across = run(p2p([(0, 2), (1, 3)], n=4), pcie).total_s  # both climb switch 0's uplink
    q_bytes = 2 * Q_BYTES  # the same sequence over 4 ranks: chunks twice as long
    assert same_switch == pytest.approx(LAT + q_bytes / BW, rel=1e-12)
    assert across == pytest.approx(LAT + 2 * q_bytes / BW, rel=1e-12)


def test_inter_node_transfer_uses_the_nic():
    tl = run(p2p([(0, 4)]), toy_cluster(nodes=2))  # ranks 0-3 on node 0, 4-7 on node 1
    assert tl.total_s == pytest.approx(2 * LAT + Q_BYTES / (BW / 4), rel=1e-12)


def test_pure_compute_is_flops_over_rate():
    comp = Compute(qbuf(0), Buf("kv", 0, (0,)), (Block((0,), (0,), False),), Buf("out", 0, (0,), at=0))
    tl = run(sched_of({0: [Step((), (comp,))]}))
    flops = 4 * 1024 ** 2 * 64  # 4 c^2 H d
    assert tl.total_s == pytest.approx(flops / FLOPS, rel=1e-12)
    assert tl.exposed_s[0] == 0 and tl.busy_s[0] == pytest.approx(tl.total_s)


@pytest.mark.parametrize("bw, bound", [(1e12, "compute"), (1e7, "comm")])
def test_compute_bound_and_communication_bound_regimes(bw, bound):
    comp = Compute(qbuf(0), Buf("kv", 0, (0,)), (Block((0,), (0,), False),), Buf("out", 0, (0,), at=0))
    tl = run(p2p([(0, 1)], extra={0: (comp,)}), toy_cluster(bw=bw))
    compute_s, comm_s = 4 * 1024 ** 2 * 64 / FLOPS, LAT + Q_BYTES / bw
    assert tl.total_s == pytest.approx(max(compute_s, comm_s), rel=1e-12)
    overlap_rank0 = 1 - tl.exposed_s[0] / tl.comm_s[0]
    assert tl.comm_s[0] == pytest.approx(comm_s, rel=1e-12)
    if bound == "compute":
        assert comm_s < compute_s and tl.exposed_s[0] == 0 and overlap_rank0 == 1.0
    else:
        assert tl.exposed_s[0] == pytest.approx(comm_s - compute_s, rel=1e-9)
        assert overlap_rank0 == pytest.approx(compute_s / comm_s, rel=1e-9)
    assert tl.exposed_s[1] == pytest.approx(comm_s, rel=1e-12)  # rank 1 only receives: all exposed


def test_receive_waits_for_a_late_sender():
    comp = Compute(qbuf(0), Buf("kv", 0, (0,)), (Block((0,), (0,), False),), Buf("out", 0, (0,), at=0))
    sched = sched_of({0: [Step((), (comp,)), Step((Send(1, qbuf(0), "q"),))], 1: [Step((Recv(0, qbuf(0), "q"),))]})
    tl = run(sched)
    compute_s = 4 * 1024 ** 2 * 64 / FLOPS
    assert tl.total_s == pytest.approx(compute_s + LAT + Q_BYTES / BW, rel=1e-12)
    assert tl.exposed_s[1] == pytest.approx(tl.total_s)  # rank 1 waited the whole time


def test_deadlock_is_reported():
    # Both ranks first wait to receive, and send only in the next step: neither can finish.
    sched = sched_of({0: [Step((Recv(1, qbuf(1), "q"),)), Step((Send(1, qbuf(0), "q"),))],
                      1: [Step((Recv(0, qbuf(0), "q"),)), Step((Send(0, qbuf(1), "q"),))]}, n=2)
    with pytest.raises(DeadlockError, match="deadlock") as info:
        run(sched, toy_cluster(gpus=2))
    assert set(info.value.stuck) == {0, 1} and info.value.stuck[0][0] == 0


def test_receive_without_send_is_a_deadlock():
    sched = sched_of({0: [Step((Recv(1, qbuf(1), "q"),))]}, n=2)
    with pytest.raises(DeadlockError, match="no matching send"):
        run(sched, toy_cluster(gpus=2))


def test_empty_schedule_takes_no_time():
    assert math.isclose(run(sched_of({}, n=2), toy_cluster(gpus=2)).total_s, 0.0)


def test_bandwidth_left_by_a_transfer_held_back_elsewhere_goes_to_the_others():
    """Max-min fairness: 0->2, 3->2, 4->2 share rank 2's ingress port (1/3 each), so 0->1, which
    shares rank 0's egress port only with 0->2, gets the remaining 2/3 of it (equal sharing: 1/2)."""
    tl = run(p2p([(0, 1), (0, 2), (3, 2), (4, 2)]))
    ends = {(t.src, t.dst): t.end for t in tl.transfers}
    assert ends[(0, 1)] == pytest.approx(LAT + 1.5 * Q_BYTES / BW, rel=1e-9)
    assert tl.total_s == pytest.approx(LAT + 3 * Q_BYTES / BW, rel=1e-9)


def test_max_min_rates_are_fair_and_the_implementations_agree():
    import numpy as np

    from tokenloom.simulator.network import _max_min_heap, _max_min_numpy, max_min_rates

    rng = np.random.default_rng(0)
    for _ in range(100):
        num_res, num_flows = int(rng.integers(2, 10)), int(rng.integers(1, 25))
        cap = np.concatenate([[np.inf], rng.choice([1e9, 2e9, 5e9], num_res)])
        routes = np.zeros((num_flows, 4), dtype=np.int64)
        for i in range(num_flows):
            hops = int(rng.integers(1, min(4, num_res) + 1))
            routes[i, :hops] = rng.choice(np.arange(1, num_res + 1), size=hops, replace=False)
        rate = max_min_rates(routes, cap)
        assert np.allclose(rate, _max_min_heap(routes.tolist(), cap), rtol=1e-9)
        assert np.allclose(rate, _max_min_numpy(routes, cap), rtol=1e-9)
        used = np.bincount(routes.ravel(), weights=np.repeat(rate, 4), minlength=len(cap))
        assert (used[1:] <= cap[1:] * (1 + 1e-9)).all()  # feasible
        for i, route in enumerate(routes):  # each transfer is capped by a full resource where it is the fastest
            assert any(used[r] >= cap[r] * (1 - 1e-9) and rate[i] >= rate[(routes == r).any(axis=1)].max() * (1 - 1e-9)
                       for r in route if r)
