"""``tokenloom run drill``: a fault drill for the launchers (and their tests).

Every rank walks ``steps`` steps; each step is a ring exchange with both neighbours and an
all-reduce, then ``step_ms`` of sleep. One rank (``fail_rank``) can misbehave at ``fail_at``:
``kill`` (SIGKILL itself), ``stop`` (SIGSTOP itself; with ``reap_after_s`` a helper process kills
it later so nothing is left behind), ``raise`` (an exception), ``skip`` (leave the schedule early,
as a rank that skips a call) or ``hang`` (sleep forever outside any transfer, heartbeat alive).
The other ranks must then fail within ``--timeout`` naming it; see docs/launch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from tokenloom.commands.args import arg_float, arg_int

MODES = ("none", "kill", "stop", "raise", "skip", "hang")


@dataclass(frozen=True)
class Drill:
    steps: int = 20
    step_ms: float = 20.0
    fail_rank: int = -1
    fail_at: int = 5
    mode: str = "none"
    reap_after_s: float = 0.0
    first_attempt_only: bool = False  # misbehave only in torchrun's first attempt (--max-restarts)
    mark_file: str = ""  # the misbehaving rank writes time.time() here first (for benchmarks)


def _misbehave(cfg: Drill) -> bool:
    """Do the configured fault; True when the rank should leave the schedule."""
    if cfg.mark_file:
        with open(cfg.mark_file, "w") as f:
            f.write(repr(time.time()))
    if cfg.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif cfg.mode == "stop":
        if cfg.reap_after_s > 0:  # a stopped process cannot clean up after itself
            subprocess.Popen(["sh", "-c", f"sleep {cfg.reap_after_s}; kill -9 {os.getpid()} 2>/dev/null"],
                             start_new_session=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif cfg.mode == "raise":
        raise RuntimeError(f"drill: rank {cfg.fail_rank} raises at step {cfg.fail_at} on purpose")
    elif cfg.mode == "hang":
        while True:
            time.sleep(1)
    return cfg.mode == "skip"


def _this_attempt(cfg: Drill) -> bool:
    return not cfg.first_attempt_only or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def job(comm, cfg: Drill) -> dict:
    """Ring exchange + all-reduce per step; returns the all-reduced sums (checkable by anyone)."""
    import torch

    from tokenloom.comm import health
    from tokenloom.comm.communicator import P2P

    rank, n = comm.rank, comm.world_size
    sums = []
    for s in range(cfg.steps):
        health.set_step(f"drill step {s}")
        if rank == cfg.fail_rank and s == cfg.fail_at and _this_attempt(cfg) and _misbehave(cfg):
            break
        mine = torch.full((4,), float(rank + s))
        left, right = torch.empty(4), torch.empty(4)
        comm.batch_p2p([P2P("send", (rank + 1) % n, mine), P2P("send", (rank - 1) % n, mine),
                        P2P("recv", (rank - 1) % n, left), P2P("recv", (rank + 1) % n, right)],
                       what=f"drill step {s} ring").wait()
        total = comm.all_reduce(torch.tensor([float(rank + s)]), what=f"drill step {s} all_reduce")
        sums.append(total.item() + left[0].item() - right[0].item())
        time.sleep(cfg.step_ms / 1e3)
    return {"rank": rank, "sums": sums, "pid": os.getpid()}


def expected(cfg: Drill, world_size: int, rank: int) -> list[float]:
    """What ``job`` returns on ``rank`` when nobody misbehaves (for tests)."""
    n = world_size
    return [sum(r + s for r in range(n)) + ((rank - 1) % n) - ((rank + 1) % n)
            for s in range(cfg.steps)]


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=arg_int(1, 10**6), default=20, help="steps per rank")
    p.add_argument("--step-ms", type=arg_float(0, 60_000), default=20.0, help="sleep per step (ms)")
    p.add_argument("--fail-rank", type=arg_int(-1), default=-1, help="rank that misbehaves (-1: none)")
    p.add_argument("--fail-at", type=arg_int(0), default=5, help="step at which it misbehaves")
    p.add_argument("--mode", choices=MODES, default="none", help="how it misbehaves")
    p.add_argument("--reap-after", type=arg_float(0, 3600), default=0.0,
                   help="with --mode stop: kill the stopped rank after this many seconds (0: never)")
    p.add_argument("--first-attempt-only", action="store_true",
                   help="misbehave only in torchrun's first attempt (to see --max-restarts recover)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def config_from_args(args: argparse.Namespace) -> Drill:
    from tokenloom.common.errors import UsageError

    if args.fail_rank >= args.world_size:
        raise UsageError(f"--fail-rank ({args.fail_rank}) must be below the world size "
                         f"({args.world_size})", field="fail_rank")
    return Drill(steps=args.steps, step_ms=args.step_ms, fail_rank=args.fail_rank,
                 fail_at=args.fail_at, mode=args.mode, reap_after_s=args.reap_after,
                 first_attempt_only=args.first_attempt_only)


def report(results: list[dict], args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    ok = all(r["sums"] == expected(cfg, len(results), i) for i, r in enumerate(results))
    if args.json:
        print(json.dumps({"world_size": len(results), "steps": cfg.steps, "ok": ok}))
    else:
        print(f"drill on {len(results)} rank(s): {cfg.steps} steps, results {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1
