"""``tokenloom trace synth``: write a synthetic MoE routing trace (skewed popularity, cross-layer affinity)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

_EPILOG = """\
The trace models what a vLLM/SGLang routed-expert recorder gives: for every layer and token, the
ids of its top-k experts. Popularity is Zipf-skewed per layer (--skew 0 is uniform). With
probability --affinity a token's next-layer expert comes from its current experts' preferred
successors (--successors of them per expert); with --domains D, tokens instead keep one of D
expert domains through all layers (like DeepSeek-V3's group-limited routing).

Output by suffix: .npz holds the raw ids (topk_ids (L, T, K), num_experts); .json holds the
aggregated loads (L, E) and transitions (L-1, E, E). Both load with `tokenloom plan --trace`.

example:
  tokenloom trace synth --layers 58 --experts 256 --top-k 8 --tokens 8192 --skew 0.8 \\
      --affinity 0.7 --domains 8 --seed 0 --out deepseek.npz
"""


def _synth(args: argparse.Namespace) -> int:
    from tokenloom.placement.synth import SynthConfig, synth_topk
    from tokenloom.placement.trace import save_aggregated, save_topk, trace_from_topk

    suffix = Path(args.out).suffix.lower()
    if suffix not in (".npz", ".json"):
        raise ValueError(f"out: unsupported file type {suffix or '(none)'!r}; valid: .npz (raw ids), .json (aggregated)")
    start = time.perf_counter()
    config = SynthConfig(
        num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, num_tokens=args.tokens,
        skew=args.skew, affinity=args.affinity, num_successors=args.successors,
        num_domains=args.domains, seed=args.seed,
    )
    topk_ids = synth_topk(config)
    if suffix == ".npz":
        save_topk(args.out, topk_ids, args.experts)
    else:
        save_aggregated(args.out, trace_from_topk(topk_ids, args.experts))
    summary = {
        "out": str(args.out), "format": "raw" if suffix == ".npz" else "aggregated",
        "num_layers": args.layers, "num_experts": args.experts, "top_k": args.top_k, "num_tokens": args.tokens,
        "skew": args.skew, "affinity": args.affinity, "domains": args.domains, "seed": args.seed,
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {args.layers} layers x {args.tokens} tokens, top-{args.top_k} of {args.experts} experts "
              f"({summary['format']}, {summary['seconds']:.1f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="make MoE routing traces for the placement planner",
                       description="Make MoE routing traces for `tokenloom plan` and `tokenloom evaluate`.")
    trace_sub = p.add_subparsers(dest="trace_command", metavar="ACTION", parser_class=type(p))
    trace_sub.required = True
    s = trace_sub.add_parser("synth", help="synthetic trace with skewed popularity and cross-layer affinity",
                             description="Write a synthetic routing trace.", epilog=_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--layers", type=int, required=True, help="number of MoE layers L")
    s.add_argument("--experts", type=int, required=True, help="routed experts per layer E")
    s.add_argument("--top-k", type=int, required=True, help="experts per token K (<= E)")
    s.add_argument("--tokens", type=int, required=True, help="tokens traced T")
    s.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity (0 = uniform; default 1.0)")
    s.add_argument("--affinity", type=float, default=0.5,
                   help="probability in [0, 1] that a next-layer expert follows the current experts (default 0.5)")
    s.add_argument("--successors", type=int, default=2, help="preferred successors per expert (default 2; ignored with --domains)")
    s.add_argument("--domains", type=int, default=0,
                   help="D > 0: tokens keep one of D expert domains through all layers (default 0: off)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same trace; default 0)")
    s.add_argument("--out", required=True, help="output file: .npz (raw ids) or .json (aggregated)")
    s.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    s.set_defaults(func=_synth)
