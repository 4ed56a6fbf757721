"""Attention of new queries over a sharded KV cache: decode and chunked prefill.

::

    cache = ShardedKVCache(CacheSpec(num_layers, batch, kv_heads, head_dim, dtype, N, rank), max_tokens)
    out = cached_attention(q, k, v, cache, layer, group=g)            # decode: q, k, v of the new tokens

One call appends the new tokens' K/V to the cache (each rank keeps its part by
:func:`~tokenloom.parallel.decode_schedule.part_rank`) and returns causal attention of the new
queries over everything cached so far, new tokens included, exactly as one process would.

``queries="replicated"`` (decode): every rank passes all new tokens (each runs the whole model on
them) and gets every output. ``queries="sharded"`` (chunked prefill): each rank passes its own part
of the new tokens (:func:`new_token_part` says which) and gets its part's output.

Before anything is appended or sent, every rank contributes one small int64 vector (cache
identity, model, shapes, positions, strategy, new-token count) to ONE all-gather; any rank's bad
argument or any disagreement raises the same named UsageError on every rank, with nothing appended.
If the attention itself fails, the append is undone.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from tokenloom.comm.communicator import Communicator
from tokenloom.errors import UsageError
from tokenloom.parallel.agree import check_scale, code_of, float_code
from tokenloom.parallel.decode_check import check_decode_schedule
from tokenloom.parallel.decode_runtime import DecodeRunner, Held, Shape, Timing
from tokenloom.parallel.decode_schedule import (
    DECODE_STRATEGIES, build_decode_schedule, part_lens, part_of, part_range,
    part_rank)
from tokenloom.parallel.kv_cache import ShardedKVCache

QUERY_MODES = ("replicated", "sharded")
_FIELDS = ("arguments", "world_size", "cache", "model", "layer_present", "seq_len", "start",
           "new_tokens", "heads", "strategy", "queries", "softmax_scale", "impl")


def new_token_part(rank: int, world_size: int, start: int, count: int) -> tuple[int, int]:
    """``[lo, hi)`` offsets, within a call's ``count`` new tokens starting at position ``start``,
    of the tokens ``rank`` holds (and appends): what it passes with ``queries="sharded"``."""
    return part_range(part_of(rank, world_size, start), count, world_size)


def choose_strategy(*, world_size: int, cached: int, new_tokens: int, heads: int, kv_heads: int,
                    queries: str) -> str:
    """``strategy="auto"``: pass-KV when moving the cache costs fewer bytes than moving queries
    and partials (new tokens * heads * ~2 against (cached + new) * kv_heads * 2: Meta's CP-inference
    rule), else pass-Q: the one-round gather for replicated queries or short chunks, the ring
    (partials return while the next block computes) for long sharded chunks on 3+ ranks."""
    if world_size == 1:
        return "gather"
    if queries == "sharded" and new_tokens * heads >= (cached + new_tokens) * kv_heads:
        return "passkv"
    if queries == "sharded" and world_size >= 3 and new_tokens >= 1024:
        return "ring"
    return "gather"


@functools.lru_cache(maxsize=256)
def _checked_schedule(strategy: str, world_size: int, rot: int, replicated: bool):
    """The schedule, proved once per shape by the checker (chunks all non-empty: empty ones only
    remove pairs, which the runtime skips)."""
    sched = build_decode_schedule(strategy, world_size, start=rot, replicated=replicated)
    n = world_size
    spans: dict[int, tuple[int, int] | None] = {r: (0, 0) for r in range(n)}
    spans.update({n + j: (1 + j, 1 + j) for j in range(n)})
    check_decode_schedule(sched, spans)
    return sched


def _identity(cache: ShardedKVCache) -> tuple[int, int]:
    s = cache.spec
    return (code_of(f"{s.layout}|{s.world_size}|{cache.max_tokens}") % (1 << 40),
            code_of(f"{s.model}|{s.num_layers}|{s.batch}|{s.kv_heads}|{s.head_dim}|{s.dtype}"))


def _describe(cache: Any, layer: Any) -> str:
    if not isinstance(cache, ShardedKVCache) or not isinstance(layer, int):
        return "?"
    s = cache.spec
    return (f"layout={s.layout} world_size={s.world_size} model={s.model or '-'} "
            f"layers={s.num_layers} kv_heads={s.kv_heads} head_dim={s.head_dim} dtype={s.dtype} "
            f"layer {layer}: {'present' if cache.has_layer(layer) else 'absent'}, "
            f"{cache.seq_len(layer)} tokens")


def _validate(q, k, v, cache, layer, comm, start, queries, strategy) -> tuple[int, int]:
    """This rank's own checks (raise UsageError); returns ``(start, my new-token count)``."""
    if not isinstance(cache, ShardedKVCache):
        raise UsageError(f"cache must be a ShardedKVCache, got {type(cache).__name__}", field="cache")
    if cache.spec.world_size != comm.world_size or cache.spec.rank != comm.rank:
        raise UsageError(f"this cache was built for rank {cache.spec.rank} of {cache.spec.world_size}, "
                         f"but this is rank {comm.rank} of {comm.world_size}", field="cache")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cache.spec.num_layers:
        raise UsageError(f"layer must be in 0..{cache.spec.num_layers - 1}, got {layer!r}", field="layer")
    if queries not in QUERY_MODES:
        raise UsageError(f"queries must be one of {QUERY_MODES}, got {queries!r}", field="queries")
    if strategy != "auto" and strategy not in DECODE_STRATEGIES:
        raise UsageError(f"strategy must be auto or one of {', '.join(DECODE_STRATEGIES)}, got "
                         f"{strategy!r}", field="strategy")
    cache.check_kv(k, v, "cached_attention")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2] or q.dtype != k.dtype:
        raise UsageError(f"q {tuple(getattr(q, 'shape', ()))} must be (batch, new_tokens, heads, "
                         f"head_dim) like k {tuple(k.shape)} with heads a multiple of kv_heads",
                         field="q")
    have = cache.seq_len(layer)
    if start is None:
        start = have
    if isinstance(start, bool) or not isinstance(start, int) or start != have:
        raise UsageError(f"positions out of order: the new tokens start at position {start!r} but "
                         f"layer {layer} of the cache holds {have} tokens (the next position is "
                         f"{have})", field="start")
    return start, q.shape[1]


