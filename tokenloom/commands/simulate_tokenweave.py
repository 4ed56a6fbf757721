"""``tokenloom simulate tokenweave``: baseline vs TokenWeave vs no-communication on a cluster."""

from __future__ import annotations

import argparse
import json

from tokenloom.common.errors import UsageError
from tokenloom.commands.args import arg_int

_EPILOG = """\
Prices the runtime's own step lists (the same ones 'tokenloom run tokenweave' executes) for one
tensor-parallel group: the baseline (AllReduce, then residual + RMSNorm), TokenWeave (two
wave-aware pieces, fused ReduceScatter + RMSNorm + AllGather overlapped with the other piece) and
the layer's compute alone (no communication, no norms). Times are per layer, averaged over the
model's layers (the last communication of a layer overlaps the next layer).

models: llama-3.3-70b, llama-3.1-8b, qwen2.5-72b, mixtral-8x22b; or --hidden/--ffn/--heads/--kv-heads
[--experts E --top-k K] for a custom layer (they also override a named model's fields).

limits (refused up front): --tokens <= 16M, --layers <= 1024 (each layer is walked step by step;
the times are per-layer averages), --hidden/--ffn <= 1048576, --heads/--kv-heads <= 65536,
--experts/--top-k <= 4096.

examples:
  tokenloom simulate tokenweave --hardware h100-sxm --tp 8 --tokens 8K --model llama-3.3-70b
  tokenloom simulate tokenweave --tp 8 --tokens 4096 --model mixtral-8x22b --json
  tokenloom simulate tokenweave --tp 4 --tokens 16K --hidden 5120 --ffn 13824 --heads 40 --kv-heads 8 \\
      --chrome-trace tw.json --png tw.png
"""


# = tokenloom.simulator.tokenweave.MAX_* (not imported here: startup time; a test keeps them equal)
MAX_LAYERS = 1024
MAX_TOKENS = 1 << 24
MAX_HIDDEN = MAX_FFN = 1 << 20
MAX_HEADS = 1 << 16
MAX_EXPERTS = 1 << 12
_WHY_SHAPE = "far above any public model"


def _tokens(text: str) -> int:
    from tokenloom.commands.simulate import tokens

    value = tokens(text)
    if not 1 <= value <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_TOKENS} (16M; the split planner prices "
                                         f"~tokens/512 cuts), got {text[:40]}")
    return value


def _bounded(lo: int, hi: int, why: str):
    """arg_int(lo, hi) whose too-large error also says why the limit exists."""
    convert = arg_int(lo, hi)

    def parse(text: str) -> int:
        try:
            return convert(text)
        except argparse.ArgumentTypeError as exc:
            if str(exc).startswith("must be <="):
                raise argparse.ArgumentTypeError(f"{exc} ({why})") from None
            raise

    return parse


def add_tokenweave(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenweave", help="TokenWeave vs baseline tensor-parallel layers: time per layer",
                       description="Simulate a tensor-parallel transformer layer stack with and without "
                       "TokenWeave.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", default="h100-sxm", metavar="NAME",
                   help="catalog name (h100-sxm, h200-sxm, a100-sxm, a10-pcie, mi300x, local-cpu, or one from "
                        "--hardware-file); default h100-sxm")
    p.add_argument("--hardware-file", default=None, metavar="FILE", help="JSON adding catalog entries")
    p.add_argument("--tp", type=arg_int(1, 1024), required=True, metavar="N", help="tensor-parallel size (GPUs)")
    p.add_argument("--tokens", type=_tokens, required=True, metavar="T", help="tokens in the batch, e.g. 8192 or 8K")
    p.add_argument("--model", default=None, metavar="NAME", help="llama-3.3-70b, llama-3.1-8b, qwen2.5-72b, "
                   "mixtral-8x22b (or give the custom flags)")
    for flag, what, hi, why in (
            ("--hidden", "hidden size", MAX_HIDDEN, _WHY_SHAPE),
            ("--ffn", "FFN (intermediate) size per expert", MAX_FFN, _WHY_SHAPE),
            ("--heads", "query heads", MAX_HEADS, _WHY_SHAPE),
            ("--kv-heads", "key/value heads (GQA)", MAX_HEADS, _WHY_SHAPE),
            ("--experts", "MoE experts (0: dense)", MAX_EXPERTS, _WHY_SHAPE),
            ("--top-k", "experts per token (MoE)", MAX_EXPERTS, "at most --experts"),
            ("--layers", "layers to simulate (default: the model's, else 1)", MAX_LAYERS,
             "every layer is simulated step by step, ~1 ms each; times are per-layer averages")):
        p.add_argument(flag, type=_bounded(0 if flag == "--experts" else 1, hi, why), default=None,
                       help=f"{what}; at most {hi}")
    p.add_argument("--comm-ctas", choices=("2", "4", "8", "16", "auto"), default="8",
                   help="CTAs of the overlapped communication kernel; 'auto' picks the fastest (default 8, "
                        "the paper's; the runtime cannot set it for torch's symmetric-memory ops)")
    p.add_argument("--explain", action="store_true", help="also print the split planner's explanation")
    out = p.add_argument_group("output")
    out.add_argument("--chrome-trace", metavar="FILE", help="write a Chrome/Perfetto trace")
    out.add_argument("--png", metavar="FILE", help="write a Gantt chart of the first two layers")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_run)


