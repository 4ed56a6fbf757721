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

from tokenloom.comm.launch.local import spawn_ranks  # noqa: E402
from tokenloom.common.errors import UsageError  # noqa: E402
from tokenloom.integrations import hf  # noqa: E402

VOCAB, SEQ, BATCH = 128, 16, 2
TOL = 1e-10  # fp64: relative to the largest magnitude of the reference tensor
LOSS_TOL = 1e-6  # transformers' causal-LM loss upcasts logits to fp32: the ranks' sums round there


def tiny_model(attn: str, dtype=torch.float64, arch="LlamaConfig", **overrides):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, arch)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_cache=False, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)


@pytest.fixture(scope="module", autouse=True)
def _warm_transformers():
    """The first model build imports the Llama modules (~2 s): do it once, before ranks fork."""
    tiny_model("sdpa")


def batch_ids(seq=SEQ, batch=BATCH):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def _reference(ids, cu_seqlens=None, arch="LlamaConfig"):
    model = tiny_model("sdpa", arch=arch)
    labels = hf.causal_lm_labels(ids, cu_seqlens=cu_seqlens)
    pos = hf.global_position_ids(ids.shape[1], cu_seqlens=cu_seqlens).expand(ids.shape[0], -1)
    out = model(input_ids=ids, position_ids=pos, labels=labels, shift_labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sp_vs_reference(rank, world_size, strategy, layout, checkpointing=False, arch="LlamaConfig"):
    from tokenloom.parallel import gather_sequence

    torch.manual_seed(0)
    ids = batch_ids()
    ref_logits, ref_loss, ref_grads = _reference(ids, arch=arch)
    name = hf.register(strategy=strategy, layout=layout)
    model = tiny_model(name, arch=arch)
    if checkpointing:  # the backward re-runs every layer's attention forward (and its collectives)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


CU_SEQLENS = torch.tensor([0, 1, 9, 12, 27, 40], dtype=torch.int32)  # 5 documents, one of length 1


def _per_document_reference(ids, cu):
    """The packed batch as separate sequences, one forward each (no packing logic involved)."""
    model = tiny_model("sdpa")
    labels = hf.causal_lm_labels(ids, cu_seqlens=cu)
    count = (labels != -100).sum()
    logits = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out = model(input_ids=ids[:, a:b], labels=labels[:, a:b], shift_labels=labels[:, a:b],
                    num_items_in_batch=count)
        if b - a > 1:  # a one-token document predicts nothing (its loss is 0/count, no graph)
            out.loss.backward()
        logits.append(out.logits.detach())
    return torch.cat(logits, dim=1), {n: p.grad for n, p in model.named_parameters()}


def _packed_vs_reference(rank, world_size, strategy):
    from tokenloom.parallel import gather_sequence

    ids = batch_ids(seq=int(CU_SEQLENS[-1]), batch=1)
    ref_logits, ref_grads = _per_document_reference(ids, CU_SEQLENS)
    model = tiny_model(hf.register(strategy=strategy))
    batch = hf.shard_inputs(ids, cu_seqlens=CU_SEQLENS)
    if strategy == "ring":  # transformers' own names (DataCollatorWithFlattening) work too
        cu = batch.pop("cu_seqlens")
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    out = model(**batch)
    out.loss.backward()
    hf.sum_gradients(model)
    logits = gather_sequence(out.logits.detach(), cu_seqlens=CU_SEQLENS)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"logits": _rel(logits, ref_logits),
            "grads": max(_rel(grads[n], ref_grads[n]) for n in grads)}


@pytest.mark.parametrize("arch", ["MistralConfig", "Qwen3Config"])
def test_other_architectures(arch):
    """Mistral passes sliding_window=4096 (longer than the sequence: no effect); Qwen3 has q/k norms."""
    for res in spawn_ranks(2, _sp_vs_reference, "tokenring", "zigzag", False, arch, timeout=120):
        assert res["logits"] < TOL and res["grads"] < TOL, res


