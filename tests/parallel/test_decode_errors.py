"""Bad input to cached_attention: a named UsageError on every rank and nothing half-appended; the
decode checker refuses broken schedules; the cache refuses what cannot fit before allocating."""

import dataclasses

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.errors import UsageError
from tokenloom.parallel.decode import cached_attention
from tokenloom.parallel.decode_check import DecodeScheduleError, check_decode_schedule
from tokenloom.parallel.decode_schedule import build_decode_schedule
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache, estimate_bytes
from tokenloom.parallel.schedule import Block, Compute, Schedule, Step

B, H, HKV, D = 1, 4, 2, 8


def _new(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, t, H, D, generator=g), torch.randn(B, t, HKV, D, generator=g),
            torch.randn(B, t, HKV, D, generator=g))


def _bad(rank, n, case):
    spec = CacheSpec(2, B, HKV, D, torch.float32, n, rank)
    if case == "world_size":
        spec = dataclasses.replace(spec, world_size=n + 1)
    if case == "layout" and rank == 1:
        spec = dataclasses.replace(spec, layout="zigzag")
    if case == "model" and rank == 1:
        spec = dataclasses.replace(spec, model="another-model")
    cache = ShardedKVCache(spec, 9 if case == "max_tokens" else 256)
    q, k, v = _new(8)
    if case not in ("world_size", "layout", "model"):
        cache_ok = cache
        cached_attention(q, k, v, cache_ok, 0)  # a prompt of 8 in layer 0 on every rank
        cached_attention(q, k, v, cache_ok, 1)
        if case == "lacks_layer" and rank == 1:
            cache.truncate(1, 0, 0)  # this rank's cache lost layer 1
    before = [(cache.local_len(l), cache.seq_len(l)) for l in range(2)]
    q1, k1, v1 = _new(2 if case in ("count", "max_tokens") and rank == 0 else 1, seed=1)
    if case == "diverged" and rank == 1:  # another token (a rank that sampled with another seed)
        q1, k1, v1 = _new(1, seed=2)
    if case == "one_bit" and rank == 1:  # the same token but for one bit of one value
        v1 = v1.clone()
        v1.view(torch.int32)[0, 0, 1, 3] ^= 1
    if case == "max_tokens":
        q1, k1, v1 = _new(2, seed=1)  # 8 + 2 > 9 on every rank
    kwargs = {}
    if case == "positions":
        kwargs["start"] = 9
    if case == "sharded_count":
        kwargs["queries"] = "sharded"  # 2 new tokens split 1 + 1, but rank 0 passes both
        q1, k1, v1 = _new(2 if rank == 0 else 0, seed=1)
    layer = 1 if case == "lacks_layer" else 0
    try:
        cached_attention(q1, k1, v1, cache, layer, **kwargs)
    except UsageError as exc:
        after = [(cache.local_len(l), cache.seq_len(l)) for l in range(2)]
        return exc.field, str(exc), before == after
    return None, "no error", False


@pytest.mark.parametrize("case,field", [("world_size", "cache"), ("layout", "cache"),
                                        ("model", "model"), ("positions", "start"),
                                        ("lacks_layer", "layer_present"), ("count", "new_tokens"),
                                        ("sharded_count", "new_tokens"), ("max_tokens", "max_tokens"),
                                        ("diverged", "replicated_inputs"),
                                        ("one_bit", "replicated_inputs")])
def test_bad_input_is_a_named_error_on_every_rank_and_nothing_is_appended(case, field):
    for got, message, unchanged in spawn_ranks(2, _bad, case, timeout=60):
        assert got == field, message
        assert unchanged, f"{case}: the cache changed: {message}"


def test_refuses_what_cannot_fit_before_allocating():
    spec = CacheSpec(32, 1, 8, 128, torch.bfloat16, 4, 0)
    need = estimate_bytes(spec, 1_000_000)
    assert need > 30 * 2**30  # 32 layers x 250K tokens x 4 KiB
    with pytest.raises(UsageError, match="max_tokens=1000000 needs .* GiB .* limit of 1.000 GiB") as e:
        ShardedKVCache(spec, 1_000_000, memory_limit=2**30)
    assert e.value.field == "max_tokens"
    cache = ShardedKVCache(spec, 1000, memory_limit=2**30)
    assert cache.allocated_bytes == 0  # nothing allocated until tokens come


def _spans(n, start, lens):
    spans = {r: (0, start - 1) for r in range(n)}
    pos = start
    for j, c in enumerate(lens):
        spans[n + j] = (pos, pos + c - 1) if c else None
        pos += c
    return spans


def test_checker_proves_every_strategy_and_refuses_broken_schedules():
    for n in (1, 2, 3, 4):
        for strategy in ("gather", "ring", "passkv"):
            for rot in range(n):
                sched = build_decode_schedule(strategy, n, start=rot, replicated=False)
                check_decode_schedule(sched, _spans(n, 10, [2] * n))
    sched = build_decode_schedule("ring", 3, start=0, replicated=False)
    # a dropped step: the partial never goes home
    broken = dataclasses.replace(sched, ranks=(sched.ranks[0][:-1],) + sched.ranks[1:])
    with pytest.raises(DecodeScheduleError):
        check_decode_schedule(broken, _spans(3, 10, [2, 2, 2]))
    # a full block where a later new part would be seen by an earlier query: a future token
    step0 = sched.ranks[0][0]
    c = step0.computes[0]
    bad = Compute(c.q_src, c.kv_src, (Block(c.q_src.chunks, c.kv_src.chunks, False),), c.dst)
    ranks = ((Step(step0.comms, (bad,), step0.merges),) + sched.ranks[0][1:],) + sched.ranks[1:]
    with pytest.raises(DecodeScheduleError, match="future token"):
        check_decode_schedule(dataclasses.replace(sched, ranks=ranks), _spans(3, 10, [2, 2, 2]))
    # a pair computed twice
    twice = Step(step0.comms, (c, c), step0.merges)
    ranks = ((twice,) + sched.ranks[0][1:],) + sched.ranks[1:]
    with pytest.raises(DecodeScheduleError, match="twice"):
        check_decode_schedule(dataclasses.replace(sched, ranks=ranks), _spans(3, 10, [2, 2, 2]))
    assert isinstance(sched, Schedule)


def test_bits_code_sees_one_bit_and_ignores_how_it_is_summed():
    from tokenloom.parallel.agree import bits_code

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.randn(3, 257, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
        code = bits_code(x, x[:1])
        assert isinstance(code, torch.Tensor) and code.dim() == 0 and code.dtype == torch.int64
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = bits_code(x, x[:1])
        finally:
            torch.set_num_threads(threads)
        assert int(one) == int(code)
        assert int(bits_code(x.transpose(0, 1), x[:1])) == int(code)  # values, not layout
        flipped = x.clone()
        raw = flipped.view(torch.int16)
        raw.view(-1)[777] ^= 1
        assert int(bits_code(flipped, x[:1])) != int(code), dtype
        assert int(bits_code(x[:1], x)) != int(code)  # which tensor holds what matters
