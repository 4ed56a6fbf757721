"""``tokenloom run attention``: sequence-parallel attention on real ranks, timed and checked.

Under torchrun every process runs this command as one rank (NCCL on GPUs, gloo on CPU); without
torchrun, ``--launcher local`` forks ``--world-size`` CPU ranks over gloo on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from tokenloom.comm.communicator import Communicator
from tokenloom.comm.launch import init_from_env, under_torchrun
from tokenloom.comm.topology import chunks_of_rank

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


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
    dtype: str = "fp32"
    backward: bool = True
    check: bool = False
    iters: int = 3
    seed: int = 0

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the flag for a request that cannot run on ``world_size`` ranks."""
        for name in ("seq", "heads", "head_dim", "batch", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        hkv = self.kv_heads or self.heads
        if hkv < 1 or self.heads % hkv:
            raise ValueError(f"--kv-heads ({hkv}) must divide --heads ({self.heads})")
        per = len(chunks_of_rank(0, world_size, self.layout)) * world_size
        if self.seq % per:
            raise ValueError(f"--seq ({self.seq}) must be a multiple of {per} "
                             f"({'2 * ' if self.layout == 'zigzag' else ''}world_size) for layout "
                             f"{self.layout}")
        if self.strategy == "ulysses" and self.heads % world_size:
            raise ValueError(f"--heads ({self.heads}) must be divisible by the world size "
                             f"({world_size}) for --strategy ulysses")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_rank(rank: int, world_size: int, cfg: AttentionRun, device: torch.device | None = None,
                   threads_note: str = "") -> dict:
    """One rank's part of ``run attention``; returns rank 0's report (others return timings)."""
    from tokenloom.kernels.reference import attention_with_lse
    from tokenloom.parallel import gather_sequence, shard_sequence, sp_attention

    device = device or torch.device("cpu")
    dtype = DTYPES[cfg.dtype]
    strategy = cfg.strategy
    if strategy == "auto":
        from tokenloom.simulator import choose_strategy

        strategy, _ = choose_strategy(world_size=world_size, seq_len=cfg.seq, num_heads=cfg.heads,
                                      num_kv_heads=cfg.kv_heads or cfg.heads, head_dim=cfg.head_dim,
                                      causal=cfg.causal, dtype_bytes=torch.finfo(dtype).bits // 8,
                                      batch=cfg.batch, backward=cfg.backward, layout=cfg.layout)
    hkv = cfg.kv_heads or cfg.heads
    gen = torch.Generator().manual_seed(cfg.seed)  # same full tensors on every rank
    shapes = [(cfg.batch, cfg.seq, cfg.heads, cfg.head_dim), (cfg.batch, cfg.seq, hkv, cfg.head_dim),
              (cfg.batch, cfg.seq, hkv, cfg.head_dim), (cfg.batch, cfg.seq, cfg.heads, cfg.head_dim)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    local = [shard_sequence(t, rank, world_size, cfg.layout).to(device, dtype) for t in full]
    fwd_ms, bwd_ms = [], []
    for it in range(cfg.iters + 1):  # the first iteration warms up
        q, k, v = (t.clone().requires_grad_(cfg.backward) for t in local[:3])
        _sync(device)
        t0 = time.perf_counter()
        out, lse = sp_attention(q, k, v, strategy=strategy, causal=cfg.causal, layout=cfg.layout,
                                return_lse=True)
        _sync(device)
        t1 = time.perf_counter()
        if cfg.backward:
            out.backward(local[3])
            _sync(device)
        t2 = time.perf_counter()
        if it:
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
    times = torch.tensor([statistics.median(fwd_ms), statistics.median(bwd_ms)], dtype=torch.float64)
    times = Communicator().all_gather(times.to(device)).cpu()  # (world_size, 2)
    report = {"strategy": strategy, "world_size": world_size, "device": str(device),
              "backend": dist.get_backend() if dist.is_initialized() else "local",
              "config": asdict(cfg), "forward_ms": times[:, 0].tolist(),
              "backward_ms": times[:, 1].tolist() if cfg.backward else None}
    if cfg.check:
        results = {"out": out.detach(), "lse": lse}
        if cfg.backward:
            results.update(dq=q.grad, dk=k.grad, dv=v.grad)
        gathered = {name: gather_sequence(t, layout=cfg.layout, dim=2 if name == "lse" else 1).cpu()
                    for name, t in results.items()}
        if rank == 0:
            report["check"] = _check(gathered, full, cfg, device, attention_with_lse)
    return report


def _check(got: dict, full: list, cfg: AttentionRun, device, attention_with_lse) -> dict:
    """Max |error| of every result against fp64, next to plain torch's error in the same dtype."""
    from tokenloom.kernels.reference import torch_sdpa, tolerance

    dtype = DTYPES[cfg.dtype]
    q, k, v, dout = (t.double().requires_grad_(i < 3) for i, t in enumerate(full))
    ref_out, ref_lse = attention_with_lse(q, k, v, causal=cfg.causal)
    refs = {"out": ref_out, "lse": ref_lse}
    if cfg.backward:
        ref_out.backward(dout)
        refs.update(dq=q.grad, dk=k.grad, dv=v.grad)
    ql, kl, vl = (t.detach().to(device, dtype).requires_grad_(cfg.backward) for t in (q, k, v))
    plain = {"out": torch_sdpa(ql, kl, vl, cfg.causal)}
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


def _print_report(rep: dict, out=sys.stdout) -> None:
    cfg = rep["config"]
    n = rep["world_size"]
    hkv = cfg["kv_heads"] or cfg["heads"]
    print(f"{rep['strategy']} attention on {n} rank(s) ({rep['backend']}, {rep['device']}): "
          f"seq {cfg['seq']} ({cfg['seq'] // n}/rank), heads {cfg['heads']}/{hkv}, "
          f"head_dim {cfg['head_dim']}, batch {cfg['batch']}, {cfg['dtype']}, "
          f"{'causal' if cfg['causal'] else 'non-causal'}, layout {cfg['layout']}", file=out)
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


def _run_attention(args: argparse.Namespace) -> int:
    def config(default_dtype: str) -> AttentionRun:
        return AttentionRun(strategy=args.strategy, seq=args.seq, heads=args.heads,
                            kv_heads=args.kv_heads, head_dim=args.head_dim, batch=args.batch,
                            causal=args.causal, layout=args.layout, dtype=args.dtype or default_dtype,
                            backward=not args.forward_only, check=args.check, iters=args.iters,
                            seed=args.seed)

    launcher = args.launcher or ("torchrun" if under_torchrun() else "local")
    if launcher == "torchrun":
        rank, world, device = init_from_env(timeout_s=args.timeout)
        cfg = config("bf16" if device.type == "cuda" else "fp32")
        cfg.validate(world)
        try:
            rep = attention_rank(rank, world, cfg, device)
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        from tokenloom.comm.spawn import spawn_ranks

        if args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        cfg = config("fp32")
        cfg.validate(args.world_size)
        threads = max(1, (os.cpu_count() or 1) // args.world_size)
        rep = spawn_ranks(args.world_size, attention_rank, cfg, timeout=args.timeout,
                          threads=threads)[0]
    if args.json:
        print(json.dumps(rep))
    else:
        _print_report(rep)
    ok = all(c["ok"] for c in rep.get("check", {}).values())
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a parallel layer on real ranks (torchrun, or local CPU ranks)",
        description="Run a tokenloom layer on real ranks and time it. Under torchrun each process "
        "is one rank (NCCL on GPUs, gloo on CPU): 'torchrun --nproc-per-node 2 -m tokenloom run "
        "attention --check'. Without torchrun, --launcher local forks --world-size CPU ranks.")
    layers = p.add_subparsers(dest="layer", metavar="LAYER")
    layers.required = True
    a = layers.add_parser(
        "attention", help="sequence-parallel attention (TokenRing, Ring, Ulysses)",
        description="Sequence-parallel attention forward+backward on every rank with random "
        "inputs (the same seed everywhere), per-rank median times, and with --check the max error "
        "of out, lse, dq, dk, dv against the fp64 single-process reference. Exit 1 if a check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--strategy", choices=("tokenring", "ring", "ulysses", "auto"), default="tokenring",
                   help="'auto' asks the simulator's advisor for this shape")
    a.add_argument("--seq", type=int, default=4096, help="global sequence length (tokens)")
    a.add_argument("--heads", type=int, default=8, help="query heads")
    a.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--causal", action="store_true", help="causal mask over the global sequence")
    a.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag",
                   help="how the sequence is cut over ranks (zigzag balances causal work)")
    a.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="input dtype (default: bf16 on CUDA, fp32 on CPU); accumulation is fp32")
    a.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    a.add_argument("--check", action="store_true", help="compare with the fp64 reference")
    a.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--launcher", choices=("torchrun", "local"), default=None,
                   help="default: torchrun when its environment is set, else local")
    a.add_argument("--world-size", type=int, default=2, help="ranks for --launcher local")
    a.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a stuck transfer or rank is reported as an error")
    a.add_argument("--json", action="store_true", help="print one JSON object (rank 0 only)")
    a.set_defaults(func=_run_attention)

