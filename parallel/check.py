"""Prove a schedule correct for every rank, in one process, without running any kernel.

:func:`check_schedule` executes the schedule symbolically. Each buffer carries the chunks it holds
and, for partial results, the set of ``(q_chunk, kv_chunk, head_shard)`` pairs folded into it.
It raises :class:`ScheduleError` (with the schedule printed and the failing step marked) unless:

- every send has a receive of the same buffer (hence the same size) on its peer, in the same
  order, and every collective is entered by all ranks;
- ranks can always make progress (no deadlock) under the step semantics of ``schedule.py``;
- every op reads data that is present, and no step sends a buffer it is also writing;
- every pair the mask needs is computed exactly once and reaches its owner's outputs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tokenloom.comm.topology import chunks_of_rank, num_chunks
from tokenloom.parallel.builders import needed_pairs
from tokenloom.parallel.schedule import (
    PARTIAL_KINDS,
    AllToAll,
    Buf,
    Compute,
    Pack,
    Recv,
    Schedule,
    Send,
    a2a_bufs,
)

Pair = tuple[int, int, int]  # (q_chunk, kv_chunk, head_shard)


class ScheduleError(AssertionError):
    """A schedule is inconsistent; the message prints it with the failing step marked."""


@dataclass
class _Held:
    chunks: set[int]
    pairs: set[Pair] = field(default_factory=set)


def _fail(sched: Schedule, rank: int, step: int, msg: str) -> None:
    raise ScheduleError(f"rank {rank} step {step}: {msg}\n{sched.describe(mark=(rank, step))}")


def _match_p2p(sched: Schedule) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Pair the k-th send a->b with the k-th receive at b from a; return recv position -> send position."""
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    for r, steps in enumerate(sched.ranks):
        for s, step in enumerate(steps):
            for i, op in enumerate(step.comms):
                if isinstance(op, (Send, Recv)) and not 0 <= op.peer < sched.world_size:
                    _fail(sched, r, s, f"peer {op.peer} outside world_size {sched.world_size}")
                if isinstance(op, Send):
                    sends[(r, op.peer)].append((s, i, op.buf))
                elif isinstance(op, Recv):
                    recvs[(op.peer, r)].append((s, i, op.buf))
    match = {}
    for pair in set(sends) | set(recvs):
        a, b = pair
        sa, rb = sends.get(pair, []), recvs.get(pair, [])
        for k in range(max(len(sa), len(rb))):
            if k >= len(sa):
                _fail(sched, b, rb[k][0], f"receive #{k} from rank {a} ({rb[k][2]}) has no matching send")
            if k >= len(rb):
                _fail(sched, a, sa[k][0], f"send #{k} to rank {b} ({sa[k][2]}) has no matching receive")
            if sa[k][2] != rb[k][2]:
                _fail(sched, b, rb[k][0], f"receive #{k} from rank {a} expects {rb[k][2]} but rank {a} "
                      f"sends {sa[k][2]} (sizes would differ or data would be swapped)")
            match[(b, rb[k][0], rb[k][1])] = (a, sa[k][0])
    return match


