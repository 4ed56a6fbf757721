"""Greedy generation from a Hugging Face causal LM with its KV cache sharded over ranks, under torchrun.

    torchrun --nproc-per-node 2 examples/hf_generate.py                  # tiny random Llama, CPU/gloo
    torchrun --nproc-per-node 4 examples/hf_generate.py --check          # also compare with 1 process
    torchrun --nproc-per-node 2 examples/hf_generate.py --sp-prefill tokenring --check  # prompt run SP
    torchrun --nproc-per-node 8 examples/hf_generate.py --model PATH --prompt-len 100001 --dtype bfloat16 \
        --sp-prefill auto

Every rank runs the whole model on the same tokens (the prompt, then one token per step); only the
KV cache is sharded: each rank keeps ~1/N of every layer's keys and values and reads only those
per token, and the (out, lse) partials of the ranks are merged (pass-Q gather, see
docs/inference.md). With ``--sp-prefill STRATEGY`` the prompt (all but its last token; its length
a multiple of 2N for the zigzag layout) runs sequence-parallel first, each rank on its shard, and
fills the cache from the K/V its attention received. With ``--check`` the tokens are compared with the same model generating in one
process with transformers' own cache and attention (fp64 by default, so they must be identical).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist

from tokenloom.comm.launch.env import init_from_env
from tokenloom.integrations import hf_cache

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="from_pretrained path (default: a tiny random Llama)")
    p.add_argument("--strategy", default="auto", choices=("auto", "gather", "ring", "passkv"),
                   help="how new queries meet the sharded cache")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (random)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--batch", type=int, default=1, help="prompts generated together (same length)")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES), help="model dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sp-prefill", default=None, choices=("auto", "tokenring", "ring", "ulysses"),
                   help="run the prompt sequence-parallel with this strategy (default: through generate)")
    p.add_argument("--check", action="store_true", help="compare with single-process generation")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)  # same weights on every rank
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=None)  # random weights: no early stop, every step is compared
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=DTYPES[args.dtype])
    model.generation_config.eos_token_id = None
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size, device = init_from_env()
    model = build_model(args).to(device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same prompt on every rank
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    reference = copy.deepcopy(model) if args.check else None
    with torch.no_grad():
        if args.sp_prefill is None:
            ids = hf_cache.generate(model, prompt, group=None, strategy=args.strategy,
                                    max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        else:
            cache = hf_cache.TokenloomCache(model.config, max_tokens=args.prompt_len + args.new_tokens,
                                            strategy=args.strategy, batch=args.batch,
                                            dtype=DTYPES[args.dtype], device=device, layout="zigzag")
            hf_cache.prefill(model, prompt, cache, strategy=args.sp_prefill, layout="zigzag")
            with cache.attached(model):
                ids = model.generate(prompt, cache=cache, max_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=0)
    new = ids[:, args.prompt_len:]
    ok = True
    if reference is not None:
        with torch.no_grad():
            want = reference.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                      pad_token_id=0)[:, args.prompt_len:]
        ok = torch.equal(new, want)
    if rank == 0:
        print(f"{world_size} rank(s), prompt {args.prompt_len} tokens, generated: {new[0].tolist()}")
        if reference is not None:
            print("-> OK: the same tokens as one process" if ok else
                  f"-> MISMATCH: one process generated {want[0].tolist()}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
