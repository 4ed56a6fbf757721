"""``tokenloom run attention``: sequence-parallel attention on real ranks, timed and checked.

A job for :func:`tokenloom.comm.launch.run_job`: every rank builds the same full random tensors (one
seed), keeps its shard, runs forward (+ backward) ``iters`` times after a warm-up and returns its
median times; with ``check`` rank 0 also compares the gathered results with the fp64
single-process reference. The same job runs under torchrun, forked local ranks and Ray actors.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from tokenloom.common.errors import UsageError
from tokenloom.common.vocab import AUTO, PREFERRED_LAYOUTS, STRATEGY_CHOICES, Strategy
from tokenloom.jobs import add_report_flags, add_shape_flags, emit_report, torch_dtype
from tokenloom.commands.args import WINDOW_HELP, arg_int, arg_window, flag_error


@dataclass(frozen=True)
class AttentionRun:
    strategy: str = "tokenring"
    seq: int = 4096
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    batch: int = 1
    causal: bool = False
    layout: str = "zigzag"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU (decided on the rank)
    backward: bool = True
    check: bool = False
    iters: int = 3
    seed: int = 0
    window: tuple[int, int] | None = None  # (left, right), flash-attn's window_size; None: none

    def problem(self, world_size: int):
        """The run as the rules object sees it (:class:`~tokenloom.parallel.dims.AttentionProblem`)."""
        from tokenloom.parallel.dims import AttentionProblem

        return AttentionProblem.of(world_size=world_size, seq_len=self.seq, heads=self.heads,
                                   kv_heads=self.kv_heads, head_dim=self.head_dim, batch=self.batch,
                                   causal=self.causal, backward=self.backward, layout=self.layout,
                                   window_size=self.window)

    def validate(self, world_size: int, flags: dict[str, str] | None = None) -> None:
        """Raise UsageError naming the flag for a request that cannot run on ``world_size`` ranks:
        the API's own rules (:class:`~tokenloom.parallel.dims.ParallelDims`) with the flag in front
        (``flags`` maps a rule's field to another flag, e.g. the demo's ``--world-size``)."""
        for name in ("seq", "heads", "head_dim", "batch", "iters"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        flags = {"window_size": "--window", **(flags or {})}
        try:
            problem = self.problem(world_size)
            problem.dims(Strategy.TOKENRING if self.strategy == AUTO else self.strategy).dense_chunk_len(self.seq)
        except UsageError as exc:
            raise flag_error(exc, flags) from None
        hkv = self.heads if self.kv_heads is None else self.kv_heads
        elements = self.batch * self.seq * (2 * self.heads + 2 * hkv) * self.head_dim
        if elements > 2**34:  # the full inputs are built on every rank (same seed everywhere)
            raise UsageError(f"--seq/--heads/--head-dim/--batch: {elements:.3g} input elements "
                             f"exceed the limit of 2^34 (every rank builds the full inputs)",
                             field="seq")



def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _strategy(cfg: AttentionRun, world_size: int, dtype) -> str:
    if cfg.strategy != "auto":
        return cfg.strategy
    import torch

    from tokenloom.simulator import choose_strategy

    problem = dataclasses.replace(cfg.problem(world_size), dtype_bytes=torch.finfo(dtype).bits // 8)
    strategy, _ = choose_strategy(problem)
    return strategy


def job(comm, cfg: AttentionRun) -> dict:
    """One rank's part: its median forward/backward ms (and rank 0's check against fp64)."""
    import torch

    from tokenloom.comm import health
    from tokenloom.parallel import gather_sequence, shard_sequence, sp_attention

    rank, world_size, device = comm.rank, comm.world_size, comm.device
    dtype_name = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch_dtype(dtype_name)
    strategy = _strategy(cfg, world_size, dtype)
    hkv = cfg.kv_heads or cfg.heads
    gen = torch.Generator().manual_seed(cfg.seed)  # same full tensors on every rank
    shapes = [(cfg.batch, cfg.seq, cfg.heads, cfg.head_dim), (cfg.batch, cfg.seq, hkv, cfg.head_dim),
              (cfg.batch, cfg.seq, hkv, cfg.head_dim), (cfg.batch, cfg.seq, cfg.heads, cfg.head_dim)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    local = [shard_sequence(t, rank, world_size, cfg.layout).to(device, dtype) for t in full]
    fwd_ms, bwd_ms = [], []
    for it in range(cfg.iters + 1):  # the first iteration warms up
        q, k, v = (t.clone().requires_grad_(cfg.backward) for t in local[:3])
        health.set_step(f"attention iteration {it} forward")
        _sync(device)
        t0 = time.perf_counter()
        out, lse = sp_attention(q, k, v, strategy=strategy, causal=cfg.causal, layout=cfg.layout,
                                return_lse=True, window_size=cfg.window)
        _sync(device)
        t1 = time.perf_counter()
        if cfg.backward:
            health.set_step(f"attention iteration {it} backward")
            out.backward(local[3])
            _sync(device)
        t2 = time.perf_counter()
        if it:
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
    result: dict[str, Any] = {"rank": rank, "strategy": strategy, "device": str(device),
                              "backend": comm.backend, "dtype": dtype_name,
                              "forward_ms": statistics.median(fwd_ms),
                              "backward_ms": statistics.median(bwd_ms) if cfg.backward else None}
    if cfg.check:
        health.set_step("attention check: gather")
        outs = {"out": out.detach(), "lse": lse}
        if cfg.backward:
            outs.update(dq=q.grad, dk=k.grad, dv=v.grad)
        gathered = {name: gather_sequence(t, layout=cfg.layout, dim=2 if name == "lse" else 1).cpu()
                    for name, t in outs.items()}
        if rank == 0:
            health.set_step("attention check: fp64 reference")
            result["check"] = _check(gathered, full, cfg, device, dtype)
    return result


def _check(got: dict, full: list, cfg: AttentionRun, device, dtype) -> dict:
    """Max |error| of every result against fp64, next to plain torch's error in the same dtype."""
    from tokenloom.kernels.reference import attention_with_lse, tolerance, torch_sdpa

    q, k, v, dout = (t.double().requires_grad_(i < 3) for i, t in enumerate(full))
    vis = None if cfg.window is None else window_visible(cfg.seq, cfg.causal, cfg.window)
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=cfg.causal, mask=vis)
    refs = {"out": ref_out, "lse": ref_lse}
    if cfg.backward:
        ref_out.backward(dout)
        refs.update(dq=q.grad, dk=k.grad, dv=v.grad)
    ql, kl, vl = (t.detach().to(device, dtype).requires_grad_(cfg.backward) for t in (q, k, v))
    plain = {"out": torch_sdpa(ql, kl, vl, cfg.causal) if vis is None else _sdpa_masked(ql, kl, vl, vis.to(device))}
    if cfg.backward:
        plain["out"].backward(dout.to(device, dtype))
        plain.update(dq=ql.grad, dk=kl.grad, dv=vl.grad)
    checks = {}
    for name, ref in refs.items():
        err = (got[name].double() - ref.detach()).abs().max().item()
        base = (plain[name].detach().cpu().double() - ref.detach()).abs().max().item() if name in plain else 0.0
        tol = tolerance(dtype, base, ref.detach().abs().max().item())
        checks[name] = {"max_abs_err": err, "plain_torch_err": base if name in plain else None,
                        "tolerance": tol, "ok": err <= tol}
    return checks


