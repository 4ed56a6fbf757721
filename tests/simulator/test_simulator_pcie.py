"""PCIe is full duplex; one peer stream is capped below the wire; peer traffic between switches
through a parent switch (PXB) vs the CPU root complex (PHB/SYS). Rates checked by hand against
max-min sharing, and the held-out TokenRing README figures on 4 x A10 (never fitted)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tokenloom.simulator import AttentionShape, make_cluster, simulate_attention
from tokenloom.simulator import collectives
from tokenloom.simulator.hardware import CATALOG, PCIE_HOST_COPY_RATE, PCIE_ROOT_RATE, Cluster, pcie_box
from tokenloom.simulator.network import Topology, max_min_rates

A10 = CATALOG["a10-pcie"]  # GPUs 0,1 on switch 0; 2,3 on switch 1
STREAM = 13e9  # one peer stream through the A10 box's PCIe switches, ~13 GB/s (REFERENCE.md §6)
WIRE = 25.8e9  # a Gen4 x16 link or switch uplink, each direction (fitted: docs/calibration.md, PCIe)


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
    assert PCIE_ROOT_RATE == 88e9  # 4 ring streams x 22 GB/s (NVIDIA/nccl#1603)
    root = pcie_box(4, 1, "root")  # every GPU on its own root port, no stream cap under the wire
    assert rates(root, [(0, 2), (3, 1)]) == pytest.approx([WIRE, WIRE])  # 2 x 25.8 < 88: the wires bind
    ring = [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert rates(root, ring) == pytest.approx([22e9] * 4)  # 88 / 4: the root binds, both directions count
    assert rates(replace(A10, p2p_via="root"), [(0, 1), (2, 3)]) == pytest.approx([STREAM, STREAM])  # no root
    assert len(Topology(Cluster(root, 4)).route(0, 2)[0]) == 6


def test_without_peer_to_peer_every_transfer_bounces_through_the_host():
    host = pcie_box(4, 4, "host")  # one switch, yet NCCL's SHM path climbs to the root
    assert len(Topology(Cluster(host, 4)).route(0, 1)[0]) == 6
    assert rates(host, [(0, 1)]) == pytest.approx([PCIE_HOST_COPY_RATE])  # 19.9 GB/s
    ring = [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert rates(host, ring) == pytest.approx([25.8e9 / 4] * 4)  # all four climb the switch's one uplink
    assert rates(pcie_box(4, 1, "host"), ring) == pytest.approx([19.9e9] * 4)  # root 88 / 4 = 22 > 19.9
    eight = pcie_box(8, 1, "host")
    topo = Topology(Cluster(eight, 8))
    routes = np.array([topo.route(r, (r + 1) % 8)[0] for r in range(8)])
    assert max_min_rates(routes, np.asarray(topo.capacity)) == pytest.approx([11e9] * 8)  # 88 / 8


def test_pcie_ring_collective_priced_by_its_slowest_stream():
    # 4 GPUs on one switch, peer-to-peer: each ring step at the wire, 25.8 GB/s; 12 us latency
    nbytes, box = 1 << 30, pcie_box(4, 4, "switch")
    t = 12e-6 + 2 * 3 * nbytes / 4 / 25.8e9
    assert collectives.ring_time(box, "allreduce", nbytes, 4) == pytest.approx(t)
    assert collectives.busbw(box, "allreduce", nbytes, 4) == pytest.approx(nbytes / t * 1.5)
    assert collectives.busbw(pcie_box(4, 1, "root"), "allreduce", nbytes, 4) == pytest.approx(22e9, rel=1e-3)
    # the A10 box: each ring stream at its 13 GB/s cap
    assert collectives.busbw(A10, "allreduce", nbytes, 4) == pytest.approx(13e9, rel=1e-3)
    # a one-way copy with no peer-to-peer: the host-bounce rate
    assert collectives.p2p_copy_bw(pcie_box(2, 1, "host"), 40 << 20, False) == pytest.approx(
        (40 << 20) / (12e-6 + (40 << 20) / 19.9e9))


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
    # outputs no longer halve the queries' rate: step 2 / step 1 is 1.34 (README 4.6 / 3.5 = 1.31;
    # 1.62 before the duplex model); steps 0-1 are the 49 MB query transfer at 13 GB/s = 3.78 ms
    assert token[2] < 1.45 * token[1]
    assert token[1] == pytest.approx(49.152e6 / 13e9 * 1e3, rel=0.01)


def test_advise_ranks_tokenring_over_ring_where_the_readme_measured_it():
    from tokenloom.simulator import advise_attention

    res = advise_attention(make_cluster("a10-pcie", 4), AttentionShape(24000, 32, 128), causal=True, backward=False,
                           strategies=("tokenring", "ring"), layouts=("zigzag",))
    assert res.winner.strategy == "tokenring"
