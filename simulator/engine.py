"""Discrete-event engine: walk a :class:`~tokenloom.parallel.schedule.Schedule` with a cost model.

Each rank has one compute stream and its posted communication beside it. A step follows the
schedule's four phases: at ``post`` every comm op is posted and the computes start back to back;
the step waits for its computes and for every transfer it takes part in; then the merges run and
the next step posts. Point-to-point operations match like NCCL's: the k-th send from a to b on a
channel meets the k-th receive at b from a on that channel, and bytes start to move only once both
sides have posted (a rendezvous) plus the route latency. An all-to-all starts when every rank has
entered it and ends, for all, when its last pair transfer lands. Transfers share links through
:class:`~tokenloom.simulator.network.FluidNetwork`.

Events are processed in time order (a heap of posts and transfer starts, plus the network's next
completion); per event the work is a few dict/list operations, and network rates are recomputed
with numpy only when the set of active transfers changes. A schedule in which some rank can never
finish (a receive without a send, a cycle of waits) raises :class:`DeadlockError`.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict

import numpy as np

from tokenloom.parallel.schedule import AllToAll, Recv, Schedule, Send
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
        n = sched.world_size
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
        sends: dict[tuple, list] = defaultdict(list)
        recvs: dict[tuple, list] = defaultdict(list)
        for r, steps in enumerate(sched.ranks):
            for s, st in enumerate(steps):
                for op in st.comms:
                    if isinstance(op, Send):
                        sends[(r, op.peer, op.channel)].append((s, op))
                    elif isinstance(op, Recv):
                        recvs[(op.peer, r, op.channel)].append((s, op))
        for key in sorted(set(sends) | set(recvs)):
            a, b, channel = key
            out, inc = sends.get(key, []), recvs.get(key, [])
            for (sa, send), (sb, recv) in zip(out, inc):
                if send.buf != recv.buf:
                    raise SimulationError(f"rank {b} step {sb} receives {recv.buf} from rank {a}, which "
                                          f"sends {send.buf} (step {sa}, channel {channel!r})")
                f = self._new_flow(a, b, cost.buf_bytes(send.buf), topo, str(send.buf), channel, -1)
                self.ops[a][sa].append(("p2p", f))
                self.ops[b][sb].append(("p2p", f))
                self.flow_ends.append(((a, sa), (b, sb)))
            for s, op in out[len(inc):]:
                self.ops[a][s].append(("never", f"send {op.buf} to rank {b}: no matching receive"))
            for s, op in inc[len(out):]:
                self.ops[b][s].append(("never", f"receive {op.buf} from rank {a}: no matching send"))

    def _collectives(self, sched: Schedule, cost: CostModel, topo: Topology) -> None:
        n = sched.world_size
        entries = [[(s, op) for s, st in enumerate(steps) for op in st.comms if isinstance(op, AllToAll)]
                   for steps in sched.ranks]
        common = min(len(e) for e in entries) if entries else 0
        for k in range(common):
            op = entries[0][k][1]
            pos = {r: entries[r][k][0] for r in range(n)}
            for r in range(n):
                if entries[r][k][1] != op:
                    raise SimulationError(f"rank {r} enters {entries[r][k][1]} as collective #{k}; rank 0 "
                                          f"enters {op}")
                self.ops[r][pos[r]].append(("coll", k))
            pair = cost.a2a_pair_bytes(op)
            flows = [self._new_flow(i, j, pair, topo, str(op), f"a2a:{op.kind}", k)
                     for i in range(n) for j in range(n) if i != j]
            for f in flows:
                self.flow_ends.append(())
            self.coll_flows.append(flows)
            self.coll_pos.append(pos)
        for r, e in enumerate(entries):
            for s, op in e[common:]:
                self.ops[r][s].append(("never", f"{op}: not every rank enters it"))


def simulate(sched: Schedule, cost: CostModel) -> Timeline:
    """Price ``sched`` on ``cost.cluster``; raise :class:`DeadlockError` if it cannot finish."""
    n = sched.world_size
    if cost.world_size != n:
        raise ValueError(f"cost model is for {cost.world_size} ranks, schedule for {n}")
    topo = Topology(cost.cluster)
    plan = _Plan(sched, cost, topo)
    num_flows = len(plan.src)
    net = FluidNetwork(topo.capacity, num_flows)
    for f in range(num_flows):
        net.set_flow(f, plan.route[f], plan.nbytes[f])
    steps = sched.num_steps
    post, comp_end, comm_end, wait_end, step_end = (np.full((n, steps), np.nan) for _ in range(5))
    pending = [[len(ops) for ops in per_rank] for per_rank in plan.ops]
    arrivals = [0] * num_flows
    coll_arrivals = [0] * len(plan.coll_flows)
    coll_left = [len(f) for f in plan.coll_flows]
    ready, started, ended = [math.nan] * num_flows, [math.nan] * num_flows, [math.nan] * num_flows
    heap: list[tuple] = [(0.0, _POST, r, 0) for r in range(n) if sched.ranks[r]]
    heapq.heapify(heap)

    def finish_step(r: int, s: int, t_comm: float) -> None:
        comm_end[r, s] = t_comm
        wait_end[r, s] = max(comp_end[r, s], t_comm)
        step_end[r, s] = wait_end[r, s] + plan.merge[r][s]
        if s + 1 < len(sched.ranks[r]):
            heapq.heappush(heap, (step_end[r, s], _POST, r, s + 1))

    def op_done(r: int, s: int, t: float) -> None:
        pending[r][s] -= 1
        if pending[r][s] == 0:
            finish_step(r, s, t)

    def do_post(r: int, s: int, t: float) -> None:
        post[r, s] = t
        comp_end[r, s] = t + plan.compute[r][s]
        for kind, ref in plan.ops[r][s]:
            if kind == "p2p":
                arrivals[ref] += 1
                if arrivals[ref] == 2:
                    ready[ref] = t
                    heapq.heappush(heap, (t + plan.lat[ref], _START, ref, 0))
            elif kind == "coll":
                coll_arrivals[ref] += 1
                if coll_arrivals[ref] == n:
                    for f in plan.coll_flows[ref]:
                        ready[f] = t
                        heapq.heappush(heap, (t + plan.lat[f], _START, f, 0))
        if not plan.ops[r][s]:
            finish_step(r, s, t)

    def flow_done(f: int, t: float) -> None:
        ended[f] = t
        k = plan.coll_of[f]
        if k < 0:
            for r, s in plan.flow_ends[f]:
                op_done(r, s, t)
            return
        coll_left[k] -= 1
        if coll_left[k] == 0:
            for r, s in plan.coll_pos[k].items():
                op_done(r, s, t)

    while True:
        t_heap = heap[0][0] if heap else math.inf
        t_net = net.next_finish()
        if t_heap == math.inf and t_net == math.inf:
            break
        if t_net <= t_heap:
            for f in net.pop_finished(t_net):
                flow_done(f, t_net)
            continue
        while heap and heap[0][0] == t_heap:  # a batch: rates are recomputed once after it
            t, kind, a, b = heapq.heappop(heap)
            if kind == _POST:
                do_post(a, b, t)
            else:
                started[a] = t
                net.add(a, t)
    _raise_if_stuck(sched, plan, pending, arrivals, coll_arrivals, step_end)
    bytes_sent = np.zeros(n)
    np.add.at(bytes_sent, np.asarray(plan.src, dtype=np.int64), np.asarray(plan.nbytes, dtype=np.float64))
    transfers = [Transfer(plan.src[f], plan.dst[f], plan.channel[f], plan.label[f], plan.nbytes[f],
                          ready[f], started[f], ended[f]) for f in range(num_flows)]
    has_comm = np.zeros((n, steps), dtype=bool)
    for r, per_rank in enumerate(plan.ops):
        for s, ops in enumerate(per_rank):
            has_comm[r, s] = bool(ops)
    return Timeline(sched, cost.cluster.describe(), post, comp_end, comm_end, wait_end, step_end,
                    has_comm, bytes_sent, transfers, net.peak_active, cost)


def _raise_if_stuck(sched: Schedule, plan: _Plan, pending, arrivals, coll_arrivals, step_end) -> None:
    stuck: dict[int, tuple[int, list[str]]] = {}
    for r, steps in enumerate(sched.ranks):
        if not steps or not np.isnan(step_end[r, len(steps) - 1]):
            continue
        s = next(i for i in range(len(steps)) if np.isnan(step_end[r, i]))
        waits = []
        for kind, ref in plan.ops[r][s]:
            if kind == "never":
                waits.append(ref)
            elif kind == "p2p" and arrivals[ref] < 2:
                peer = plan.dst[ref] if plan.src[ref] == r else plan.src[ref]
                waits.append(f"{plan.label[ref]} with rank {peer}, which never posts it")
            elif kind == "coll" and coll_arrivals[ref] < sched.world_size:
                waits.append(f"collective #{ref} that not every rank reaches")
        stuck[r] = (s, waits)
    if stuck:
        lines = [f"rank {r} step {s}: waits on {'; '.join(w) or 'a transfer'}" for r, (s, w) in sorted(stuck.items())]
        more = f" (+{len(lines) - 4} more ranks)" if len(lines) > 4 else ""
        raise DeadlockError(f"deadlock: ranks {sorted(stuck)} can never finish; " + " | ".join(lines[:4]) + more,
                            stuck)
