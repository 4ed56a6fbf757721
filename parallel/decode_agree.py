"""Cross-rank agreement for :func:`tokenloom.parallel.decode.cached_attention`.

Every rank sends one fixed-size int64 vector (:data:`FIELDS` order, then its local cache length)
to every other rank, posted as P2P so that it returns a handle: decode attends its own shard while
the vectors travel. Then every rank sees every rank's values and raises the same way: a rank's own
bad argument raises its own message, the others name the ranks that refused; a disagreement names
the field, each rank's value and what it means (a cache from another layout, model, world size; a
rank lacking the layer; with replicated queries, new tokens whose bits differ). Fixed size, so a
disagreement can never turn into a size mismatch.

The message is :data:`MESSAGE_BYTES` long whatever the arguments: the vector, then room for a
*payload*. Decode (replicated queries, pass-Q gather) puts its own partial ``(out, lse)`` there
when it fits, so one round trip both agrees the arguments and exchanges the partials (the gather
schedule's second step rides on the agreement message): a decode step pays one message latency,
not two. Whether a payload rides is decided from agreed values only (shapes, strategy), so every
rank decides alike whenever the arguments agree, and a rank that disagrees raises before it reads
a payload.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenloom.comm.communicator import P2P, Communicator
from tokenloom.common.errors import UsageError
from tokenloom.parallel.agree import code_of
from tokenloom.parallel.decode_schedule import AGREE_FIELDS as FIELDS
from tokenloom.parallel.decode_schedule import MESSAGE_BYTES, payload_fits_bytes
from tokenloom.parallel.decode_schedule import MESSAGE_HEADER as _HEADER
from tokenloom.parallel.kv_cache import ShardedKVCache


def identity(cache: ShardedKVCache) -> tuple[int, int]:
    """Codes of what the cache is for: (layout, world size, size) and (model, batch, dtype)."""
    s = cache.spec
    return (code_of(f"{s.layout}|{s.world_size}|{cache.max_tokens}") % (1 << 40),
            code_of(f"{s.model}|{s.num_layers}|{s.batch}|{s.kv_heads}|{s.head_dim}|{s.dtype}"))


def describe(cache: Any, layer: Any) -> str:
    """This rank's cache in words, for disagreement messages."""
    if not isinstance(cache, ShardedKVCache) or not isinstance(layer, int):
        return "?"
    s = cache.spec
    return (f"layout={s.layout} world_size={s.world_size} model={s.model or '-'} "
            f"layers={s.num_layers} kv_heads={s.kv_heads} head_dim={s.head_dim} dtype={s.dtype} "
            f"layer {layer}: {'present' if cache.has_layer(layer) else 'absent'}, "
            f"{cache.seq_len(layer)} tokens")


def payload_fits(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` ride in the agreement message (by shape and dtype only)."""
    return payload_fits_bytes(sum(t.numel() * t.element_size() for t in tensors))



def post_agreement(comm: Communicator, mine: list,
                   payload: list[torch.Tensor] | None = None) -> Any:
    """Post the exchange of every rank's fixed-size message (one to and from each peer; an
    all-gather that returns a handle, so this rank can work while it is in flight). ``mine``: ints,
    or 0-dim int64 tensors still on the device. ``payload``: tensors that fit
    (:func:`payload_fits`), carried after the vector."""
    if comm.world_size == 1:
        return None
    msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=comm.device)
    head = msg[:_HEADER].view(torch.int64)
    head.copy_(torch.tensor([x if isinstance(x, int) else 0 for x in mine], dtype=torch.int64))
    for i, x in enumerate(mine):
        if isinstance(x, torch.Tensor):  # a value still on the device (bits_code): no host sync
            head[i] = x
    at = _HEADER
    for t in payload or ():
        nbytes = t.numel() * t.element_size()
        msg[at:at + nbytes].view(t.dtype).copy_(t.reshape(-1))
        at += nbytes
    rows = [msg if r == comm.rank else torch.empty_like(msg) for r in range(comm.world_size)]
    peers = [p for p in range(comm.world_size) if p != comm.rank]
    ops = [P2P("send", p, msg) for p in peers] + [P2P("recv", p, rows[p]) for p in peers]
    return comm.batch_p2p(ops, what="cached_attention agreement"), rows


def payload_of(posted: Any, rank: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank ``rank``'s payload (after :func:`wait_agreement`), as views shaped like ``like``."""
    msg, at, out = posted[1][rank], _HEADER, []
    for t in like:
        nbytes = t.numel() * t.element_size()
        out.append(msg[at:at + nbytes].view(t.dtype).view(t.shape))
        at += nbytes
    return out


def wait_agreement(comm: Communicator, mine: list[int], error: UsageError | None, local: str = "",
                   posted: Any = None) -> list[list[int]]:
    """Wait for every rank's vector (posted by :func:`post_agreement`); raise the same way on
    every rank."""
    if comm.world_size == 1:
        if error is not None:
            raise error
        return [mine]
    handle, rows = posted
    handle.wait()
    every = [row[:_HEADER].view(torch.int64).cpu().tolist() for row in rows]
    failed = {r: FIELDS[row[0] - 1] for r, row in enumerate(every) if row[0]}
    if failed:
        if error is not None:
            raise error
        what = ", ".join(f"rank {r}: {f}" for r, f in sorted(failed.items()))
        raise UsageError(f"cached_attention: other ranks refused their arguments ({what}); see their "
                         f"errors", field=next(iter(failed.values())))
    sharded = mine[FIELDS.index("queries")] == 1
    last = ["new_tokens", "replicated_inputs"]  # the values themselves only once shapes agree
    for name in [f for f in FIELDS[1:] if f not in last] + last:
        column = [row[FIELDS.index(name)] for row in every]
        if name == "new_tokens" and sharded:
            continue  # each rank's own part, checked by the caller against the agreed total
        if len(set(column)) > 1:
            shown = "; ".join(f"rank {r}: {c}" for r, c in enumerate(column))
            what = {"cache": "a cache from another layout, world size or size",
                    "model": "a cache from another model",
                    "layer_present": "a rank whose cache lacks this layer",
                    "replicated_inputs": "with queries='replicated' every rank must pass the same "
                                         "q, k, v; when generating by sampling, seed every rank "
                                         "alike"}.get(name, name)
            raise UsageError(f"cached_attention: ranks disagree on {name} ({what}): {shown}; "
                             f"this rank's cache: {local}", field=name)
    return every
