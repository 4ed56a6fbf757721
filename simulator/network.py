"""Topology with contention: which shared resources a transfer crosses, and a fluid model of them.

A *resource* is one direction of something with a bandwidth: a GPU's NVSwitch port (egress and
ingress are separate resources, so the two directions of a link never interfere), one directed
pair link of a full mesh, a PCIe link or switch uplink (each direction), a NIC (each direction), or
the one shared loopback bus of a CPU host.

PCIe (fabric ``"pcie"``) is full duplex: every x16 link and switch uplink is two resources, one per
direction, at ``Link.bw`` (the nominal rate each way). One peer-to-peer stream through PCIe switches
reaches only ``Link.rate`` (``bw * efficiency``: ~13 of 25 GB/s on A10s, REFERENCE.md §6), which is a
limit of the stream, not of the wire: each (src, dst) pair is its own resource at that rate, so two
streams leaving one GPU for two peers share its link's full nominal rate instead of 13 GB/s. A transfer
between switches climbs its switch's uplink and descends the other's; with ``p2p_via="root"`` (peer
traffic forwarded by the CPU's root complex, nvidia-smi ``PHB``/``SYS``) it also crosses one
root-complex resource per node shared by every cross-switch transfer in both directions; with
``"switch"`` (``PIX``/``PXB``: a parent PCIe switch forwards it) it does not. The root complex
forwards :data:`~tokenloom.simulator.hardware.PCIE_ROOT_RATE` in all (fitted, docs/calibration.md).
With ``"host"`` (no peer-to-peer, NCCL's SHM path) every transfer, same switch or not, climbs to the
root and is capped per stream at ``PCIE_HOST_COPY_RATE``. :class:`Topology` maps a (src, dst) rank pair to the
resources on its route and the route latency.

:class:`FluidNetwork` moves bytes: a transfer crosses its route after the route latency (the
alpha-beta model: time = latency + bytes / bandwidth, Hockney 1994), and transfers sharing
resources get max-min fair rates (:func:`max_min_rates`: as TCP-like or NCCL channel sharing
tends to: no transfer can go faster without slowing one that is no faster). Two transfers on one
port therefore take twice as long as one; transfers on opposite directions or different ports do
not slow each other; a transfer held back elsewhere leaves its share of a port to the others.
Rates are recomputed, with numpy over all active transfers, only when the set of active transfers
changes.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from tokenloom.simulator.hardware import PCIE_HOST_COPY_RATE, PCIE_ROOT_RATE, Cluster

_MAX_HOPS = 6  # resources on the longest route (PCIe across switches through the root complex)


class Topology:
    """Resources (capacities in bytes/s) and routes of a :class:`Cluster`."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.capacity: list[float] = [math.inf]  # resource 0: padding, never a bottleneck
        self._ids: dict[tuple, int] = {}
        self._routes: dict[tuple[int, int], tuple[tuple[int, ...], float]] = {}

    def _res(self, key: tuple, rate: float) -> int:
        rid = self._ids.get(key)
        if rid is None:
            rid = self._ids[key] = len(self.capacity)
            self.capacity.append(rate)
        return rid

    def route(self, src: int, dst: int) -> tuple[tuple[int, ...], float]:
        """(resource ids padded to ``_MAX_HOPS`` with 0, latency in seconds) from ``src`` to ``dst``."""
        key = (src, dst)
        if key not in self._routes:
            res, lat = self._build_route(src, dst)
            self._routes[key] = (tuple(res) + (0,) * (_MAX_HOPS - len(res)), lat)
        return self._routes[key]

    def _build_route(self, src: int, dst: int) -> tuple[list[int], float]:
        node = self.cluster.node
        if self.cluster.node_of(src) != self.cluster.node_of(dst):
            nic = node.nic
            return [self._res(("nic_out", src), nic.rate), self._res(("nic_in", dst), nic.rate)], nic.latency_s
        link = node.link
        if node.fabric == "switch":
            return [self._res(("port_out", src), link.rate), self._res(("port_in", dst), link.rate)], link.latency_s
        if node.fabric == "mesh":
            return [self._res(("pair", src, dst), link.rate)], link.latency_s
        if node.fabric == "bus":
            return [self._res(("bus", self.cluster.node_of(src)), link.rate)], link.latency_s
        # PCIe tree: GPU -> its switch -> (root -> other switch) -> GPU; full duplex (module docstring).
        local = self.cluster.gpus_per_node
        sw_src = (src % local) // node.gpus_per_switch + local * self.cluster.node_of(src)
        sw_dst = (dst % local) // node.gpus_per_switch + local * self.cluster.node_of(dst)
        host = node.p2p_via == "host"  # no peer-to-peer: every transfer bounces through host memory
        stream = min(link.rate, PCIE_HOST_COPY_RATE) if host else link.rate
        res = [self._res(("p2p", src, dst), stream), self._res(("gpu_up", src), link.bw)]
        lat = link.latency_s
        if sw_src != sw_dst or host:
            up = node.uplink
            assert up is not None
            res += [self._res(("sw_up", sw_src), up.rate), self._res(("sw_down", sw_dst), up.rate)]
            if node.p2p_via in ("root", "host"):
                res.append(self._res(("root", self.cluster.node_of(src)), PCIE_ROOT_RATE))
            lat += up.latency_s
        res.append(self._res(("gpu_down", dst), link.bw))
        return res, lat


