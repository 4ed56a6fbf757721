"""tokenloom.parallel: schedules, runtimes and the public sequence-parallel attention API.

The attention API is imported on first use, so that ``tokenloom.parallel.builders`` (pure data,
used by the simulator) loads without the runtime.
"""

from __future__ import annotations

from tokenloom.common.shadow import hand_back

hand_back(__name__, __file__)  # imported by its bare name from the checkout: the installed package wins

from tokenloom.common.lazy import lazy_exports

_API = "tokenloom.parallel.attention"
_LAZY = {
    "gather_sequence": "tokenloom.parallel.sharding",
    "ring_attention": _API,
    "shard_sequence": "tokenloom.parallel.sharding",
    "sp_attention": _API,
    "token_ring_attention": _API,
    "ulysses_attention": _API,
    "STRATEGIES": "tokenloom.parallel.dims",
    "ParallelDims": "tokenloom.parallel.dims",
    "SeqLayout": "tokenloom.parallel.layout",
    "build_schedule": "tokenloom.parallel.builders",
    "check_schedule": "tokenloom.parallel.check",
    "resolve_strategy": "tokenloom.parallel.attention_plan",
    "CacheSpec": "tokenloom.parallel.kv_cache",
    "ShardedKVCache": "tokenloom.parallel.kv_cache",
    "cached_attention": "tokenloom.parallel.decode",
    "new_token_part": "tokenloom.parallel.decode",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