def window_visible(seq: int, causal: bool, window: tuple[int, int], rows: int | None = None):
    """``(rows, seq)`` bool: query i sees key j, written out from positions (flash-attn's rule:
    ``i - left <= j <= i + right``, -1 unbounded, causal caps ``j <= i``), not from the library.
    The queries are the last ``rows`` positions (default all: a square; decode's new tokens end
    the keys)."""
    import torch

    rows = seq if rows is None else rows
    i = torch.arange(seq - rows, seq).unsqueeze(1)
    j = torch.arange(seq).unsqueeze(0)
    left, right = window
    vis = torch.ones(rows, seq, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def _sdpa_masked(q, k, v, vis):
    """torch's SDPA with a boolean mask in the input dtype (BSHD, GQA by repetition): plain
    torch's error for the same windowed attention."""
    import torch

    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=vis)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------- the CLI side
def add_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--strategy", choices=STRATEGY_CHOICES, default="tokenring",
                   help="'auto' asks the simulator's advisor for this shape (its window too)")
    a.add_argument("--seq", type=arg_int(1), default=4096, help="global sequence length (tokens)")
    add_shape_flags(a)
    a.add_argument("--causal", action="store_true", help="causal mask over the global sequence")
    a.add_argument("--layout", choices=PREFERRED_LAYOUTS, default="zigzag",
                   help="how the sequence is cut over ranks (zigzag balances causal work)")
    a.add_argument("--window", type=arg_window, default=None, metavar="LEFT[,RIGHT]",
                   help=WINDOW_HELP + "; --check compares with the fp64 reference under the same mask")
    a.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    a.add_argument("--iters", type=arg_int(1, 10_000), default=3, help="timed iterations after one warm-up")
    add_report_flags(a)


