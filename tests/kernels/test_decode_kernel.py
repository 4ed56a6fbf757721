"""The decode block kernel over both cache storage orders vs an fp64 reference: the matrix-vector
path (few rows over a keys-last cache), the fused op over heads-first copies made a few keys at a
time (many rows), GQA, batches, and the non-finite guarantee on each path."""

import pytest
import torch

from tokenloom.kernels import decode
from tokenloom.kernels.decode import GEMV_ROWS, cache_block
from tokenloom.kernels.masks import exact_forward
from tokenloom.kernels.reference import attention_with_lse
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache


def _keys_last(t: torch.Tensor) -> torch.Tensor:
    """A BHSD view of keys-last storage with spare capacity (as the cache hands it out)."""
    b, h, s, d = t.shape
    store = torch.full((b, h, d, s + 5), float("nan"), dtype=t.dtype)
    store[..., :s] = t.transpose(-1, -2)
    view = store[..., :s].transpose(-1, -2)
    assert view.stride(-2) == 1
    return view


def _qkv(b, t, h, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,t,h,hkv", [(1, 1, 4, 4), (2, 1, 8, 2), (1, 3, 4, 1), (2, 5, 8, 2)])
@pytest.mark.parametrize("keys_last", [True, False])
@pytest.mark.parametrize("scratch", ["whole", "chunks"])
def test_cache_block_matches_fp64_on_both_storage_orders(dtype, b, t, h, hkv, keys_last, scratch,
                                                         monkeypatch):
    q, k, v = _qkv(b, t, h, hkv, 97, 16, dtype)
    if scratch == "chunks":  # keys-last blocks in chunks of a few keys, lse-merged
        monkeypatch.setattr(decode, "SCRATCH_BYTES", 24 * b * hkv * k.element_size())
    kk, vv = (_keys_last(k), _keys_last(v)) if keys_last else (k, v)
    out, lse = cache_block(q, kk, vv, causal=False, scale=0.3)
    ref, ref_lse = attention_with_lse(q.double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                                      causal=False, softmax_scale=0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.shape == (b, t, h, 16) and lse.shape == (b, h, t)
    assert float((out.double() - ref).abs().max()) < tol
    assert float((lse.double() - ref_lse).abs().max()) < tol


def test_each_path_is_the_one_that_ran(monkeypatch):
    """Few rows over keys-last storage take the matrix-vector path; more than GEMV_ROWS rows per kv
    head, or heads-first storage, take the fused op (a path that silently never ran would leave
    the test above proving only one of them)."""
    seen = []
    real_gemv, real_copy = decode._gemv, decode._heads_first
    monkeypatch.setattr(decode, "_gemv", lambda *a: seen.append("gemv") or real_gemv(*a))
    monkeypatch.setattr(decode, "_heads_first", lambda *a: seen.append("copy") or real_copy(*a))
    q, k, v = _qkv(1, 2, 4, 2, 50, 8, torch.float32)  # 4 rows per kv head
    cache_block(q, _keys_last(k), _keys_last(v), causal=False, scale=0.3)
    cache_block(q, k, v, causal=False, scale=0.3)
    q, k, v = _qkv(1, GEMV_ROWS, 4, 2, 50, 8, torch.float32)  # 2 * GEMV_ROWS rows per kv head
    cache_block(q, _keys_last(k), _keys_last(v), causal=False, scale=0.3)
    assert seen == ["gemv", "copy", "copy"]  # K and V copied heads-first


def test_heads_first_copies_are_reused_only_while_the_storage_is_unchanged():
    store = torch.randn(1, 2, 8, 30)
    view = store[..., :20].transpose(-1, -2)
    first = decode._heads_first(view, "k")
    assert torch.equal(first, view) and first.is_contiguous()
    assert decode._heads_first(view, "k") is first  # the same view again: no second copy
    assert decode._heads_first(store[..., :20].transpose(-1, -2), "k") is first  # an equal view
    store[0, 1, 3, 7] += 1.0  # an in-place write (as an append): copied again
    again = decode._heads_first(view, "k")
    assert torch.equal(again, view)
    other = decode._heads_first(store[..., :19].transpose(-1, -2), "k")  # another shape
    assert torch.equal(other, store[..., :19].transpose(-1, -2))
    del store, view, first, again, other
    fresh = torch.zeros(1, 2, 8, 30)  # may reuse the freed address: still never a stale match
    assert torch.equal(decode._heads_first(fresh[..., :19].transpose(-1, -2), "k"),
                       torch.zeros(1, 2, 19, 8))


@pytest.mark.parametrize("case", ["all_keys_neg_inf", "v_inf_behind_neg_inf_score", "q_nan", "k_inf",
                                  "finite"])
@pytest.mark.parametrize("t", [1, 2, GEMV_ROWS + 1])
@pytest.mark.parametrize("keys_last", [True, False])
def test_full_block_paths_are_exact_on_non_finite_inputs(case, t, keys_last):
    """The full-block paths check their result instead of scanning the cache: every case equals
    the exact visible-pairs path (the CPU fused op alone answers all -inf scores with 0 and lse 0:
    swallowed), on both storage orders (heads-first: the fused op; keys-last: the matrix-vector
    path and the heads-first copies)."""
    q, k, v = _qkv(1, t, 4, 2, 60, 8, torch.float32)
    q = q.abs()
    if case == "all_keys_neg_inf":
        k[..., 0] = float("-inf")
    elif case == "v_inf_behind_neg_inf_score":
        k[0, 0, 7, 0], v[0, 0, 7, 3] = float("-inf"), float("inf")
    elif case == "q_nan":
        q[0, t - 1, 2, 5] = float("nan")
    elif case == "k_inf":
        k[0, 1, 11, 2] = float("inf")
    kk, vv = (_keys_last(k), _keys_last(v)) if keys_last else (k, v)
    out, lse = cache_block(q, kk, vv, causal=False, scale=0.4)
    vis = torch.ones(t, 60, dtype=torch.bool)
    want, want_lse = exact_forward(q, k.transpose(1, 2), v.transpose(1, 2), vis, 0.4)
    torch.testing.assert_close(out, want, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, equal_nan=True)


def test_windowed_block_over_keys_last_storage():
    """A window over shuffled positions (keys picked by index, not as one run) on keys-last views."""
    q, k, v = _qkv(1, 2, 4, 2, 40, 8, torch.float64)
    pos = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    out, lse = cache_block(q, _keys_last(k), _keys_last(v), causal=False, scale=0.5, q_pos=40,
                           k_pos=pos, left=9)
    qp = torch.tensor([40, 41])[:, None]
    vis = (pos[None] <= qp) & (pos[None] >= qp - 9)
    want, want_lse = exact_forward(q, k.transpose(1, 2), v.transpose(1, 2), vis, 0.5)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("dtype,want", [(torch.float32, True), (torch.float64, True),
                                        (torch.bfloat16, False), (torch.float16, False)])
def test_cache_storage_order_by_dtype(dtype, want):
    assert ShardedKVCache(CacheSpec(1, 1, 2, 8, dtype, 1, 0), 16).keys_last is want


def test_both_storage_orders_hold_the_same_tokens_through_growth_and_rollback():
    g = torch.Generator().manual_seed(5)
    caches = [ShardedKVCache(CacheSpec(2, 2, 3, 8, torch.float32, 1, 0), 500, keys_last=kl)
              for kl in (True, False)]
    assert caches[0].keys_last and not caches[1].keys_last
    total = 0
    for n in (1, 70, 1, 130, 2):  # grows past 64 and 128 local tokens (copies on growth)
        k, v = torch.randn(2, 2, n, 3, 8, generator=g)
        for c in caches:
            c.append(1, k, v, torch.arange(total, total + n), total + n)
        total += n
    for c in caches:
        c.truncate(1, total - 2, total - 2)
        assert c.keys_heads_first(1).shape == (2, 3, total - 2, 8)
    a, b = caches
    assert a.keys_heads_first(1).stride(-2) == 1 and b.keys_heads_first(1).stride(-1) == 1
    assert torch.equal(a.keys(1), b.keys(1)) and torch.equal(a.values(1), b.values(1))
    assert torch.equal(a.positions(1), b.positions(1))
    for c in caches:  # counted (capacities differ: keys-last rows are padded to odd cache lines)
        assert c.allocated_bytes >= (total + 2) * (c.spec.token_bytes() + 8)


def test_keys_last_rows_span_an_odd_number_of_cache_lines():
    from tokenloom.parallel.kv_cache import odd_lines

    for n in (1, 15, 16, 17, 4096, 61440, 65536, 99999):
        for itemsize in (4, 8):
            m = odd_lines(n, itemsize)
            assert m >= n and (m * itemsize) % 64 == 0 and (m * itemsize // 64) % 2 == 1
            assert m - n < 2 * 64 // itemsize  # never more than two lines of padding
    cache = ShardedKVCache(CacheSpec(1, 1, 2, 8, torch.float32, 1, 0), 1 << 16)
    cache.append(0, *torch.randn(2, 1, 4096, 2, 8), torch.arange(4096), 4096)
    assert (cache.keys_heads_first(0).stride(-1) * 4 // 64) % 2 == 1


def test_scratch_is_per_thread():
    """Two threads decoding at once each get their own buffers (a shared one would be overwritten
    between one thread's copy and its use)."""
    import threading

    q, k, v = _qkv(1, GEMV_ROWS + 1, 4, 2, 300, 8, torch.float64)  # the copy path
    want = cache_block(q, _keys_last(k), _keys_last(v), causal=False, scale=0.3)
    errs, bufs = [], []

    def run(seed):
        qq = q + seed
        ref = attention_with_lse(qq, k.transpose(1, 2), v.transpose(1, 2), causal=False, softmax_scale=0.3)[0]
        for _ in range(20):
            out, _ = cache_block(qq, _keys_last(k), _keys_last(v), causal=False, scale=0.3)
            errs.append(float((out - ref).abs().max()))
        bufs.append(id(decode._held()[0][("k", torch.float64, torch.device("cpu"))]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(errs) < 1e-12 and len(errs) == 40 and len(set(bufs)) == 2
    assert want[0].shape == q.shape
