"""``tokenloom simulate decode``: time per token over a sharded KV cache, and how many GPUs a
context needs at a given ms per token."""

from __future__ import annotations

import argparse
import json

from tokenloom.common.errors import UsageError
from tokenloom.commands.args import arg_float, arg_int

_EPILOG = """\
Prices the runtime's own decode schedules (pass-Q gather, pass-Q ring, pass-KV) step by step in
lockstep: a rank's block reads its share of the cache at HBM bandwidth (decode is memory-bound),
each message pays the link's latency plus bytes over its rate, and every call pays the small
argument all-gather. Times cover all --layers for one step of --new-tokens tokens.

examples:
  tokenloom simulate decode --hardware h100-sxm --gpus 8 --context 1M --heads 64 --kv-heads 8 \\
      --head-dim 128 --layers 80
  tokenloom simulate decode --hardware h200-sxm --context 1M --heads 64 --kv-heads 8 --head-dim 128 \\
      --layers 80 --target-ms 20      # the fewest GPUs meeting 20 ms per token (cache must fit)
"""

_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
MAX_GPUS = 256  # work limit: the gather schedule has ~2 N^2 messages, all priced


def add_decode(sub: argparse._SubParsersAction) -> None:
    from tokenloom.commands.simulate import tokens

    p = sub.add_parser("decode", help="decode over a sharded KV cache: ms per token, GPUs needed",
                       description="Simulate decode steps over a KV cache sharded across GPUs.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", default="h100-sxm", metavar="NAME",
                   help="catalog name (h100-sxm, h200-sxm, a100-sxm, a10-pcie, mi300x, local-cpu, or "
                        "one from --hardware-file); default h100-sxm")
    p.add_argument("--hardware-file", default=None, metavar="FILE", help="JSON adding catalog entries")
    p.add_argument("--gpus", type=arg_int(1, MAX_GPUS), default=None, metavar="N",
                   help=f"GPUs sharing the cache (filled node by node; at most {MAX_GPUS}: every "
                        f"message of every rank is priced, ~15 s at 256); omit with --target-ms")
    p.add_argument("--target-ms", type=arg_float(1e-6, 1e9), default=None, metavar="MS",
                   help="find the fewest GPUs (powers of two) meeting MS per step with the cache fitting")
    p.add_argument("--max-gpus", type=arg_int(1, MAX_GPUS), default=MAX_GPUS, metavar="N",
                   help=f"largest count --target-ms tries (default and at most {MAX_GPUS})")
    p.add_argument("--context", type=tokens, required=True, metavar="S",
                   help="cached tokens, e.g. 65536, 64K, 1M")
    p.add_argument("--new-tokens", type=arg_int(1, 1 << 24), default=1, metavar="T",
                   help="tokens per step (1: decode; more: chunked prefill)")
    p.add_argument("--heads", type=arg_int(1, 1 << 16), default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=arg_int(1, 1 << 16), default=None, help="key/value heads (default --heads)")
    p.add_argument("--head-dim", type=arg_int(1, 1 << 16), default=128, help="head dimension (default 128)")
    p.add_argument("--layers", type=arg_int(1, 4096), default=1, help="attention layers (default 1)")
    p.add_argument("--batch", type=arg_int(1, 1 << 20), default=1, help="sequences decoded together")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="cache dtype (default bf16)")
    p.add_argument("--strategy", choices=("auto", "gather", "ring", "passkv"), default="auto",
                   help="auto: the fastest of the three for this shape")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_decode)


def _decode(args: argparse.Namespace) -> int:
    from tokenloom.simulator.decode import DecodeShape, min_gpus_for, simulate_decode
    from tokenloom.simulator.hardware import make_cluster

    if (args.gpus is None) == (args.target_ms is None):
        raise UsageError("give exactly one of --gpus and --target-ms", field="gpus")
    sh = DecodeShape(args.context, args.new_tokens, args.heads, args.kv_heads or args.heads,
                     args.head_dim, args.layers, args.batch, _DTYPES[args.dtype])

    def cluster(n: int):
        per = make_cluster(args.hardware, 1, hardware_file=args.hardware_file).node.gpus_per_node
        nodes = max(1, -(-n // per))
        if n % nodes:
            raise UsageError(f"--gpus {n} does not spread evenly over {nodes} nodes of {per}", field="gpus")
        return make_cluster(args.hardware, n, nodes, hardware_file=args.hardware_file)

    if args.gpus is not None:
        res = simulate_decode(cluster(args.gpus), sh, args.strategy)
        from dataclasses import asdict

        rep = {"shape": asdict(sh), **res.summary()}
        if args.json:
            print(json.dumps(rep))
        else:
            _print_one(res, sh)
        return 0
    best, tried = min_gpus_for(cluster, sh, args.target_ms, strategy=args.strategy,
                               max_gpus=args.max_gpus)
    if args.json:
        print(json.dumps({"target_ms": args.target_ms, "gpus": best.gpus if best else None,
                          "best": best.summary() if best else None,
                          "tried": [t.summary() for t in tried]}))
        return 0
    for t in tried:
        _print_one(t, sh)
    if best is None:
        print(f"no count up to {args.max_gpus} GPUs meets {args.target_ms:g} ms per step with the "
              f"cache fitting")
    else:
        print(f"-> {best.gpus} x {best.hardware} ({best.strategy}) meet {args.target_ms:g} ms per step: "
              f"{best.step_ms:.3f} ms, {best.cache_gb_per_gpu:.1f} GB of cache per GPU")
    return 0


def _print_one(res, sh) -> None:
    fits = "" if res.fits else "  (cache does not fit)"
    print(f"{res.gpus:>5} x {res.hardware} {res.strategy:<7} context {sh.context} x {sh.layers} layers: "
          f"{res.step_ms:9.3f} ms/step (attention {res.compute_ms:.3f}, communication "
          f"{res.comm_ms:.3f}), cache {res.cache_gb_per_gpu:.2f} GB/GPU{fits}")