def config_from_args(args: argparse.Namespace) -> AttentionRun:
    cfg = AttentionRun(strategy=args.strategy, seq=args.seq, heads=args.heads, kv_heads=args.kv_heads,
                       head_dim=args.head_dim, batch=args.batch, causal=args.causal, layout=args.layout,
                       dtype=args.dtype, backward=not args.forward_only, check=args.check,
                       iters=args.iters, seed=args.seed, window=args.window)
    cfg.validate(args.world_size)
    return cfg


def combine(results: list[dict], cfg: AttentionRun) -> dict:
    """One report from every rank's result (the JSON that ``--json`` prints)."""
    first = results[0]
    report = {"strategy": first["strategy"], "world_size": len(results), "device": first["device"],
              "backend": first["backend"], "config": {**asdict(cfg), "dtype": first["dtype"]},
              "forward_ms": [r["forward_ms"] for r in results],
              "backward_ms": [r["backward_ms"] for r in results] if cfg.backward else None}
    if "check" in first:
        report["check"] = first["check"]
    return report


def report(results: list[dict], args: argparse.Namespace) -> int:
    return emit_report(combine(results, config_from_args(args)), args.json, _print_report)


def _print_report(rep: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time: tests (and Ray) replace sys.stdout
    cfg = rep["config"]
    n = rep["world_size"]
    hkv = cfg["kv_heads"] or cfg["heads"]
    print(f"{rep['strategy']} attention on {n} rank(s) ({rep['backend']}, {rep['device']}): "
          f"seq {cfg['seq']} ({cfg['seq'] // n}/rank), heads {cfg['heads']}/{hkv}, "
          f"head_dim {cfg['head_dim']}, batch {cfg['batch']}, {cfg['dtype']}, "
          f"{'causal' if cfg['causal'] else 'non-causal'}, layout {cfg['layout']}"
          + (f", window {tuple(cfg['window'])}" if cfg.get("window") else ""), file=out)
    print(f"{'rank':>4}  {'forward ms':>11}  {'backward ms':>11}", file=out)
    for r in range(n):
        bwd = f"{rep['backward_ms'][r]:11.1f}" if rep["backward_ms"] else f"{'-':>11}"
        print(f"{r:>4}  {rep['forward_ms'][r]:11.1f}  {bwd}", file=out)
    if "check" in rep:
        print("check against the fp64 single-process reference (plain torch in the same dtype "
              "shown for scale):", file=out)
        for name, c in rep["check"].items():
            plain = f"{c['plain_torch_err']:.2e}" if c["plain_torch_err"] is not None else "-"
            print(f"  {name:<4} max|err| {c['max_abs_err']:.2e}  plain torch {plain:>8}  "
                  f"tolerance {c['tolerance']:.2e}  {'ok' if c['ok'] else 'FAILED'}", file=out)
