"""The simulator and the advisor cover the 2-D hybrid (Ulysses inside nodes, a ring across)."""

import pytest

from tokenloom.common.errors import UsageError
from tokenloom.parallel import build_schedule
from tokenloom.parallel.builders import describe_strategy, parse_strategy
from tokenloom.parallel.schedule import match_p2p
from tokenloom.simulator.advisor import advise_attention, hybrid_candidates
from tokenloom.simulator.cost import AttentionShape, CostModel
from tokenloom.simulator.hardware import make_cluster
from tokenloom.simulator.scenario import check_feasible, simulate_attention


def test_hybrid_names():
    assert parse_strategy("ulysses8+tokenring") == ("tokenring", 8)
    assert parse_strategy("ring") == ("ring", 1)
    for bad in ("ulysses+ring", "ulysses8+ulysses", "ulyssesX+ring", "ring8"):
        with pytest.raises(UsageError, match="strategy must be"):
            parse_strategy(bad)
    assert describe_strategy("ulysses8+tokenring", 32, 8) == "ulysses x8 inside nodes, tokenring x4 across"


def test_hybrid_all_to_all_stays_inside_the_node_and_the_ring_crosses():
    cluster = make_cluster("h100-sxm", 8, 2)  # 2 nodes x 4
    shape = AttentionShape(8192, 8, 64, 2, 1, 2)
    res = simulate_attention("ulysses4+tokenring", cluster, shape, causal=True, backward=True, engine="event")
    for timeline in res.passes:
        a2a = [t for t in timeline.transfers if t.channel.startswith("a2a")]
        p2p = [t for t in timeline.transfers if not t.channel.startswith("a2a")]
        assert a2a and p2p
        assert all(t.src // 4 == t.dst // 4 for t in a2a)  # Ulysses group = one node
        assert all(t.src // 4 != t.dst // 4 for t in p2p)  # ring peers in the other node
    assert res.total_s > 0


def test_hybrid_all_to_all_bytes_are_the_group_share():
    cluster = make_cluster("h100-sxm", 8, 2)
    shape = AttentionShape(8192, 8, 64, 8, 1, 2)
    flat, hybrid = CostModel(shape, cluster, "zigzag"), CostModel(shape, cluster, "zigzag", head_shards=4)
    sched = build_schedule("ulysses4+ring", 8, causal=True, num_heads=8)
    op = sched.ranks[0][0].comms[0]
    # a rank's 1024 tokens x 8 heads x 64 dims x 2 bytes, split over 4 (hybrid) vs 8 (flat) ranks
    assert hybrid.a2a_pair_bytes(op) == 1024 * 8 * 64 * 2 / 4 == 2 * flat.a2a_pair_bytes(op)
    assert not match_p2p(sched)[1]


def test_advisor_prices_hybrids_only_across_nodes():
    one_node = make_cluster("h100-sxm", 8, 1)
    assert hybrid_candidates(one_node) == ()
    four_nodes = make_cluster("h100-sxm", 32, 4)
    assert "ulysses8+tokenring" in hybrid_candidates(four_nodes)
    shape = AttentionShape(65536, 32, 128, 8, 1, 2)
    advice = advise_attention(four_nodes, shape, causal=True, backward=False, layouts=("zigzag",))
    names = {r.strategy for r in advice.ranking}
    assert {"tokenring", "ring", "ulysses", "ulysses8+tokenring", "ulysses8+ring"} <= names
    if parse_strategy(advice.winner.strategy)[1] > 1:
        assert "inside" in advice.verdict()


def test_hybrid_feasibility_names_the_field():
    shape = AttentionShape(4096, 6, 64)
    with pytest.raises(UsageError, match=r"heads \(6\) divisible by ulysses mesh dim size \(4\)"):
        check_feasible("ulysses4+ring", 8, shape)
    with pytest.raises(UsageError, match="must divide gpus"):
        check_feasible("ulysses3+ring", 8, AttentionShape(4096, 6, 64))


def test_hybrid_work_estimate_never_undercounts():
    from tokenloom.simulator.scenario import estimated_transfers

    for n, nodes, u in ((8, 2, 2), (8, 2, 4), (12, 3, 4), (16, 4, 4)):
        cluster = make_cluster("h100-sxm", n, nodes)
        for strategy, layout, causal in (("tokenring", "zigzag", True), ("ring", "contiguous", False)):
            name = f"ulysses{u}+{strategy}"
            res = simulate_attention(name, cluster, AttentionShape(64 * n, 8, 32, 2), causal=causal,
                                     backward=True, layout=layout, engine="event")
            assert sum(len(p.transfers) for p in res.passes) <= estimated_transfers(name, n, True)


def test_advisor_drops_its_own_hybrids_at_the_work_limit():
    from tokenloom.simulator.scenario import LOCKSTEP_WEIGHT, estimated_transfers

    cluster = make_cluster("h100-sxm", 16, 2)  # NVSwitch: lockstep, whose work counts 1/LOCKSTEP_WEIGHT
    flat_only = -(-sum(estimated_transfers(s, 16, False) for s in ("tokenring", "ring", "ulysses"))
                  // LOCKSTEP_WEIGHT)
    advice = advise_attention(cluster, AttentionShape(4096, 16, 64), causal=True, backward=False,
                              layouts=("zigzag",), max_transfers=flat_only)
    assert {r.strategy for r in advice.ranking} == {"tokenring", "ring", "ulysses"}
    assert any("work limit" in why for s, _, why in advice.skipped if "+" in s)
