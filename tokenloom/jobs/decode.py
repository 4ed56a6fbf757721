"""``tokenloom run decode``: decode steps over a sharded KV cache on real ranks, timed and checked.

Every rank builds the same random context K/V (one seed), keeps its share of it in a
:class:`~tokenloom.parallel.kv_cache.ShardedKVCache` (the append rule's split of one long chunk),
then runs ``--new-tokens`` decode steps of ``--step-tokens`` new tokens each (1: decode; more:
chunked prefill) through :func:`~tokenloom.parallel.decode.cached_attention`, timing each step and
its split between attention and communication. With ``--check`` rank 0 compares every step's output
(all ranks hold it: the queries are replicated) and the gathered cache with fp64 single-process
attention. Any context length works, divisible by the world size or not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from tokenloom.common.errors import UsageError
from tokenloom.jobs import add_report_flags, add_shape_flags, emit_report, torch_dtype
from tokenloom.commands.args import WINDOW_HELP, arg_float, arg_int, arg_window

STRATEGIES = ("auto", "gather", "ring", "passkv")


def parse_tokens(text: str) -> int:
    """``"64K"`` -> 65536, ``"1M"`` -> 1048576, ``"1000"`` -> 1000 (argparse type)."""
    s = str(text).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    digits = s[:-1] if mult > 1 else s
    if not digits.isdigit() or int(digits) * mult < 1:
        raise argparse.ArgumentTypeError(f"expected a token count like 4096, 64K or 1M, got {text!r}")
    return int(digits) * mult


@dataclass(frozen=True)
class DecodeRun:
    context: int = 65536
    new_tokens: int = 32
    step_tokens: int = 1
    strategy: str = "auto"
    queries: str = "replicated"  # or "sharded": each rank passes its part of a step's new tokens
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    batch: int = 1
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    check: bool = False
    seed: int = 0
    window: tuple[int, int] | None = None  # (left, right) as flash-attn's window_size; decode is causal
    softcap: float | None = None  # scores c * tanh(s / c) (Gemma 2)

    def validate(self, world_size: int = 1) -> None:
        hkv = self.heads if self.kv_heads is None else self.kv_heads
        if self.window is not None:
            from tokenloom.parallel.layout import normalize_window

            try:
                normalize_window(self.window, True)
            except UsageError as exc:
                raise UsageError(f"--window: {exc}", field="window_size") from None
        from tokenloom.parallel.agree import check_softcap

        try:
            check_softcap(self.softcap)
        except UsageError as exc:
            raise UsageError(f"--softcap: {exc}", field="softcap") from None
        if hkv < 1 or self.heads % hkv:
            raise UsageError(f"--kv-heads ({hkv}) must divide --heads ({self.heads})", field="kv_heads")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}", field="strategy")
        if self.queries not in ("replicated", "sharded"):
            raise UsageError("--queries must be replicated or sharded", field="queries")
        total = self.context + self.new_tokens * self.step_tokens
        elements = self.batch * total * (self.heads + 2 * hkv) * self.head_dim
        if elements > 2**33:  # the full context is built on every rank (same seed everywhere)
            raise UsageError(f"--context/--new-tokens/--heads/--head-dim/--batch: {elements:.3g} "
                             f"elements exceed the limit of 2^33 (every rank builds them all)",
                             field="context")
        import os

        from tokenloom.parallel.kv_cache import free_memory

        # estimated before anything is allocated: every rank on this host builds the full inputs
        # (fp32) and keeps its cache share
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        need = local * (elements * 4 + 2 * self.batch * total * hkv * self.head_dim * 8 // world_size)
        import torch

        have = free_memory(torch.device("cpu"))
        if need > have:
            raise UsageError(f"--context {self.context}: {local} rank(s) on this host need about "
                             f"{need / 2**30:.1f} GiB of host memory (full inputs on every rank plus "
                             f"its cache share), more than the {have / 2**30:.1f} GiB available",
                             field="context")



def job(comm, cfg: DecodeRun) -> dict:
    """One rank's part: per-step ms and split; rank 0's check against fp64."""
    import time

    import torch

    from tokenloom.comm import health
    from tokenloom.parallel.decode import cached_attention, gather_cache, new_token_part
    from tokenloom.parallel.decode_runtime import Timing
    from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache

    rank, n, device = comm.rank, comm.world_size, comm.device
    dtype_name = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch_dtype(dtype_name)
    hkv = cfg.kv_heads or cfg.heads
    total = cfg.context + cfg.new_tokens * cfg.step_tokens
    gen = torch.Generator().manual_seed(cfg.seed)
    k = torch.randn(cfg.batch, total, hkv, cfg.head_dim, generator=gen)
    v = torch.randn(cfg.batch, total, hkv, cfg.head_dim, generator=gen)
    q = torch.randn(cfg.batch, total - cfg.context, cfg.heads, cfg.head_dim, generator=gen)
    spec = CacheSpec(1, cfg.batch, hkv, cfg.head_dim, dtype, n, rank)
    cache = ShardedKVCache(spec, total, device=device)
    lo, hi = new_token_part(rank, n, 0, cfg.context)  # the context as one appended chunk
    cache.append(0, k[:, lo:hi].to(device, dtype), v[:, lo:hi].to(device, dtype),
                 torch.arange(lo, hi), cfg.context)
    steps, parts, strategy = [], [], cfg.strategy
    for s in range(cfg.new_tokens):
        a, b = s * cfg.step_tokens, (s + 1) * cfg.step_tokens  # offsets among the new tokens
        c = cfg.context
        if cfg.queries == "sharded":  # this rank's part of the step's tokens
            lo, hi = new_token_part(rank, n, c + a, cfg.step_tokens)
            a, b = a + lo, a + hi
        args = [t.to(device, dtype) for t in (q[:, a:b], k[:, c + a:c + b], v[:, c + a:c + b])]
        timing = Timing()
        health.set_step(f"decode step {s}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = cached_attention(*args, cache, 0, group=comm, strategy=cfg.strategy,
                               queries=cfg.queries, timing=timing, window_size=cfg.window,
                               softcap=cfg.softcap)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps.append(((time.perf_counter() - t0) * 1e3, timing.attention_s * 1e3, timing.comm_s * 1e3))
        parts.append((a, b, out.cpu()))
        strategy = timing.strategy
    timed = steps[1:] or steps  # the first step warms up
    result: dict[str, Any] = {
        "rank": rank, "strategy": strategy, "device": str(device), "backend": comm.backend,
        "dtype": dtype_name, "local_tokens": cache.local_len(0),
        "step_ms": statistics.median(t[0] for t in timed),
        "attention_ms": statistics.median(t[1] for t in timed),
        "comm_ms": statistics.median(t[2] for t in timed)}
    if cfg.check:
        health.set_step("decode check: gather the cache")
        kf, vf = gather_cache(cache, 0, group=comm)
        if rank == 0:  # the gathered cache against the single-process one, exactly
            err = float((kf.double() - k.to(dtype).double()).abs().max()
                        + (vf.double() - v.to(dtype).double()).abs().max())
            result["cache_check"] = {"max_abs_err": err, "plain_torch_err": None, "tolerance": 0.0,
                                     "ok": err == 0.0 and kf.shape == k.shape}
        if rank == 0 or cfg.queries == "sharded":  # replicated: every rank holds every output
            health.set_step("decode check: fp64 reference")
            result["out_check"] = _errors(parts, q, k, v, cfg.context, dtype, cfg.window, cfg.softcap)
    return result


def _visible(t: int, s: int, window: tuple[int, int] | None):
    """(t, s) bool: the last ``t`` of ``s`` positions as queries, causal, inside ``window``."""
    from tokenloom.jobs.attention import window_visible

    return window_visible(s, True, window or (-1, -1), rows=t)


def _plain_sdpa(q, k, v, mask, softcap=None):
    """Plain torch in the input dtype under ``mask`` (new queries at the end): its SDPA, or (it
    cannot cap) the soft-capped scores written out."""
    import torch
    import torch.nn.functional as F

    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.repeat_interleave(r, dim=2).transpose(1, 2) for x, r in ((q, 1), (k, rep), (v, rep)))
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = (torch.tanh(s / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2)


def _errors(parts, q, k, v, context: int, dtype, window=None, softcap=None
            ) -> tuple[float, float, float]:
    """Max |error| of this rank's outputs against fp64 single-process attention under the same
    mask (causal, and the window) and soft-cap, next to plain torch's in the same dtype, and the
    reference's max |value|: ``(err, plain_err, ref_absmax)``."""
    from tokenloom.kernels.reference import attention_with_lse

    err = plain_err = absmax = 0.0
    for a, b, out in parts:
        if a == b:
            continue
        kd, vd = k[:, :context + b], v[:, :context + b]  # bottom-right: the queries end the keys
        vis = _visible(b - a, context + b, window)
        ref, _ = attention_with_lse(q[:, a:b].double(), kd.double(), vd.double(), causal=False,
                                    mask=vis, softcap=softcap)
        plain = _plain_sdpa(q[:, a:b].to(dtype), kd.to(dtype), vd.to(dtype), vis, softcap).double()
        err = max(err, float((out.double() - ref).abs().max()))
        plain_err = max(plain_err, float((plain - ref).abs().max()))
        absmax = max(absmax, float(ref.abs().max()))
    return err, plain_err, absmax


