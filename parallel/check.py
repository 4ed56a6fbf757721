"""Prove a schedule correct for every rank, in one process, without running any kernel.

:func:`check_schedule` executes the schedule symbolically. Each buffer carries the chunks it holds
and, for partial results, the set of ``(q_chunk, kv_chunk, head_shard)`` pairs folded into it.
It raises :class:`ScheduleError` (with the schedule printed and the failing step marked) unless:

- every send has a receive of the same buffer (hence the same size) on its peer, in the same
  order, and every collective is entered by all ranks;
- ranks can always make progress (no deadlock) under the step semantics of ``schedule.py``;
- every op reads data that is present, and no step sends a buffer it is also writing;
- every pair the mask needs is computed exactly once and reaches its owner's outputs.

The needed pairs are derived here from the mask itself, token by token position (causal: key
position <= query position; packed: same document), not from the builders' chunk rules; P2P
matching is :func:`tokenloom.parallel.schedule.match_p2p`, the rule the runtime and the simulator
engine use too.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

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
    a2a_entries,
    match_p2p,
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
    """Recv position -> send position, by the shared rule; fail on the first problem."""
    matches, problems = match_p2p(sched)
    if problems:
        _fail(sched, problems[0].rank, problems[0].step, problems[0].message)
    return {m.recv_at: m.send_at[:2] for m in matches}


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
    for g, entries in a2a_entries(sched).items():
        counts = [len(e) for e in entries]
        if len(set(counts)) > 1:
            r = g[counts.index(min(counts))]
            _fail(sched, r, len(sched.ranks[r]) - 1, f"ranks {list(g)} enter different numbers of "
                  f"all-to-alls: {counts}")
        for k in range(counts[0] if counts else 0):
            ops = {op for e in entries for _, op in [e[k]]}
            if len(ops) > 1:
                _fail(sched, g[0], entries[0][k][0], f"all-to-all #{k} differs across ranks {list(g)}: "
                      f"{sorted(map(str, ops))}")
            group = [(r, entries[i][k][0]) for i, r in enumerate(g)]
            for member in group:
                partner[member].extend(x for x in group if x != member)
    if any(coll_pos[r] for r in range(n) if not any(r in g for g in sched.groups)):
        r = next(r for r in range(n) if coll_pos[r] and not any(r in g for g in sched.groups))
        _fail(sched, r, coll_pos[r][0], "enters an all-to-all but belongs to no all-to-all group")
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
                src, _ = a2a_bufs(op, r, sched)
                if src.kind in PARTIAL_KINDS:  # a result nobody folded into starts empty
                    held[r].setdefault(src.key, _Held(set(src.chunks)))
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
                _check_block_mask(sched, r, s, blk)
                pairs |= {(qc, kc, op.head_shard[0]) for qc, kc in _computed_pairs(sched, blk)}
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
                _, dst = a2a_bufs(op, r, sched)
                parts = [a2a_src[(j, _coll_step(sched, j, op), str(op))] for j in sched.group_of(r)]
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


def required_pairs(sched: Schedule) -> set[Pair]:
    """Every (query chunk, key chunk, head shard) whose tokens the mask connects.

    Derived from token positions: chunk ``c``'s tokens are the global ranges the layout gives it;
    a query at position i sees a key at j iff both are in the same document and, when causal,
    j <= i, and under a window ``i - left <= j <= i + right``. For a dense schedule without a
    window (size-free) every chunk is taken one token long.
    """
    seq = sched.seq_layout
    k = seq.num_chunks
    dense_len = seq.seq_len if seq.window is not None else k
    starts = list(itertools.accumulate(seq.doc_lens or (dense_len,), initial=0))

    def doc_spans(c: int) -> dict[int, tuple[int, int]]:
        """document -> (first, last) global position of chunk c's tokens in it."""
        ranges = seq._chunk_ranges(c, None if seq.varlen or seq.window is not None else k)
        spans: dict[int, tuple[int, int]] = {}
        for a, length in ranges:
            for pos in (a, a + length - 1):
                d = bisect.bisect_right(starts, pos) - 1
                lo, hi = spans.get(d, (pos, pos))
                spans[d] = (min(lo, pos), max(hi, pos))
        return spans

    spans = [doc_spans(c) for c in range(k)]
    pairs = set()
    for qc, kc in itertools.product(range(k), repeat=2):
        if seq.window is not None:
            seen = any(_window_sees(spans[qc][d], spans[kc][d], seq.window, sched.causal)[0]
                       for d in spans[qc] if d in spans[kc])
        else:
            seen = any(d in spans[kc] and (not sched.causal or spans[kc][d][0] <= spans[qc][d][1])
                       for d in spans[qc])
        if seen:
            pairs.update((qc, kc, h) for h in range(sched.head_shards))
    return pairs