def max_min_rates(routes: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of transfers ``routes`` (one row of resource ids each; 0 = none) by
    progressive filling (Bertsekas & Gallager, "Data Networks", §6.5.2): the transfers on the
    resource with the smallest equal share are frozen at that share, the capacity they use is taken
    off their other resources, and the rest share what is left."""
    counts = np.bincount(routes.ravel(), minlength=len(capacity))
    rate = (capacity / np.maximum(counts, 1))[routes].min(axis=1)  # equal shares
    # Fast path: equal shares are already max-min fair when every transfer crosses a resource they
    # saturate (there it has the largest rate and cannot grow): true of symmetric traffic.
    used = np.bincount(routes.ravel(), weights=np.repeat(rate, routes.shape[1]), minlength=len(capacity))
    if (used >= capacity * (1 - 1e-9))[routes].any(axis=1).all():
        return rate
    if len(routes) > _VECTOR_FROM:
        return _max_min_numpy(routes, capacity)
    return np.asarray(_max_min_heap(routes.tolist(), capacity))


_VECTOR_FROM = 256  # below this many transfers a heap in plain Python beats numpy's per-call cost


def _max_min_heap(routes: list[list[int]], capacity: np.ndarray) -> list[float]:
    users: dict[int, list[int]] = {}
    for i, route in enumerate(routes):
        for res in route:
            if res:
                users.setdefault(res, []).append(i)
    cap = {res: float(capacity[res]) for res in users}
    count = {res: len(flows) for res, flows in users.items()}
    heap = [(cap[res] / count[res], res) for res in users]
    heapq.heapify(heap)
    rate = [-1.0] * len(routes)
    while heap:
        share, res = heapq.heappop(heap)
        if count[res] == 0 or share != cap[res] / count[res]:
            continue  # stale: this resource's share changed and was pushed again
        for i in users[res]:
            if rate[i] >= 0:
                continue
            rate[i] = share
            for other in routes[i]:
                if other:
                    cap[other] = max(cap[other] - share, 0.0)
                    count[other] -= 1
                    if count[other] and other != res:
                        heapq.heappush(heap, (cap[other] / count[other], other))
    return rate


def _max_min_numpy(routes: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """The same, one filling level per round over all transfers at once (large all-to-alls)."""
    cap = capacity.copy()
    rate = np.empty(len(routes))
    live = np.ones(len(routes), dtype=bool)
    while live.any():
        idx = np.flatnonzero(live)
        counts = np.bincount(routes[idx].ravel(), minlength=len(cap))
        share = cap / np.maximum(counts, 1)
        flow_share = share[routes[idx]].min(axis=1)
        level = flow_share.min()
        frozen = idx[flow_share <= level * (1 + 1e-9)]
        rate[frozen] = level
        live[frozen] = False
        cap -= level * np.bincount(routes[frozen].ravel(), minlength=len(cap))  # resource 0 stays inf
        np.maximum(cap, 0.0, out=cap)
    return rate


class FluidNetwork:
    """Active transfers and their remaining bytes; max-min fair shares (module docstring)."""

    def __init__(self, capacity: list[float], max_flows: int) -> None:
        self.capacity = np.asarray(capacity, dtype=np.float64)
        self.routes = np.zeros((max_flows, _MAX_HOPS), dtype=np.int64)
        self.remaining = np.zeros(max_flows, dtype=np.float64)
        self.active: list[int] = []
        self._rate = np.zeros(0)
        self._dirty = False
        self.now = 0.0
        self.peak_active = 0

    def set_flow(self, flow: int, route: tuple[int, ...], num_bytes: float) -> None:
        self.routes[flow, :len(route)] = route  # shorter routes (lockstep's two hops) padded with 0
        self.routes[flow, len(route):] = 0
        self.remaining[flow] = num_bytes

    def advance(self, t: float) -> None:
        """Move every active transfer forward to time ``t`` at its current rate."""
        if self.active and t > self.now:
            self._refresh()
            idx = np.asarray(self.active)
            self.remaining[idx] -= self._rate * (t - self.now)
        self.now = max(self.now, t)

    def add(self, flow: int, t: float) -> None:
        self.advance(t)
        self.active.append(flow)
        self._dirty = True
        self.peak_active = max(self.peak_active, len(self.active))

    def _refresh(self) -> None:
        if not self._dirty:
            return
        self._rate = max_min_rates(self.routes[self.active], self.capacity)
        self._dirty = False

    def next_finish(self) -> float:
        """Time at which the first active transfer completes (inf if none)."""
        if not self.active:
            return math.inf
        self._refresh()
        left = self.remaining[self.active]
        return self.now + max(float(np.min(left / self._rate)), 0.0)

    def pop_finished(self, t: float) -> list[int]:
        """Advance to ``t`` and remove (return, in flow order) the transfers done by then."""
        self.advance(t)
        self._refresh()
        left = self.remaining[self.active]
        # A relative tolerance absorbs rounding from repeated advances.
        done_mask = left <= 1e-9 * np.maximum(self._rate, 1.0)
        if not done_mask.any():  # rounding left a sliver on the transfer due now: finish it
            done_mask[int(np.argmin(left / self._rate))] = True
        done = [f for f, d in zip(self.active, done_mask) if d]
        self.active = [f for f, d in zip(self.active, done_mask) if not d]
        self._dirty = True
        return sorted(done)
