"""Execute a :class:`~tokenloom.parallel.schedule.Schedule` on this rank.

The runtime makes no decisions: it walks its rank's steps with the four-phase semantics of
``schedule.py`` (post comms, compute, wait, merge), using a :class:`Communicator` for transfers and
:func:`tokenloom.kernels.block_forward` / ``block_backward`` for the blocks.

Buffers and their arithmetic are :mod:`tokenloom.parallel.buffers`; this is the runner. A buffer is
freed after its last use in the schedule unless it is an output or asked to be kept.

Packed sequences: a block's chunks hold pieces of several documents; the block runs one kernel
call per document present on both sides (queries of a document see only its keys), so a block
never computes across documents. P2P ops are posted in ``step.comms`` order, field by field, which
is the order :func:`tokenloom.parallel.schedule.match_p2p` assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from tokenloom.comm.health import set_step as report_step  # the launcher's watchdog (heartbeat)
from tokenloom.comm.communicator import P2P, Communicator
from tokenloom.kernels import attention_delta, block_backward, block_forward, merge_into_
from tokenloom.kernels.masks import PositionMask, poison_dead_rows
from tokenloom.parallel.buffers import (
    Dims,
    Held,
    Key,
    Segment,
    alloc,
    chunk_offsets,
    extract,
    head_dim_of,
    pad,
    place,
    seg_ranges,
    select,
    seq_dim,
    sub_blocks,
    take,
    whole,
)
from tokenloom.parallel.schedule import (
    PARTIAL_KINDS,
    WIRE_FIELDS,
    AllToAll,
    Buf,
    Compute,
    Direction,
    Merge,
    Pack,
    Recv,
    Schedule,
    Send,
    a2a_bufs,
)



@dataclass
class Groups:
    """The communicators of one SP rank: P2P along its ring, all-to-all inside its group.

    A flat group uses one communicator for both. On a 2-D mesh SP rank ``p = ring_rank * ulysses
    + ulysses_rank``: P2P peers are addressed in the ring communicator (``p // ulysses``) and the
    all-to-all runs over the Ulysses communicator.
    """

    rank: int
    world_size: int
    p2p: Communicator
    a2a: Communicator
    ulysses: int = 1

    @classmethod
    def flat(cls, comm: Communicator) -> "Groups":
        return cls(comm.rank, comm.world_size, comm, comm, 1)

    def p2p_rank(self, sp_rank: int) -> int:
        assert sp_rank % self.ulysses == self.rank % self.ulysses, (sp_rank, self.rank)
        return sp_rank // self.ulysses


def _run_start(seq, segs: list[Segment]) -> int:
    """Global position of the first token of ``segs``, which must be consecutive positions."""
    starts = [seq.global_pos(c, o) for c, o, _ in segs]
    assert all(a + n == b for a, (_, _, n), b in zip(starts, segs, starts[1:])), segs
    return starts[0]


class StepError(RuntimeError):
    """A step failed for a reason other than communication; the message marks the step."""


def _with_context(exc: Exception, context: str) -> Exception:
    """Append ``context`` to ``exc``'s message in place (Python 3.10 has no add_note)."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{context}", *exc.args[1:])
        return exc
    return StepError(f"{type(exc).__name__}: {exc}\n{context}")


class Runner:
    """Executes one schedule on one rank; reusable across calls with the same geometry."""

    def __init__(self, schedule: Schedule, comm: Communicator | Groups, dims: Dims, *,
                 softmax_scale: float | None, impl: str | None = None, keep: Iterable[Key] = (),
                 softcap: float | None = None) -> None:
        groups = comm if isinstance(comm, Groups) else Groups.flat(comm)
        assert schedule.world_size == groups.world_size, (schedule.world_size, groups.world_size)
        self.schedule, self.groups, self.dims = schedule, groups, dims
        self.comm = groups.p2p
        self.rank = groups.rank
        self.scale, self.impl, self.softcap = softmax_scale, impl, softcap
        self.steps = schedule.ranks[self.rank]
        self.outputs = schedule.outputs[self.rank] if schedule.outputs else {}
        self.keep = set(keep) | {b.key for b in self.outputs.values()}
        self.last_use = self._last_use()

    # ------------------------------------------------------------------ bookkeeping
    def _last_use(self) -> dict[Key, int]:
        last: dict[Key, int] = {}
        for s, step in enumerate(self.steps):
            keys: list[Key] = []
            for op in step.comms:
                if isinstance(op, (Send, Recv)):
                    keys.append(op.buf.key)
                else:
                    keys.extend(b.key for b in a2a_bufs(op, self.rank, self.schedule))
            for op in step.computes:
                if isinstance(op, Compute):
                    keys += [op.q_src.key, op.kv_src.key, op.dst.key]
                    if op.dst_kv is not None:
                        keys.append(op.dst_kv.key)
                else:
                    keys += [op.dst.key, *(b.key for b in op.srcs)]
            for op in step.merges:
                keys += [op.src.key, op.dst.key]
            for k in keys:
                last[k] = s
        return last

    def _ensure(self, store: dict, buf: Buf) -> Held:
        """The fold destination ``buf``, created empty (zeros, lse = -inf) when absent."""
        held = store.get(buf.key)
        if held is None:
            held = store[buf.key] = Held(buf.chunks, alloc(buf, self.dims, fill=True), set(buf.chunks))
        else:
            assert set(buf.chunks) <= set(held.chunks), (self.rank, buf, held.chunks)
        return held

    def _get(self, store: dict, buf: Buf) -> Held:
        held = store.get(buf.key)
        assert held is not None, f"rank {self.rank}: buffer {buf} is not here (schedule bug)"
        return held

    # ------------------------------------------------------------------ folds
    def _fold(self, dst: Held, segs: list[Segment], fields: dict[str, torch.Tensor]) -> None:
        """Fold a partial over ``segs`` into ``dst``: lse-merge for outputs, sum for grads."""
        ranges = seg_ranges(self.dims.chunk_lens, dst.chunks, segs)
        fresh = dst.untouched is not None and all(c in dst.untouched for c, _, _ in segs)
        if dst.untouched is not None:
            dst.untouched.difference_update(c for c, _, _ in segs)
        if fresh:  # rows still at zeros / -inf: the merge or sum would return the partial itself
            for name, value in fields.items():
                dim = 2 if name == "lse" else 1
                for view, j, n in place(dst.fields[name], dim, ranges):
                    view.copy_(value.narrow(dim, j, n))
            return
        if "lse" in fields:
            for (o_view, j, n), (l_view, _, _) in zip(place(dst.fields["out"], 1, ranges),
                                                      place(dst.fields["lse"], 2, ranges)):
                merge_into_(o_view, l_view, fields["out"].narrow(1, j, n), fields["lse"].narrow(2, j, n),
                            impl=self.impl)
            return
        for name, value in fields.items():
            for view, j, n in place(dst.fields[name], 1, ranges):
                view.add_(value.narrow(1, j, n))

    def _compute(self, store: dict, op: Compute) -> None:
        d = self.dims
        lens = d.chunk_lens
        qs, kvs = self._get(store, op.q_src), self._get(store, op.kv_src)
        dst = self._ensure(store, op.dst)
        dst_kv = self._ensure(store, op.dst_kv) if op.dst_kv is not None else None
        for blk in op.blocks:
            for q_segs, kv_segs in sub_blocks(blk, d):
                q_rows, kv_rows = seg_ranges(lens, qs.chunks, q_segs), seg_ranges(lens, kvs.chunks, kv_segs)
                q = take(qs.fields["q"], 1, q_rows)
                k, v = take(kvs.fields["k"], 1, kv_rows), take(kvs.fields["v"], 1, kv_rows)
                mask = self._position_mask(q_segs, kv_segs) if blk.masked else None
                if op.q_src.kind == "q":
                    out, lse = block_forward(q, k, v, causal=blk.causal, softmax_scale=self.scale,
                                             impl=self.impl, mask=mask, softcap=self.softcap)
                    self._fold(dst, q_segs, {"out": out, "lse": lse})
                    continue
                dout = take(qs.fields["dout"], 1, q_rows)
                lse = take(qs.fields["lse"], 2, q_rows)
                delta = take(qs.fields["delta"], 2, q_rows)
                dq, dk, dv = block_backward(dout, q, k, v, lse, delta, causal=blk.causal,
                                            softmax_scale=self.scale, impl=self.impl, mask=mask,
                                            softcap=self.softcap)
                self._fold(dst, q_segs, {"dq": dq.to(d.acc)})
                assert dst_kv is not None
                self._fold(dst_kv, kv_segs, {"dk": dk.to(d.acc), "dv": dv.to(d.acc)})

    def _position_mask(self, q_segs: list[Segment], kv_segs: list[Segment]) -> PositionMask:
        """A masked block (sliding window) is one run of consecutive query positions against one
        run of key positions (segments of consecutive chunks of one document): their starts and
        the schedule's window."""
        seq = self.schedule.seq_layout
        assert seq.window is not None, "a masked block in a schedule without a window"
        return PositionMask(_run_start(seq, q_segs), _run_start(seq, kv_segs), *seq.window)

    def _pack(self, store: dict, op: Pack) -> None:
        by_kind = {b.kind: self._get(store, b) for b in op.srcs}
        q, out, dout = by_kind["q"], by_kind["out"], by_kind["dout"]
        assert q.chunks == out.chunks == dout.chunks == op.dst.chunks, (self.rank, op)
        o, lse = poison_dead_rows(out.fields["out"], out.fields["lse"])  # as the API's forward output
        fields = {"q": q.fields["q"], "dout": dout.fields["dout"], "lse": lse,
                  "delta": attention_delta(o, dout.fields["dout"])}
        store[op.dst.key] = Held(op.dst.chunks, fields)

    # ------------------------------------------------------------------ all-to-all
    def _a2a_layout(self) -> tuple[tuple[int, ...], list[tuple[int, ...]], int]:
        """(group members, their local chunks, padded local length)."""
        group = self.schedule.group_of(self.rank)
        seq = self.schedule.seq_layout
        local = [seq.chunks_of(m) for m in group]
        return group, local, max(self.dims.length(ch) for ch in local)

    def _a2a_post(self, store: dict, op: AllToAll) -> tuple:
        d, comm = self.dims, self.groups.a2a
        group, local, padded = self._a2a_layout()
        src_buf, dst_buf = a2a_bufs(op, self.rank, self.schedule)
        if op.kind in PARTIAL_KINDS:
            src = self._ensure(store, src_buf)  # nothing folded into it: an empty result
        else:
            src = self._get(store, src_buf)
        m = len(group)
        handles, pending = [], []
        for name, head_kind, width, dt in WIRE_FIELDS[op.kind]:
            t = src.fields[name].to(d.wire_dtype(dt))
            hd, sd = head_dim_of(width), seq_dim(width)
            if op.direction == Direction.SEQ2HEAD:
                if head_kind == "kv" and op.kv_repeat > 1:
                    t = t.repeat_interleave(op.kv_repeat, dim=hd)
                t = pad(t, sd, padded)
                x = t.unflatten(hd, (m, t.shape[hd] // m)).movedim(hd, 0).contiguous()
            else:  # head2seq: member j gets its own chunks of this head shard
                x = torch.stack([pad(select(t, sd, d.chunk_lens, src.chunks, local[j]), sd, padded)
                                 for j in range(m)]).contiguous()
            y = torch.empty_like(x)
            handles.append(comm.all_to_all(y, x, what=f"all_to_all {name}"))
            pending.append((name, head_kind, width, y))
        return handles, pending, dst_buf, op

    def _a2a_finish(self, store: dict, state) -> None:
        handles, pending, dst_buf, op = state
        d = self.dims
        group, local, _ = self._a2a_layout()
        for h in handles:
            h.wait()
        fields = {}
        for name, head_kind, width, y in pending:
            hd, sd = head_dim_of(width), seq_dim(width)
            if op.direction == Direction.SEQ2HEAD:  # y[j] holds member j's chunks: global order
                segs = {c: (j, o) for j, ch in enumerate(local) for c, o in chunk_offsets(d.chunk_lens, ch).items()}
                parts = [y[segs[c][0]].narrow(sd - 0, segs[c][1], d.chunk_lens[c]) for c in dst_buf.chunks]
                fields[name] = torch.cat(parts, dim=sd)
            else:  # y[j] holds head shard j of my chunks (padded)
                t = y.narrow(sd + 1, 0, d.length(dst_buf.chunks)).movedim(0, hd).flatten(hd, hd + 1)
                if head_kind == "kv" and op.kv_repeat > 1:
                    t = t.unflatten(hd, (t.shape[hd] // op.kv_repeat, op.kv_repeat)).sum(hd + 1)
                fields[name] = t
        store[dst_buf.key] = Held(dst_buf.chunks, fields)

    # ------------------------------------------------------------------ the walk
    def run(self, store: dict[Key, Held]) -> dict[Key, Held]:
        """Walk this rank's steps over ``store`` (inputs in, outputs and kept buffers out)."""
        for s, step in enumerate(self.steps):
            report_step(f"{self.schedule.strategy} {'backward' if self.schedule.backward else 'forward'} "
                        f"step {s}")
            try:
                self._step(store, s, step)
            except Exception as exc:
                text = self.schedule.describe(mark=(self.rank, s), ranks=[self.rank])
                raise _with_context(exc, f"tokenloom: rank {self.rank} failed in step {s} of\n{text}")
        return store

    def _step(self, store: dict, s: int, step) -> None:
        d = self.dims
        ops, recvs, a2a = [], [], []
        for op in step.comms:  # posting order: match_p2p's rule
            if isinstance(op, Send):
                held = self._get(store, op.buf)
                peer = self.groups.p2p_rank(op.peer)
                for name, _, width, dt in WIRE_FIELDS[op.buf.kind]:
                    t = select(held.fields[name], seq_dim(width), d.chunk_lens, held.chunks, op.buf.chunks)
                    ops.append(P2P("send", peer, t.to(d.wire_dtype(dt)).contiguous()))
            elif isinstance(op, Recv):
                fields = alloc(op.buf, d)
                peer = self.groups.p2p_rank(op.peer)
                ops.extend(P2P("recv", peer, t) for t in fields.values())
                recvs.append((op.buf, fields))
            else:
                a2a.append(self._a2a_post(store, op))
        handle = self.comm.batch_p2p(ops, what=f"step {s} p2p") if ops else None
        for op in step.computes:
            if isinstance(op, Compute):
                self._compute(store, op)
            else:
                self._pack(store, op)
        if handle is not None:
            handle.wait()
        for buf, fields in recvs:
            store[buf.key] = Held(buf.chunks, fields)
        for state in a2a:
            self._a2a_finish(store, state)
        for m in step.merges:
            self._merge(store, m)
        for key in [k for k, last in self.last_use.items() if last == s and k not in self.keep]:
            store.pop(key, None)

    def _merge(self, store: dict, m: Merge) -> None:
        src = self._get(store, m.src)
        dst = self._ensure(store, m.dst)
        self._fold(dst, whole(self.dims.chunk_lens, src.chunks), src.fields)

    # ------------------------------------------------------------------ outputs
    def output(self, store: dict, kind: str, name: str) -> torch.Tensor:
        """Field ``name`` of output ``kind`` over this rank's local chunks (empty parts filled)."""
        return extract(store, self.outputs[kind], name, self.dims)
