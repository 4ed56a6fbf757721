"""NCCL-style collectives on one node of the catalog, priced with the same links as the engine.

Alpha-beta per message (Hockney 1994) over the node's per-direction link rate
(:attr:`~tokenloom.simulator.hardware.Link.rate`), the conventions of NCCL-tests
(``doc/PERFORMANCE.md`` there): ``algbw = bytes / time``; ``busbw`` = algbw times 2(n-1)/n for
AllReduce, (n-1)/n for AllGather and ReduceScatter (``bytes`` = the full output), 1 for SendRecv.

- Ring AllReduce: 2(n-1) steps, each moving bytes/n over every rank's link; AllGather/ReduceScatter:
  n-1 such steps; SendRecv: one message. The call pays the link's message latency once: NCCL's
  low-latency protocols pipeline a ring's steps, so a 1 KB ring AllReduce on 4 GPUs took 3.5 us,
  about one 1 KB SendRecv (3.7 us; NVIDIA/nccl#1984, 4 x H800, no CUDA graphs), not 6 of them.
  A per-hop term that grows with n (NCCL's maintainer: ring latency is linear in n, nccl#757)
  cannot be separated from one row and is left out: at the sizes the simulator prices (MBs and up)
  it is < 1 % of the time.
- NVLink SHARP (NVLS, "multimem"): the NVSwitch reduces and multicasts, so every GPU sends and
  receives its bytes once; the switch's reduction rate bounds it (:data:`NVLS_ALGBW`, fitted to
  the published 8-GPU H100 figure, docs/calibration.md). NCCL runs whichever of ring and NVLS is
  faster (its tuner does; forcing NVLS on 2-4 GPUs published ring-like numbers).
- Point-to-point copies (cudaMemcpyPeer): one direction at the link rate; both directions at
  once do not interfere (the two directions are separate resources, as in the engine).
- PCIe nodes: a ring step's rate is the slowest of its n concurrent transfers r -> r+1 routed and
  shared by the engine's own topology (:class:`~tokenloom.simulator.network.Topology`: x16 links,
  switch uplinks, the root complex, or host memory when peer-to-peer is off), so a ring that crosses
  the CPU root complex shares it n ways; the latency is the link's plus the uplink's.
"""

from __future__ import annotations

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.simulator.hardware import Cluster, NodeSpec
from tokenloom.simulator.network import Topology, max_min_rates

# Achieved NVLS AllReduce algorithm bandwidth (bytes/s) of NVSwitch-3 nodes (sm_90). Fitted to the
# calibration set: NCCL maintainer, NVIDIA/nccl-tests#212 ("peak busBw ~480GB/s (algbw ~275GB/s)"
# on 8 x H100) and NVIDIA/nccl#1455 (algbw 258-273 GB/s on 5-8 H100s); H200 shares the switch.
NVLS_ALGBW = {"h100-sxm": 270e9, "h200-sxm": 270e9}
# Small-message NVLS AllReduce time: "approximately 6us" for 128 B - 64 KB on 2 x H100 with CUDA
# graphs (NVIDIA/nccl#1259, NCCL 2.20.5, NCCL_ALGO=NVLSTree): the switch's multicast round trip.
NVLS_LATENCY_S = 6e-6
OPS = ("allreduce", "allgather", "reducescatter", "sendrecv")


def _rate(node: NodeSpec, gpus: int = 2, both_ways: bool = True) -> float:
    """Per-rank link rate of a ring step: the NVSwitch port's, or on PCIe the slowest of the ring's
    concurrent transfers r -> r+1 under the engine's own topology and max-min sharing (:mod:`.network`;
    ``both_ways=False``: one transfer 0 -> 1 alone, a one-way peer copy)."""
    if node.fabric == "switch":
        return node.link.rate
    if node.fabric != "pcie":
        raise UsageError(f"collective model: only NVSwitch and PCIe nodes are priced, {node.name} is "
                         f"{node.fabric}", field="hardware")
    gpus = max(gpus, 2)
    topo = Topology(Cluster(node, gpus))
    pairs = [(r, (r + 1) % gpus) for r in range(gpus)] if both_ways else [(0, 1)]
    routes = np.array([topo.route(a, b)[0] for a, b in pairs], dtype=np.int64)
    return float(max_min_rates(routes, np.asarray(topo.capacity)).min())


def _latency(node: NodeSpec) -> float:
    up = node.uplink.latency_s if node.fabric == "pcie" and node.uplink is not None else 0.0
    return node.link.latency_s + up


def ring_time(node: NodeSpec, op: str, nbytes: float, gpus: int) -> float:
    """Seconds of a ring ``op`` of ``nbytes`` (the full buffer) over ``gpus`` ranks of ``node``."""
    if op not in OPS:
        raise UsageError(f"op must be one of {', '.join(OPS)}, got {op!r}", field="op")
    rate, lat = _rate(node, gpus), _latency(node)
    if op == "sendrecv":
        return lat + nbytes / rate
    if gpus < 2:
        return 0.0
    steps = 2 * (gpus - 1) if op == "allreduce" else gpus - 1
    return lat + steps * nbytes / gpus / rate


def nvls_time(node: NodeSpec, nbytes: float, gpus: int) -> float | None:
    """Seconds of an NVLS AllReduce, or None where the node has no NVLink SHARP."""
    bw = NVLS_ALGBW.get(node.name)
    if bw is None or gpus < 2:
        return None
    return NVLS_LATENCY_S + nbytes / min(bw, node.link.rate)


def allreduce_time(node: NodeSpec, nbytes: float, gpus: int) -> float:
    """What NCCL's tuner gives: the faster of ring and NVLS."""
    ring = ring_time(node, "allreduce", nbytes, gpus)
    nvls = nvls_time(node, nbytes, gpus)
    return ring if nvls is None else min(ring, nvls)


def bus_factor(op: str, gpus: int) -> float:
    if op == "allreduce":
        return 2 * (gpus - 1) / gpus
    if op in ("allgather", "reducescatter"):
        return (gpus - 1) / gpus
    return 1.0


def op_time(node: NodeSpec, op: str, nbytes: float, gpus: int, algo: str = "ring") -> float:
    """Seconds of one NCCL-tests ``op`` call; ``algo`` "ring", "nvls" or "auto" (AllReduce only)."""
    if op == "allreduce" and algo == "auto":
        return allreduce_time(node, nbytes, gpus)
    if op == "allreduce" and algo == "nvls":
        t = nvls_time(node, nbytes, gpus)
        if t is None:
            raise UsageError(f"collective model: {node.name} has no NVLS", field="algo")
        return t
    return ring_time(node, op, nbytes, gpus)


def busbw(node: NodeSpec, op: str, nbytes: float, gpus: int, algo: str = "ring") -> float:
    """NCCL-tests bus bandwidth (bytes/s) the model predicts; ``algo`` "ring" or "auto"."""
    t = allreduce_time(node, nbytes, gpus) if (op == "allreduce" and algo == "auto") else \
        ring_time(node, op, nbytes, gpus)
    return nbytes / t * bus_factor(op, gpus)


def p2p_copy_bw(node: NodeSpec, nbytes: float, both_directions: bool) -> float:
    """Bytes/s of a peer copy of ``nbytes`` (summed over directions when both run at once)."""
    rate = _rate(node, 2, both_directions)
    one = nbytes / (_latency(node) + nbytes / rate)
    return 2 * one if both_directions else one
