"""An independent proof of a decode / chunked-prefill schedule (:mod:`tokenloom.parallel.decode_schedule`).

It trusts nothing the builder says about attention. From the chunks' global positions alone it
derives which (query chunk, key chunk) pairs a causal model needs: query chunk q needs key chunk k
iff some key of k is at or before some query of q (empty chunks need nothing). Then it walks every
rank's steps with the runtime's rules (post every comm of a step, compute, wait, merge; the k-th
send from a to b meets the k-th receive at b from a) and proves:

* every receive meets a send of the same buffer and no rank waits forever (no deadlock);
* a compute or send only uses data the rank holds at that moment, and block chunks are contiguous
  in their buffer (the runtime slices them);
* a full block lets every query see every key of the pair (max key position <= min query position);
  a causal block is a chunk against itself (the square diagonal);
* every rank ends with an output covering exactly the query chunks it started with, each needed
  pair folded in exactly once and no other non-empty pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenloom.parallel.schedule import Buf, Compute, Merge, Recv, Schedule, Send, match_p2p

Pair = tuple[int, int]
Span = tuple[int, int] | None  # (first, last) global position of a chunk; None when empty


class DecodeScheduleError(AssertionError):
    """A decode schedule breaks a rule (message names the rank, step and what is wrong)."""


@dataclass
class _Held:
    chunks: set[int]
    pairs: dict[Pair, int] = field(default_factory=dict)


def required_pairs(spans: dict[int, Span], query_chunks: set[int]) -> set[Pair]:
    """Pairs a causal model needs, from positions only: key chunk k is needed by query chunk q
    iff both are non-empty and ``first(k) <= last(q)``."""
    need = set()
    for qc in query_chunks:
        if spans.get(qc) is None:
            continue
        for kc, span in spans.items():
            if span is not None and span[0] <= spans[qc][1]:
                need.add((qc, kc))
    return need


def _fail(sched: Schedule, rank: int, step: int, msg: str) -> None:
    raise DecodeScheduleError(f"{sched.strategy}: rank {rank} step {step}: {msg}\n"
                              f"{sched.describe(mark=(rank, step), ranks=[rank])}")


def _contiguous(sub: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    if not set(sub) <= set(whole):
        return False
    i = whole.index(sub[0])
    return whole[i:i + len(sub)] == sub


class _Walk:
    def __init__(self, sched: Schedule, spans: dict[int, Span]) -> None:
        self.sched, self.spans = sched, spans
        self.held: list[dict[tuple, _Held]] = [
            {b.key: _Held(set(b.chunks)) for b in ins} for ins in sched.inputs]
        matches, problems = match_p2p(sched)
        if problems:
            p = problems[0]
            _fail(sched, p.rank, p.step, p.message)
        self.partner: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        for m in matches:
            self.partner[m.send_at] = m.recv_at
            self.partner[m.recv_at] = m.send_at
        self.in_flight: dict[tuple[int, int, int], _Held] = {}  # send position -> snapshot

    def need(self, r: int, s: int, buf: Buf, what: str) -> _Held:
        h = self.held[r].get(buf.key)
        if h is None or not set(buf.chunks) <= h.chunks:
            _fail(self.sched, r, s, f"{what} {buf} is not held here (holds "
                                    f"{sorted(h.chunks) if h else 'nothing of it'})")
        return h

    def post(self, r: int, s: int) -> None:
        for i, op in enumerate(self.sched.ranks[r][s].comms):
            if isinstance(op, Send):
                h = self.need(r, s, op.buf, "send of")
                chunks = set(op.buf.chunks)
                self.in_flight[(r, s, i)] = _Held(chunks, {p: c for p, c in h.pairs.items()
                                                             if p[0] in chunks})
            elif not isinstance(op, Recv):
                _fail(self.sched, r, s, f"decode schedules use P2P only, found {op}")

    def ready(self, r: int, s: int, posted: list[int]) -> bool:
        for i, op in enumerate(self.sched.ranks[r][s].comms):
            peer, peer_step, _ = self.partner[(r, s, i)]
            if posted[peer] < peer_step:
                return False
        return True

    def finish(self, r: int, s: int) -> None:
        step = self.sched.ranks[r][s]
        for op in step.computes:
            assert isinstance(op, Compute), op
            self.compute(r, s, op)
        for i, op in enumerate(step.comms):
            if isinstance(op, Recv):
                got = self.in_flight.pop(self.partner[(r, s, i)])
                if op.buf.key in self.held[r]:
                    _fail(self.sched, r, s, f"receive of {op.buf} overwrites a buffer held here")
                self.held[r][op.buf.key] = got
        for m in step.merges:
            self.merge(r, s, m)

    def compute(self, r: int, s: int, op: Compute) -> None:
        q = self.need(r, s, op.q_src, "query buffer")
        self.need(r, s, op.kv_src, "key buffer")
        dst = self.held[r].setdefault(op.dst.key, _Held(set()))
        for blk in op.blocks:
            if not (_contiguous(blk.q_chunks, op.q_src.chunks)
                    and _contiguous(blk.kv_chunks, op.kv_src.chunks)):
                _fail(self.sched, r, s, f"block {blk} is not contiguous in {op.q_src} x {op.kv_src}")
            if blk.causal and blk.q_chunks != blk.kv_chunks or blk.causal and len(blk.q_chunks) != 1:
                _fail(self.sched, r, s, f"causal block {blk} is not one chunk against itself")
            for qc in blk.q_chunks:
                for kc in blk.kv_chunks:
                    self.visible(r, s, blk, qc, kc)
                    if (qc, kc) in dst.pairs:
                        _fail(self.sched, r, s, f"pair {qc}x{kc} folded twice into {op.dst}")
                    dst.pairs[(qc, kc)] = 1
            dst.chunks |= set(blk.q_chunks) & q.chunks

    def visible(self, r: int, s: int, blk, qc: int, kc: int) -> None:
        qs, ks = self.spans.get(qc), self.spans.get(kc)
        if blk.causal or qs is None or ks is None:
            return
        if ks[1] > qs[0]:
            _fail(self.sched, r, s, f"full block {qc}x{kc} lets query position {qs[0]} see key "
                                    f"position {ks[1]} (a future token)")

    def merge(self, r: int, s: int, m: Merge) -> None:
        src = self.need(r, s, m.src, "merge source")
        dst = self.held[r].setdefault(m.dst.key, _Held(set()))
        twice = set(src.pairs) & set(dst.pairs)
        if twice:
            _fail(self.sched, r, s, f"merge folds pairs {sorted(twice)[:4]} into {m.dst} twice")
        dst.pairs.update(src.pairs)
        dst.chunks |= src.chunks


def check_decode_schedule(sched: Schedule, spans: dict[int, Span]) -> None:
    """Raise :class:`DecodeScheduleError` unless ``sched`` computes exact causal attention of the
    new queries over the cache, given each chunk's ``(first, last)`` global position (None: empty)."""
    n = sched.world_size
    walk = _Walk(sched, spans)
    posted = [0] * n
    done = [len(steps) == 0 for steps in sched.ranks]
    for r in range(n):
        if not done[r]:
            walk.post(r, 0)
    while not all(done):
        progressed = False
        for r in range(n):
            if done[r] or not walk.ready(r, posted[r], posted):
                continue
            walk.finish(r, posted[r])
            posted[r] += 1
            progressed = True
            if posted[r] == len(sched.ranks[r]):
                done[r] = True
                posted[r] = 1 << 30  # a finished rank has posted everything it ever will
            else:
                walk.post(r, posted[r])
        if not progressed:
            stuck = [f"rank {r} at step {posted[r]}" for r in range(n) if not done[r]]
            raise DecodeScheduleError(f"{sched.strategy}: deadlock: {', '.join(stuck)} wait for "
                                      f"peers that never post the matching op\n{sched.describe()}")
    for r in range(n):
        _check_output(sched, walk, r, spans)


def _check_output(sched: Schedule, walk: _Walk, r: int, spans: dict[int, Span]) -> None:
    last = max(len(sched.ranks[r]) - 1, 0)
    mine = {c for b in sched.inputs[r] if b.kind == "q" for c in b.chunks}
    out = sched.outputs[r].get("out") if sched.outputs else None
    if out is None or set(out.chunks) != mine:
        _fail(sched, r, last, f"output {out} must cover exactly the query chunks {sorted(mine)}")
    held = walk.need(r, last, out, "output")
    need = required_pairs(spans, mine)
    missing = need - set(held.pairs)
    if missing:
        _fail(sched, r, last, f"output {out} misses pairs {sorted(missing)[:6]}")
    extra = {p for p in held.pairs if p not in need and p[0] in mine
             and spans.get(p[0]) is not None and spans.get(p[1]) is not None}
    if extra:
        _fail(sched, r, last, f"output {out} holds pairs no causal query needs: {sorted(extra)[:6]}")
