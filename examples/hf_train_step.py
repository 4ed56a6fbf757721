"""A complete sequence-parallel training step for a Hugging Face causal LM, under torchrun.

    torchrun --nproc-per-node 2 examples/hf_train_step.py                 # tiny Llama, CPU/gloo or GPU/NCCL
    torchrun --nproc-per-node 8 examples/hf_train_step.py --model PATH --seq 32768 --dtype bfloat16
    torchrun --nproc-per-node 2 examples/hf_train_step.py --check         # also compare with 1 device
    torchrun --nproc-per-node 2 examples/hf_train_step.py --docs 5 --check  # packed: 5 documents per row

Every rank holds the same full batch (here: the same seeded random tokens; in a real job, the
data loader of the sequence-parallel group), keeps its shard of the sequence, runs the model with
tokenloom's attention, and sums the gradients over the group before the optimizer step. The
loss each rank returns is its share of the global mean; their sum is the single-device loss.
With ``--check`` the first step is compared with the same model run on the full sequence on
one device (transformers' own sdpa attention): loss, logits and every gradient.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist

from tokenloom.comm.launch.env import init_from_env
from tokenloom.integrations import hf
from tokenloom.parallel import gather_sequence

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="from_pretrained path (default: a tiny random Llama)")
    p.add_argument("--strategy", default="auto", choices=hf.STRATEGIES, help="SP attention strategy")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"), help="sharding")
    p.add_argument("--seq", type=int, default=256, help="global sequence length (tokens)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (1 with --docs)")
    p.add_argument("--docs", type=int, default=0,
                   help="pack this many random-length documents into the sequence (cu_seqlens)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--check", action="store_true", help="compare step 1 with a 1-device run")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, attn: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    dtype = DTYPES[args.dtype]
    if args.model:
        cfg = AutoConfig.from_pretrained(args.model)
    else:
        cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=max(args.seq, 256))
    cfg.attention_dropout = 0.0  # tokenloom attention has no dropout (layers read it when built)
    cfg.use_cache = False  # training: no KV cache
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, config=cfg, attn_implementation=attn,
                                                     dtype=dtype)
    else:
        torch.manual_seed(0)  # same weights on every rank
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.to(device).train()


def packed_boundaries(seq: int, docs: int, step: int) -> torch.Tensor | None:
    """``cu_seqlens`` of ``docs`` random-length documents filling ``seq`` tokens (same on all ranks)."""
    if docs <= 1:
        return None
    gen = torch.Generator().manual_seed(1000 + step)
    cuts = torch.randperm(seq - 1, generator=gen)[:docs - 1] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([seq])]).to(torch.int32)


def reference_step(model: torch.nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The same model on the full sequence, one device, transformers' sdpa attention.

    A packed row gets per-document positions, from which transformers builds its own
    document-causal mask.
    """
    model.set_attn_implementation("sdpa")  # the deep copy only
    labels = hf.causal_lm_labels(ids, cu_seqlens=cu_seqlens)
    pos = hf.global_position_ids(ids.shape[1], cu_seqlens=cu_seqlens, device=ids.device)
    out = model(input_ids=ids, position_ids=pos.expand(ids.shape[0], -1), labels=labels,
                shift_labels=labels)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.docs > 1 and args.batch != 1:
        raise SystemExit("--docs packs one row: use --batch 1")
    rank, world_size, device = init_from_env()
    name = hf.register(strategy=args.strategy, layout=args.layout)  # default group = the SP group
    model = build_model(args, name, device)
    reference = copy.deepcopy(model) if args.check else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    vocab = model.config.vocab_size
    ok = True
    for step in range(1, args.steps + 1):
        gen = torch.Generator().manual_seed(step)  # the same full batch on every rank
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
        cu = packed_boundaries(args.seq, args.docs, step)  # None: one sequence per row
        batch = hf.shard_inputs(ids, layout=args.layout, cu_seqlens=cu)  # tokens, positions, labels
        out = model(**batch)
        out.loss.backward()
        hf.sum_gradients(model)  # or let FSDP/DDP over (dp x sp) reduce them
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)  # the ranks' shares sum to the global mean loss
        if step == 1 and reference is not None:
            ok = check(reference, ids, cu, loss, out.logits.detach(), model, args, rank)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  ({world_size} ranks x "
                  f"{batch['input_ids'].shape[1]} tokens, strategy {args.strategy})", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


def check(reference, ids, cu, loss, local_logits, model, args, rank) -> bool:
    ref_loss, ref_logits, ref_grads = reference_step(reference, ids, cu)
    logits = gather_sequence(local_logits, layout=args.layout, cu_seqlens=cu)
    errs = {"loss": rel_err(loss, ref_loss), "logits": rel_err(logits, ref_logits),
            "grads": max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters())}
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(DTYPES[args.dtype], 5e-2)
    # transformers computes the causal-LM loss in fp32 whatever the model dtype
    ok = errs["loss"] <= max(tol, 1e-6) and errs["logits"] <= tol and errs["grads"] <= tol
    if rank == 0:
        shown = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        print(f"check vs 1 device (max relative error): {shown} -> {'OK' if ok else 'FAIL'} "
              f"(tolerance {tol:g})", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
