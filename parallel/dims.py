"""The derived rules of one sequence-parallel attention run, in one typed object.

:class:`ParallelDims` (after torchtitan's ``ParallelDims``) answers every question that the
builders, the public API, the CLI job and the simulator would otherwise each re-derive: which
strategy runs on which dimension, how many head shards the all-to-all makes, whether the heads
divide, how often kv heads are replicated for Ulysses, how the sequence is chunked (dense or
packed, flat or 2-D) and how long each chunk is. Bad values raise
:class:`tokenloom.common.errors.UsageError` naming the argument. Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenloom.common.errors import UsageError
from tokenloom.common.vocab import RING_STRATEGIES, STRATEGIES, Strategy
from tokenloom.parallel.layout import SeqLayout, normalize_window

__all__ = ["RING_STRATEGIES", "STRATEGIES", "AttentionProblem", "ParallelDims", "Strategy", "check_gqa",
           "describe_strategy", "effective_window", "hybrid_name", "kv_repeat_for", "parse_strategy"]


def hybrid_name(ulysses: int, ring_strategy: str) -> str:
    """Name of a 2-D hybrid for the simulator and the advisor, e.g. ``"ulysses8+tokenring"``."""
    return f"ulysses{ulysses}+{ring_strategy}"


def parse_strategy(name: str) -> tuple[str, int]:
    """``(strategy, ulysses size)``: ``"ring"`` -> ("ring", 1); ``"ulysses8+tokenring"`` ->
    ("tokenring", 8). UsageError for anything else."""
    if name in STRATEGIES:
        return name, 1
    head, _, ring = str(name).partition("+")
    size = head[len("ulysses"):]
    if head.startswith("ulysses") and size.isdigit() and int(size) >= 1 and ring in RING_STRATEGIES:
        return ring, int(size)
    raise UsageError(f"strategy must be one of {STRATEGIES} or 'ulysses<N>+tokenring' / "
                     f"'ulysses<N>+ring' (2-D hybrid), got {name!r}", field="strategy")


def check_gqa(heads: int, kv_heads: int | None) -> None:
    """GQA: query heads a positive multiple of kv heads (None: as many); UsageError naming kv_heads."""
    hkv = kv_heads if kv_heads is not None else heads
    if heads < 1 or hkv < 1 or heads % hkv:
        raise UsageError(f"kv_heads ({hkv}) must be >= 1 and divide heads ({heads})", field="kv_heads")


def kv_repeat_for(kv_heads: int, head_shards: int) -> int:
    """Times each of ``kv_heads`` heads is replicated so they split evenly over ``head_shards``."""
    return head_shards // math.gcd(kv_heads, head_shards)


def effective_window(window_size: Any, causal: bool, seq_len: int | None) -> tuple[int, int] | None:
    """The window a call really masks with: :func:`normalize_window` (flash-attn's ``(left,
    right)``, -1 unbounded, causal folds ``right = 0``), then a side reaching past the sequence
    (``>= seq_len - 1``) made unbounded, since it masks nothing. None: no window beyond causal."""
    window = normalize_window(window_size, causal)
    if window is not None and seq_len is not None:
        window = normalize_window(tuple(-1 if w >= seq_len - 1 else w for w in window), causal)
    return window


def describe_strategy(name: str, world_size: int, gpus_per_node: int = 0) -> str:
    """Readable form of a hybrid name: "ulysses x8 inside nodes, tokenring x4 across"."""
    strategy, u = parse_strategy(name)
    if u == 1:
        return name
    where = "nodes" if u == gpus_per_node else f"groups of {u}"
    return f"ulysses x{u} inside {where}, {strategy} x{world_size // u} across"


@dataclass(frozen=True)
class ParallelDims:
    """One attention run's parallel shape.

    ``strategy`` is "tokenring" | "ring" | "ulysses" ("auto" is resolved before, in
    :func:`tokenloom.parallel.attention.resolve_strategy`). On a 2-D mesh (``ulysses`` > 1) it is
    the strategy of the outer (ring) dimension and Ulysses runs on the inner one. ``heads`` /
    ``kv_heads`` may be None for size-free questions (schedules of non-Ulysses strategies).
    """

    strategy: str
    world_size: int
    layout: str = "zigzag"
    ulysses: int = 1
    heads: int | None = None
    kv_heads: int | None = None
    doc_lens: tuple[int, ...] | None = None
    window: tuple[int, int] | None = None  # (left, right), causal folded in; None: no window
    seq_len: int | None = None  # global length; needed only by a dense sequence with a window

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UsageError(f"strategy must be 'auto' or one of {STRATEGIES}, got {self.strategy!r}",
                             field="strategy")
        object.__setattr__(self, "strategy", Strategy(self.strategy).value)  # a Strategy member too
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise UsageError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if self.ulysses > 1 and self.strategy == "ulysses":
            raise UsageError("strategy: on a 2-D ('ulysses', 'ring') mesh Ulysses runs on the inner "
                             "dim; pass the ring dim's strategy, 'tokenring' or 'ring'")
        self.seq  # validates layout, ulysses and doc_lens
        if self.heads is not None:
            check_gqa(self.heads, self.kv_heads)
            if self.heads % self.head_shards:
                what = "ulysses mesh dim size" if self.ulysses > 1 else "world_size"
                raise UsageError(
                    f"{self.name} needs heads ({self.heads}) divisible by {what} "
                    f"({self.head_shards}); use strategy 'tokenring' or 'ring', or a size dividing "
                    f"{self.heads}", field="heads")

    # -------------------------------------------------------------- strategy
    @property
    def ring(self) -> int:
        return self.world_size // self.ulysses

    @classmethod
    def named(cls, name: str, world_size: int, **kwargs) -> "ParallelDims":
        """From a strategy name that may be a hybrid (:func:`parse_strategy`)."""
        strategy, ulysses = parse_strategy(name)
        return cls(strategy, world_size, ulysses=ulysses, **kwargs)

    @property
    def name(self) -> str:
        """Schedule name: "tokenring", "ring", "ulysses" or "ulysses+<ring strategy>"."""
        return f"ulysses+{self.strategy}" if self.ulysses > 1 else self.strategy

    @property
    def uses_a2a(self) -> bool:
        return self.strategy == "ulysses" or self.ulysses > 1

    @property
    def head_shards(self) -> int:
        """Ranks one all-to-all spreads the heads over (1: no all-to-all)."""
        if self.strategy == "ulysses":
            return self.world_size
        return self.ulysses

    @property
    def kv_repeat(self) -> int:
        """Times each kv head is replicated so kv heads split evenly over the head shards."""
        if not self.uses_a2a:
            return 1
        hkv = self.kv_heads if self.kv_heads is not None else self.heads
        if hkv is None:
            return 1
        return kv_repeat_for(hkv, self.head_shards)

    def a2a_groups(self) -> tuple[tuple[int, ...], ...]:
        """The all-to-all groups (a partition of the SP ranks); empty without all-to-all."""
        if self.strategy == "ulysses":
            return (tuple(range(self.world_size)),)
        if self.ulysses > 1:
            return tuple(tuple(range(b, b + self.ulysses)) for b in range(0, self.world_size, self.ulysses))
        return ()

    # -------------------------------------------------------------- sequence
    @property
    def seq(self) -> SeqLayout:
        """Which chunks each rank holds; a 1-D group keeps the flat layout for every strategy."""
        return SeqLayout(self.world_size, self.layout, self.ulysses, self.doc_lens, self.window,
                         self.seq_len if self.window is not None else None)

    def chunk_lens(self, seq_len: int | None = None) -> tuple[int, ...]:
        return self.seq.chunk_lens(seq_len)

    def local_len(self, rank: int, seq_len: int | None = None) -> int:
        return self.seq.local_len(rank, seq_len)

    def dense_seq_len(self, seq_local: int) -> int:
        """Global length of a dense sequence whose shards are ``seq_local`` long; checks it divides."""
        per = len(self.seq.chunks_of(0))
        if seq_local <= 0 or seq_local % per:
            raise UsageError(f"seq_local (q.shape[1]={seq_local}) must be a positive multiple of "
                             f"{per}: layout {self.layout!r} holds {per} equal chunk(s) per rank", field="seq")
        return seq_local * self.world_size

    def dense_chunk_len(self, seq_len: int) -> int:
        """Tokens per chunk of a dense global sequence of ``seq_len``; UsageError naming ``seq``
        unless the layout's chunks divide it (the simulator's form of :meth:`dense_seq_len`)."""
        n = self.seq.num_chunks
        if seq_len <= 0 or seq_len % n:
            how = "world_size" if self.layout == "contiguous" else "2 * world_size"
            raise UsageError(f"seq ({seq_len}) must be a multiple of {how} = {n} for layout {self.layout!r}",
                             field="seq")
        return seq_len // n


@dataclass(frozen=True)
class AttentionProblem:
    """One attention layer as ``strategy="auto"`` prices it: the global shape, the mask and the
    group, before a strategy is chosen. Hashable (the advisor caches per problem).

    ``seq_len`` is the global length (all ranks); ``layout`` None lets the advisor rank both;
    ``ulysses`` > 1 is the inner size of a 2-D mesh; ``window`` the effective window
    (:func:`effective_window`; None: none). Sizes are validated where they are priced
    (:class:`tokenloom.simulator.cost.AttentionShape`); the parallel rules by :meth:`dims`.
    """

    world_size: int
    seq_len: int
    heads: int
    head_dim: int
    kv_heads: int | None = None
    batch: int = 1
    dtype_bytes: int = 2
    causal: bool = False
    backward: bool = True
    layout: str | None = None
    ulysses: int = 1
    window: tuple[int, int] | None = None

    _LEGACY = {"num_heads": "heads", "num_kv_heads": "kv_heads"}  # choose_strategy's keyword names

    @classmethod
    def of(cls, **kwargs: Any) -> "AttentionProblem":
        """From keyword scalars (``num_heads``/``num_kv_heads`` accepted too, and ``window_size``
        as the API takes it, turned into the effective window)."""
        kw = {cls._LEGACY.get(k, k): v for k, v in kwargs.items()}
        if "window_size" in kw:
            size = kw.pop("window_size")
            seq = kw.get("seq_len")
            kw["window"] = effective_window(size, bool(kw.get("causal", False)),
                                            seq if isinstance(seq, int) else None)
        return cls(**kw)

    def dims(self, strategy: str) -> ParallelDims:
        """The rules object of running this problem with ``strategy`` (a hybrid name too)."""
        name, ulysses = parse_strategy(strategy)
        return ParallelDims(name, self.world_size, layout=self.layout or "zigzag",
                            ulysses=max(ulysses, self.ulysses), heads=self.heads, kv_heads=self.kv_heads,
                            window=self.window, seq_len=self.seq_len if self.window is not None else None)
