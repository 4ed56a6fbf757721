"""GEMM time by shape: wave quantisation plus a fixed cost per output tile, fitted to measured rows.

``t = launch + max(2 M N K / (F * GEMM_EFF * K / (K + GEMM_K_HALF) * util), bytes / HBM)`` with

- ``util = tiles / (waves * SMs)`` over ``tiles = ceil(M / 64) * ceil(N / 128)`` output tiles
  (:data:`GEMM_TILE`) in ``waves = ceil(tiles / SMs)``: a part-empty last wave costs a full one;
- ``K / (K + GEMM_K_HALF)``: each output tile pays a fixed prologue/epilogue worth
  ``GEMM_K_HALF`` steps of its K loop (loading the first operands, writing the result), so a short
  K (the O projection under TP 8: K = 1024) runs below a long one (K = 8192);
- ``F`` the dense bf16 peak of the catalog (989 TFLOP/s on H100/H200), ``GEMM_EFF`` the share a
  long-K, full-wave GEMM reaches.

Where the numbers come from: 44 rows measured on one NVIDIA H200 (torch 2.11 ``x @ w``, bf16, CUDA
events, median of 5; ``python benchmarks/gpu_shapes.py``, 2026-12-04): the four projections of one
Llama-3.3-70B layer at TP 8 for 128..32768 tokens (docs/calibration.md, ``h200-gemm-*`` rows). A
grid search over (efficiency, K half, tile, fixed cost) minimising the worst relative error
(:func:`fit_gemm_curve`; ``tests/simulator/test_simulator_gemm.py`` reruns it on those rows) gave
``GEMM_EFF`` 0.88, ``GEMM_K_HALF`` 256 and 64 x 128 tiles: worst 16.5 %, median 6.4 %. Each row was
timed as one call between two CUDA events, so the GPU also waits for the host to dispatch it:
that fixed cost (:data:`TIMED_CALL_S`, 18 us, fitted with the rest) is part of what those rows
measured but not of a kernel queued behind others, which pays ``launch_s`` (5 us). The H100 has the
H200's SMs and clocks (its HBM differs), so the curve is used for both; for the A100 and others it
is an extrapolation checked only against one best-shape row each (docs/calibration.md).
"""

from __future__ import annotations

import itertools
import math

GEMM_EFF = 0.88
GEMM_K_HALF = 256.0
GEMM_TILE = (64, 128)
TIMED_CALL_S = 18e-6


def gemm_efficiency(m: int, n: int, k: int, sms: int, tile: tuple[int, int] = GEMM_TILE) -> float:
    """Share of dense peak an ``m x n x k`` GEMM reaches on ``sms`` SMs (module docstring)."""
    tiles = math.ceil(m / tile[0]) * math.ceil(n / tile[1])
    if tiles == 0 or k == 0:
        return GEMM_EFF
    util = tiles / (math.ceil(tiles / sms) * sms)
    return GEMM_EFF * k / (k + GEMM_K_HALF) * util


def gemm_seconds(dev, m: int, n: int, k: int, *, sms: int | None = None, groups: int = 1, dtype_bytes: int = 2,
                 tile: tuple[int, int] = GEMM_TILE, call_s: float | None = None,
                 curve: tuple[float, float] = (GEMM_EFF, GEMM_K_HALF)) -> float:
    """One (grouped) ``m x n x k`` GEMM on ``sms`` of ``dev``'s SMs (all by default): ``call_s``
    (``dev.launch_s`` unless given) + the larger of compute at :func:`gemm_efficiency` and the
    bytes of A, B and C over HBM. A grouped GEMM's ``groups`` problems share the waves. Running on
    fewer SMs (some lent to a communication kernel) means more waves at the same per-tile rate."""
    used = sms or dev.sms
    flops = 2.0 * groups * m * n * k
    nbytes = groups * (m * k + k * n + m * n) * dtype_bytes
    tiles = groups * math.ceil(m / tile[0]) * math.ceil(n / tile[1])
    if tiles == 0:
        compute = 0.0
    else:  # per-tile rate of a full wave on all SMs, times the waves this many tiles need on `used`
        eff, k_half = curve
        rate = dev.flops * eff * k / (k + k_half) / dev.sms  # FLOP/s of one SM
        compute = math.ceil(tiles / used) * (flops / tiles) / rate
    fixed = dev.launch_s if call_s is None else call_s
    return fixed + max(compute, nbytes / dev.hbm_bw)


# The grid :func:`fit_gemm_curve` searches (the one the constants above came from).
FIT_EFF = tuple(round(0.76 + 0.01 * i, 2) for i in range(20))
FIT_K_HALF = (0.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
FIT_TILES = ((64, 128), (128, 128), (128, 256))
FIT_CALL_S = tuple(round(1e-6 * t, 7) for t in range(10, 34, 2))


def fit_gemm_curve(dev, rows: list[tuple[int, int, int, float]]) -> tuple[dict, float]:
    """Fit (efficiency, K half, tile, one-call fixed cost) to ``rows`` of (m, n, k, TFLOP/s timed as
    one call) on ``dev`` by a grid minimising the worst relative error: (fit, worst error)."""
    best: tuple[float, dict] = (math.inf, {})
    for eff, k_half, tile, call in itertools.product(FIT_EFF, FIT_K_HALF, FIT_TILES, FIT_CALL_S):
        worst = 0.0
        for m, n, k, tflops in rows:
            t = gemm_seconds(dev, m, n, k, tile=tile, call_s=call, curve=(eff, k_half))
            worst = max(worst, abs(2.0 * m * n * k / t / 1e12 / tflops - 1))
            if worst >= best[0]:
                break
        if worst < best[0]:
            best = (worst, {"eff": eff, "k_half": k_half, "tile": tile, "call_s": call})
    return best[1], best[0]