def _agree(comm: Communicator, mine: list[int], error: UsageError | None, local: str = ""
           ) -> list[list[int]]:
    """ONE all-gather of every rank's vector; raise the same way on every rank."""
    if comm.world_size == 1:
        if error is not None:
            raise error
        return [mine]
    every = comm.all_gather(torch.tensor(mine, dtype=torch.int64, device=comm.device)).cpu().tolist()
    failed = {r: _FIELDS[row[0] - 1] for r, row in enumerate(every) if row[0]}
    if failed:
        if error is not None:
            raise error
        what = ", ".join(f"rank {r}: {f}" for r, f in sorted(failed.items()))
        raise UsageError(f"cached_attention: other ranks refused their arguments ({what}); see their "
                         f"errors", field=next(iter(failed.values())))
    sharded = mine[_FIELDS.index("queries")] == 1
    for name in [f for f in _FIELDS[1:] if f != "new_tokens"] + ["new_tokens"]:
        column = [row[_FIELDS.index(name)] for row in every]
        if name == "new_tokens" and sharded:
            continue  # each rank's own part, checked by the caller against the agreed total
        if len(set(column)) > 1:
            shown = "; ".join(f"rank {r}: {c}" for r, c in enumerate(column))
            what = {"cache": "a cache from another layout, world size or size",
                    "model": "a cache from another model",
                    "layer_present": "a rank whose cache lacks this layer"}.get(name, name)
            raise UsageError(f"cached_attention: ranks disagree on {name} ({what}): {shown}; "
                             f"this rank's cache: {local}", field=name)
    return every


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache,
                     layer: int, *, group: Any = None, strategy: str = "auto",
                     queries: str = "replicated", start: int | None = None,
                     softmax_scale: float | None = None, impl: str | None = None,
                     timing: Timing | None = None, return_lse: bool = False):
    """Append the new tokens to ``cache`` and attend their queries over it (causal).

    q ``(batch, t, heads, head_dim)``, k/v ``(batch, t, kv_heads, head_dim)``: all new tokens
    (``queries="replicated"``) or this rank's part (``"sharded"``). ``start``: the global position
    of the first new token (default: the layer's length; anything else is refused). Returns ``out``
    shaped like q (``(out, lse)`` with ``return_lse``). ``timing``: filled with this rank's split
    between attention and communication.
    """
    comm = group if isinstance(group, Communicator) else Communicator(group)
    error, start_ok, count = None, 0, 0
    try:
        start_ok, count = _validate(q, k, v, cache, layer, comm, start, queries, strategy)
        scale = check_scale(softmax_scale, q.shape[-1])
        if impl is not None:
            from tokenloom import kernels
            kernels.select_impl(q.device, impl)
    except UsageError as exc:
        error, scale = exc, 0.0
    if error is None:
        ident, model = _identity(cache)
        mine = [0, comm.world_size, ident, model, int(cache.has_layer(layer)), cache.seq_len(layer),
                start_ok, count, q.shape[2], code_of(strategy), QUERY_MODES.index(queries),
                float_code(scale), code_of(repr(impl)), cache.local_len(layer)]
    else:
        mine = [_FIELDS.index(error.field if error.field in _FIELDS else "arguments") + 1] \
            + [0] * len(_FIELDS)
    t0 = time.perf_counter()
    every = _agree(comm, mine, error, _describe(cache, layer))
    if timing is not None:
        timing.agree_s += time.perf_counter() - t0
        timing.comm_s += time.perf_counter() - t0
    n = comm.world_size
    old = [row[-1] for row in every]
    total = sum(row[7] for row in every) if queries == "sharded" else count
    if queries == "sharded":
        want = [part_lens(total, n)[part_of(r, n, start_ok)] for r in range(n)]
        got = [row[7] for row in every]
        if got != want:
            raise UsageError(f"cached_attention: ranks disagree on the new tokens' count: rank parts "
                             f"{got}, but {total} new tokens from position {start_ok} split as "
                             f"{want} (see new_token_part)", field="new_tokens")
    if strategy == "auto":
        strategy = choose_strategy(world_size=n, cached=start_ok, new_tokens=total, heads=q.shape[2],
                                   kv_heads=k.shape[2], queries=queries)
    return _run(q, k, v, cache, layer, comm, strategy, queries, start_ok, total, old, scale, impl,
                timing, return_lse)


