"""``tokenloom run tokenweave``: a tensor-parallel layer stack, baseline vs TokenWeave, timed and checked.

A job for :func:`tokenloom.comm.launch.run_job`: every rank builds the same full weights and input (one
seed), keeps its tensor-parallel shard, and runs the stack in both modes ``iters`` times after a
warm-up (interleaved, so both see the same machine state). It returns its median time per layer
for each mode and the planner's decision; with ``check`` the TokenWeave output and residual are
compared with the baseline's and with the unsharded single-device stack in fp64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from tokenloom.common.errors import UsageError
from tokenloom.jobs import DTYPES, emit_report, torch_dtype
from tokenloom.commands.args import arg_int

MAX_LAYER_ELEMENTS = 2**31  # every rank draws one full layer at a time (fp64) and keeps its shard
MAX_CHECK_SCORES = 2**27  # the fp64 oracle materialises heads x tokens^2 attention scores


@dataclass(frozen=True)
class TokenweaveRun:
    layers: int = 2
    tokens: int = 1024
    hidden: int = 256
    heads: int = 8
    kv_heads: int | None = None
    ffn: int = 512
    moe_experts: int = 0
    top_k: int = 2
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU (decided on the rank)
    split_threshold: int | None = None  # None: the paper's (1024 dense, 2048 MoE)
    check: bool = False
    iters: int = 3
    seed: int = 0

    def layer_config(self):
        from tokenloom.parallel.tokenweave_model import LayerConfig

        return LayerConfig(self.hidden, self.heads, self.kv_heads or self.heads, self.ffn, self.moe_experts,
                           self.top_k if self.moe_experts else 0)

    def validate(self, world_size: int) -> None:
        """UsageError naming the flag for a request that cannot run on ``world_size`` ranks."""
        for name in ("layers", "tokens", "iters"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}", field=name)
        self.layer_config().check_tp(world_size)
        per_layer = 4 * self.hidden * self.hidden + 3 * self.hidden * self.ffn * max(1, self.moe_experts)
        if per_layer > MAX_LAYER_ELEMENTS:
            raise UsageError(f"--hidden/--ffn/--moe-experts: {per_layer:.3g} weight elements per layer exceed "
                             f"the limit of 2^31 (every rank draws each full layer once)", field="hidden")
        if self.check and self.heads * self.tokens ** 2 > MAX_CHECK_SCORES:
            raise UsageError(f"--check: the fp64 single-device oracle would hold heads x tokens^2 = "
                             f"{self.heads * self.tokens ** 2:.3g} scores (limit 2^27); use fewer --tokens "
                             f"or drop --check", field="check")



def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def job(comm, cfg: TokenweaveRun) -> dict:
    """One rank's part: median ms per layer of each mode (and rank 0's check against fp64)."""
    import torch

    from tokenloom.parallel.tokenweave_layer import Pieces, TPStack, plan_for
    from tokenloom.parallel.tokenweave_model import build_shard, make_weights

    rank, world, device = comm.rank, comm.world_size, comm.device
    dtype_name = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch_dtype(dtype_name)
    lc = cfg.layer_config()
    stack = TPStack(lc, build_shard(lc, cfg.layers, cfg.seed, rank, world, dtype, device), comm)
    x = torch.randn(cfg.tokens, lc.hidden, generator=torch.Generator().manual_seed(cfg.seed + 1),
                    dtype=torch.float64)
    xd = x.to(device, dtype)
    plan = plan_for(lc, world, cfg.tokens, threshold=cfg.split_threshold)
    pieces = Pieces.from_plan(plan)
    times: dict[str, list[float]] = {"baseline": [], "tokenweave": []}
    outs: dict[str, Any] = {}
    for it in range(cfg.iters + 1):  # the first iteration warms up
        for mode in ("baseline", "tokenweave"):
            _sync(device)
            t0 = time.perf_counter()
            outs[mode] = stack.run(xd, mode, pieces if mode == "tokenweave" else None)
            _sync(device)
            if it:
                times[mode].append((time.perf_counter() - t0) * 1e3 / cfg.layers)
    result: dict[str, Any] = {"rank": rank, "device": str(device), "backend": comm.backend, "dtype": dtype_name,
                              "baseline_ms": statistics.median(times["baseline"]),
                              "tokenweave_ms": statistics.median(times["tokenweave"]),
                              "plan": {"mode": plan.mode, "cut": plan.cut, "pieces": [list(p) for p in plan.pieces],
                                       "padded": list(plan.padded)}}
    if cfg.check:
        tw_out, tw_res = outs["tokenweave"]
        tw_res = stack.gather_residual(tw_res, pieces)  # collective: every rank
        if rank == 0:
            base_out, base_res = outs["baseline"]
            full = make_weights(lc, cfg.layers, seed=cfg.seed)
            result["check"] = _check({"out": tw_out, "residual": tw_res},
                                     {"out": base_out, "residual": base_res[0]}, x, full, lc, dtype)
    return result


def _check(tw: dict, base: dict, x, full: dict, lc, dtype) -> dict:
    """Errors of TokenWeave against the baseline and against fp64, with the earned tolerance."""
    from tokenloom.kernels.reference import tolerance
    from tokenloom.parallel.tokenweave_model import reference_stack

    ref = dict(zip(("out", "residual"), reference_stack(x, full, lc)))
    plain = dict(zip(("out", "residual"), reference_stack(x.to(dtype), full, lc)))
    checks = {}
    for name in ("out", "residual"):
        r = ref[name]
        plain_err = (plain[name].double() - r).abs().max().item()
        tol = tolerance(dtype, plain_err, r.abs().max().item())
        err = (tw[name].cpu().double() - r).abs().max().item()
        vs_base = (tw[name].cpu().double() - base[name].cpu().double()).abs().max().item()
        base_err = (base[name].cpu().double() - r).abs().max().item()
        checks[name] = {"max_abs_err": err, "baseline_err": base_err, "vs_baseline": vs_base,
                        "plain_torch_err": plain_err, "tolerance": tol,
                        "ok": err <= tol and base_err <= tol and vs_base <= tol}
    return checks


# ---------------------------------------------------------------------------- the CLI side
def add_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--layers", type=arg_int(1, 4096), default=2, help="layers in the stack")
    a.add_argument("--tokens", type=arg_int(1, 1 << 24), default=1024, help="tokens (one causal prefill)")
    a.add_argument("--hidden", type=arg_int(1), default=256, help="hidden size")
    a.add_argument("--heads", type=arg_int(1), default=8, help="query heads (divisible by the ranks)")
    a.add_argument("--kv-heads", type=arg_int(1), default=None, help="key/value heads (GQA); default: --heads")
    a.add_argument("--ffn", type=arg_int(1), default=512, help="FFN size (per expert; divisible by the ranks)")
    a.add_argument("--moe-experts", type=arg_int(0), default=0, help="Mixtral-style MoE MLP with E experts "
                   "(0: dense SwiGLU)")
    a.add_argument("--top-k", type=arg_int(1), default=2, help="experts per token (MoE)")
    a.add_argument("--split-threshold", type=arg_int(2), default=None,
                   help="split from this many tokens (default: 1024 dense, 2048 MoE, as the paper)")
    a.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    a.add_argument("--check", action="store_true", help="compare with the baseline and the fp64 "
                   "single-device stack; exit 1 beyond tolerance")
    a.add_argument("--iters", type=arg_int(1, 10_000), default=3, help="timed iterations after one warm-up")
    a.add_argument("--seed", type=arg_int(0), default=0, help="random seed of weights and input")
    a.add_argument("--json", action="store_true", help="print one JSON object")


def config_from_args(args: argparse.Namespace) -> TokenweaveRun:
    cfg = TokenweaveRun(layers=args.layers, tokens=args.tokens, hidden=args.hidden, heads=args.heads,
                        kv_heads=args.kv_heads, ffn=args.ffn, moe_experts=args.moe_experts, top_k=args.top_k,
                        dtype=args.dtype, split_threshold=args.split_threshold, check=args.check,
                        iters=args.iters, seed=args.seed)
    cfg.validate(args.world_size)
    return cfg


def combine(results: list[dict], cfg: TokenweaveRun) -> dict:
    first = results[0]
    rep = {"world_size": len(results), "device": first["device"], "backend": first["backend"],
           "config": {**asdict(cfg), "dtype": first["dtype"]}, "plan": first["plan"],
           "baseline_ms": [r["baseline_ms"] for r in results],
           "tokenweave_ms": [r["tokenweave_ms"] for r in results]}
    rep["speedup"] = max(rep["baseline_ms"]) / max(rep["tokenweave_ms"])
    if "check" in first:
        rep["check"] = first["check"]
    return rep


def report(results: list[dict], args: argparse.Namespace) -> int:
    return emit_report(combine(results, config_from_args(args)), args.json, print_report)


def print_report(rep: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time: tests (and Ray) replace sys.stdout
    cfg, plan = rep["config"], rep["plan"]
    moe = f", MoE {cfg['moe_experts']} experts top-{cfg['top_k']}" if cfg["moe_experts"] else ""
    pieces = " + ".join(str(e - s) for s, e in plan["pieces"])
    print(f"TokenWeave on {rep['world_size']} rank(s) ({rep['backend']}, {rep['device']}): {cfg['layers']} layers, "
          f"{cfg['tokens']} tokens, hidden {cfg['hidden']}, heads {cfg['heads']}/{cfg['kv_heads'] or cfg['heads']}, "
          f"ffn {cfg['ffn']}{moe}, {cfg['dtype']}; plan {plan['mode']} ({pieces} tokens)", file=out)
    print(f"{'rank':>4}  {'baseline ms/layer':>18}  {'tokenweave ms/layer':>20}", file=out)
    for r in range(rep["world_size"]):
        print(f"{r:>4}  {rep['baseline_ms'][r]:18.2f}  {rep['tokenweave_ms'][r]:20.2f}", file=out)
    print(f"speedup (slowest rank): {rep['speedup']:.3f}x", file=out)
    if "check" in rep:
        print("check against the fp64 single-device stack (plain torch in the same dtype for scale):", file=out)
        for name, c in rep["check"].items():
            print(f"  {name:<8} tokenweave {c['max_abs_err']:.2e}  baseline {c['baseline_err']:.2e}  "
                  f"tw-vs-baseline {c['vs_baseline']:.2e}  plain torch {c['plain_torch_err']:.2e}  "
                  f"tolerance {c['tolerance']:.2e}  {'ok' if c['ok'] else 'FAILED'}", file=out)
