"""Predicted vs measured wall time of the real runtime on 2 and 4 local CPU ranks.

The measured side runs ``tokenloom.parallel`` (TokenRing, Ring, Ulysses) under
``tokenloom.comm.launch.local.spawn_ranks`` (fork, gloo, one thread per rank); each rank times the
forward (and forward+backward) of one attention call after a warm-up, and the slowest rank's
median of ``--repeats`` counts (the calibration takes medians too). The predicted side simulates
the same schedules with the ``local-cpu`` profile (``tokenloom simulate calibrate`` writes it;
``--calibrate`` measures a fresh one first).

    python benchmarks/bench_calibration.py [--calibrate] [--repeats 5] [--seq 4096] [--heads 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from tokenloom.comm.launch.local import spawn_ranks
from tokenloom.common.vocab import STRATEGIES
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import PROFILE_ENV, cpu_profile_path, make_cluster
from tokenloom.simulator.scenario import simulate_attention


def _run_rank(rank: int, world_size: int, strategy: str, seq: int, heads: int, head_dim: int,
              causal: bool, backward: bool, repeats: int) -> float:
    import torch.distributed as dist

    from tokenloom.parallel import ring_attention, token_ring_attention, ulysses_attention

    fn = {"tokenring": token_ring_attention, "ring": ring_attention, "ulysses": ulysses_attention}[strategy]
    gen = torch.Generator().manual_seed(rank)
    local = seq // world_size
    q, k, v = (torch.randn(1, local, heads, head_dim, generator=gen, requires_grad=backward)
               for _ in range(3))
    times = []
    for i in range(repeats + 1):  # the first call warms up (and builds the schedule)
        dist.barrier()
        t0 = time.perf_counter()
        out = fn(q, k, v, causal=causal, layout="zigzag")
        if backward:
            out.sum().backward()
        elapsed = time.perf_counter() - t0
        if i:
            times.append(elapsed)
    return float(sorted(times)[len(times) // 2])


def measure(world_size: int, strategy: str, shape: AttentionShape, causal: bool, backward: bool,
            repeats: int) -> float:
    times = spawn_ranks(world_size, _run_rank, strategy, shape.seq_len, shape.num_heads, shape.head_dim,
                        causal, backward, repeats, timeout=600)
    return max(times)


def predict(world_size: int, strategy: str, shape: AttentionShape, causal: bool, backward: bool) -> float:
    cluster = make_cluster("local-cpu", world_size)
    return simulate_attention(strategy, cluster, shape, causal=causal, backward=backward).total_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibrate", action="store_true", help="measure a fresh local-cpu profile first")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    args = p.parse_args(argv)
    if args.calibrate:
        from tokenloom.simulator.calibrate import calibrate

        path = os.path.join(tempfile.mkdtemp(prefix="tokenloom-cal-"), "local-cpu.json")
        calibrate(path)
        os.environ[PROFILE_ENV] = path
    print(f"profile: {cpu_profile_path() if cpu_profile_path().is_file() else 'shipped default'}; "
          f"seq {args.seq}, heads {args.heads}, head_dim {args.head_dim}, fp32, causal, zigzag; "
          f"{os.cpu_count()} cores")
    shape = AttentionShape(args.seq, args.heads, args.head_dim, dtype_bytes=4)
    print("| ranks | strategy | pass | predicted ms | measured ms | predicted/measured |")
    print("|---|---|---|---|---|---|")
    for n in args.ranks:
        for strategy in args.strategies:
            for backward in (False, True):
                pred = predict(n, strategy, shape, True, backward)
                meas = measure(n, strategy, shape, True, backward, args.repeats)
                label = "fwd+bwd" if backward else "fwd"
                print(f"| {n} | {strategy} | {label} | {pred * 1e3:.1f} | {meas * 1e3:.1f} | {pred / meas:.2f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