def _progress_order(sched: Schedule) -> list[tuple[int, int]]:
    """Order in which (rank, step) complete; raise on deadlock."""
    n = sched.world_size
    partner: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    p2p_pos: dict[tuple, list] = defaultdict(list)
    coll_pos: list[list[int]] = [[] for _ in range(n)]
    for r, steps in enumerate(sched.ranks):
        for s, step in enumerate(steps):
            for op in step.comms:
                if isinstance(op, Send):
                    p2p_pos[("s", r, op.peer)].append(s)
                elif isinstance(op, Recv):
                    p2p_pos[("r", op.peer, r)].append(s)
                else:
                    coll_pos[r].append(s)
    for (kind, a, b), positions in p2p_pos.items():
        if kind != "s":
            continue
        for s_send, s_recv in zip(positions, p2p_pos[("r", a, b)]):
            partner[(a, s_send)].append((b, s_recv))
            partner[(b, s_recv)].append((a, s_send))
    counts = {len(c) for c in coll_pos}
    if len(counts) > 1:
        r = min(range(n), key=lambda x: len(coll_pos[x]))
        _fail(sched, r, len(sched.ranks[r]) - 1, f"ranks enter different numbers of collectives: "
              f"{[len(c) for c in coll_pos]}")
    for k in range(counts.pop() if counts else 0):
        group = [(r, coll_pos[r][k]) for r in range(n)]
        for member in group:
            partner[member].extend(g for g in group if g != member)
    pc = [0] * n  # next step each rank has to complete; a rank has *posted* step pc[r]
    order = []
    progressed = True
    while progressed:
        progressed = False
        for r in range(n):
            while pc[r] < len(sched.ranks[r]) and all(pc[p] >= s for p, s in partner[(r, pc[r])]):
                order.append((r, pc[r]))
                pc[r] += 1
                progressed = True
    stuck = [r for r in range(n) if pc[r] < len(sched.ranks[r])]
    if stuck:
        waits = {r: sorted({p for p, s in partner[(r, pc[r])] if pc[p] < s}) for r in stuck}
        _fail(sched, stuck[0], pc[stuck[0]], f"deadlock: ranks {stuck} can never finish their steps "
              f"{[pc[r] for r in stuck]}; each waits on ranks {waits}")
    return order


