"""PCIe is full duplex; one peer stream is capped below the wire; peer traffic between switches
through a parent switch (PXB) vs the CPU root complex (PHB/SYS). Rates checked by hand against
max-min sharing, and the held-out TokenRing README figures on 4 x A10 (never fitted)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tokenloom.simulator import AttentionShape, make_cluster, simulate_attention
from tokenloom.simulator.hardware import CATALOG, Cluster
from tokenloom.simulator.network import Topology, max_min_rates

A10 = CATALOG["a10-pcie"]  # GPUs 0,1 on switch 0; 2,3 on switch 1
STREAM = 25e9 * 0.52  # one peer stream through PCIe switches, ~13 GB/s (REFERENCE.md §6)
WIRE = 25e9  # a Gen4 x16 link or switch uplink, each direction (REFERENCE.md §6)


def rates(node, pairs) -> np.ndarray:
    topo = Topology(Cluster(node, 4))
    routes = np.array([topo.route(a, b)[0] for a, b in pairs])
    return max_min_rates(routes, np.asarray(topo.capacity))


def test_both_directions_of_a_pcie_link_run_at_once():
    assert rates(A10, [(0, 1), (1, 0)]) == pytest.approx([STREAM, STREAM])
    assert rates(A10, [(0, 2), (2, 0)]) == pytest.approx([STREAM, STREAM])  # uplinks too


def test_two_streams_out_of_one_gpu_share_its_wire_not_one_stream_rate():
    # TokenRing's step: queries one way, partial outputs the other way, both leave GPU 0
    assert rates(A10, [(0, 1), (0, 3)]) == pytest.approx([WIRE / 2, WIRE / 2])
    # three streams out of one GPU: 25/3 each, below the 13 GB/s stream cap
    assert rates(A10, [(0, 1), (0, 2), (0, 3)]) == pytest.approx([WIRE / 3] * 3)


def test_switch_uplink_is_shared_by_its_gpus_in_one_direction_only():
    assert rates(A10, [(0, 2), (1, 3)]) == pytest.approx([WIRE / 2, WIRE / 2])  # both climb switch 0
    assert rates(A10, [(0, 2), (3, 1)]) == pytest.approx([STREAM, STREAM])  # opposite directions


def test_peer_traffic_through_the_root_complex_contends_in_both_directions():
    root = replace(A10, p2p_via="root")
    assert rates(root, [(0, 2), (3, 1)]) == pytest.approx([WIRE / 2, WIRE / 2])
    assert rates(root, [(0, 1), (2, 3)]) == pytest.approx([STREAM, STREAM])  # same switch: no root
    assert len(Topology(Cluster(root, 4)).route(0, 2)[0]) == 6


def test_tokenring_readme_per_step_times_on_4_a10():
    """ACA-Lab-SJTU/token-ring README (held out, never fitted): 4 x A10 (PIX + PXB), LLaMA2-7B
    attention (32 heads x 128), 24000 tokens: Ring ~7.6 ms per step (communication-bound); TokenRing
    ~3.5 ms at steps 0-1 and ~4.6 ms at step 2, when queries and outputs travel at once."""
    shape = AttentionShape(24000, 32, 128)
    cluster = make_cluster("a10-pcie", 4)
    ring = simulate_attention("ring", cluster, shape, causal=True, layout="zigzag").summary()["step_ms"]
    token = simulate_attention("tokenring", cluster, shape, causal=True, layout="zigzag").summary()["step_ms"]
    assert ring[1] == pytest.approx(7.6, rel=0.05)  # K+V, 98.3 MB at 13 GB/s = 7.56 ms
    assert max(token[:4]) < 0.75 * ring[1]  # TokenRing clearly faster per step, as measured
    assert token[2] < 1.1 * token[1]  # outputs no longer halve the queries' rate (was 1.6x)


def test_advise_ranks_tokenring_over_ring_where_the_readme_measured_it():
    from tokenloom.simulator import advise_attention

    res = advise_attention(make_cluster("a10-pcie", 4), AttentionShape(24000, 32, 128), causal=True, backward=False,
                           strategies=("tokenring", "ring"), layouts=("zigzag",))
    assert res.winner.strategy == "tokenring"
