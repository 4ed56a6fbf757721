"""The event engine's semantics, evaluated one step index at a time across all ranks (vectorised).

Why this is the same engine, not a second model. In :mod:`.engine` a rank posts step ``s+1`` only
after every transfer of its step ``s`` has ended, and every transfer of the built-in schedules
has both ends at the same step index. A resource that only one rank's traffic crosses (its
NVSwitch port out or in, its NIC out or in, a mesh pair link it sends on, its own PCIe link)
therefore only ever carries transfers of one step of that rank. When every route of a schedule
uses only such *rank-owned* resources, the transfers of step ``s`` can only contend with other
transfers of step ``s``, and the posts of step ``s`` on every rank are known once step ``s-1`` is
priced everywhere. So the engine's answer can be computed step by step: for each step, the posts
of all ranks, the computes, the rendezvous (a transfer is ready once both sides posted; an
all-to-all once every member did), then the same fluid max-min sharing
(:func:`~tokenloom.simulator.network.max_min_rates`) over that step's transfers only, then the
waits and merges. Transfers that share no resource with another of the step finish in closed form
(latency + bytes / rate); the others run a small event loop in which every connected group of
transfers keeps its own clock (groups do not interact), so the loop runs as many rounds as the
busiest group has events, not as many as the whole step.

A PCIe tree whose switch uplinks are shared by several GPUs, or a CPU host's one bus, breaks the
premise (one rank's late step can slow another rank's next step); :func:`lockstep_supported`
says no and the event engine prices those. Tests compare the two on many configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenloom.simulator.hardware import Cluster
from tokenloom.simulator.network import max_min_rates
from tokenloom.simulator.timeline import Timeline

_HOPS = 2  # rank-owned routes have at most two resources (out and in)


@dataclass(frozen=True)
class ScheduleInfo:
    """What a :class:`Timeline` needs to know of the schedule it priced (no step objects)."""

    strategy: str
    layout: str
    causal: bool
    backward: bool
    world_size: int
    num_steps: int
    ranks: tuple = ()  # no per-step objects: traces need the event engine


@dataclass
class StepPlan:
    """One pass compiled to arrays: per (rank, step) kernel seconds, and every transfer's step.

    ``coll`` is -1 for a point-to-point transfer, else the all-to-all it belongs to; an
    all-to-all ``k`` happens at step ``coll_step[k]`` over ranks ``coll_members[k]``.
    """

    info: ScheduleInfo
    compute: np.ndarray  # (ranks, steps) seconds
    merge: np.ndarray  # (ranks, steps) seconds
    has_ops: np.ndarray  # (ranks, steps) bool: some transfer or collective at that step
    step: np.ndarray  # (flows,) int
    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray  # (flows,) float
    coll: np.ndarray  # (flows,) int, -1 for p2p
    coll_step: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    coll_members: list = field(default_factory=list)


def lockstep_supported(cluster: Cluster) -> bool:
    """True when every route uses only rank-owned resources (module docstring)."""
    node = cluster.node
    if node.fabric in ("switch", "mesh"):
        return True
    # PCIe adds a per-stream resource (network.py) unless a stream can fill its link
    return (node.fabric == "pcie" and node.gpus_per_switch >= cluster.gpus_per_node
            and node.link.efficiency >= 1.0)


class Routes:
    """Vectorised :class:`~tokenloom.simulator.network.Topology` for rank-owned routes.

    Resource ids (0 = none): port/link out of rank r = 1 + r, in = 1 + n + r; NIC out/in =
    1 + 2n + r, 1 + 3n + r; a mesh pair link (a, b) on one node = 1 + 4n + a * g + b % g.
    """

    def __init__(self, cluster: Cluster) -> None:
        assert lockstep_supported(cluster), cluster.node.fabric
        n, node = cluster.num_gpus, cluster.node
        self.n, self.g, self.mesh = n, cluster.gpus_per_node, node.fabric == "mesh"
        size = 1 + 4 * n + (n * self.g if self.mesh else 0)
        self.capacity = np.full(size, np.inf)
        self.capacity[1:1 + 2 * n] = node.link.rate
        self.capacity[1 + 2 * n:1 + 4 * n] = node.nic.rate
        if self.mesh:
            self.capacity[1 + 4 * n:] = node.link.rate
        self.link_lat, self.nic_lat = node.link.latency_s, node.nic.latency_s

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(routes (flows, 2) int64, latency (flows,)) for transfers ``src`` -> ``dst``."""
        n, g = self.n, self.g
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        remote = (src // g) != (dst // g)
        out = np.where(remote, 1 + 2 * n + src, 1 + src)
        inn = np.where(remote, 1 + 3 * n + dst, 1 + n + dst)
        if self.mesh:
            out = np.where(remote, out, 1 + 4 * n + src * g + dst % g)
            inn = np.where(remote, inn, 0)
        lat = np.where(remote, self.nic_lat, self.link_lat)
        return np.stack([out, inn], axis=1), lat


def _components(start: np.ndarray, latest: np.ndarray, routes: np.ndarray) -> np.ndarray:
    """Groups of transfers that can affect each other's rates: linked when they cross one resource
    and their intervals ``[start, latest]`` overlap (transitively). Label = smallest member index.

    ``latest`` bounds a transfer's end (its worst max-min share), so two transfers that are never
    in flight together on a resource never share it, and groups that never link are independent.
    """
    flows = np.arange(len(start))
    res = np.concatenate([routes[:, 0], routes[:, 1]])
    who = np.concatenate([flows, flows])
    keep = res > 0
    res, who = res[keep], who[keep]
    order = np.lexsort((start[who], res))
    res, who = res[order], who[order]
    first = np.r_[True, res[1:] != res[:-1]]
    # running maximum of ``latest`` within each resource, in start order (groups are short)
    pos = np.arange(len(res)) - np.maximum.accumulate(np.where(first, np.arange(len(res)), 0))
    reach = latest[who].copy()
    for k in range(1, int(pos.max(initial=0)) + 1):
        at = np.flatnonzero(pos == k)
        reach[at] = np.maximum(reach[at], reach[at - 1])
    linked = ~first
    linked[1:] &= start[who[1:]] <= reach[:-1]
    a, b = who[np.flatnonzero(linked) - 1], who[linked]
    label = flows.copy()
    while a.size:
        low = label.copy()
        np.minimum.at(low, a, label[b])
        np.minimum.at(low, b, label[a])
        low = low[low]  # pointer jumping: labels point at members with smaller labels
        if (low == label).all():
            break
        label = low
    return label


def fluid_ends(start: np.ndarray, nbytes: np.ndarray, routes: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """End times of transfers that start at ``start`` and share resources max-min fairly."""
    end = np.empty(len(start))
    if not len(start):
        return end
    counts = np.bincount(routes.ravel(), minlength=len(capacity))
    alone = np.all((counts[routes] <= 1) | (routes == 0), axis=1)
    solo_rate = capacity[routes].min(axis=1)
    end[alone] = start[alone] + nbytes[alone] / solo_rate[alone]
    rest = np.flatnonzero(~alone)
    if rest.size:
        worst = (capacity / np.maximum(counts, 1))[routes[rest]].min(axis=1)  # max-min share >= this
        latest = start[rest] + nbytes[rest] / worst * (1 + 1e-9) + 1e-12
        comp = _components(start[rest], latest, routes[rest])
        single = np.bincount(comp, minlength=len(rest))[comp] == 1
        end[rest[single]] = start[rest[single]] + nbytes[rest[single]] / solo_rate[rest[single]]
        if not single.all():
            idx = rest[~single]
            end[idx] = _shared_ends(start[idx], nbytes[idx], routes[idx], capacity, comp[~single])
    return end


def _segments(comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index of each run of equal (sorted) group labels, and each element's run number."""
    new = np.r_[True, comp[1:] != comp[:-1]]
    return np.flatnonzero(new), np.cumsum(new) - 1


def _shared_ends(start: np.ndarray, nbytes: np.ndarray, routes: np.ndarray, capacity: np.ndarray,
                 comp: np.ndarray) -> np.ndarray:
    """The engine's fluid loop on transfers that share resources; one clock per group ``comp``."""
    order = np.argsort(comp, kind="stable")
    start, nbytes, routes, comp = start[order], nbytes[order], routes[order], comp[order]
    # groups are independent but may use one resource at different times: give each its own copy
    keyed = np.where(routes > 0, comp[:, None] * len(capacity) + routes, -1)
    ids, inv = np.unique(keyed, return_inverse=True)
    routes = inv.reshape(routes.shape) + (0 if ids[0] == -1 else 1)
    capacity = np.r_[np.inf, capacity[ids[ids >= 0] % len(capacity)]]
    seg, seg_of = _segments(comp)
    clock = np.minimum.reduceat(start, seg)
    rem = nbytes.astype(np.float64).copy()
    end = np.full(len(start), np.nan)
    where = np.arange(len(start))  # position of each working transfer in ``end``
    started = start <= clock[seg_of]
    done = np.zeros(len(start), dtype=bool)
    rate = np.zeros(len(start))
    for _ in range(4 * len(end) + 4):
        act = started & ~done
        if act.any():
            rate[act] = max_min_rates(routes[act], capacity)
        t = clock[seg_of]
        with np.errstate(divide="ignore", invalid="ignore"):
            due = np.where(act, t + rem / np.where(act, rate, 1.0), np.where(started | done, np.inf, start))
        nxt = np.minimum.reduceat(due, seg)
        live = np.isfinite(nxt)
        if not live.any():
            break
        step_to = np.where(live, nxt, clock)
        dt = step_to[seg_of] - t
        rem[act] -= rate[act] * dt[act]
        finished = act & ((due <= step_to[seg_of]) | (rem <= 1e-9 * np.maximum(rate, 1.0)))
        end[where[finished]] = step_to[seg_of][finished]
        done |= finished
        started |= ~started & (start <= step_to[seg_of])
        clock = step_to
        busy = ~np.logical_and.reduceat(done, seg)  # groups with a transfer left
        if not busy.any():
            break
        if busy.sum() * 2 < len(seg):  # most groups are done: keep working on the rest only
            keep = busy[seg_of]
            start, routes, rem, rate, where = start[keep], routes[keep], rem[keep], rate[keep], where[keep]
            started, done, comp, clock = started[keep], done[keep], comp[keep], clock[busy]
            seg, seg_of = _segments(comp)
    else:  # pragma: no cover - each round ends or starts a transfer
        raise AssertionError("lockstep fluid loop made no progress")
    out = np.empty(len(end))
    out[order] = end
    return out


def simulate_plan(plan: StepPlan, cluster: Cluster, cost=None) -> Timeline:
    """Price ``plan`` on ``cluster`` step by step (module docstring); the engine's :class:`Timeline`."""
    routes_of = Routes(cluster)
    n, steps = plan.compute.shape
    post, comp_end, comm_end, wait_end, step_end = (np.full((n, steps), np.nan) for _ in range(5))
    bounds = np.searchsorted(plan.step, np.arange(steps + 1))
    coll_at = np.searchsorted(plan.coll_step, np.arange(steps + 1)) if len(plan.coll_step) else None
    p = np.zeros(n)
    for s in range(steps):
        post[:, s] = p
        comp_end[:, s] = p + plan.compute[:, s]
        lo, hi = bounds[s], bounds[s + 1]
        ce = p.copy()
        if hi > lo:
            src, dst, coll = plan.src[lo:hi], plan.dst[lo:hi], plan.coll[lo:hi]
            ready = np.maximum(p[src], p[dst])
            ks = range(coll_at[s], coll_at[s + 1]) if coll_at is not None else range(0)
            coll_ready = {k: float(p[plan.coll_members[k]].max()) for k in ks}
            if coll_ready:
                is_coll = coll >= 0
                ready[is_coll] = [coll_ready[k] for k in coll[is_coll]]
            routes, lat = routes_of(src, dst)
            end = fluid_ends(ready + lat, plan.nbytes[lo:hi], routes, routes_of.capacity)
            p2p = coll < 0
            np.maximum.at(ce, src[p2p], end[p2p])
            np.maximum.at(ce, dst[p2p], end[p2p])
            for k, t in coll_ready.items():
                mine = coll == k
                members = plan.coll_members[k]
                ce[members] = np.maximum(ce[members], max(t, float(end[mine].max(initial=t))))
        comm_end[:, s] = ce
        wait_end[:, s] = np.maximum(comp_end[:, s], ce)
        p = step_end[:, s] = wait_end[:, s] + plan.merge[:, s]
    bytes_sent = np.bincount(plan.src, weights=plan.nbytes, minlength=n)
    return Timeline(plan.info, cluster.describe(), post, comp_end, comm_end, wait_end, step_end,
                    plan.has_ops, bytes_sent, [], 0, cost)


def plan_from_schedule(sched, cost) -> StepPlan | None:
    """The event engine's compiled plan of a real schedule as a :class:`StepPlan`; None when some
    transfer's two ends (or an all-to-all's members) are at different step indices."""
    from tokenloom.simulator.engine import _Plan
    from tokenloom.simulator.network import Topology

    plan = _Plan(sched, cost, Topology(cost.cluster))
    n, steps = sched.world_size, sched.num_steps

    def pad(rows: list[float]) -> list[float]:
        return rows + [0.0] * (steps - len(rows))

    compute = np.array([pad(list(r)) for r in plan.compute]).reshape(n, steps)
    merge = np.array([pad(list(r)) for r in plan.merge]).reshape(n, steps)
    has_ops = np.array([[bool(ops) for ops in r] + [False] * (steps - len(r)) for r in plan.ops]).reshape(n, steps)
    if any(kind == "never" for r in plan.ops for ops in r for kind, _ in ops):
        return None
    step = np.zeros(len(plan.src), dtype=np.int64)
    coll_step = np.zeros(len(plan.coll_pos), dtype=np.int64)
    for k, pos in enumerate(plan.coll_pos):
        if len(set(pos.values())) != 1:
            return None
        coll_step[k] = next(iter(pos.values()))
    for f, ends in enumerate(plan.flow_ends):
        if ends:
            (_, sa), (_, sb) = ends
            if sa != sb:
                return None
            step[f] = sa
        else:
            step[f] = coll_step[plan.coll_of[f]]
    order = np.argsort(step, kind="stable")
    info = ScheduleInfo(sched.strategy, sched.layout, sched.causal, sched.backward, n, steps)
    members = [np.array(sorted(pos), dtype=np.int64) for pos in plan.coll_pos]
    korder = np.argsort(coll_step, kind="stable")
    remap = np.empty(len(korder), dtype=np.int64)
    remap[korder] = np.arange(len(korder))
    coll = np.asarray(plan.coll_of, dtype=np.int64)[order]
    if len(remap):
        coll = np.where(coll >= 0, remap[np.maximum(coll, 0)], -1)
    return StepPlan(info, compute, merge, has_ops, step[order], np.asarray(plan.src, dtype=np.int64)[order],
                    np.asarray(plan.dst, dtype=np.int64)[order], np.asarray(plan.nbytes, dtype=np.float64)[order],
                    coll, coll_step[korder], [members[k] for k in korder])
