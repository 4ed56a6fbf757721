"""Which tokens each rank holds: dense or packed (varlen) sequences, on a 1-D group or a 2-D mesh.

The global sequence is cut into ``num_chunks`` chunks (global chunk ids, see
:func:`tokenloom.comm.topology.mesh_chunks_of_rank`); every rank holds a few of them, in a fixed
order, concatenated along its sequence axis. Schedules speak only of chunk ids.

- **Dense** (``doc_lens=None``): one sequence; chunk ``c`` is the ``c``-th equal slice of it.
- **Packed** (``doc_lens``, from flash-attn's ``cu_seqlens``): every *document* is cut into
  ``num_chunks`` pieces of near-equal length (sizes differ by at most one token) and chunk ``c``
  is piece ``c`` of every document, documents in order. This is per-document zigzag: with
  ``layout="zigzag"`` every rank holds an early and a late piece of every document, so causal work
  balances per document. The leftover tokens of documents whose length does not divide go to the
  pieces in rank order, continuing where the previous document stopped, so ranks differ by at
  most a couple of tokens (a document shorter than ``num_chunks`` simply leaves pieces empty).
  Queries see keys of their own document only (and, when causal, not later ones).

Pieces of one document are in global order along the chunk ids, so chunk-level causality is the
dense rule (key chunk < query chunk: full; equal: diagonal; greater: nothing) applied per document.
A (query chunk, key chunk) pair is *needed* iff some document has tokens in both (and, when
causal, the key chunk is not later). Everything here is pure Python; nothing imports torch.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

from tokenloom.comm.topology import check_layout, mesh_chunks_of_rank, num_chunks
from tokenloom.common.errors import UsageError


@dataclass(frozen=True)
class SeqLayout:
    """How a (dense or packed) sequence is spread over ``world_size`` SP ranks.

    ``ulysses`` > 1 is the inner size of a 2-D ``(ulysses, ring)`` mesh (see
    :func:`~tokenloom.comm.topology.mesh_chunks_of_rank`); 1 for a flat group. ``doc_lens`` are
    document lengths of a packed sequence (None: one dense sequence of any length).
    ``window`` is a sliding window ``(left, right)`` in tokens (-1: unbounded; causal already folded
    in as ``right = 0``), None for none; a dense sequence with a window needs ``seq_len``.
    """

    world_size: int
    layout: str = "zigzag"
    ulysses: int = 1
    doc_lens: tuple[int, ...] | None = None
    window: tuple[int, int] | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.world_size < 1:
            raise UsageError(f"world_size must be >= 1, got {self.world_size}")
        if self.ulysses < 1 or self.world_size % self.ulysses:
            raise UsageError(f"ulysses size {self.ulysses} must divide world_size {self.world_size}")
        if self.doc_lens is not None:
            if not self.doc_lens or any(n < 1 for n in self.doc_lens):
                raise UsageError("cu_seqlens: documents must have positive lengths "
                                 f"(got lengths {list(self.doc_lens)[:8]})")

    # -------------------------------------------------------------- chunks
    @property
    def ring(self) -> int:
        return self.world_size // self.ulysses

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.ring, self.layout) * self.ulysses

    @property
    def varlen(self) -> bool:
        return self.doc_lens is not None

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """Global chunk ids held by SP ``rank``, in local order."""
        return mesh_chunks_of_rank(rank, self.world_size, self.layout, self.ulysses)

    def owner(self, chunk: int) -> int:
        return _owners(self)[chunk]

    def ulysses_group(self, rank: int) -> tuple[int, ...]:
        """SP ranks of ``rank``'s Ulysses group (same ring rank), in Ulysses-rank order."""
        base = rank - rank % self.ulysses
        return tuple(range(base, base + self.ulysses))

    # -------------------------------------------------------------- sizes
    def total_len(self, seq_len: int | None = None) -> int:
        return sum(self.doc_lens) if self.varlen else int(seq_len or 0)

    def chunk_lens(self, seq_len: int | None = None) -> tuple[int, ...]:
        """Tokens per chunk; dense needs ``seq_len`` (the global length, a multiple of num_chunks)."""
        if self.varlen:
            return _pieces(self).chunk_lens
        k = self.num_chunks
        seq_len = self.seq_len if seq_len is None else seq_len
        if seq_len is None or seq_len <= 0 or seq_len % k:
            raise UsageError(f"sequence length {seq_len} must be a positive multiple of {k} "
                             f"(chunks of layout {self.layout!r} over {self.world_size} ranks)")
        return (seq_len // k,) * k

    def local_len(self, rank: int, seq_len: int | None = None) -> int:
        lens = self.chunk_lens(seq_len)
        return sum(lens[c] for c in self.chunks_of(rank))

    def pieces(self, chunk: int, seq_len: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """Non-empty ``(doc, offset in chunk, length)`` of ``chunk``; dense: one whole piece."""
        if self.varlen:
            return _pieces(self).in_chunk[chunk]
        return ((0, 0, self.chunk_lens(seq_len)[chunk]),)

    def global_ranges(self, rank: int, seq_len: int | None = None) -> list[tuple[int, int]]:
        """``(global start, length)`` runs of ``rank``'s local tokens, in local order (merged)."""
        runs: list[list[int]] = []
        for c in self.chunks_of(rank):
            for start, length in self._chunk_ranges(c, seq_len):
                if runs and runs[-1][0] + runs[-1][1] == start:
                    runs[-1][1] += length
                else:
                    runs.append([start, length])
        return [(a, n) for a, n in runs]

    def _chunk_ranges(self, chunk: int, seq_len: int | None) -> list[tuple[int, int]]:
        seq_len = self.seq_len if seq_len is None else seq_len
        if not self.varlen:
            c = self.chunk_lens(seq_len)[chunk]
            return [(chunk * c, c)]
        p = _pieces(self)
        return [(p.doc_start[d] + p.piece_start[d][chunk], n) for d, _, n in p.in_chunk[chunk]]

    # -------------------------------------------------------------- mask
    def docs_in(self, chunk: int) -> int:
        """Bitset of documents with tokens in ``chunk`` (dense: document 0)."""
        return _pieces(self).docs_bits[chunk] if self.varlen else 1

    def pair_needed(self, q_chunk: int, kv_chunk: int, causal: bool) -> bool:
        """Does some query of ``q_chunk`` see some key of ``kv_chunk``?"""
        if causal and kv_chunk > q_chunk:
            return False
        return bool(self.docs_in(q_chunk) & self.docs_in(kv_chunk))

    def needed_pairs(self, q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], causal: bool
                     ) -> list[tuple[int, int]]:
        if self.window is not None:
            return [(qc, kc) for qc in q_chunks for kc in kv_chunks if self.pair_kind(qc, kc) != "none"]
        return [(qc, kc) for qc in q_chunks for kc in kv_chunks if self.pair_needed(qc, kc, causal)]

    # -------------------------------------------------------------- windows
    def spans(self, chunk: int) -> dict[int, tuple[int, int]]:
        """document -> (first, last) global position of ``chunk``'s tokens in it (one run each)."""
        out = {}
        for d, (start, length) in zip(self._chunk_docs(chunk), self._chunk_ranges(chunk, None)):
            out[d] = (start, start + length - 1)
        return out

    def _chunk_docs(self, chunk: int) -> list[int]:
        return [d for d, _, _ in _pieces(self).in_chunk[chunk]] if self.varlen else [0]

    def pair_kind(self, q_chunk: int, kv_chunk: int) -> str:
        """Under the window: "none" (no query of ``q_chunk`` sees a key of ``kv_chunk``), "full"
        (in every shared document every query sees every key) or "partial"."""
        assert self.window is not None
        left, right = self.window
        qs, ks = self.spans(q_chunk), self.spans(kv_chunk)
        kinds = set()
        for d in qs.keys() & ks.keys():
            lo, hi = ks[d][0] - qs[d][1], ks[d][1] - qs[d][0]  # range of key - query positions
            if (left >= 0 and hi < -left) or (right >= 0 and lo > right):
                kinds.add("none")
            elif (left < 0 or lo >= -left) and (right < 0 or hi <= right):
                kinds.add("full")
            else:
                kinds.add("partial")
        # a block runs every shared document: unmasked only if the window shows each one whole
        return "none" if kinds <= {"none"} else ("full" if kinds == {"full"} else "partial")

    def global_pos(self, chunk: int, offset: int) -> int:
        """Global position of the token ``offset`` rows into ``chunk``."""
        for start, length in self._chunk_ranges(chunk, None):
            if offset < length:
                return start + offset
            offset -= length
        raise AssertionError((chunk, offset))


@functools.lru_cache(maxsize=64)
def _owners(lay: SeqLayout) -> dict[int, int]:
    return {c: r for r in range(lay.world_size) for c in lay.chunks_of(r)}


@dataclass(frozen=True)
class _Pieces:
    chunk_lens: tuple[int, ...]
    in_chunk: tuple[tuple[tuple[int, int, int], ...], ...]  # per chunk: (doc, offset, length)
    doc_start: tuple[int, ...]
    piece_start: tuple[tuple[int, ...], ...]  # per doc, per chunk: offset inside the document
    docs_bits: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def _pieces(lay: SeqLayout) -> _Pieces:
    """Cut every document into ``num_chunks`` pieces (module docstring)."""
    assert lay.doc_lens is not None
    k = lay.num_chunks
    rank_order = [c for r in range(lay.world_size) for c in lay.chunks_of(r)]
    lens = [0] * k
    in_chunk: list[list[tuple[int, int, int]]] = [[] for _ in range(k)]
    bits = [0] * k
    doc_start, piece_start = [], []
    start, extra_at = 0, 0
    for d, n in enumerate(lay.doc_lens):
        base, rem = divmod(n, k)
        sizes = [base] * k
        for i in range(rem):
            sizes[rank_order[(extra_at + i) % k]] += 1
        extra_at = (extra_at + rem) % k
        offs, acc = [], 0
        for c in range(k):
            offs.append(acc)
            acc += sizes[c]
            if sizes[c]:
                in_chunk[c].append((d, lens[c], sizes[c]))
                lens[c] += sizes[c]
                bits[c] |= 1 << d
        doc_start.append(start)
        piece_start.append(tuple(offs))
        start += n
    return _Pieces(tuple(lens), tuple(map(tuple, in_chunk)), tuple(doc_start), tuple(piece_start),
                   tuple(bits))


def doc_lens_from_cu_seqlens(cu: list[int] | tuple[int, ...], *, total: int | None = None,
                             name: str = "cu_seqlens") -> tuple[int, ...]:
    """Validate flash-attn style boundaries ``[0, e1, ..., total]`` and return document lengths."""
    cu = [int(x) for x in cu]
    if len(cu) < 2 or cu[0] != 0:
        raise UsageError(f"{name} must start at 0 and hold num_docs + 1 >= 2 boundaries, got "
                         f"{cu[:8]}{'...' if len(cu) > 8 else ''}")
    lens = tuple(b - a for a, b in zip(cu, cu[1:]))
    if any(n <= 0 for n in lens):
        bad = next(i for i, n in enumerate(lens) if n <= 0)
        raise UsageError(f"{name} must be strictly increasing (documents of positive length); "
                         f"boundary {bad + 1} is {cu[bad + 1]} after {cu[bad]}")
    if total is not None and cu[-1] != total:
        raise UsageError(f"{name} ends at {cu[-1]} but the global sequence has {total} tokens")
    return lens


def normalize_window(window_size, causal: bool) -> tuple[int, int] | None:
    """``window_size=(left, right)`` (flash-attn: -1 unbounded) validated; causal sets ``right = 0``
    (as flash-attn does). None when nothing is masked beyond ``causal``: None, ``(-1, -1)``, or
    causal with an unbounded left. UsageError naming ``window_size`` otherwise."""
    if window_size is None:
        return None
    bad = UsageError(f"window_size must be (left, right), two integers >= -1 (-1: unbounded), got "
                     f"{window_size!r}", field="window_size")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise bad
    vals = []
    for w in window_size:
        if hasattr(w, "item") and getattr(w, "numel", lambda: 0)() == 1 and not w.is_floating_point():
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1:
            raise bad
        vals.append(int(w))
    left, right = vals
    if causal:
        right = 0
    if left < 0 and (right < 0 or causal):
        return None
    return (left, right)