def _errors_fp32(model, batch, ref_logits, ref_grads, layout=None):
    from tokenloom.parallel import gather_sequence

    out = model(**batch)
    out.loss.backward()
    logits = out.logits.detach()
    if layout is not None:
        hf.sum_gradients(model)
        logits = gather_sequence(logits, layout=layout)
    return (_rel(logits.double(), ref_logits),
            max(_rel(p.grad.double(), ref_grads[n]) for n, p in model.named_parameters()))


def _fp32_error_vs_plain_pytorch(rank, world_size, strategy):
    """fp32 SP against fp64, next to fp32 single-device sdpa against fp64 (same weights)."""
    ids = batch_ids()
    ref_logits, _, ref_grads = _reference(ids)
    weights = tiny_model("sdpa").state_dict()
    plain = tiny_model("sdpa", dtype=torch.float32)
    plain.load_state_dict(weights)
    labels = hf.causal_lm_labels(ids)
    full = {"input_ids": ids, "labels": labels, "shift_labels": labels}
    sp = tiny_model(hf.register(strategy=strategy), dtype=torch.float32)
    sp.load_state_dict(weights)
    return {"plain": _errors_fp32(plain, full, ref_logits, ref_grads),
            "sp": _errors_fp32(sp, hf.shard_inputs(ids), ref_logits, ref_grads, layout="zigzag")}


def test_fp32_error_is_no_worse_than_plain_pytorch():
    """STYLE 5: at most 2x the error of single-device fp32 attention, plus a small floor."""
    for res in spawn_ranks(2, _fp32_error_vs_plain_pytorch, "tokenring", timeout=120):
        for what, plain, sp in zip(("logits", "grads"), res["plain"], res["sp"]):
            assert sp <= 2 * plain + 1e-6, (what, res)


def test_gradient_checkpointing_recomputes_sp_attention():
    for res in spawn_ranks(2, _sp_vs_reference, "ring", "zigzag", True, timeout=120):
        assert res["logits"] < TOL and res["grads"] < TOL, res


@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses"])
def test_packed_batch_matches_per_document_runs(strategy):
    for res in spawn_ranks(2, _packed_vs_reference, strategy, timeout=120):
        assert res["logits"] < TOL, res
        assert res["grads"] < TOL, res


def _mesh_vs_reference(rank, world_size, packed):
    """USP: Ulysses over the inner mesh dim, TokenRing over the outer, with the same helpers."""
    from torch.distributed.device_mesh import init_device_mesh

    from tokenloom.parallel import gather_sequence

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    cu = CU_SEQLENS if packed else None
    ids = batch_ids(seq=int(CU_SEQLENS[-1]) if packed else SEQ, batch=1 if packed else BATCH)
    if packed:
        ref_logits, ref_grads = _per_document_reference(ids, cu)
    else:
        ref_logits, _, ref_grads = _reference(ids)
    model = tiny_model(hf.register(strategy="tokenring", group=mesh, name="tokenloom-usp"))
    out = model(**hf.shard_inputs(ids, group=mesh, cu_seqlens=cu))
    out.loss.backward()
    hf.sum_gradients(model, group=mesh)
    logits = gather_sequence(out.logits.detach(), group=mesh, cu_seqlens=cu)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"logits": _rel(logits, ref_logits),
            "grads": max(_rel(grads[n], ref_grads[n]) for n in grads)}


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_2d_mesh_matches_single_process(packed):
    for res in spawn_ranks(4, _mesh_vs_reference, packed, timeout=120):
        assert res["logits"] < TOL, res
        assert res["grads"] < TOL, res


def _attention_fn(name):
    from transformers import AttentionInterface

    return AttentionInterface()[name]


def test_world_of_one_is_plain_attention_and_inference_works():
    """Without torch.distributed the group is a world of one: the model equals sdpa, no grad too."""
    ids = batch_ids()
    ref = tiny_model("sdpa").eval()
    model = tiny_model(hf.register(strategy="tokenring", layout="contiguous")).eval()
    batch = hf.shard_inputs(ids, layout="contiguous")
    assert torch.equal(batch["input_ids"], ids)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert _rel(got, want) < TOL


