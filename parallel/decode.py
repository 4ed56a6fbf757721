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

Before any data is sent, every rank exchanges one fixed-size int64 vector (cache identity, model,
shapes, positions, strategy, new-token count) with every other rank (an all-gather posted as P2P,
so it returns a handle); any rank's bad argument or any disagreement raises the same named
UsageError on every rank, with nothing appended. Decode (replicated queries, pass-Q gather) attends
its own shard while that exchange is in flight: the append it needs is undone if any rank
refused, as it is when the attention itself fails.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from tokenloom.comm.communicator import Communicator
from tokenloom.common.errors import UsageError
from tokenloom.kernels.masks import poison_dead_rows
from tokenloom.parallel.agree import bits_code, check_scale, check_softcap, code_of, float_code
from tokenloom.parallel.decode_agree import (
    FIELDS, describe, identity, payload_fits, payload_of, post_agreement, wait_agreement)
from tokenloom.parallel.decode_call import Call, new_token_part
from tokenloom.parallel.decode_runtime import Timing
from tokenloom.parallel.decode_schedule import DECODE_STRATEGIES, part_lens, part_of
from tokenloom.parallel.kv_cache import ShardedKVCache
from tokenloom.parallel.layout import normalize_window
from tokenloom.parallel.sinks import apply_sinks, sinks_problem

__all__ = ["QUERY_MODES", "cached_attention", "choose_strategy", "gather_cache", "new_token_part"]

QUERY_MODES = ("replicated", "sharded")


def choose_strategy(*, world_size: int, cached: int, new_tokens: int, heads: int, kv_heads: int,
                    queries: str, head_dim: int = 128, dtype_bytes: int = 2, batch: int = 1,
                    hardware: str | None = None) -> str:
    """``strategy="auto"``. With ``hardware`` (a simulator catalog name): the strategy the decode
    scenario prices fastest for this shape on that hardware (:mod:`tokenloom.simulator.decode`;
    lengths rounded up to powers of two, answers cached). Without: pass-KV when moving the cache
    costs fewer bytes than moving queries and partials (new tokens * heads * ~2 against (cached +
    new) * kv_heads * 2: Meta's CP-inference rule), else pass-Q: the one-round gather for
    replicated queries or short chunks, the ring (partials return while the next block computes)
    for long sharded chunks on 3+ ranks."""
    if world_size == 1:
        return "gather"
    if hardware is not None and world_size <= 64:  # the engine prices up to 64 ranks in ~1 s
        return _priced_choice(hardware, world_size, _pow2(cached), _pow2(new_tokens), heads,
                              kv_heads, head_dim, dtype_bytes, batch, queries)
    if queries == "sharded" and new_tokens * heads >= (cached + new_tokens) * kv_heads:
        return "passkv"
    if queries == "sharded" and world_size >= 3 and new_tokens >= 1024:
        return "ring"
    return "gather"


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=128)
def _priced_choice(hardware: str, n: int, cached: int, new: int, heads: int, kv_heads: int,
                   head_dim: int, dtype_bytes: int, batch: int, queries: str) -> str:
    from tokenloom.simulator.decode import DecodeShape, simulate_decode
    from tokenloom.simulator.hardware import make_cluster

    per = make_cluster(hardware, 1).node.gpus_per_node
    nodes = -(-n // per)
    cluster = make_cluster(hardware, n, nodes if n % nodes == 0 else n)
    shape = DecodeShape(cached, new, heads, kv_heads, head_dim, 1, batch, dtype_bytes)
    return simulate_decode(cluster, shape, "auto", replicated=queries == "replicated").strategy


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


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache,
                     layer: int, *, group: Any = None, strategy: str = "auto",
                     queries: str = "replicated", start: int | None = None,
                     softmax_scale: float | None = None, impl: str | None = None,
                     timing: Timing | None = None, return_lse: bool = False,
                     hardware: str | None = None, window_size: Any = None,
                     softcap: float | None = None, sinks: torch.Tensor | None = None):
    """Append the new tokens to ``cache`` and attend their queries over it (causal).

    q ``(batch, t, heads, head_dim)``, k/v ``(batch, t, kv_heads, head_dim)``: all new tokens
    (``queries="replicated"``) or this rank's part (``"sharded"``). ``start``: the global position
    of the first new token (default: the layer's length; anything else is refused). Returns ``out``
    shaped like q (``(out, lse)`` with ``return_lse``). ``timing``: filled with this rank's split
    between attention and communication (and the strategy run). ``hardware``: a simulator catalog
    name for ``strategy="auto"`` to price the strategies on (None: a byte-count rule).
    ``window_size``: a sliding window ``(left, right)`` (flash-attn's convention; causal, so
    ``right`` is 0): keys outside it are never read, a rank whose shard is wholly outside skips its
    work. ``softcap``: scores -> ``softcap * tanh(scores / softcap)``. ``sinks``: ``(heads,)`` one
    logit per head in every query's softmax denominator (applied once, after the merge).
    """
    comm = group if isinstance(group, Communicator) else Communicator(group)
    mine, error, start_ok, count, scale, masks = _local_vector(
        q, k, v, cache, layer, comm, start, queries, strategy, softmax_scale, impl, hardware,
        window_size, softcap, sinks)
    local = describe(cache, layer)
    n = comm.world_size
    call, payload = None, None
    if error is None:
        call = Call(q, k, v, cache, layer, comm, queries, start_ok, scale, impl, timing, masks)
        if queries == "replicated" and n > 1 and \
                _local_choice(strategy, n, start_ok, q, k, hardware) == "gather":
            # attend this rank's shard before the agreement (local work only; the append is undone
            # below if any rank refused); its partial rides the agreement message when it fits
            own = [cache.local_len(layer) if r == comm.rank else 0 for r in range(n)]
            try:
                call.prepare("gather", count, own)  # only this rank's own lengths are read here
                call.steps(0, 1)
            except BaseException:
                call.rollback()
                _refuse(comm, len(mine))  # the others must not wait for this rank's message
                raise
            partial = call.own_partial()
            payload = partial if payload_fits(partial) else None
    t0 = time.perf_counter()
    posted = post_agreement(comm, mine, payload)
    try:
        every = wait_agreement(comm, mine, error, local, posted)
    except BaseException:
        if call is not None:
            call.rollback()
        raise
    if timing is not None:
        timing.agree_s += time.perf_counter() - t0
        timing.comm_s += time.perf_counter() - t0
    assert call is not None
    try:
        if payload is not None:  # the gather's second step rode the agreement
            if timing is not None:
                timing.strategy = "gather"
            parts = [payload if r == comm.rank else payload_of(posted, r, payload) for r in range(n)]
            out, lse = call.merge_payloads(parts)
        else:
            out, lse = _finish(call, every, strategy, n, start_ok, count, q, k, queries, hardware,
                               timing)
    except BaseException:
        call.rollback()
        raise
    out, lse = poison_dead_rows(out, lse)  # rows whose every score was -inf (infinite inputs)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _refuse(comm: Communicator, width: int) -> None:
    """Send this rank's refusal in the agreement (its own attention failed before the agreement):
    every other rank raises that this rank refused, instead of waiting for it."""
    if comm.world_size > 1:
        posted = post_agreement(comm, [FIELDS.index("arguments") + 1] + [0] * (width - 1))
        posted[0].wait()


