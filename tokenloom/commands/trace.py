"""``tokenloom trace synth``: write a synthetic MoE routing trace (router model, or skewed popularity
with cross-layer affinity)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenloom.common.errors import UsageError
from tokenloom.commands.args import arg_float, arg_int

_EPILOG = """\
The trace models what a vLLM/SGLang routed-expert recorder gives: for every layer and token, the
ids of its top-k experts, best score first.

--model router (DeepSeek-V3 style): each token has a latent topic (one of --topics) kept through
all layers; an expert's logit is its popularity (Zipf-like, --skew) + --topic-strength x a
per-layer topic preference + --noise; scores are sigmoids; experts form --groups contiguous
groups, a token keeps its --topk-group best groups (by the sum of each group's top-2 scores)
and takes its top-k inside them. --groups 1 is plain top-k (Qwen3). --topic-strength 0 leaves
no co-activation structure.

--model affinity (default): popularity is Zipf-skewed per layer (--skew 0 is uniform). With
probability --affinity a token's next-layer expert comes from its current experts' preferred
successors (--successors of them per expert); with --domains D, tokens instead keep one of D
expert domains through all layers.

Output by suffix: .npz holds the raw ids (topk_ids (L, T, K), num_experts); .json holds the
aggregated loads (L, E) and transitions (L-1, E, E). Both load with `tokenloom plan --trace`.

examples:
  tokenloom trace synth --model router --layers 58 --experts 256 --top-k 8 --tokens 8192 \\
      --groups 8 --topk-group 4 --seed 0 --out deepseek.npz
  tokenloom trace synth --layers 12 --experts 32 --top-k 4 --tokens 2000 --affinity 0.7 \\
      --domains 4 --out small.npz
"""


def _synth(args: argparse.Namespace) -> int:
    from tokenloom.commands.outputs import OutputFiles

    suffix = Path(args.out).suffix.lower()
    if suffix not in (".npz", ".json"):
        raise UsageError(f"--out: unsupported file type {suffix or '(none)'!r}; valid: .npz (raw ids), .json (aggregated)",
                         field="--out")
    with OutputFiles() as out:
        out.claim("--out", args.out)  # before any work: exit 2 if the path is unusable
        config, topk_ids, seconds = _generate(args)
        out.write("--out", lambda path: _save(path, suffix, topk_ids, args.experts))
        out.commit()
    summary = {
        "out": str(args.out), "format": "raw" if suffix == ".npz" else "aggregated", "model": args.model,
        "num_layers": args.layers, "num_experts": args.experts, "top_k": args.top_k, "num_tokens": args.tokens,
        "skew": args.skew, "seed": args.seed, "seconds": seconds,
    }
    if args.model == "router":
        summary.update(groups=config.num_groups, topk_group=config.topk_group, topics=config.num_topics,
                       topic_strength=config.topic_strength, noise=config.noise)
    else:
        summary.update(affinity=args.affinity, domains=args.domains)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {args.layers} layers x {args.tokens} tokens, top-{args.top_k} of {args.experts} experts "
              f"({args.model} model, {summary['format']}, {seconds:.1f} s)")
    return 0


def _generate(args: argparse.Namespace):
    start = time.perf_counter()
    if args.model == "router":
        from tokenloom.placement.router import RouterConfig, router_topk

        config = RouterConfig(
            num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, num_tokens=args.tokens,
            num_groups=args.groups, topk_group=args.groups if args.topk_group is None else args.topk_group,
            num_topics=args.topics, topic_strength=args.topic_strength, noise=args.noise,
            skew=0.6 if args.skew is None else args.skew, seed=args.seed,
        )
        return config, router_topk(config), time.perf_counter() - start
    from tokenloom.placement.synth import SynthConfig, synth_topk

    config = SynthConfig(
        num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, num_tokens=args.tokens,
        skew=1.0 if args.skew is None else args.skew, affinity=args.affinity,
        num_successors=min(2, args.experts) if args.successors is None else args.successors,
        num_domains=args.domains, seed=args.seed,
    )
    return config, synth_topk(config), time.perf_counter() - start


def _save(path: Path, suffix: str, topk_ids, num_experts: int) -> None:
    from tokenloom.placement.trace import save_aggregated, save_topk, trace_from_topk

    if suffix == ".npz":
        save_topk(path, topk_ids, num_experts)
    else:
        save_aggregated(path, trace_from_topk(topk_ids, num_experts), suffix=".json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="make MoE routing traces for the placement planner",
                       description="Make MoE routing traces for `tokenloom plan` and `tokenloom evaluate`.")
    trace_sub = p.add_subparsers(dest="trace_command", metavar="ACTION", parser_class=type(p))
    trace_sub.required = True
    s = trace_sub.add_parser("synth", help="synthetic trace with skewed popularity and cross-layer affinity",
                             description="Write a synthetic routing trace.", epilog=_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", choices=("affinity", "router"), default="affinity",
                   help="affinity: Zipf popularity + preferred successors or domains (default); "
                        "router: DeepSeek-V3-style group-limited routing with latent topics")
    s.add_argument("--layers", type=arg_int(1, 4096), required=True, help="number of MoE layers L")
    s.add_argument("--experts", type=arg_int(1, 16384), required=True, help="routed experts per layer E")
    s.add_argument("--top-k", type=arg_int(1, 16384), required=True, help="experts per token K (<= E)")
    s.add_argument("--tokens", type=arg_int(1, 1 << 31), required=True, help="tokens traced T")
    s.add_argument("--skew", type=arg_float(0, 100), default=None,
                   help="popularity skew (Zipf exponent; 0 = uniform; default 1.0 affinity, 0.6 router)")
    s.add_argument("--seed", type=arg_int(0, 2**63 - 1), default=0, help="random seed (same seed, same trace; default 0)")
    r = s.add_argument_group("router model (--model router)")
    r.add_argument("--groups", type=arg_int(1, 16384), default=1, help="contiguous expert groups (default 1: plain top-k)")
    r.add_argument("--topk-group", type=arg_int(1, 16384), default=None, help="groups a token keeps (default: all)")
    r.add_argument("--topics", type=arg_int(1, 65536), default=32, help="latent token topics (default 32)")
    r.add_argument("--topic-strength", type=arg_float(0, 100), default=1.5,
                   help="weight of the topic preference in the logits (default 1.5; 0 = no co-activation structure)")
    r.add_argument("--noise", type=arg_float(0, 100), default=1.0, help="per-token logit noise (default 1.0)")
    a = s.add_argument_group("affinity model (--model affinity)")
    a.add_argument("--affinity", type=arg_float(0, 1), default=0.5,
                   help="probability in [0, 1] that a next-layer expert follows the current experts (default 0.5)")
    a.add_argument("--successors", type=arg_int(1, 16384), default=None,
                   help="preferred successors per expert (default min(2, E); ignored with --domains)")
    a.add_argument("--domains", type=arg_int(0, 16384), default=0,
                   help="D > 0: tokens keep one of D expert domains through all layers (default 0: off)")
    s.add_argument("--out", required=True, help="output file: .npz (raw ids) or .json (aggregated)")
    s.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    s.set_defaults(func=_synth)