def check_schedule(sched: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``sched`` is correct for every rank (module docstring)."""
    n = sched.world_size
    if len(sched.ranks) != n or len(sched.inputs) != n or len(sched.outputs) != n:
        raise ScheduleError(f"schedule must describe {n} ranks\n{sched}")
    match = _match_p2p(sched)
    order = _progress_order(sched)
    held: list[dict[tuple, _Held]] = [
        {b.key: _Held(set(b.chunks)) for b in sched.inputs[r]} for r in range(n)]
    in_flight: dict[tuple[int, int], dict[Buf, _Held]] = defaultdict(dict)  # (rank, step) -> payloads
    a2a_src: dict[tuple[int, int], list[_Held]] = {}
    computed: set[Pair] = set()

    def need(r: int, s: int, buf: Buf) -> _Held:
        h = held[r].get(buf.key)
        if h is None or not set(buf.chunks) <= h.chunks:
            _fail(sched, r, s, f"needs {buf} but holds {sorted(h.chunks) if h else 'nothing'} of it")
        return h

    def fold(r: int, s: int, dst: Buf, chunks: set[int], pairs: set[Pair]) -> None:
        h = held[r].setdefault(dst.key, _Held(set(dst.chunks)))
        if not chunks <= h.chunks:
            _fail(sched, r, s, f"folds chunks {sorted(chunks)} into {dst} which holds {sorted(h.chunks)}")
        twice = h.pairs & pairs
        if twice:
            _fail(sched, r, s, f"pairs {sorted(twice)[:4]} folded twice into {dst}")
        h.pairs |= pairs

    def restrict(h: _Held, buf: Buf) -> _Held:
        idx = 0 if buf.kind in ("out", "dq") else 1
        return _Held(set(buf.chunks), {p for p in h.pairs if p[idx] in buf.chunks})

    def post(r: int, s: int) -> None:
        """Phase 1 of step s on rank r: sends and collectives snapshot their data."""
        step = sched.ranks[r][s]
        writes = {op.dst.key for op in step.computes if isinstance(op, (Compute, Pack))}
        writes |= {op.dst_kv.key for op in step.computes if isinstance(op, Compute) and op.dst_kv}
        writes |= {op.dst.key for op in step.merges}
        for op in step.comms:
            if isinstance(op, Send):
                if op.buf.key in writes:
                    _fail(sched, r, s, f"sends {op.buf} while the same step writes it")
                in_flight[(r, s)][(op.peer, op.buf)] = restrict(need(r, s, op.buf), op.buf)
            elif isinstance(op, AllToAll):
                src, _ = a2a_bufs(op, r, n, sched.layout)
                a2a_src[(r, s, str(op))] = restrict(need(r, s, src), src)

    for r in range(n):
        if sched.ranks[r]:
            post(r, 0)
    for r, s in order:  # (rank, step) in an order in which they can complete
        step = sched.ranks[r][s]
        # Phase 2: computes read only what was present at the start of the step.
        for op in step.computes:
            if isinstance(op, Pack):
                for src in op.srcs:
                    need(r, s, src)
                held[r][op.dst.key] = _Held(set(op.dst.chunks))
                continue
            need(r, s, op.q_src)
            need(r, s, op.kv_src)
            pairs: set[Pair] = set()
            for blk in op.blocks:
                if not set(blk.q_chunks) <= set(op.q_src.chunks) or not set(blk.kv_chunks) <= set(op.kv_src.chunks):
                    _fail(sched, r, s, f"block {blk} outside its sources {op.q_src}, {op.kv_src}")
                pairs |= {(qc, kc, op.head_shard[0]) for qc, kc in blk.pairs()}
            if pairs & computed:
                _fail(sched, r, s, f"pairs {sorted(pairs & computed)[:4]} computed twice")
            computed.update(pairs)
            fold(r, s, op.dst, {p[0] for p in pairs}, pairs)
            if op.dst_kv is not None:
                fold(r, s, op.dst_kv, {p[1] for p in pairs}, pairs)
        # Phase 3: receives land (their senders posted already: the progress order guarantees it).
        for i, op in enumerate(step.comms):
            if isinstance(op, Recv):
                a, sa = match[(r, s, i)]
                assert (r, op.buf) in in_flight[(a, sa)], (r, s, op)
                if op.buf.key in held[r]:
                    _fail(sched, r, s, f"receives {op.buf} but already holds a buffer with that name")
                held[r][op.buf.key] = in_flight[(a, sa)].pop((r, op.buf))
            elif isinstance(op, AllToAll):
                _, dst = a2a_bufs(op, r, n, sched.layout)
                parts = [a2a_src[(j, _coll_step(sched, j, op), str(op))] for j in range(n)]
                got = _Held(set(dst.chunks), set().union(*(p.pairs for p in parts)))
                held[r][dst.key] = restrict(got, dst) if dst.kind in PARTIAL_KINDS else got
        # Phase 4: merges.
        for op in step.merges:
            src = need(r, s, op.src)
            fold(r, s, op.dst, set(op.src.chunks), src.pairs)
        if s + 1 < len(sched.ranks[r]):
            post(r, s + 1)
    _check_coverage(sched, held, computed)


def _coll_step(sched: Schedule, rank: int, op: AllToAll) -> int:
    for s, step in enumerate(sched.ranks[rank]):
        if op in step.comms:
            return s
    raise ScheduleError(f"rank {rank} never enters {op}\n{sched}")


def _check_coverage(sched: Schedule, held: list[dict], computed: set[Pair]) -> None:
    n = sched.world_size
    shards = n if sched.strategy == "ulysses" else 1
    every = tuple(range(num_chunks(n, sched.layout)))
    required = {(qc, kc, h) for qc, kc in needed_pairs(every, every, sched.causal) for h in range(shards)}
    if computed != required:
        missing, extra = sorted(required - computed), sorted(computed - required)
        raise ScheduleError(f"coverage: missing pairs {missing[:6]}, unneeded pairs {extra[:6]}\n{sched}")
    for r in range(n):
        local = set(chunks_of_rank(r, n, sched.layout))
        for kind, buf in sched.outputs[r].items():
            h = held[r].get(buf.key)
            idx = 1 if kind == "dkv" else 0
            want = {p for p in required if p[idx] in local}
            got = h.pairs if h else set()
            if got != want:
                raise ScheduleError(f"rank {r} output {kind} ({buf}) lacks pairs "
                                    f"{sorted(want - got)[:6]} and has extra {sorted(got - want)[:6]}\n{sched}")