def _finish(call, every, strategy, n, start, count, q, k, queries, hardware, timing):
    """The rest of the schedule after the agreement: ``(out, lse)`` in the accumulation dtype."""
    old = [row[-1] for row in every]
    total = sum(row[FIELDS.index("new_tokens")] for row in every) if queries == "sharded" else count
    if queries == "sharded":
        want = [part_lens(total, n)[part_of(r, n, start)] for r in range(n)]
        got = [row[FIELDS.index("new_tokens")] for row in every]
        if got != want:
            raise UsageError(f"cached_attention: ranks disagree on the new tokens' count: rank parts "
                             f"{got}, but {total} new tokens from position {start} split as "
                             f"{want} (see new_token_part)", field="new_tokens")
    if strategy == "auto":
        strategy = _auto(n, start, total, q, k, queries, hardware)
    if timing is not None:
        timing.strategy = strategy
    if call.runner is None:
        call.prepare(strategy, total, old)
    call.steps(1 if call.started else 0, None)
    return call.result()


def _sinks_code(sinks: Any, q: torch.Tensor) -> int:
    if sinks is None:
        return 0
    problem = sinks_problem(sinks, q.shape[2], q)
    if problem is not None:
        raise UsageError(f"cached_attention: {problem}", field="sinks")
    return code_of(repr(sinks.detach().to("cpu", torch.float64).tolist()))


def _local_vector(q, k, v, cache, layer, comm, start, queries, strategy, softmax_scale, impl,
                  hardware, window_size, softcap, sinks):
    """This rank's checks, as the vector it contributes to the agreement: ``(vector, its own
    error or None, start, new-token count, scale, (softcap, window left))``. Room for its new
    tokens is reserved here, so a memory or max_tokens refusal travels in the agreement too."""
    try:
        start_ok, count = _validate(q, k, v, cache, layer, comm, start, queries, strategy)
        window = normalize_window(window_size, True)
        cap = check_softcap(softcap)
        sink_code = _sinks_code(sinks, q)
        if queries == "replicated" and start_ok + count > cache.max_tokens:
            raise UsageError(f"the sequence would reach {start_ok + count} tokens, beyond this "
                             f"cache's max_tokens={cache.max_tokens}", field="max_tokens")
        lo, hi = new_token_part(comm.rank, comm.world_size, start_ok, count)
        cache.reserve(layer, hi - lo if queries == "replicated" else count)  # may refuse: memory
        scale = check_scale(softmax_scale, q.shape[-1])
        if impl is not None:
            from tokenloom import kernels
            kernels.select_impl(q.device, impl)
    except UsageError as exc:
        code = FIELDS.index(exc.field if exc.field in FIELDS else "arguments") + 1
        return [code] + [0] * len(FIELDS), exc, 0, 0, 0.0, (None, -1)
    ident, model = identity(cache)
    mine = [0, comm.world_size, ident, model, int(cache.has_layer(layer)), cache.seq_len(layer),
            start_ok, count, q.shape[2], code_of(f"{strategy}|{hardware}"), QUERY_MODES.index(queries),
            float_code(scale), code_of(repr(impl)), code_of(repr(window)), float_code(cap or 0.0),
            sink_code, bits_code(q, k, v) if queries == "replicated" and comm.world_size > 1 else 0,
            cache.local_len(layer)]
    return mine, None, start_ok, count, scale, (cap, window[0] if window else -1)


def _local_choice(strategy: str, n: int, start: int, q: torch.Tensor, k: torch.Tensor,
                  hardware: str | None) -> str:
    if strategy != "auto":
        return strategy
    return _auto(n, start, q.shape[1], q, k, "replicated", hardware)


def _auto(n: int, cached: int, new: int, q: torch.Tensor, k: torch.Tensor, queries: str,
          hardware: str | None) -> str:
    return choose_strategy(world_size=n, cached=cached, new_tokens=new, heads=q.shape[2],
                           kv_heads=k.shape[2], queries=queries, head_dim=q.shape[3],
                           dtype_bytes=q.element_size(), batch=q.shape[0], hardware=hardware)


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
