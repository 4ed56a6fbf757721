"""Prefill fills the sharded cache for every sequence-parallel strategy (the K/V shard each rank
gave the attention call, stored with its layout's positions), and decode over it is exact."""

import pytest
import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.kernels.reference import attention_with_lse
from tokenloom.parallel import shard_sequence, sp_attention
from tokenloom.parallel.decode import cached_attention, gather_cache
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache, prefill_positions

B, H, HKV, D, S = 1, 4, 2, 8, 16


def _prefill_then_decode(rank, n, strategy, layout):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S + 2, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV))
    ql, kl, vl = (shard_sequence(t[:, :S].float(), rank, n, layout=layout) for t in (q, k, v))
    out = sp_attention(ql, kl, vl, strategy=strategy, causal=True, layout=layout)
    cache = ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, n, rank, layout=layout), 64)
    cache.fill_shard(0, kl, vl, S, layout=layout)  # the shard the strategy was given, as it is
    ref, _ = attention_with_lse(q[:, :S], k[:, :S], v[:, :S], causal=True)
    errs = [float((out.double() - shard_sequence(ref, rank, n, layout=layout)).abs().max())]
    for t in (S, S + 1):
        new = cached_attention(q[:, t:t + 1].float(), k[:, t:t + 1].float(), v[:, t:t + 1].float(),
                               cache, 0)
        ref, _ = attention_with_lse(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], causal=True)
        errs.append(float((new.double() - ref).abs().max()))
    kf, vf = gather_cache(cache, 0)
    errs.append(float((kf.double() - k).abs().max() + (vf.double() - v).abs().max()))
    return errs


@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_prefill_fills_the_cache_for_every_strategy(strategy, layout):
    for errs in spawn_ranks(2, _prefill_then_decode, strategy, layout, timeout=60):
        assert max(errs) < 2e-5, errs


def test_prefill_positions_cover_the_sequence_once():
    for n, layout in ((1, "zigzag"), (3, "zigzag"), (4, "contiguous")):
        got = torch.cat([prefill_positions(r, n, 24, layout=layout) for r in range(n)])
        assert sorted(got.tolist()) == list(range(24))
    got = torch.cat([prefill_positions(r, 4, 32, layout="zigzag", ulysses=2) for r in range(4)])
    assert sorted(got.tolist()) == list(range(32))


def _packed(rank, n, strategy):
    from tokenloom.parallel.kv_cache import fill_packed

    doc_lens = [5, 11, 8]
    cu = torch.tensor([0, 5, 16, 24])
    g = torch.Generator().manual_seed(4)
    docs = [[torch.randn(B, L + 1, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV)]
            for L in doc_lens]
    packed = [torch.cat([d[i][:, :-1] for d in docs], dim=1) for i in range(3)]
    ql, kl, vl = (shard_sequence(t.float(), rank, n, cu_seqlens=cu) for t in packed)
    sp_attention(ql, kl, vl, strategy=strategy, causal=True, cu_seqlens=cu)
    caches = [ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, n, rank, layout="zigzag"), 32)
              for _ in doc_lens]
    fill_packed(caches, 0, kl, vl, cu)
    errs = []
    for (q, k, v), cache, L in zip(docs, caches, doc_lens):
        new = cached_attention(q[:, L:].float(), k[:, L:].float(), v[:, L:].float(), cache, 0)
        ref, _ = attention_with_lse(q[:, L:], k, v, causal=True)
        errs.append(float((new.double() - ref).abs().max()))
        kf, vf = gather_cache(cache, 0)
        errs.append(float((kf.double() - k).abs().max() + (vf.double() - v).abs().max()))
    return errs


@pytest.mark.parametrize("world_size,strategy", [(2, "tokenring"), (3, "tokenring"), (4, "ring"),
                                                 (2, "ulysses")])
def test_packed_prompts_fill_one_cache_per_document(world_size, strategy):
    for errs in spawn_ranks(world_size, _packed, strategy, timeout=60):
        assert max(errs) < 2e-5, errs


def _mesh_prefill(rank, n):
    from torch.distributed.device_mesh import init_device_mesh

    from tokenloom.parallel.groups import resolve_sp_group

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    sp = resolve_sp_group(mesh)
    assert sp.rank == rank  # SP rank order = global order here, so decode runs on the default group
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, S + 1, h, D, generator=g, dtype=torch.float64) for h in (H, HKV, HKV))
    ql, kl, vl = (shard_sequence(t[:, :S].float(), group=mesh) for t in (q, k, v))
    sp_attention(ql, kl, vl, strategy="tokenring", group=mesh, causal=True)
    cache = ShardedKVCache(CacheSpec(1, B, HKV, D, torch.float32, n, sp.rank, layout="zigzag"), 64)
    cache.fill_shard(0, kl, vl, S, layout="zigzag", ulysses=sp.ulysses)
    new = cached_attention(q[:, S:].float(), k[:, S:].float(), v[:, S:].float(), cache, 0)
    ref, _ = attention_with_lse(q[:, S:], k, v, causal=True)
    kf, vf = gather_cache(cache, 0)
    return [float((new.double() - ref).abs().max()),
            float((kf.double() - k).abs().max() + (vf.double() - v).abs().max())]


def test_a_2d_mesh_prefill_fills_the_cache():
    for errs in spawn_ranks(4, _mesh_prefill, timeout=60):
        assert max(errs) < 2e-5, errs
