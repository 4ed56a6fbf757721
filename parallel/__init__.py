"""tokenloom.parallel: schedules, runtimes and the public sequence-parallel attention API."""

from tokenloom.parallel.attention import (
    gather_sequence,
    ring_attention,
    shard_sequence,
    sp_attention,
    token_ring_attention,
    ulysses_attention,
)
from tokenloom.parallel.builders import STRATEGIES, build_schedule

__all__ = [
    "STRATEGIES",
    "build_schedule",
    "gather_sequence",
    "ring_attention",
    "shard_sequence",
    "sp_attention",
    "token_ring_attention",
    "ulysses_attention",
]