def test_labels_are_shifted_on_the_full_sequence():
    ids = torch.arange(10).reshape(1, 10)
    assert hf.causal_lm_labels(ids).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, -100]]
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    assert hf.causal_lm_labels(ids, cu_seqlens=cu).tolist() == [[1, 2, -100, -100, 5, 6, 7, 8, 9, -100]]
    assert hf.global_position_ids(10, cu_seqlens=cu).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4, 5]]
    with pytest.raises(UsageError, match="cu_seqlens"):
        hf.causal_lm_labels(ids, cu_seqlens=torch.tensor([0, 5, 9]))


def test_refusals_without_ranks():
    with pytest.raises(UsageError, match="strategy"):
        hf.register(strategy="flash")
    with pytest.raises(UsageError, match="layout"):
        hf.register(layout="striped")
    for taken in ("sdpa", "eager", "flex_attention"):
        with pytest.raises(UsageError, match="name"):
            hf.register(name=taken)
    with pytest.raises(UsageError, match="input_ids"):
        hf.shard_inputs(torch.zeros(1, 2, 3, dtype=torch.long))
    ids = batch_ids()
    model = tiny_model(hf.register(strategy="ring"), attention_dropout=0.1)  # from_config: train mode
    with pytest.raises(UsageError, match="dropout"):
        model(**hf.shard_inputs(ids))
    fn = _attention_fn(hf.register(strategy="ring"))
    layer = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 16, dtype=torch.float64)
    kv = torch.zeros(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(UsageError, match="softcap"):
        fn(layer, q, kv, kv, None, softcap=-30.0)
    with pytest.raises(UsageError, match="sliding_window"):
        fn(layer, q, kv, kv, None, sliding_window=0)
    with pytest.raises(UsageError, match="sinks"):
        fn(layer, q, kv, kv, None, s_aux=torch.zeros(3, dtype=torch.float64))
    assert fn(layer, q, kv, kv, None, sliding_window=8)[0].shape == (1, 8, 4, 16)  # masks nothing
    assert fn(layer, q, kv, kv, None, sliding_window=3, softcap=30.0,
              s_aux=torch.zeros(4, dtype=torch.float64))[0].shape == (1, 8, 4, 16)
    with pytest.raises(UsageError, match="use_cache"):
        fn(layer, q[:, :, :1], kv, kv, None)
    with pytest.raises(UsageError, match="attention_mask"):
        fn(layer, q, kv, kv, torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    out, weights = fn(layer, q, kv, kv, torch.ones(1, 8, dtype=torch.long))  # masks nothing: fine
    assert out.shape == (1, 8, 4, 16) and weights is None


def _refused_on_every_rank(rank, world_size, case):
    """Each rank reports the error it got; a rank that hung would time the test out instead."""
    ids = batch_ids()
    model = tiny_model(hf.register(strategy="tokenring"))
    batch = hf.shard_inputs(ids)
    if case == "padding":  # only rank 1 has padding: rank 0 must fail too, not wait for it
        mask = torch.ones_like(batch["input_ids"])
        if rank == 1:
            mask[0, -3:] = 0
        batch["attention_mask"] = mask
    elif case == "positions":  # transformers would default them to arange(seq_local)
        del batch["position_ids"]
    try:
        model(**batch)
    except UsageError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("case,needle", [("padding", "attention_mask: ranks [1]"),
                                         ("positions", "position_ids")])
def test_rank_dependent_problems_raise_on_every_rank(case, needle):
    for msg in spawn_ranks(2, _refused_on_every_rank, case, timeout=60):
        assert needle in msg, msg


def _run_example(rank, world_size, argv):
    import importlib.util
    import os
    from pathlib import Path

    # the group is already up (spawn_ranks); init_from_env only needs torchrun's variables to exist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    path = Path(__file__).resolve().parents[2] / "examples" / "hf_train_step.py"
    spec = importlib.util.spec_from_file_location("hf_train_step", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.main(argv)


def test_readme_training_step_example_checks_itself(capfd):
    argv = ["--check", "--steps", "2", "--seq", "40", "--docs", "4", "--strategy", "tokenring",
            "--dtype", "float64"]
    assert spawn_ranks(2, _run_example, argv, timeout=120) == [0, 0]
    assert "-> OK" in capfd.readouterr().out
