"""Topology with contention: which shared resources a transfer crosses, and a fluid model of them.

A *resource* is one direction of something with a bandwidth: a GPU's NVSwitch port (egress and
ingress are separate resources, so the two directions of a link never interfere), one directed
pair link of a full mesh, a PCIe link or switch uplink (each direction), a NIC (each direction), or
the one shared loopback bus of a CPU host. :class:`Topology` maps a (src, dst) rank pair to the
resources on its route and the route latency.

:class:`FluidNetwork` moves bytes: a transfer crosses its route after the route latency (the
alpha-beta model: time = latency + bytes / bandwidth, Hockney 1994), and while several transfers
share a resource each gets an equal share of it; a transfer runs at the share of its tightest
resource. Two transfers on one port therefore take twice as long as one; transfers on opposite
directions or different ports do not slow each other. (Equal sharing is max-min fair whenever the
flows on a resource have the same bottleneck, which holds for the symmetric ring and all-to-all
traffic priced here; otherwise it is a slightly pessimistic bound.) Rates are recomputed, with
numpy over all active transfers, only when the set of active transfers changes.
"""

from __future__ import annotations

import math

import numpy as np

from tokenloom.simulator.hardware import Cluster

_MAX_HOPS = 4  # resources on the longest route (PCIe across switches)


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
        # PCIe tree: GPU -> its switch -> (root -> other switch) -> GPU.
        local = self.cluster.gpus_per_node
        sw_src = (src % local) // node.gpus_per_switch + local * self.cluster.node_of(src)
        sw_dst = (dst % local) // node.gpus_per_switch + local * self.cluster.node_of(dst)
        res = [self._res(("gpu_up", src), link.rate)]
        lat = link.latency_s
        if sw_src != sw_dst:
            up = node.uplink
            assert up is not None
            res += [self._res(("sw_up", sw_src), up.rate), self._res(("sw_down", sw_dst), up.rate)]
            lat += up.latency_s
        res.append(self._res(("gpu_down", dst), link.rate))
        return res, lat


class FluidNetwork:
    """Active transfers and their remaining bytes; equal share per resource (module docstring)."""

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
        self.routes[flow] = route
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
        routes = self.routes[self.active]
        counts = np.bincount(routes.ravel(), minlength=len(self.capacity))
        share = self.capacity / np.maximum(counts, 1)
        self._rate = share[routes].min(axis=1)
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
