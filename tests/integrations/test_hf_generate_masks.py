"""model.generate over a tokenloom sharded cache for models whose layers differ: Gemma 2 (logit
soft-capping, sliding windows on alternate layers), Gemma 3 (per-layer sliding/global) and GPT-OSS
(attention sinks, sliding windows, MoE), tiny fp64 models on 2 gloo ranks, against the
single-process model's greedy tokens and logits (transformers' eager attention and its own cache).
Beam search is refused with a one-line error naming it."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenloom.comm.launch.local import spawn_ranks  # noqa: E402
from tokenloom.common.errors import UsageError  # noqa: E402
from tokenloom.integrations import hf_cache  # noqa: E402
from hf_mask_configs import mask_configs  # noqa: E402  (tests/ is on sys.path)

VOCAB, PROMPT, NEW, WINDOW = 128, 9, 10, 4
CONFIGS = mask_configs(WINDOW)


def tiny(arch: str):
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, arch)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, attention_dropout=0.0,
                                      **CONFIGS[arch])
    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if arch == "GptOssConfig" else {}
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float64,
                                             **extra).eval()
    if arch == "GptOssConfig":  # sinks start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()
    return model


def _prompt():
    return torch.randint(1, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))  # no pad (0)


def _generate(rank, n, arch, strategy):
    model = tiny(arch)
    cache = hf_cache.TokenloomCache(model.config, max_tokens=PROMPT + NEW, strategy=strategy,
                                    dtype=torch.float64)
    with cache.attached(model):
        res = model.generate(_prompt(), cache=cache, max_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return res.sequences.tolist(), torch.stack(res.logits).numpy()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_layers_with_windows_softcap_sinks_generate_the_single_process_tokens(arch):
    model = tiny(arch)
    want = model.generate(_prompt(), max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)
    logits = torch.stack(want.logits)
    assert PROMPT + NEW > WINDOW + 2  # the window hides cached tokens
    for strategy in ("gather", "ring"):
        for ids, got in spawn_ranks(2, _generate, arch, strategy, timeout=120):
            assert ids == want.sequences.tolist(), strategy
            assert float((torch.as_tensor(got) - logits).abs().max()) < 1e-6, strategy  # generate stores fp32 logits


def test_a_cache_built_for_the_wrong_batch_is_refused_in_one_line():
    """Beam search runs prompts x num_beams rows: a cache built for the prompts alone is refused
    with what to build instead (hf_cache.generate builds the right one)."""
    model = tiny("Gemma3TextConfig")
    cache = hf_cache.TokenloomCache(model.config, max_tokens=PROMPT + 2, dtype=torch.float64)
    with cache.attached(model), pytest.raises(UsageError, match="num_beams") as e:
        model.generate(_prompt(), cache=cache, max_new_tokens=2, num_beams=2, do_sample=False,
                       pad_token_id=0)
    assert e.value.field == "batch" and "\n" not in str(e.value)
    for call in (lambda: cache.batch_repeat_interleave(2), lambda: cache.batch_select_indices([0])):
        with pytest.raises(UsageError, match="batch size") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="num_beams") as e:
        hf_cache.generate(model, _prompt(), max_new_tokens=2, num_beams=0)
    assert e.value.field == "num_beams"