# ---------------------------------------------------------------------------- the CLI side
def add_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--context", type=parse_tokens, default=65536,
                   help="cached tokens before the first step (4096, 64K, 1M; any count)")
    a.add_argument("--new-tokens", type=arg_int(1, 1_000_000), default=32, help="decode steps")
    a.add_argument("--step-tokens", type=arg_int(1, 1_000_000), default=1,
                   help="new tokens per step (1: decode; more: chunked prefill)")
    a.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="gather: pass-Q gather/scatter; ring: pass-Q ring (TokenRing); passkv: the "
                        "cache travels; auto: chosen from the shape")
    a.add_argument("--queries", choices=("replicated", "sharded"), default="replicated",
                   help="replicated: every rank passes all new tokens (decode, as HF generation); "
                        "sharded: each rank its part of each step (chunked prefill)")
    a.add_argument("--window", type=arg_window, default=None, metavar="LEFT[,RIGHT]",
                   help=WINDOW_HELP + "; decode is causal, so RIGHT changes nothing; a rank whose "
                        "whole cache share is outside the window reads nothing")
    a.add_argument("--softcap", type=arg_float(0.0, lo_open=True), default=None, metavar="C",
                   help="soft-cap the scores to C * tanh(s / C) (Gemma 2 uses 50); --check compares "
                        "with fp64 under the same cap")
    add_shape_flags(a)
    add_report_flags(a)


