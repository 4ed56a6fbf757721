"""A sharded KV cache: each rank holds its share of every layer's keys and values.

Per layer, rank r holds ``keys``/``values`` ``(batch, local_len, kv_heads, head_dim)`` and the global
position of each local token (``positions``, int64, in local order). Storage is chosen for the
decode kernel (:mod:`tokenloom.kernels.decode`): each head's keys one contiguous run, either
heads-first ``(batch, kv_heads, capacity, head_dim)`` (what the fused GPU ops read) or, for fp32/fp64
on CPU, keys-last ``(batch, kv_heads, head_dim, capacity)``, where a one-token step is two
matrix-vector products that stream the shard at the memory's rate (1.8x the fused CPU op per rank,
``benchmarks/bench_decode.py``). Readers get the same ``(batch, kv_heads, local_len, head_dim)``
view either way (:meth:`ShardedKVCache.keys_heads_first`). The cache knows the whole
sequence length of each layer (``seq_len``): the next token's position. Tokens come in two ways:

* :meth:`ShardedKVCache.fill`: a sequence-parallel prefill hands this rank's K/V shard over as it is
  (Ring, TokenRing, Ulysses and the 2-D mesh all take and give sequence shards under a
  :class:`~tokenloom.parallel.layout.SeqLayout`; :func:`prefill_positions` says which positions).
* appends by :func:`tokenloom.parallel.decode.cached_attention`, by the rule of
  :func:`~tokenloom.parallel.decode_schedule.part_rank` (a call's new tokens are cut into
  world_size contiguous parts, part j to rank ``(j + start) % world_size``), which keeps shards
  within a token or so of each other for decode and splits a long chunk evenly.

Memory is estimated before anything is allocated: the constructor refuses a ``max_tokens`` whose
share does not fit ``memory_limit`` (default: the device's free memory), naming both; storage
then grows by doubling, each growth checked again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.common.errors import UsageError


@dataclass(frozen=True)
class CacheSpec:
    """What a cache is for: a model (layers, kv heads, head_dim, dtype), a batch and a group.

    ``model`` names the model (any string, e.g. its config's hash) so a cache filled for one model
    is refused by another; ``layout`` says how the prefill was sharded ("zigzag", "contiguous",
    or "appended" when every token came through decode appends).
    """

    num_layers: int
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    world_size: int
    rank: int
    layout: str = "appended"
    model: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "batch", "kv_heads", "head_dim", "world_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}", field=name)
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is outside world_size {self.world_size}", field="rank")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def token_bytes(self) -> int:
        """Bytes of K and V for one token of one layer."""
        return 2 * self.batch * self.kv_heads * self.head_dim * self.itemsize


def estimate_bytes(spec: CacheSpec, max_tokens: int) -> int:
    """Bytes this rank needs for ``max_tokens`` tokens over all layers (its even share, plus one
    token per rank for the append rule's rounding, plus two cache lines of padding per row of a
    keys-last layer, plus positions)."""
    local = math.ceil(max_tokens / spec.world_size) + spec.world_size + 2 * max(1, 64 // spec.itemsize)
    return spec.num_layers * local * (spec.token_bytes() + 8)


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def keys_last_default(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a cache on ``device`` in ``dtype`` is stored keys-last by default: on CPU for
    fp32/fp64, where the decode kernel's matrix-vector path reads that order at the memory's rate
    (see the module docstring); the decode runtime sends K/V in the same order."""
    return device.type == "cpu" and dtype in (torch.float32, torch.float64)


def odd_lines(n: int, itemsize: int, line: int = 64) -> int:
    """The least ``m >= n`` whose row of ``m`` items spans an odd number of cache lines. Keys-last
    rows are read across (a copy heads-first reads every row at once); rows a multiple of 4 KiB
    apart all fall in one cache set, which made that copy 3x slower (61440 fp32 keys: 56 ms
    against 20 for 61456, 8 heads x 32K keys x 64 on this CPU)."""
    per = max(1, line // itemsize)
    lines = -(-n // per)
    return (lines + 1 - lines % 2) * per


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


class ShardedKVCache:
    """This rank's shard of a KV cache (see module docstring).

    Args:
        spec: the model, batch and group the cache serves.
        max_tokens: the longest sequence it will hold (prompt plus generated tokens).
        device: where the shards live.
        memory_limit: bytes this rank may use; None: the device's free memory now.
        keys_last: store ``(batch, kv_heads, head_dim, capacity)`` (see module docstring); None:
            on CPU for fp32/fp64.
    """

    def __init__(self, spec: CacheSpec, max_tokens: int, *, device: torch.device | str = "cpu",
                 memory_limit: int | None = None, keys_last: bool | None = None) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise UsageError(f"max_tokens must be a positive integer, got {max_tokens!r}",
                             field="max_tokens")
        self.spec, self.max_tokens, self.device = spec, max_tokens, torch.device(device)
        self.keys_last = keys_last_default(self.device, spec.dtype) if keys_last is None else bool(keys_last)
        self.memory_limit = free_memory(self.device) if memory_limit is None else int(memory_limit)
        need = estimate_bytes(spec, max_tokens)
        if need > self.memory_limit:
            raise UsageError(
                f"a KV cache of max_tokens={max_tokens} needs {_gib(need)} on each of "
                f"{spec.world_size} ranks ({spec.num_layers} layers x {spec.token_bytes()} bytes per "
                f"token), more than the limit of {_gib(self.memory_limit)} "
                f"({'memory_limit' if memory_limit is not None else 'free memory on ' + str(self.device)}); "
                f"use more ranks or a shorter max_tokens", field="max_tokens")
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._pos: dict[int, torch.Tensor] = {}
        self._len: dict[int, int] = {}
        self._seq: dict[int, int] = {}
        self._allocated = 0

    # ------------------------------------------------------------------ reading
    def has_layer(self, layer: int) -> bool:
        return layer in self._len

    def local_len(self, layer: int) -> int:
        return self._len.get(layer, 0)

    def seq_len(self, layer: int) -> int:
        """Tokens of the whole sequence in ``layer`` (all ranks): the next token's position."""
        return self._seq.get(layer, 0)

    def keys(self, layer: int) -> torch.Tensor:
        """``(batch, local_len, kv_heads, head_dim)`` view."""
        return self.keys_heads_first(layer).transpose(1, 2)

    def values(self, layer: int) -> torch.Tensor:
        return self.values_heads_first(layer).transpose(1, 2)

    def keys_heads_first(self, layer: int) -> torch.Tensor:
        """``(batch, kv_heads, local_len, head_dim)`` view of the storage (keys-last storage:
        ``stride(-2) == 1``)."""
        return self._view(self._k[layer], self._len[layer])

    def values_heads_first(self, layer: int) -> torch.Tensor:
        return self._view(self._v[layer], self._len[layer])

    def _view(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[..., :n].transpose(-1, -2) if self.keys_last else t[:, :, :n]

    def _capacity(self, layer: int) -> int:
        return self._k[layer].shape[3 if self.keys_last else 2] if layer in self._k else 0

    def positions(self, layer: int) -> torch.Tensor:
        return self._pos[layer][:self._len[layer]]

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    # ------------------------------------------------------------------ writing
    def reserve(self, layer: int, extra: int) -> None:
        """Make room for ``extra`` more local tokens in ``layer`` (checked against the memory
        limit and ``max_tokens``; raises UsageError before anything is written)."""
        have = self._len.get(layer, 0)
        cap = self._capacity(layer)
        if have + extra <= cap and layer in self._k:
            return
        spec = self.spec
        new_cap = min(max(have + extra, 2 * cap, 64), max(self.max_tokens, have + extra))
        if self.keys_last:
            new_cap = odd_lines(new_cap, spec.itemsize)
        grow = (new_cap - cap) * (spec.token_bytes() + 8)
        if self._allocated + grow > self.memory_limit:
            raise UsageError(f"KV cache layer {layer}: growing to {new_cap} local tokens needs "
                             f"{_gib(self._allocated + grow)}, more than the limit of "
                             f"{_gib(self.memory_limit)}", field="max_tokens")
        shape = ((spec.batch, spec.kv_heads, spec.head_dim, new_cap) if self.keys_last
                 else (spec.batch, spec.kv_heads, new_cap, spec.head_dim))
        k = torch.empty(shape, dtype=spec.dtype, device=self.device)
        v = torch.empty(shape, dtype=spec.dtype, device=self.device)
        pos = torch.empty(new_cap, dtype=torch.int64, device=self.device)
        if layer in self._k:
            self._view(k, have).copy_(self._view(self._k[layer], have))
            self._view(v, have).copy_(self._view(self._v[layer], have))
            pos[:have] = self._pos[layer][:have]
        self._k[layer], self._v[layer], self._pos[layer] = k, v, pos
        self._allocated += grow

    def check_kv(self, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
        """Refuse K/V that do not belong to this cache's model and batch (names the argument)."""
        spec = self.spec
        want = (spec.batch, spec.kv_heads, spec.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise UsageError(f"{what}: {name} must be a 4-D tensor (batch, seq, kv_heads, "
                                 f"head_dim)", field=name)
            got = (t.shape[0], t.shape[2], t.shape[3])
            if got != want or t.dtype != spec.dtype:
                raise UsageError(f"{what}: {name} of shape {tuple(t.shape)} {t.dtype} does not fit this "
                                 f"cache (batch, kv_heads, head_dim = {want}, {spec.dtype}): a cache "
                                 f"from another model or batch", field=name)
        if k.shape != v.shape:
            raise UsageError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} differ", field="v")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               seq_len: int) -> None:
        """Store ``k``/``v`` (this rank's new tokens, at ``positions``) and set the layer's global
        length to ``seq_len``. Callers validate (and agree) first; this only writes."""
        self.check_kv(k, v, "append")
        n = k.shape[1]
        if seq_len > self.max_tokens:
            raise UsageError(f"the sequence would reach {seq_len} tokens, beyond this cache's "
                             f"max_tokens={self.max_tokens}", field="max_tokens")
        self.reserve(layer, n)
        have = self._len.get(layer, 0)
        self._view(self._k[layer], have + n)[:, :, have:] = k.transpose(1, 2)
        self._view(self._v[layer], have + n)[:, :, have:] = v.transpose(1, 2)
        self._pos[layer][have:have + n] = positions.to(self.device, torch.int64)
        self._len[layer] = have + n
        self._seq[layer] = seq_len

    def reorder_batch(self, index: Any, layer: int | None = None) -> None:
        """Rows of the batch in a new order, ``new[i] = old[index[i]]`` (beam search keeps the
        beams it continues), in ``layer`` or every layer. Positions are the same for every row,
        so only K and V move. Every rank must pass the same index: under HF generation they do,
        because every rank computes bitwise the same logits (the partials merge identically)."""
        batch = self.spec.batch
        idx = torch.as_tensor(index)
        if (idx.dim() != 1 or idx.numel() != batch or idx.dtype.is_floating_point
                or idx.dtype == torch.bool or bool(((idx < 0) | (idx >= batch)).any())):
            raise UsageError(f"reorder_batch: the index must be {batch} integers in 0..{batch - 1} "
                             f"(one source row per batch row), got {idx.tolist()!r}", field="beam_idx")
        idx = idx.to(self.device, torch.int64)
        for i in (list(self._k) if layer is None else [layer] if layer in self._k else []):
            self._k[i] = self._k[i].index_select(0, idx)
            self._v[i] = self._v[i].index_select(0, idx)

    def truncate(self, layer: int, local_len: int, seq_len: int) -> None:
        """Undo appends back to ``local_len`` local tokens and ``seq_len`` global ones (rollback)."""
        if local_len == 0 and seq_len == 0:
            for d in (self._len, self._seq):
                d.pop(layer, None)
            return
        self._len[layer] = local_len
        self._seq[layer] = seq_len

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
             seq_len: int) -> None:
        """A prefill's K/V shard for an empty ``layer``: ``positions`` (``(local_len,)``) from
        :func:`prefill_positions`; ``seq_len`` the whole prompt's length."""
        if self.has_layer(layer):
            raise UsageError(f"fill: layer {layer} already holds {self.seq_len(layer)} tokens; a "
                             f"prefill fills an empty layer", field="layer")
        if not 0 <= layer < self.spec.num_layers:
            raise UsageError(f"fill: layer {layer} is outside 0..{self.spec.num_layers - 1}",
                             field="layer")
        if positions.shape != (k.shape[1],):
            raise UsageError(f"fill: positions {tuple(positions.shape)} must be ({k.shape[1]},), "
                             f"one per local token", field="positions")
        self.append(layer, k, v, positions, seq_len)

    def fill_shard(self, layer: int, k: torch.Tensor, v: torch.Tensor, seq_len: int, *,
                   layout: str = "zigzag", ulysses: int = 1) -> None:
        """This rank's K/V shard of a sequence-parallel prefill of ``seq_len`` tokens (as given to
        ``sp_attention`` with ``layout``; ``ulysses`` > 1 for a 2-D mesh) into an empty layer."""
        if layout != self.spec.layout:
            raise UsageError(f"fill_shard: the prefill's layout {layout!r} is not this cache's "
                             f"{self.spec.layout!r}", field="layout")
        pos = prefill_positions(self.spec.rank, self.spec.world_size, seq_len, layout=layout,
                                ulysses=ulysses)
        self.fill(layer, k, v, pos, seq_len)


def prefill_positions(rank: int, world_size: int, seq_len: int, *, layout: str = "zigzag",
                      ulysses: int = 1) -> torch.Tensor:
    """Global positions of ``rank``'s tokens in a prefill sharded by ``layout`` (local order):
    what :meth:`ShardedKVCache.fill` stores next to the K/V shard the attention call received."""
    from tokenloom.parallel.layout import SeqLayout

    lay = SeqLayout(world_size, layout, ulysses=ulysses)
    runs = lay.global_ranges(rank, seq_len)
    return torch.cat([torch.arange(a, a + n, dtype=torch.int64) for a, n in runs])


def fill_packed(caches: "list[ShardedKVCache]", layer: int, k: torch.Tensor, v: torch.Tensor,
                cu_seqlens: Any, *, layout: str = "zigzag") -> None:
    """A packed prefill's K/V shard (documents concatenated along the sequence, boundaries
    ``cu_seqlens`` as given to ``sp_attention``) into one cache per document: document d's local
    tokens go to ``caches[d]`` at their positions within the document (each document is its own
    sequence for decoding)."""
    from tokenloom.parallel.layout import SeqLayout, doc_lens_from_cu_seqlens
    from tokenloom.parallel.sharding import host_cu_seqlens

    cu = host_cu_seqlens(cu_seqlens)
    lens = doc_lens_from_cu_seqlens(cu, total=int(cu[-1]))
    if len(caches) != len(lens):
        raise UsageError(f"fill_packed: {len(lens)} documents but {len(caches)} caches", field="caches")
    spec = caches[0].spec
    runs = SeqLayout(spec.world_size, layout, doc_lens=lens).global_ranges(spec.rank, int(cu[-1]))
    pos = torch.cat([torch.arange(a, a + n, dtype=torch.int64) for a, n in runs])
    if pos.numel() != k.shape[1]:
        raise UsageError(f"fill_packed: this rank holds {pos.numel()} tokens of the packed sequence "
                         f"under layout {layout!r}, but k has {k.shape[1]}", field="k")
    bounds = torch.tensor(list(cu), dtype=torch.int64)
    doc = torch.searchsorted(bounds, pos, right=True) - 1
    for d, cache in enumerate(caches):
        mine = (doc == d).nonzero().view(-1)
        cache.fill(layer, k[:, mine], v[:, mine], pos[mine] - bounds[d], lens[d])
