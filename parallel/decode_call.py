"""One :func:`~tokenloom.parallel.decode.cached_attention` call after this rank's own checks:
append its new tokens, walk the schedule (possibly in two parts around the agreement), undo the
append on any failure; and the helpers that finish a call (the output gather of replicated
queries under a sharded schedule, the stacked merge of partials that rode the agreement).
"""

from __future__ import annotations

import functools
import time

import torch

from tokenloom.comm.communicator import Communicator
from tokenloom.parallel.decode_check import check_decode_schedule
from tokenloom.parallel.decode_runtime import DecodeRunner, Held, Shape
from tokenloom.parallel.decode_schedule import build_decode_schedule, part_lens, part_of, part_range, part_rank


def new_token_part(rank: int, world_size: int, start: int, count: int) -> tuple[int, int]:
    """``[lo, hi)`` offsets, within a call's ``count`` new tokens starting at position ``start``,
    of the tokens ``rank`` holds (and appends): what it passes with ``queries="sharded"``."""
    return part_range(part_of(rank, world_size, start), count, world_size)


@functools.lru_cache(maxsize=256)
def checked_schedule(strategy: str, world_size: int, rot: int, replicated: bool):
    """The schedule, proved once per shape by the checker (chunks all non-empty: empty ones only
    remove pairs, which the runtime skips)."""
    sched = build_decode_schedule(strategy, world_size, start=rot, replicated=replicated)
    n = world_size
    spans: dict[int, tuple[int, int] | None] = {r: (0, 0) for r in range(n)}
    spans.update({n + j: (1 + j, 1 + j) for j in range(n)})
    check_decode_schedule(sched, spans)
    return sched


class Call:
    """See the module docstring. ``masks``: ``(softcap, window left or -1)``."""

    def __init__(self, q, k, v, cache, layer, comm, queries, start, scale, impl, timing,
                 masks=(None, -1)) -> None:
        self.q, self.k, self.v, self.cache, self.layer, self.comm = q, k, v, cache, layer, comm
        self.queries, self.start, self.scale, self.impl, self.timing = queries, start, scale, impl, timing
        self.softcap, self.left = masks
        self.before = (cache.local_len(layer), cache.seq_len(layer))
        self.appended, self.started = False, False
        self.runner: DecodeRunner | None = None

    def prepare(self, strategy: str, total: int, old: list[int]) -> None:
        """Append this rank's part of the ``total`` new tokens; build the schedule's store."""
        n, rank, start = self.comm.world_size, self.comm.rank, self.start
        lo, hi = new_token_part(rank, n, start, total)
        self.replicated = self.queries == "replicated"
        self.native = self.replicated and strategy == "gather"
        self.total, self.lo, self.hi = total, lo, hi
        k, v = (self.k[:, lo:hi], self.v[:, lo:hi]) if self.replicated else (self.k, self.v)
        self.cache.append(self.layer, k, v, torch.arange(start + lo, start + hi), start + total)
        self.appended = True
        q = self.q if self.native or not self.replicated else self.q[:, lo:hi]
        self.sched = checked_schedule(strategy, n, start % n, self.native)
        lens = {r: old[r] for r in range(n)}
        lens.update({n + j: c for j, c in enumerate(part_lens(total, n))})
        sh = Shape(lens, q.shape[0], q.shape[2], self.cache.spec.kv_heads, q.shape[3], q.dtype,
                   q.device, self.scale, self.impl, self.softcap, self.left, start)
        self.store = {}
        for buf in self.sched.inputs[rank]:
            if buf.kind == "kv":
                tensors = {"k": self.cache.keys_heads_first(self.layer),
                           "v": self.cache.values_heads_first(self.layer)}
                if self.left >= 0:
                    tensors["pos"] = self.cache.positions(self.layer)
            else:
                tensors = {"q": q}
            self.store[buf.key] = Held(buf.chunks, tensors)
        self.runner = DecodeRunner(self.sched, self.comm, sh)

    def steps(self, first: int, stop: int | None) -> None:
        assert self.runner is not None
        self.started = True
        t = self.runner.timing
        before = (t.attention_s, t.comm_s, len(t.steps))
        self.store = self.runner.run(self.store, first, stop)
        if self.timing is not None:
            self.timing.attention_s += t.attention_s - before[0]
            self.timing.comm_s += t.comm_s - before[1]
            self.timing.steps.extend(t.steps[before[2]:])

    def own_partial(self) -> list[torch.Tensor]:
        """``[out, lse]`` of this rank's shard (replicated gather, after its first step)."""
        held = self.store[self.sched.outputs[self.comm.rank]["out"].key]
        return [held.tensors["out"], held.tensors["lse"]]

    def merge_payloads(self, partials: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's partial (rank order) merged at once (one stacked log-sum-exp, not N - 1
        merges one by one), identically on every rank, so that every rank gets bitwise the same
        output (each then runs the same model on it)."""
        t0 = time.perf_counter()
        outs = torch.stack([p[0] for p in partials])  # (n, b, t, h, d)
        lses = torch.stack([p[1] for p in partials])  # (n, b, h, t)
        lse = torch.logsumexp(lses, 0)
        weight = torch.exp(lses - lse).masked_fill(torch.isneginf(lses), 0.0)  # empty sides: 0
        out = (outs * weight.transpose(-1, -2).unsqueeze(-1)).sum(0)
        if self.timing is not None:
            self.timing.attention_s += time.perf_counter() - t0
        return out, lse

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.store[self.sched.outputs[self.comm.rank]["out"].key]
        out, lse = held.tensors["out"], held.tensors["lse"]
        if self.replicated and not self.native:
            t0 = time.perf_counter()
            out, lse = gather_parts(out, lse, self.comm, self.start, self.total)
            if self.timing is not None:
                self.timing.comm_s += time.perf_counter() - t0
        return out, lse

    def rollback(self) -> None:
        if self.appended:
            self.cache.truncate(self.layer, *self.before)
            self.appended = False


def gather_parts(out: torch.Tensor, lse: torch.Tensor, comm: Communicator, start: int, total: int):
    """Every rank's part of the outputs, in sequence order, on every rank (uneven parts padded)."""
    n = comm.world_size
    lens = part_lens(total, n)
    width = max(lens)
    b, _, h, d = out.shape
    pad = torch.zeros(b, width, h, d + 1, dtype=out.dtype, device=out.device)
    pad[:, :out.shape[1], :, :d] = out
    pad[:, :out.shape[1], :, d] = lse.transpose(1, 2)
    every = comm.all_gather(pad, what="decode output gather") if n > 1 else pad.unsqueeze(0)
    parts = [every[part_rank(j, n, start), :, :lens[j]] for j in range(n)]
    full = torch.cat(parts, dim=1)
    return full[..., :d], full[..., d].transpose(1, 2).contiguous()
