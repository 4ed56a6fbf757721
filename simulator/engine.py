"""Discrete-event engine: walk a :class:`~tokenloom.parallel.schedule.Schedule` with a cost model.

Each rank has one compute stream and its posted communication beside it. A step follows the
schedule's four phases: at ``post`` every comm op is posted and the computes start back to back;
the step waits for its computes and for every transfer it takes part in; then the merges run and
the next step posts. Point-to-point operations match by the runtime's rule
(:func:`tokenloom.parallel.schedule.match_p2p`): the k-th send from a to b meets the k-th receive
at b from a, and bytes start to move only once both
sides have posted (a rendezvous) plus the route latency. An all-to-all starts when every rank of its group
has entered it and ends, for all, when its last pair transfer lands. Transfers share links through
:class:`~tokenloom.simulator.network.FluidNetwork`.

Events are processed in time order (a heap of posts and transfer starts, plus the network's next
completion); per event the work is a few dict/list operations, and network rates are recomputed
with numpy only when the set of active transfers changes. A schedule in which some rank can never
finish (a receive without a send, a cycle of waits) raises :class:`DeadlockError`.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
from typing import Iterator

import numpy as np

from tokenloom.parallel.schedule import Schedule, a2a_entries, match_p2p
from tokenloom.simulator.cost import CostModel
from tokenloom.simulator.network import FluidNetwork, Topology
from tokenloom.simulator.timeline import Timeline, Transfer

_POST, _START = 0, 1  # heap event kinds; at equal times posts go first


class SimulationError(RuntimeError):
    """The schedule cannot be priced as written (e.g. a send and its receive disagree)."""


class DeadlockError(SimulationError):
    """Some rank can never finish; ``stuck`` maps rank -> (step, what it waits on)."""

    def __init__(self, message: str, stuck: dict[int, tuple[int, list[str]]]) -> None:
        super().__init__(message)
        self.stuck = stuck


class _Plan:
    """The schedule compiled to flat lists: per (rank, step) durations and comm ops, per flow its route."""

    def __init__(self, sched: Schedule, cost: CostModel, topo: Topology) -> None:
        self.compute = [[sum(cost.compute_s(op) for op in st.computes) for st in steps] for steps in sched.ranks]
        self.merge = [[sum(cost.merge_s(op) for op in st.merges) for st in steps] for steps in sched.ranks]
        # per (rank, step): list of ("p2p", flow) | ("coll", k) | ("never", description)
        self.ops: list[list[list[tuple]]] = [[[] for _ in steps] for steps in sched.ranks]
        self.src, self.dst, self.nbytes, self.lat, self.route = [], [], [], [], []
        self.label, self.channel, self.coll_of = [], [], []
        self.flow_ends: list[tuple[tuple[int, int], ...]] = []  # p2p: (sender pos, receiver pos)
        self.coll_flows: list[list[int]] = []
        self.coll_pos: list[dict[int, int]] = []  # collective k -> {rank: step}
        self._match_p2p(sched, cost, topo)
        self._collectives(sched, cost, topo)
        self._check_finite(topo)

    def _check_finite(self, topo: Topology) -> None:
        """Invariant: every duration, size and latency is finite and >= 0 and every capacity > 0.

        Inputs are range-checked where they enter (hardware file, flags, dataclasses), so a
        violation here is a bug; it is caught before the event loop, which could otherwise spin
        forever on a NaN time or never finish a transfer over a zero-rate link.
        """
        for what, rows in (("compute", self.compute), ("merge", self.merge)):
            for r, per_step in enumerate(rows):
                bad = [s for s, x in enumerate(per_step) if not 0.0 <= x < math.inf]
                if bad:
                    raise SimulationError(f"{what} time of rank {r} step {bad[0]} is {per_step[bad[0]]!r}; "
                                          f"durations must be finite and >= 0")
        for name, values in (("bytes", self.nbytes), ("latency", self.lat)):
            bad = [f for f, x in enumerate(values) if not 0.0 <= x < math.inf]
            if bad:
                f = bad[0]
                raise SimulationError(f"{name} of transfer {self.label[f]} (rank {self.src[f]} -> "
                                      f"{self.dst[f]}) is {values[f]!r}; it must be finite and >= 0")
        capacity = np.asarray(topo.capacity[1:], dtype=np.float64)
        if not (capacity > 0).all():  # NaN fails too
            raise SimulationError(f"a link or port has capacity {capacity[~(capacity > 0)][0]!r} bytes/s; "
                                  f"capacities must be > 0")

    def _new_flow(self, src: int, dst: int, nbytes: float, topo: Topology, label: str, channel: str,
                  coll: int) -> int:
        route, lat = topo.route(src, dst)
        self.src.append(src)
        self.dst.append(dst)
        self.nbytes.append(nbytes)
        self.route.append(route)
        self.lat.append(lat)
        self.label.append(label)
        self.channel.append(channel)
        self.coll_of.append(coll)
        return len(self.src) - 1

    def _match_p2p(self, sched: Schedule, cost: CostModel, topo: Topology) -> None:
        """Flows for matched sends/receives: the runtime's rule (:func:`match_p2p`)."""
        matches, problems = match_p2p(sched)
        for p in problems:
            if p.kind == "mismatch":
                raise SimulationError(f"rank {p.rank} step {p.step}: {p.message}")
            self.ops[p.rank][p.step].append(("never", p.message))
        for m in matches:
            (a, sa, _), (b, sb, _) = m.send_at, m.recv_at
            f = self._new_flow(a, b, cost.buf_bytes(m.send.buf), topo, str(m.send.buf), m.send.channel, -1)
            self.ops[a][sa].append(("p2p", f))
            self.ops[b][sb].append(("p2p", f))
            self.flow_ends.append(((a, sa), (b, sb)))

    def _collectives(self, sched: Schedule, cost: CostModel, topo: Topology) -> None:
        """All-to-alls per group (:attr:`Schedule.groups`): the k-th of every member meet."""
        for group, entries in a2a_entries(sched).items():
            common = min(len(e) for e in entries) if entries else 0
            for k in range(common):
                op = entries[0][k][1]
                c = len(self.coll_flows)
                pos = {r: entries[i][k][0] for i, r in enumerate(group)}
                for i, r in enumerate(group):
                    if entries[i][k][1] != op:
                        raise SimulationError(f"rank {r} enters {entries[i][k][1]} as collective #{k}; rank "
                                              f"{group[0]} enters {op}")
                    self.ops[r][pos[r]].append(("coll", c))
                pair = cost.a2a_pair_bytes(op)
                flows = [self._new_flow(i, j, pair, topo, str(op), f"a2a:{op.kind}", c)
                         for i in group for j in group if i != j]
                for f in flows:
                    self.flow_ends.append(())
                self.coll_flows.append(flows)
                self.coll_pos.append(pos)
            for i, e in enumerate(entries):
                for s, op in e[common:]:
                    self.ops[group[i]][s].append(("never", f"{op}: not every rank of {list(group)} enters it"))


