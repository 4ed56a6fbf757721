"""Gemma 2 (soft-capping, sliding windows), Gemma 3 (per-layer sliding/global layers) and GPT-OSS
(sinks, sliding windows, MoE) through the HF backend on 2 gloo ranks: the single-process model's
logits and every parameter gradient (fp64; the reference is transformers' own eager attention,
which implements all three). Also: tokenloom's window mapping equals transformers' own sliding
window mask function, checked by evaluating it, not by reading it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenloom.comm.launch.local import spawn_ranks  # noqa: E402
from tokenloom.integrations import hf  # noqa: E402
from hf_mask_configs import mask_configs  # noqa: E402  (tests/ is on sys.path)

VOCAB, SEQ, BATCH, WINDOW = 128, 24, 2, 5
TOL = 1e-10
CONFIGS = mask_configs(WINDOW)


def tiny(arch: str, attn: str):
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, arch)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, use_cache=False, attention_dropout=0.0,
                                      **CONFIGS[arch])
    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if arch == "GptOssConfig" else {}  # grouped_mm has no fp64
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float64, **extra)
    if arch == "GptOssConfig":  # sinks start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()
    return model


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sp_vs_reference(rank, world_size, arch, strategy, layout):
    from tokenloom.parallel import gather_sequence

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ref = tiny(arch, "eager")
    labels = hf.causal_lm_labels(ids)
    pos = hf.global_position_ids(SEQ).expand(BATCH, -1)
    softmax = torch.nn.functional.softmax

    def fp64_softmax(x, dim=None, _stacklevel=3, dtype=None):
        """Gemma's eager attention upcasts the softmax to fp32 (1e-7 error): keep fp64 exact."""
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = fp64_softmax  # this forked rank only, for the reference
    try:
        out = ref(input_ids=ids, position_ids=pos, labels=labels, shift_labels=labels)
    finally:
        torch.nn.functional.softmax = softmax
    out.loss.backward()
    ref_logits, ref_grads = out.logits.detach(), {n: p.grad for n, p in ref.named_parameters()}
    model = tiny(arch, hf.register(strategy=strategy, layout=layout))
    out = model(**hf.shard_inputs(ids, layout=layout))
    out.loss.backward()
    hf.sum_gradients(model)
    logits = gather_sequence(out.logits.detach(), layout=layout)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    missing = sorted(n for n, g in ref_grads.items() if g is not None and n not in grads)
    # Gemma's RMSNorm runs in fp32 (x.float()): its weight gradient is an fp32 sum over tokens,
    # which two ranks round differently from one; every other gradient is fp64 end to end
    fp32 = [n for n in grads if "norm" in n]
    return {"logits": _rel(logits, ref_logits), "missing": missing,
            "grads": max(_rel(grads[n], ref_grads[n]) for n in grads if n not in fp32),
            "norm_grads": max((_rel(grads[n], ref_grads[n]) for n in fp32), default=0.0),
            "sinks": [n for n in grads if n.endswith("sinks")]}


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("strategy,layout", [("tokenring", "zigzag"), ("ring", "contiguous"), ("ulysses", "zigzag")])
def test_model_matches_single_process(arch, strategy, layout):
    for res in spawn_ranks(2, _sp_vs_reference, arch, strategy, layout, timeout=180):
        assert not res["missing"], res
        assert res["logits"] < TOL and res["grads"] < TOL and res["norm_grads"] < 1e-5, res
        if arch == "GptOssConfig":
            assert len(res["sinks"]) == 2, res  # every layer's sinks got a gradient


def test_window_mapping_equals_transformers_mask_function():
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    from tokenloom.kernels.masks import PositionMask

    for w in (1, 2, 5, 9):
        theirs = and_masks(causal_mask_function, sliding_window_overlay(w))
        t = torch.tensor
        want = torch.tensor([[bool(theirs(t(0), t(0), t(i), t(j))) for j in range(12)] for i in range(12)])
        left, right = hf.window_size_of(w, causal=True)
        assert torch.equal(PositionMask(0, 0, left, right).visible(12, 12), want), w
