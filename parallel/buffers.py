"""The runtime's buffers: what a rank holds and the arithmetic of chunks, segments and fields.

Buffers live in a dict keyed by :attr:`Buf.key`. Each holds its chunks (global chunk ids, in the
order they sit along the sequence axis; chunks may differ in length, see :class:`Dims`) and its
fields (:data:`WIRE_FIELDS`): per-token fields are ``(batch, seq, heads, head_dim)``, per-row
statistics ``(batch, heads, seq)``. Partial results that this rank folds into (``out``, ``dq``,
``dkv``) are held in the accumulation dtype (fp32); on the wire each field travels in the dtype
WIRE_FIELDS names ("io": the input dtype, "acc": fp32). Pure tensor bookkeeping: no communication.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from tokenloom.kernels.reference import acc_dtype
from tokenloom.parallel.layout import SeqLayout
from tokenloom.parallel.schedule import WIRE_FIELDS, Block, Buf

Key = tuple  # Buf.key
Segment = tuple[int, int, int]  # (global chunk, offset inside the chunk, length) in tokens


@dataclass(frozen=True)
class Dims:
    """Per-rank tensor geometry shared by every buffer of one attention call."""

    batch: int
    chunk_lens: tuple[int, ...]  # tokens of every global chunk
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype  # input ("io") dtype
    device: torch.device
    head_shards: int = 1  # how many head shards an all-to-all makes
    kv_repeat: int = 1  # kv heads replicated so that they split over the head shards
    seq: SeqLayout | None = None  # packed documents (None or dense: one piece per chunk)

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.dtype)

    def num_heads(self, head_kind: str, shard: int) -> int:
        if head_kind == "q":
            return self.heads if shard < 0 else self.heads // self.head_shards
        if shard < 0:
            return self.kv_heads
        return self.kv_heads * self.kv_repeat // self.head_shards

    def wire_dtype(self, dt: str) -> torch.dtype:
        return self.dtype if dt == "io" else self.acc

    def length(self, chunks: Iterable[int]) -> int:
        return sum(self.chunk_lens[c] for c in chunks)


@dataclass
class Held:
    """A buffer present on this rank."""

    chunks: tuple[int, ...]
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    # a fold destination: chunks nothing was folded into yet (still zeros / lse = -inf), where the
    # first fold is a copy instead of a merge or an add (None: not a fold destination)
    untouched: set[int] | None = None


def seq_dim(width: str) -> int:
    return 1 if width == "d" else 2


def head_dim_of(width: str) -> int:
    return 2 if width == "d" else 1


def chunk_offsets(lens: tuple[int, ...], have: tuple[int, ...]) -> dict[int, int]:
    out, acc = {}, 0
    for c in have:
        out[c] = acc
        acc += lens[c]
    return out


def seg_ranges(lens: tuple[int, ...], have: tuple[int, ...], segs: Iterable[Segment]
               ) -> list[tuple[int, int]]:
    """Token ranges ``(start, length)`` of ``segs`` inside a buffer holding ``have`` (merged)."""
    off = chunk_offsets(lens, have)
    runs: list[list[int]] = []
    for c, o, n in segs:
        if c not in off:
            raise AssertionError(f"chunk {c} is not held (held chunks {have}): a schedule bug")
        start = off[c] + o
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += n
        else:
            runs.append([start, n])
    return [(a, n) for a, n in runs if n]


def whole(lens: tuple[int, ...], chunks: Iterable[int]) -> list[Segment]:
    return [(c, 0, lens[c]) for c in chunks]


def take(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of ``ranges`` along ``dim``: a view when there is one range."""
    if len(ranges) == 1:
        return t.narrow(dim, *ranges[0])
    if not ranges:
        return t.narrow(dim, 0, 0)
    return torch.cat([t.narrow(dim, a, n) for a, n in ranges], dim=dim)


def select(t: torch.Tensor, dim: int, lens: tuple[int, ...], have: tuple[int, ...],
           want: tuple[int, ...]) -> torch.Tensor:
    """The rows of ``want`` chunks from ``t`` (which holds ``have``): a view when they are adjacent."""
    return take(t, dim, seg_ranges(lens, have, whole(lens, want)))


def place(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]]
          ) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Yield ``(view of t at a range, row offset in a ranges-shaped tensor, length)``."""
    j = 0
    for a, n in ranges:
        yield t.narrow(dim, a, n), j, n
        j += n


def alloc(buf: Buf, dims: Dims, *, fill: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for ``buf``'s fields: uninitialised in wire dtypes (to receive into), or, with
    ``fill``, an empty fold destination in the accumulation dtype (zeros, lse = -inf)."""
    length = dims.length(buf.chunks)
    fields = {}
    for name, head_kind, width, dt in WIRE_FIELDS[buf.kind]:
        h = dims.num_heads(head_kind, buf.shard)
        shape = (dims.batch, length, h, dims.head_dim) if width == "d" else (dims.batch, h, length)
        if not fill:
            fields[name] = torch.empty(shape, dtype=dims.wire_dtype(dt), device=dims.device)
        else:
            value = float("-inf") if name == "lse" else 0.0
            fields[name] = torch.full(shape, value, dtype=dims.acc, device=dims.device)
    return fields


def sub_blocks(blk: Block, dims: Dims) -> list[tuple[list[Segment], list[Segment]]]:
    """``(query segments, key segments)`` of each kernel call of ``blk``: one for a dense
    sequence, one per document present on both sides for a packed one (cached: every layer of a
    model asks the same)."""
    return _sub_blocks(blk, dims.chunk_lens, dims.seq)


@functools.lru_cache(maxsize=4096)
def _sub_blocks(blk: Block, lens: tuple[int, ...], seq: SeqLayout | None
                ) -> list[tuple[list[Segment], list[Segment]]]:
    if seq is None or not seq.varlen:
        return [(whole(lens, blk.q_chunks), whole(lens, blk.kv_chunks))]
    per_chunk = {c: {d: (o, n) for d, o, n in seq.pieces(c)} for c in (*blk.q_chunks, *blk.kv_chunks)}
    docs_q = set().union(*(per_chunk[c] for c in blk.q_chunks))
    docs_kv = set().union(*(per_chunk[c] for c in blk.kv_chunks))
    calls = []
    for d in sorted(docs_q & docs_kv):
        qs = [(c, *per_chunk[c][d]) for c in blk.q_chunks if d in per_chunk[c]]
        ks = [(c, *per_chunk[c][d]) for c in blk.kv_chunks if d in per_chunk[c]]
        calls.append((qs, ks))
    return calls


def pad(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def extract(store: dict, buf: Buf, name: str, dims: Dims) -> torch.Tensor:
    """Field ``name`` of ``buf`` laid out over ``buf.chunks``; chunks never written are 0 (lse -inf)."""
    held = store.get(buf.key)
    if held is not None and held.chunks == tuple(buf.chunks):
        return held.fields[name]
    width = next(f.width for f in WIRE_FIELDS[buf.kind] if f.name == name)
    out = alloc(buf, dims, fill=True)[name]
    if held is not None:
        lens, sd = dims.chunk_lens, seq_dim(width)
        present = tuple(c for c in buf.chunks if c in held.chunks)
        src = select(held.fields[name], sd, lens, held.chunks, present)
        for view, j, n in place(out, sd, seg_ranges(lens, tuple(buf.chunks), whole(lens, present))):
            view.copy_(src.narrow(sd, j, n))
    return out
