"""Calibrate the ``local-cpu`` profile: measure this machine so the simulator predicts CPU runs.

What is measured, in forked ranks with one intra-op thread each (as ``tokenloom.comm.launch.local`` runs
the runtime), one rank per core measuring at the same time:

- attention FLOP/s, forward with ``tokenloom.kernels.reference.attention_with_lse`` and backward
  with ``attention_backward``, on blocks shaped like the runtime's, FLOPs counted as in
  :mod:`tokenloom.simulator.cost` (so the rate is in the cost model's own units), and the fixed
  cost of one call (a tiny call's time: Python and dispatch overhead);
- memory bandwidth: an in-place add over 64 MiB tensors (reads two, writes one);
- gloo over loopback between two forked ranks: a ping-pong at several message sizes; bandwidth from
  a least-squares fit of ``one_way = latency + bytes / bandwidth`` (the alpha-beta model), latency
  from the smallest message.

The result is a hardware-file entry named ``local-cpu`` (fabric ``bus``: all transfers share the
host), written atomically to ``cpu_profile_path()`` unless another path is given.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from typing import Callable

import numpy as np

from tokenloom.common.files import atomic_write, resolve_output
from tokenloom.simulator.hardware import LOCAL_CPU, Device, Link, NodeSpec, node_to_dict

_PING_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24)  # bytes


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median of ``repeats`` timed calls after a warm-up: the typical time, as runs see it (the best
    of a few is too optimistic on a shared or virtual machine, where identical calls vary ~2x).
    Seconds, on the host clock: the CPU twin of ``calibrate_gpu.time_ms``; benchmarks use it too."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _compute_rank(rank: int, world_size: int, chunks: tuple[int, ...], heads: int, head_dim: int,
                  repeats: int) -> dict:
    """One rank's kernel times on blocks shaped like the runtime's, per chunk size ``c``: a c x c
    full block plus a causal c x 2c block. FLOPs are counted as the cost model counts them
    (4 c^2 H d full, 2 c^2 H d diagonal)."""
    import torch

    from tokenloom.kernels.reference import attention_backward, attention_delta, attention_with_lse

    gen = torch.Generator().manual_seed(rank)
    tiny = [torch.randn(1, 16, heads, head_dim, generator=gen) for _ in range(3)]
    launch = median_time(lambda: attention_with_lse(*tiny), repeats * 3)
    rows = []  # (flops, forward s, backward s) per chunk size
    for c in chunks:
        q, dout = (torch.randn(1, c, heads, head_dim, generator=gen) for _ in range(2))
        k, v = (torch.randn(1, 2 * c, heads, head_dim, generator=gen) for _ in range(2))
        fwd = bwd = 0.0
        for kb, vb, causal in ((k[:, :c], v[:, :c], False), (k, v, True)):
            fwd += median_time(lambda: attention_with_lse(q, kb, vb, causal=causal), repeats) - launch
            out, lse = attention_with_lse(q, kb, vb, causal=causal)
            delta = attention_delta(out, dout)
            bwd += median_time(lambda: attention_backward(dout, q, kb, vb, lse, delta, causal=causal),
                              repeats) - launch
        rows.append((10.0 * c * c * heads * head_dim, fwd, bwd))
    a, b = torch.ones(1 << 23), torch.ones(1 << 23)  # 32 MiB each
    add = median_time(lambda: a.add_(b), repeats)
    return {"launch_s": launch, "mem_bw": 3 * a.numel() * 4 / add, "rows": rows}


def measure_compute(chunks: tuple[int, ...] = (256, 512, 1024, 2048), heads: int = 4, head_dim: int = 64,
                    repeats: int = 3, ranks: int | None = None, timeout: float = 300.0) -> dict:
    """Kernel rates while ``ranks`` (default: every core) forked ranks measure at once, so shared
    caches and memory bandwidth are in the numbers as in real runs; rank times averaged, then
    pooled over the chunk sizes (total FLOPs / total seconds)."""
    from tokenloom.comm.launch.local import spawn_ranks

    ranks = ranks or os.cpu_count() or 1
    per_rank = spawn_ranks(ranks, _compute_rank, tuple(chunks), heads, head_dim, repeats, timeout=timeout)
    rows = np.mean([np.asarray(r["rows"]) for r in per_rank], axis=0)
    flops = rows[:, 0].sum()
    return {"fwd_flops": flops / rows[:, 1].sum(), "bwd_flops": 2.5 * flops / rows[:, 2].sum(),
            "launch_s": float(np.mean([r["launch_s"] for r in per_rank])),
            "mem_bw": float(np.mean([r["mem_bw"] for r in per_rank])), "chunks": list(chunks),
            "rows": rows.tolist()}


def _ping_pong(rank: int, world_size: int, sizes: tuple[int, ...], repeats: int) -> list[float]:
    import torch
    import torch.distributed as dist

    times = []
    for size in sizes:
        buf = torch.zeros(size // 4)
        best = float("inf")
        for _ in range(repeats + 1):  # the first round trip also sets up the connection
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            best = min(best, time.perf_counter() - t0)
        times.append(best / 2)
    return times


def measure_gloo(sizes: tuple[int, ...] = _PING_SIZES, repeats: int = 5, timeout: float = 120.0
                 ) -> dict:
    """Latency (s) and bandwidth (bytes/s) of one gloo transfer between two local ranks."""
    from tokenloom.comm.launch.local import spawn_ranks

    one_way = spawn_ranks(2, _ping_pong, tuple(sizes), repeats, timeout=timeout)[0]
    slope, _ = np.polyfit(np.asarray(sizes, dtype=float), np.asarray(one_way), 1)
    bw = 1.0 / max(float(slope), 1e-12)
    # The fitted intercept is dominated by the large messages' noise; the smallest message is
    # almost pure latency, so take the latency from it.
    latency = one_way[0] - sizes[0] / bw
    return {"latency_s": max(float(latency), 1e-6), "bw": bw,
            "samples": dict(zip(map(int, sizes), map(float, one_way)))}


def profile_from(compute: dict, gloo: dict, cores: int | None = None) -> NodeSpec:
    """The ``local-cpu`` node spec from measurements (FLOP/s measured are taken as achieved)."""
    for name, value in (("forward FLOP/s", compute["fwd_flops"]), ("backward FLOP/s", compute["bwd_flops"]),
                        ("memory bandwidth", compute["mem_bw"]), ("gloo bandwidth", gloo["bw"])):
        if not (math.isfinite(value) and value > 0):  # timer noise beat the work: not the user's input
            raise RuntimeError(f"calibration measured {name} = {value!r}; the timings were too noisy "
                               f"(launch overhead larger than the kernels?): rerun on a quieter machine")
    device = Device(LOCAL_CPU, 1, compute["fwd_flops"], compute["mem_bw"], 1.0,
                    compute["bwd_flops"] / compute["fwd_flops"], compute["launch_s"])
    link = Link(gloo["bw"], gloo["latency_s"])
    return NodeSpec(LOCAL_CPU, device, 64, "bus", link=link, nic=replace(link),
                    host_cores=cores or os.cpu_count() or 1)


def measure_profile(*, quick: bool = False) -> dict:
    """Measure this machine: the ``local-cpu`` hardware-file entry (with the raw measurements)."""
    compute = measure_compute((128, 256, 512) if quick else (256, 512, 1024, 2048), repeats=1 if quick else 3)
    gloo = measure_gloo(_PING_SIZES[:4] if quick else _PING_SIZES, repeats=3 if quick else 5)
    entry = node_to_dict(profile_from(compute, gloo))
    entry["measured"] = {"compute": compute, "gloo": gloo, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return entry


def write_profile(entry: dict, path: str | os.PathLike) -> None:
    """Write ``entry`` as the hardware file ``{"local-cpu": entry}`` (atomically)."""
    with atomic_write(path, "w") as handle:
        json.dump({LOCAL_CPU: entry}, handle, indent=2, allow_nan=False)


def calibrate(out_path: str | os.PathLike, *, quick: bool = False) -> dict:
    """Measure, write the profile atomically to ``out_path``, and return what was written."""
    resolve_output(out_path, "out_path")  # before measuring: fail fast on an unusable path
    entry = measure_profile(quick=quick)
    write_profile(entry, out_path)
    return entry