def config_from_args(args: argparse.Namespace) -> DecodeRun:
    cfg = DecodeRun(context=args.context, new_tokens=args.new_tokens, step_tokens=args.step_tokens,
                    strategy=args.strategy, queries=args.queries, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, batch=args.batch, dtype=args.dtype, check=args.check,
                    seed=args.seed, window=args.window, softcap=args.softcap)
    cfg.validate(args.world_size)
    return cfg


def combine(results: list[dict], cfg: DecodeRun) -> dict:
    first = results[0]
    rep = {"strategy": first["strategy"], "world_size": len(results), "device": first["device"],
           "backend": first["backend"], "config": {**asdict(cfg), "dtype": first["dtype"]},
           **{key: [r[key] for r in results] for key in
              ("local_tokens", "step_ms", "attention_ms", "comm_ms")}}
    if "cache_check" in first:
        from tokenloom.kernels.reference import tolerance

        err, plain, absmax = (max(r["out_check"][i] for r in results if "out_check" in r)
                              for i in range(3))
        tol = tolerance(torch_dtype(first["dtype"]), plain, absmax)
        rep["check"] = {"out": {"max_abs_err": err, "plain_torch_err": plain, "tolerance": tol,
                                "ok": err <= tol},
                        "cache": first["cache_check"]}
    return rep


def report(results: list[dict], args: argparse.Namespace) -> int:
    return emit_report(combine(results, config_from_args(args)), args.json, _print_report)


def _print_report(rep: dict, out=None) -> None:
    out = out or sys.stdout
    cfg = rep["config"]
    print(f"{rep['strategy']} decode on {rep['world_size']} rank(s) ({rep['backend']}, "
          f"{rep['device']}): context {cfg['context']}, {cfg['new_tokens']} steps of "
          f"{cfg['step_tokens']} token(s) ({cfg['queries']} queries), "
          f"heads {cfg['heads']}/{cfg['kv_heads'] or cfg['heads']}, "
          f"head_dim {cfg['head_dim']}, batch {cfg['batch']}, {cfg['dtype']}", file=out)
    print(f"{'rank':>4}  {'cached':>9}  {'step ms':>8}  {'attention':>9}  {'comm':>7}", file=out)
    for r in range(rep["world_size"]):
        print(f"{r:>4}  {rep['local_tokens'][r]:>9}  {rep['step_ms'][r]:8.2f}  "
              f"{rep['attention_ms'][r]:9.2f}  {rep['comm_ms'][r]:7.2f}", file=out)
    for name, c in rep.get("check", {}).items():
        plain = f"{c['plain_torch_err']:.2e}" if c["plain_torch_err"] is not None else "-"
        print(f"  check {name:<5} max|err| {c['max_abs_err']:.2e}  plain torch {plain:>8}  "
              f"tolerance {c['tolerance']:.2e}  {'ok' if c['ok'] else 'FAILED'}", file=out)