def _window_sees(q_span: tuple[int, int], k_span: tuple[int, int], window: tuple[int, int],
                 causal: bool) -> tuple[bool, bool]:
    """(does some query of ``q_span`` see some key of ``k_span``, does every query see every key)
    under ``window`` (and causality), from the spans' positions: the key - query offsets form the
    interval [k_first - q_last, k_last - q_first], which must meet / lie inside [-left, right]."""
    left, right = window
    right = 0 if causal and (right < 0 or right > 0) else right
    lo_off, hi_off = k_span[0] - q_span[1], k_span[1] - q_span[0]
    lo_ok = float("-inf") if left < 0 else -left
    hi_ok = float("inf") if right < 0 else right
    return max(lo_off, lo_ok) <= min(hi_off, hi_ok), lo_ok <= lo_off and hi_off <= hi_ok


def _computed_pairs(sched: Schedule, blk) -> list[tuple[int, int]]:
    """The pairs a block computes: a masked block (a run of chunks against a run) only those its
    window shows some token of, from the positions (hidden pairs of the rectangle cost nothing)."""
    if not blk.masked:
        return blk.pairs()
    seq = sched.seq_layout
    out = []
    for qc, kc in blk.pairs():
        q_spans, k_spans = seq.spans(qc), seq.spans(kc)
        if any(_window_sees(q_spans[d], k_spans[d], seq.window, sched.causal)[0]
               for d in q_spans.keys() & k_spans.keys()):
            out.append((qc, kc))
    return out


def _check_block_mask(sched: Schedule, rank: int, step: int, blk) -> None:
    """Under a window, a block without a mask must only hold pairs the window shows whole."""
    seq = sched.seq_layout
    if seq.window is None or blk.masked:
        runs = all(c == (cs[0] + i) for cs in (blk.q_chunks, blk.kv_chunks) for i, c in enumerate(cs))
        if blk.masked and (seq.window is None or not runs):
            _fail(sched, rank, step, f"masked block {blk} must be a run of consecutive query chunks "
                  "against a run of consecutive key chunks, under a window")
        return
    for qc in blk.q_chunks:
        q_spans, k_spans = seq.spans(qc), None
        for kc in blk.kv_chunks:
            k_spans = seq.spans(kc)
            for d in q_spans.keys() & k_spans.keys():
                if not _window_sees(q_spans[d], k_spans[d], seq.window, sched.causal)[1]:
                    _fail(sched, rank, step, f"block {blk} runs without a mask but window "
                          f"{seq.window} hides part of pair ({qc}, {kc})")


def _check_coverage(sched: Schedule, held: list[dict], computed: set[Pair]) -> None:
    n = sched.world_size
    required = required_pairs(sched)
    if computed != required:
        missing, extra = sorted(required - computed), sorted(computed - required)
        raise ScheduleError(f"coverage: missing pairs {missing[:6]}, unneeded pairs {extra[:6]}\n{sched}")
    for r in range(n):
        local = set(sched.seq_layout.chunks_of(r))
        for kind, buf in sched.outputs[r].items():
            h = held[r].get(buf.key)
            idx = 1 if kind == "dkv" else 0
            want = {p for p in required if p[idx] in local}
            got = h.pairs if h else set()
            if got != want:
                raise ScheduleError(f"rank {r} output {kind} ({buf}) lacks pairs "
                                    f"{sorted(want - got)[:6]} and has extra {sorted(got - want)[:6]}\n{sched}")
