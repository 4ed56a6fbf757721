"""The lockstep path (ringfast compiler + step-by-step pricing) against the event engine.

Two independent references: ``build_schedule`` (the runtime's own schedule, compiled by the event
engine's ``_Plan``) for what the fast compiler produces, and the event engine itself
(``engine.simulate`` over ``FluidNetwork``) for every time the lockstep pricing computes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokenloom.common.errors import UsageError
from tokenloom.parallel.builders import build_schedule, parse_strategy
from tokenloom.simulator import AttentionShape, make_cluster, simulate_attention
from tokenloom.simulator.cost import CostModel
from tokenloom.simulator.engine import simulate
from tokenloom.simulator.lockstep import Routes, fluid_ends, lockstep_supported, plan_from_schedule, simulate_plan
from tokenloom.simulator.network import FluidNetwork, Topology
from tokenloom.simulator.ringfast import compile_ring
from tokenloom.simulator.scenario import uses_lockstep

STRATEGIES = ("tokenring", "ring", "ulysses2+tokenring", "ulysses4+ring", "ulysses")


def _cases(sizes):
    for strategy, n, layout, causal, backward in itertools.product(STRATEGIES, sizes, ("zigzag", "contiguous"),
                                                                   (True, False), (False, True)):
        u = parse_strategy(strategy)[1]
        if (u > 1 and (n % u or u >= n)) or (strategy == "ulysses" and 16 % n):
            continue
        yield strategy, n, layout, causal, backward


def _cost(strategy, n, layout, nodes=1, hardware="h100-sxm", heads=16, kv_heads=4, seq_per_rank=2048):
    u = parse_strategy(strategy)[1]
    cluster = make_cluster(hardware, n, nodes)
    shape = AttentionShape(seq_per_rank * n, heads, 64, kv_heads)
    return cluster, CostModel(shape, cluster, layout, head_shards=u if u > 1 else None)


def _flows(plan):
    return sorted(zip(plan.step.tolist(), plan.src.tolist(), plan.dst.tolist(), np.round(plan.nbytes, 3).tolist(),
                      (plan.coll >= 0).tolist()))


@pytest.mark.parametrize("strategy,n,layout,causal,backward", list(_cases((1, 2, 3, 4, 5, 8, 12))))
def test_compiler_equals_the_built_schedule(strategy, n, layout, causal, backward):
    nodes = 2 if n % 2 == 0 and n >= 4 else 1
    _, cost = _cost(strategy, n, layout, nodes)
    sched = build_schedule(strategy, n, layout=layout, causal=causal, backward=backward, num_heads=16,
                           num_kv_heads=4)
    want = plan_from_schedule(sched, cost)
    got = compile_ring(strategy, n, cost, layout=layout, causal=causal, backward=backward, num_heads=16,
                       num_kv_heads=4)
    assert got.info == want.info
    np.testing.assert_allclose(got.compute, want.compute, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.merge, want.merge, rtol=1e-12, atol=0)
    assert (got.has_ops == want.has_ops).all()
    assert _flows(got) == _flows(want)
    assert sorted(map(tuple, map(list, got.coll_members))) == sorted(map(tuple, map(list, want.coll_members)))


def test_compiler_equals_the_built_schedule_at_32_ranks():
    for strategy, layout in (("tokenring", "zigzag"), ("ring", "contiguous"), ("ulysses4+tokenring", "zigzag")):
        _, cost = _cost(strategy, 32, layout, 4)
        for backward in (False, True):
            sched = build_schedule(strategy, 32, layout=layout, causal=True, backward=backward, num_heads=16,
                                   num_kv_heads=4)
            want = plan_from_schedule(sched, cost)
            got = compile_ring(strategy, 32, cost, layout=layout, causal=True, backward=backward, num_heads=16,
                               num_kv_heads=4)
            np.testing.assert_allclose(got.compute, want.compute, rtol=1e-12)
            assert _flows(got) == _flows(want)


CLUSTERS = (("h100-sxm", 8, 1), ("h100-sxm", 16, 2), ("h100-sxm", 24, 3), ("mi300x", 8, 1), ("a100-sxm", 16, 2),
            ("mi300x", 16, 2))


@pytest.mark.parametrize("hardware,n,nodes", CLUSTERS)
def test_lockstep_times_equal_the_event_engine(hardware, n, nodes):
    for strategy, layout, causal, backward in (("tokenring", "zigzag", True, True), ("ring", "zigzag", True, False),
                                               ("ring", "contiguous", False, True),
                                               ("tokenring", "contiguous", True, False),
                                               ("ulysses4+tokenring", "zigzag", True, True),
                                               ("ulysses2+ring", "contiguous", False, True)):
        for heads, kv_heads, per_rank in ((16, 4, 2048), (32, 32, 512)):
            cluster, cost = _cost(strategy, n, layout, nodes, hardware, heads, kv_heads, per_rank)
            sched = build_schedule(strategy, n, layout=layout, causal=causal, backward=backward, num_heads=heads,
                                   num_kv_heads=kv_heads)
            want = simulate(sched, cost)
            got = simulate_plan(plan_from_schedule(sched, cost), cluster, cost)
            assert got.total_s == pytest.approx(want.total_s, rel=1e-9)
            np.testing.assert_allclose(got.step_end, want.step_end, rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(got.comm_end, want.comm_end, rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(got.bytes_sent, want.bytes_sent)


@pytest.mark.parametrize("strategy,hardware,n,nodes,seq", [
    ("tokenring", "h100-sxm", 64, 8, 1 << 20), ("ring", "h100-sxm", 48, 6, 3 << 15),
    ("ulysses8+tokenring", "h100-sxm", 64, 8, 1 << 20), ("ulysses8+ring", "h200-sxm", 128, 16, 1 << 20),
    ("tokenring", "mi300x", 48, 6, 3 << 14)])
def test_auto_path_equals_the_event_engine_end_to_end(strategy, hardware, n, nodes, seq):
    cluster = make_cluster(hardware, n, nodes)
    shape = AttentionShape(seq, 32, 128, 8)
    fast = simulate_attention(strategy, cluster, shape, causal=True, backward=True).summary()
    slow = simulate_attention(strategy, cluster, shape, causal=True, backward=True, engine="event",
                              max_transfers=2_000_000).summary()
    for key in ("total_ms", "compute_ms", "exposed_comm_ms", "comm_ms", "bubble_ms", "bytes_per_rank"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-6), key
    assert fast["step_ms"] == pytest.approx(slow["step_ms"], rel=1e-6)


def test_vectorised_routes_are_the_topology_routes():
    for hardware, n, nodes in (("h100-sxm", 16, 2), ("mi300x", 16, 2), ("a100-sxm", 8, 1)):
        cluster = make_cluster(hardware, n, nodes)
        topo, routes = Topology(cluster), Routes(cluster)
        src, dst = np.nonzero(~np.eye(n, dtype=bool))
        ids, lat = routes(src, dst)
        for a, b, row, t in zip(src, dst, ids, lat):
            want, want_lat = topo.route(int(a), int(b))
            assert sorted(topo.capacity[r] for r in want if r) == sorted(routes.capacity[r] for r in row if r)
            assert t == want_lat


def _fluid_reference(start, nbytes, routes, capacity):
    """The event engine's FluidNetwork, fed the same transfers one start at a time."""
    net = FluidNetwork(list(capacity), len(start))
    for f, (route, b) in enumerate(zip(routes, nbytes)):
        net.set_flow(f, tuple(route) + (0, 0), b)
    end = np.full(len(start), np.nan)
    pending = sorted(range(len(start)), key=lambda f: start[f])
    while pending or net.active:
        t_next = start[pending[0]] if pending else np.inf
        if net.active and net.next_finish() <= t_next:
            t = net.next_finish()
            for f in net.pop_finished(t):
                end[f] = t
        else:
            net.add(pending.pop(0), t_next)
    return end


