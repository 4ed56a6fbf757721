"""Beam search with a tokenloom sharded cache: on 2 and 3 ranks ``hf_cache.generate`` returns the
single-process model's beams (sequences and scores), with the cache reordered by the beam index
on every rank; and ``reorder_batch`` itself against a plain reindex, with bad indices refused."""

import pytest
import torch

pytest.importorskip("transformers")

from tokenloom.comm.launch.local import spawn_ranks  # noqa: E402
from tokenloom.common.errors import UsageError  # noqa: E402
from tokenloom.integrations import hf_cache  # noqa: E402
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache  # noqa: E402

VOCAB, PROMPT, NEW, BEAMS = 96, 9, 7, 3
KWARGS = dict(max_new_tokens=NEW, num_beams=BEAMS, num_return_sequences=2, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True, length_penalty=1.0,
              early_stopping=False)


def tiny_model(arch):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, arch)(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float64).eval()


def _prompt():
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(7))


def _beams(rank, n, arch, strategy):
    res = hf_cache.generate(tiny_model(arch), _prompt(), strategy=strategy, **KWARGS)
    return res.sequences.tolist(), res.sequences_scores.tolist()


@pytest.mark.parametrize("arch", ["LlamaConfig", "Qwen2Config"])
def test_beam_search_returns_the_single_process_beams(arch):
    want = tiny_model(arch).generate(_prompt(), **KWARGS)
    assert want.sequences.shape == (4, PROMPT + NEW)  # 2 prompts x 2 returned beams
    for n, strategy in ((2, "gather"), (3, "ring")):
        for ids, scores in spawn_ranks(n, _beams, arch, strategy, timeout=120):
            assert ids == want.sequences.tolist(), (n, strategy)
            assert max(abs(a - b) for a, b in zip(scores, want.sequences_scores.tolist())) < 1e-9


def test_the_beams_actually_reorder():
    """A yardstick: the same beam search with reorder_cache made a no-op gives other beams, so the
    test above would catch a cache that kept each row's own history."""
    model = tiny_model("LlamaConfig")
    want = model.generate(_prompt(), **KWARGS).sequences.tolist()
    real = ShardedKVCache.reorder_batch
    try:
        ShardedKVCache.reorder_batch = lambda self, index, layer=None: None
        got = hf_cache.generate(model, _prompt(), **KWARGS).sequences.tolist()
    finally:
        ShardedKVCache.reorder_batch = real
    assert got != want


@pytest.mark.parametrize("keys_last", [True, False])
def test_reorder_batch_matches_a_plain_reindex(keys_last):
    cache = ShardedKVCache(CacheSpec(2, 3, 2, 4, torch.float64, 1, 0), 64, keys_last=keys_last)
    k, v = torch.randn(2, 3, 10, 2, 4, dtype=torch.float64)
    cache.append(1, k, v, torch.arange(10), 10)
    idx = torch.tensor([2, 2, 0])
    cache.reorder_batch(idx)
    assert torch.equal(cache.keys(1), k[idx]) and torch.equal(cache.values(1), v[idx])
    assert torch.equal(cache.positions(1), torch.arange(10))
    cache.append(1, k[:, :2], v[:, :2], torch.arange(10, 12), 12)  # appends still land after it
    assert torch.equal(cache.keys(1)[:, 10:], k[:, :2])


@pytest.mark.parametrize("bad", [[0, 1], [0, 1, 3], [0, -1, 1], [0.0, 1.0, 2.0], [[0, 1, 2]]])
def test_bad_beam_indices_are_refused_naming_the_field(bad):
    cache = ShardedKVCache(CacheSpec(1, 3, 2, 4, torch.float32, 1, 0), 64)
    cache.append(0, *torch.randn(2, 3, 5, 2, 4), torch.arange(5), 5)
    before = cache.keys(0).clone()
    with pytest.raises(UsageError) as e:
        cache.reorder_batch(torch.tensor(bad))
    assert e.value.field == "beam_idx" and "\n" not in str(e.value)
    assert torch.equal(cache.keys(0), before)  # nothing moved