def _run(q, k, v, cache, layer, comm, strategy, queries, start, total, old, scale, impl, timing,
         return_lse):
    n, rank = comm.world_size, comm.rank
    lo, hi = new_token_part(rank, n, start, total)
    replicated = queries == "replicated"
    k_mine, v_mine = (k[:, lo:hi], v[:, lo:hi]) if replicated else (k, v)
    before = (cache.local_len(layer), cache.seq_len(layer))
    cache.append(layer, k_mine, v_mine, torch.arange(start + lo, start + hi), start + total)
    try:
        native = replicated and strategy == "gather"
        q_in = q if native or not replicated else q[:, lo:hi]
        out, lse = _attend(q_in, cache, layer, comm, strategy, native, start, total, old, scale, impl,
                           timing)
        if replicated and not native:
            t0 = time.perf_counter()
            out, lse = _gather_parts(out, lse, comm, start, total)
            if timing is not None:
                timing.comm_s += time.perf_counter() - t0
    except BaseException:
        cache.truncate(layer, *before)
        raise
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _attend(q, cache, layer, comm, strategy, replicated, start, total, old, scale, impl, timing):
    n, rank = comm.world_size, comm.rank
    sched = _checked_schedule(strategy, n, start % n, replicated)
    lens = {r: old[r] for r in range(n)}
    lens.update({n + j: c for j, c in enumerate(part_lens(total, n))})
    sh = Shape(lens, q.shape[0], q.shape[2], cache.spec.kv_heads, q.shape[3], q.dtype, q.device,
               scale, impl)
    mine = part_of(rank, n, start)
    store = {}
    for buf in sched.inputs[rank]:
        if buf.kind == "kv":
            store[buf.key] = Held(buf.chunks, {"k": cache.keys_heads_first(layer),
                                               "v": cache.values_heads_first(layer)})
        else:
            store[buf.key] = Held(buf.chunks, {"q": q})
    runner = DecodeRunner(sched, comm, sh)
    store = runner.run(store)
    if timing is not None:
        timing.attention_s += runner.timing.attention_s
        timing.comm_s += runner.timing.comm_s
        timing.steps.extend(runner.timing.steps)
    held = store[sched.outputs[rank]["out"].key]
    assert replicated or held.chunks == (n + mine,), held.chunks
    return held.tensors["out"], held.tensors["lse"]


def _gather_parts(out: torch.Tensor, lse: torch.Tensor, comm: Communicator, start: int, total: int):
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


def gather_cache(cache: ShardedKVCache, layer: int, *, group: Any = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole layer's ``(keys, values)`` in position order on every rank (for checks)."""
    comm = group if isinstance(group, Communicator) else Communicator(group)
    k, v, pos = cache.keys(layer), cache.values(layer), cache.positions(layer)
    lens = comm.all_gather(torch.tensor([k.shape[1]], device=comm.device)).view(-1).tolist()
    width = max(lens)
    packed = torch.zeros(k.shape[0], width, k.shape[2], 2 * k.shape[3] + 1, dtype=torch.float64,
                         device=k.device)
    packed[:, :k.shape[1], :, :k.shape[3]] = k
    packed[:, :k.shape[1], :, k.shape[3]:-1] = v
    packed[:, :k.shape[1], :, -1] = pos.to(torch.float64)[None, :, None]
    every = comm.all_gather(packed, what="gather_cache")
    rows = torch.cat([every[r, :, :lens[r]] for r in range(len(lens))], dim=1)
    order = torch.argsort(rows[0, :, 0, -1])
    rows = rows[:, order]
    d = k.shape[3]
    return rows[..., :d].to(k.dtype), rows[..., d:2 * d].to(k.dtype)
