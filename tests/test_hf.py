"""tokenloom.integrations.hf on real gloo ranks: a tiny Llama (random weights, built from a config)
must give the single-process model's logits and every parameter gradient, for each strategy.

The reference is the same model with transformers' own "sdpa" attention in fp64 on the full
sequence, computed inside each rank (same seed, same weights). fp64 makes the comparison tight:
the only differences left are summation order (~1e-15 relative).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # imported in the parent: forked ranks share it

from tokenloom.comm.spawn import RankError, spawn_ranks  # noqa: E402
from tokenloom.errors import UsageError  # noqa: E402
from tokenloom.integrations import hf  # noqa: E402

VOCAB, SEQ, BATCH = 128, 16, 2
TOL = 1e-10  # fp64: relative to the largest magnitude of the reference tensor
LOSS_TOL = 1e-6  # transformers' causal-LM loss upcasts logits to fp32: the ranks' sums round there


def tiny_model(attn: str, dtype=torch.float64, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_cache=False, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)


def batch_ids(seq=SEQ, batch=BATCH):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def _reference(ids, cu_seqlens=None):
    model = tiny_model("sdpa")
    labels = hf.causal_lm_labels(ids, cu_seqlens=cu_seqlens)
    pos = hf.global_position_ids(ids.shape[1], cu_seqlens=cu_seqlens).expand(ids.shape[0], -1)
    out = model(input_ids=ids, position_ids=pos, labels=labels, shift_labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sp_vs_reference(rank, world_size, strategy, layout):
    from tokenloom.parallel import gather_sequence

    torch.manual_seed(0)
    ids = batch_ids()
    ref_logits, ref_loss, ref_grads = _reference(ids)
    name = hf.register(strategy=strategy, layout=layout)
    model = tiny_model(name)
    batch = hf.shard_inputs(ids, layout=layout)
    out = model(**batch)
    out.loss.backward()
    hf.sum_gradients(model)
    loss = out.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    logits = gather_sequence(out.logits.detach(), layout=layout)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    return {"logits": _rel(logits, ref_logits), "loss": _rel(loss, ref_loss),
            "grads": max(_rel(grads[n], ref_grads[n]) for n in grads), "num_grads": len(grads)}


@pytest.mark.parametrize("strategy,layout", [("tokenring", "zigzag"), ("ring", "contiguous"),
                                             ("ulysses", "zigzag"), ("auto", "zigzag")])
def test_plain_batch_matches_single_process(strategy, layout):
    for res in spawn_ranks(2, _sp_vs_reference, strategy, layout, timeout=120):
        assert res["num_grads"] > 10
        assert res["logits"] < TOL, res
        assert res["loss"] < LOSS_TOL, res
        assert res["grads"] < TOL, res
