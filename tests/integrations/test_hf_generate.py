"""model.generate with a tokenloom sharded KV cache on N ranks gives the single-process greedy tokens
(tiny random-weight fp64 models, GQA), and the cache refuses what it cannot honour."""

import pytest
import torch

pytest.importorskip("transformers")

from tokenloom.comm.launch.local import spawn_ranks  # noqa: E402
from tokenloom.common.errors import UsageError  # noqa: E402
from tokenloom.integrations import hf_cache  # noqa: E402

VOCAB, PROMPT, NEW = 96, 11, 12


def tiny_model(arch="LlamaConfig", dtype=torch.float64):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, arch)(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()


def _prompt(batch=1):
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens and last-step logits of the single-process model."""
    out = {}
    for arch in ("LlamaConfig", "Qwen2Config"):
        model = tiny_model(arch)
        res = model.generate(_prompt(2), max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        out[arch] = (res.sequences.tolist(), res.logits[-1])
    return out


def _generate(rank, n, arch, strategy):
    model = tiny_model(arch)
    cache = hf_cache.TokenloomCache(model.config, max_tokens=PROMPT + NEW, strategy=strategy, batch=2,
                                    dtype=torch.float64)
    with cache.attached(model):
        res = model.generate(_prompt(2), cache=cache, max_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"  # restored after
    for layer in range(2):  # the cache went through tokenloom: sharded, each rank ~1/n of it
        assert cache.sharded.seq_len(layer) == PROMPT + NEW - 1
        assert cache.sharded.local_len(layer) <= -(-(PROMPT + NEW - 1) // n) + 1
    return res.sequences.tolist(), res.logits[-1].numpy()


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["gather", "ring", "passkv"])
def test_greedy_tokens_match_single_process(reference, world_size, strategy):
    ids, logits = reference["LlamaConfig"]
    for got_ids, got_logits in spawn_ranks(world_size, _generate, "LlamaConfig", strategy, timeout=120):
        assert got_ids == ids
        assert float((torch.as_tensor(got_logits) - logits).abs().max()) < 1e-10


def test_greedy_tokens_match_on_four_ranks_another_architecture(reference):
    ids, logits = reference["Qwen2Config"]
    for got_ids, got_logits in spawn_ranks(4, _generate, "Qwen2Config", "auto", timeout=120):
        assert got_ids == ids
        assert float((torch.as_tensor(got_logits) - logits).abs().max()) < 1e-10


def test_generate_helper_matches(reference):
    ids, _ = reference["LlamaConfig"]
    out = hf_cache.generate(tiny_model(), _prompt(2), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)
    assert out.tolist() == ids


def test_padding_mask_is_refused():
    model = tiny_model()
    mask = torch.ones(1, PROMPT, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(UsageError) as e:
        hf_cache.generate(model, _prompt(), attention_mask=mask, max_new_tokens=2)
    assert e.value.field == "attention_mask"


def test_cache_too_big_is_refused_before_allocating():
    model = tiny_model()
    with pytest.raises(UsageError, match="limit of") as e:
        hf_cache.TokenloomCache(model.config, max_tokens=10**6, memory_limit=10**6)
    assert e.value.field == "max_tokens"


def test_torchrun_example_generates_the_single_process_tokens():
    import os
    import sys
    from pathlib import Path

    from procs import run

    root = Path(__file__).resolve().parents[2]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for extra in ([], ["--sp-prefill", "tokenring"]):
        proc = run([torchrun, "--standalone", "--nproc-per-node", "2", "examples/hf_generate.py",
                    "--check", "--prompt-len", "21", "--new-tokens", "6", *extra], cwd=root,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "-> OK" in proc.stdout, proc.stdout[-2000:]


def test_padding_mask_through_generate_is_refused_not_ignored():
    model = tiny_model()
    mask = torch.ones(1, PROMPT, dtype=torch.long)
    mask[0, :2] = 0
    cache = hf_cache.TokenloomCache(model.config, max_tokens=PROMPT + 2, dtype=torch.float64)
    with cache.attached(model), pytest.raises(UsageError) as e:
        model.generate(_prompt(), attention_mask=mask, cache=cache, max_new_tokens=2, pad_token_id=0)
    assert e.value.field == "attention_mask"


def _sp_prompt(n):
    """All but the last token split into 2n zigzag chunks of 2 tokens."""
    return torch.randint(0, VOCAB, (2, 4 * n + 1), generator=torch.Generator().manual_seed(6))


def _sp_prefill_then_generate(rank, n, strategy, layout):
    model = tiny_model()
    prompt = _sp_prompt(n)
    cache = hf_cache.TokenloomCache(model.config, max_tokens=prompt.shape[1] + NEW, batch=2,
                                    dtype=torch.float64, layout=layout)
    hf_cache.prefill(model, prompt, cache, strategy=strategy, layout=layout)
    local = cache.sharded.local_len(0)
    with cache.attached(model):
        ids = model.generate(prompt, cache=cache, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return ids.tolist(), local


@pytest.mark.parametrize("world_size,strategy,layout", [(2, "tokenring", "zigzag"), (3, "ring", "zigzag"),
                                                        (2, "ulysses", "contiguous")])
def test_sequence_parallel_prefill_fills_the_cache_then_generates(world_size, strategy, layout):
    model = tiny_model()
    prompt = _sp_prompt(world_size)
    want = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0).tolist()
    for ids, local in spawn_ranks(world_size, _sp_prefill_then_generate, strategy, layout, timeout=120):
        assert ids == want
        assert local == 4  # each rank prefilled only its shard of the prompt


def _sample(rank, n, seeds):
    model = tiny_model()
    torch.manual_seed(seeds[rank])
    try:
        out = hf_cache.generate(model, _prompt(2), max_new_tokens=NEW, do_sample=True, top_k=0,
                                temperature=1.5, pad_token_id=0)
    except UsageError as exc:
        return exc.field, str(exc)
    return out.tolist(), None


def test_sampling_gives_the_single_process_tokens_and_diverged_ranks_are_refused():
    """Sampling with every rank seeded alike gives the single-process tokens; ranks seeded apart
    would sample different tokens and silently attend to different sequences: every rank refuses
    (the new tokens' bits are agreed under replicated queries)."""
    model = tiny_model()
    torch.manual_seed(11)
    want = model.generate(_prompt(2), max_new_tokens=NEW, do_sample=True, top_k=0,
                          temperature=1.5, pad_token_id=0).tolist()
    greedy = tiny_model().generate(_prompt(2), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert want != greedy.tolist()  # it sampled
    for got, err in spawn_ranks(2, _sample, [11, 11], timeout=120):
        assert err is None and got == want, err
    for field, err in spawn_ranks(2, _sample, [11, 12], timeout=120):
        assert field == "replicated_inputs" and "seed every rank alike" in err, err