def simulate(sched: Schedule, cost: CostModel) -> Timeline:
    """Price ``sched`` on ``cost.cluster``; raise :class:`DeadlockError` if it cannot finish."""
    if cost.world_size != sched.world_size:
        raise SimulationError(f"cost model is for {cost.world_size} ranks, schedule for {sched.world_size}")
    with no_gc():
        run = _Run(sched, cost)
        run.loop()
        run.raise_if_stuck()
        return run.timeline()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: simulating allocates many small objects and no cycles,
    and Python's collector rescanning the large live schedule made up half the run time (measured)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Run:
    """State of one simulation: per (rank, step) times, per transfer arrivals and times."""

    def __init__(self, sched: Schedule, cost: CostModel) -> None:
        n, steps = sched.world_size, sched.num_steps
        topo = Topology(cost.cluster)
        self.sched, self.cost, self.plan = sched, cost, _Plan(sched, cost, topo)
        num_flows = len(self.plan.src)
        self.net = FluidNetwork(topo.capacity, num_flows)
        for f in range(num_flows):
            self.net.set_flow(f, self.plan.route[f], self.plan.nbytes[f])
        self.post, self.comp_end, self.comm_end, self.wait_end, self.step_end = (
            np.full((n, steps), np.nan) for _ in range(5))
        self.pending = [[len(ops) for ops in per_rank] for per_rank in self.plan.ops]
        self.arrivals = [0] * num_flows
        self.coll_arrivals = [0] * len(self.plan.coll_flows)
        self.coll_left = [len(f) for f in self.plan.coll_flows]
        self.ready, self.started, self.ended = ([math.nan] * num_flows for _ in range(3))
        self.heap: list[tuple] = [(0.0, _POST, r, 0) for r in range(n) if sched.ranks[r]]
        heapq.heapify(self.heap)

    def loop(self) -> None:
        """Process events in time order until nothing more can happen."""
        heap, net = self.heap, self.net
        # Each round pops at least one event (a post, a transfer start, or a finished transfer), so
        # a finite schedule needs at most this many rounds; more means the invariants broke.
        budget = sum(len(steps) for steps in self.sched.ranks) + 2 * len(self.plan.src) + 1
        now = 0.0
        while True:
            t_heap = heap[0][0] if heap else math.inf
            t_net = net.next_finish()
            if t_heap == math.inf and t_net == math.inf:
                return
            budget -= 1
            if budget < 0 or not (now <= t_heap and now <= t_net):  # NaN fails both comparisons
                raise SimulationError(f"event loop made no progress at t={now!r} s (next post {t_heap!r}, "
                                      f"next transfer end {t_net!r}); a time is NaN or went backwards")
            now = min(t_heap, t_net)
            if t_net <= t_heap:
                for f in net.pop_finished(t_net):
                    self.flow_done(f, t_net)
                continue
            while heap and heap[0][0] == t_heap:  # a batch: rates are recomputed once after it
                t, kind, a, b = heapq.heappop(heap)
                if kind == _POST:
                    self.do_post(a, b, t)
                else:
                    self.started[a] = t
                    net.add(a, t)

    def do_post(self, r: int, s: int, t: float) -> None:
        """Phase 1 and 2 of step s on rank r: post the comm ops, run the computes."""
        plan = self.plan
        self.post[r, s] = t
        self.comp_end[r, s] = t + plan.compute[r][s]
        for kind, ref in plan.ops[r][s]:
            if kind == "p2p":
                self.arrivals[ref] += 1
                if self.arrivals[ref] == 2:
                    self._start(ref, t)
            elif kind == "coll":
                self.coll_arrivals[ref] += 1
                if self.coll_arrivals[ref] == len(plan.coll_pos[ref]):
                    for f in plan.coll_flows[ref]:
                        self._start(f, t)
                    if not plan.coll_flows[ref]:  # one rank: the all-to-all is the identity
                        self._collective_done(ref, t)
        if not plan.ops[r][s]:
            self.finish_step(r, s, t)

    def _start(self, f: int, t: float) -> None:
        self.ready[f] = t
        heapq.heappush(self.heap, (t + self.plan.lat[f], _START, f, 0))

    def flow_done(self, f: int, t: float) -> None:
        self.ended[f] = t
        k = self.plan.coll_of[f]
        if k < 0:
            for r, s in self.plan.flow_ends[f]:
                self.op_done(r, s, t)
            return
        self.coll_left[k] -= 1
        if self.coll_left[k] == 0:
            self._collective_done(k, t)

    def _collective_done(self, k: int, t: float) -> None:
        for r, s in self.plan.coll_pos[k].items():
            self.op_done(r, s, t)

    def op_done(self, r: int, s: int, t: float) -> None:
        self.pending[r][s] -= 1
        if self.pending[r][s] == 0:
            self.finish_step(r, s, t)

    def finish_step(self, r: int, s: int, t_comm: float) -> None:
        """Phases 3 and 4: the wait ends with the later of computes and transfers; merges follow."""
        self.comm_end[r, s] = t_comm
        self.wait_end[r, s] = max(self.comp_end[r, s], t_comm)
        self.step_end[r, s] = self.wait_end[r, s] + self.plan.merge[r][s]
        if s + 1 < len(self.sched.ranks[r]):
            heapq.heappush(self.heap, (self.step_end[r, s], _POST, r, s + 1))

    def raise_if_stuck(self) -> None:
        stuck = {r: (s, self._waits(r, s)) for r, s in self._stuck_steps()}
        if stuck:
            lines = [f"rank {r} step {s}: waits on {'; '.join(w) or 'a transfer'}" for r, (s, w) in sorted(stuck.items())]
            more = f" (+{len(lines) - 4} more ranks)" if len(lines) > 4 else ""
            raise DeadlockError(f"deadlock: ranks {sorted(stuck)} can never finish; " + " | ".join(lines[:4]) + more,
                                stuck)

    def _stuck_steps(self) -> list[tuple[int, int]]:
        """(rank, first unfinished step) of every rank that did not finish."""
        out = []
        for r, steps in enumerate(self.sched.ranks):
            unfinished = np.flatnonzero(np.isnan(self.step_end[r, :len(steps)]))
            if unfinished.size:
                out.append((r, int(unfinished[0])))
        return out

    def _waits(self, r: int, s: int) -> list[str]:
        plan, waits = self.plan, []
        for kind, ref in plan.ops[r][s]:
            if kind == "never":
                waits.append(ref)
            elif kind == "p2p" and self.arrivals[ref] < 2:
                peer = plan.dst[ref] if plan.src[ref] == r else plan.src[ref]
                waits.append(f"{plan.label[ref]} with rank {peer}, which never posts it")
            elif kind == "coll" and self.coll_arrivals[ref] < self.sched.world_size:
                waits.append(f"collective #{ref} that not every rank reaches")
        return waits

    def timeline(self) -> Timeline:
        plan, n = self.plan, self.sched.world_size
        bytes_sent = np.zeros(n)
        np.add.at(bytes_sent, np.asarray(plan.src, dtype=np.int64), np.asarray(plan.nbytes, dtype=np.float64))
        transfers = [Transfer(plan.src[f], plan.dst[f], plan.channel[f], plan.label[f], plan.nbytes[f],
                              self.ready[f], self.started[f], self.ended[f]) for f in range(len(plan.src))]
        has_comm = np.zeros(self.post.shape, dtype=bool)
        for r, per_rank in enumerate(plan.ops):
            for s, ops in enumerate(per_rank):
                has_comm[r, s] = bool(ops)
        return Timeline(self.sched, self.cost.cluster.describe(), self.post, self.comp_end, self.comm_end,
                        self.wait_end, self.step_end, has_comm, bytes_sent, transfers, self.net.peak_active,
                        self.cost)