def test_fluid_sharing_matches_the_event_engine_network():
    rng = np.random.default_rng(7)
    for trial in range(40):
        num_res, num = int(rng.integers(2, 7)), int(rng.integers(1, 14))
        capacity = np.r_[np.inf, rng.uniform(1.0, 4.0, num_res)]
        routes = rng.integers(1, num_res + 1, size=(num, 2))
        routes[rng.random(num) < 0.2, 1] = 0  # some one-resource routes (mesh links)
        same = routes[:, 0] == routes[:, 1]
        routes[same, 1] = 0
        start = np.round(rng.uniform(0, 3, num), 1)  # ties on purpose
        nbytes = rng.uniform(0.5, 5.0, num)
        got = fluid_ends(start, nbytes, routes, capacity)
        want = _fluid_reference(start, nbytes, routes, capacity)
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=f"trial {trial}")


def test_shared_uplinks_and_buses_stay_on_the_event_engine():
    assert lockstep_supported(make_cluster("h100-sxm", 8)) and lockstep_supported(make_cluster("mi300x", 8))
    assert not lockstep_supported(make_cluster("a10-pcie", 4))  # two GPUs share a switch uplink
    assert not uses_lockstep(make_cluster("a10-pcie", 4))
    assert not uses_lockstep(make_cluster("h100-sxm", 8), "event")
    with pytest.raises(UsageError, match="engine"):
        simulate_attention("tokenring", make_cluster("a10-pcie", 4), AttentionShape(4096, 8, 64), causal=True,
                           engine="lockstep")
    with pytest.raises(UsageError, match="engine"):
        simulate_attention("tokenring", make_cluster("h100-sxm", 4), AttentionShape(4096, 8, 64), causal=True,
                           engine="fast")