def layer_from_args(args: argparse.Namespace):
    """(LayerShape, num_layers, model name) from --model and the custom flags."""
    from tokenloom.parallel.tokenweave_split import LayerShape
    from tokenloom.simulator.tokenweave import MODELS

    if args.model is not None and args.model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {args.model!r}", field="model")
    base = dict(zip(("hidden", "ffn", "heads", "kv_heads", "experts", "top_k", "layers"),
                    MODELS[args.model] if args.model else (None, None, None, None, 0, 0, 1)))
    for key in base:
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    missing = [f"--{k.replace('_', '-')}" for k in ("hidden", "ffn", "heads") if base[k] is None]
    if missing:
        raise UsageError(f"give --model or {', '.join(missing)}", field="model")
    if base["kv_heads"] is None:
        base["kv_heads"] = base["heads"]
    if base["experts"] and not base["top_k"]:
        raise UsageError("--top-k is required with --experts", field="top-k")
    shape = LayerShape(base["hidden"], base["ffn"], base["heads"], base["kv_heads"], args.tp,
                       base["experts"], base["top_k"] if base["experts"] else 0)
    return shape, base["layers"], args.model or "custom"


def _print(s: dict, plan_text: str | None) -> None:
    moe = f", MoE {s['experts']}x top-{s['top_k']}" if s["experts"] else ""
    print(f"{s['model']} (hidden {s['hidden']}, ffn {s['ffn']}, heads {s['heads']}/{s['kv_heads']} kv{moe}) "
          f"TP{s['tp']} on {s['hardware']}, {s['tokens']} tokens, {s['layers']} layers")
    sp = s["split"]
    if sp["mode"] == "split":
        split = (f"split at {sp['cut']} ({sp['pieces'][0][1] - sp['pieces'][0][0]} + "
                 f"{sp['pieces'][1][1] - sp['pieces'][1][0]} tokens), GEMM cost {sp['gemm_penalty']:+.1%} "
                 f"(naive 50/50 {sp['naive_gemm_penalty']:+.1%})")
    else:
        split = f"{sp['mode']} (one piece padded to {sp['padded'][0]} rows)"
    print(f"  {'plan':<28}{split}")
    print(f"  {'communication path':<28}{s['comm_path']}, {s['comm_ctas']} CTAs while overlapping")
    for name, key in (("baseline", "baseline_ms"), ("TokenWeave", "tokenweave_ms"),
                      ("TokenWeave, 50/50 cut", "naive_split_ms"),
                      ("baseline without comm", "no_comm_norm_ms"), ("no communication (compute)", "no_comm_ms")):
        if s[key] is not None:
            print(f"  {name:<28}{s[key]:9.3f} ms/layer")
    print(f"  {'speedup':<28}{s['speedup']:9.3f}x  (baseline spends {s['baseline_comm_share']:.0%} outside "
          f"compute; TokenWeave exposes {s['tokenweave_exposed_comm_ms']:.3f} ms/layer)")
    if plan_text:
        print(plan_text)


def _run(args: argparse.Namespace) -> int:
    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.simulator.hardware import catalog, make_cluster
    from tokenloom.simulator.tokenweave import simulate_tokenweave
    from tokenloom.simulator.tokenweave_export import write_chrome_trace, write_gantt

    with OutputFiles(inputs=[args.hardware_file]) as outputs:
        outputs.claim("--chrome-trace", args.chrome_trace)
        outputs.claim("--png", args.png)
        layer, num_layers, model = layer_from_args(args)
        nodes = catalog(args.hardware_file)
        if args.hardware in nodes and args.tp > nodes[args.hardware].gpus_per_node:
            raise UsageError(f"--tp ({args.tp}) exceeds the {nodes[args.hardware].gpus_per_node} GPUs of one "
                             f"{args.hardware!r} node: a tensor-parallel group stays inside a node", field="tp")
        cluster = make_cluster(args.hardware, args.tp, 1, args.hardware_file)
        result = simulate_tokenweave(cluster, layer, args.tokens, num_layers=num_layers, model=model,
                                     comm_ctas=args.comm_ctas if args.comm_ctas == "auto" else int(args.comm_ctas))
        outputs.write("--chrome-trace", lambda p: write_chrome_trace(result, p))
        outputs.write("--png", lambda p: write_gantt(result, p))
        outputs.commit()
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    _print(summary, result.plan.explain() if args.explain else None)
    for path in (args.chrome_trace, args.png):
        if path:
            print(f"wrote {path}")
    return 0
