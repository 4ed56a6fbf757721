"""``tokenloom simulate calibrate --device cuda``: measure this GPU into a hardware-file entry.

What is measured (CUDA events, median of a few calls after a warm-up), on one GPU:

- attention: ``tokenloom.kernels.block_attention`` (the runtime's dispatched kernel, the one the
  simulator prices) forward and forward+backward, causal and not, at sequence lengths 512..16K in
  the FlashAttention benchmark's shape (batch x seq = 16K, heads x head dim = 2048, head dim 128,
  bf16); TFLOP/s counted the FlashAttention way (4 b s^2 h d, half causal, backward 2.5x);
- GEMM: bf16 ``torch.matmul`` of n x n x n for n in 1K..8K; the best is taken as the achievable
  dense peak (``device.flops``), so the attention efficiencies are shares of what this GPU reaches;
- memory bandwidth: a copy of a 1 GiB tensor (read + write);
- GEMM shapes: the four Llama-3.3-70B TP8 projections at 128..32K tokens, one call at a time, fitted
  with :func:`tokenloom.simulator.gemm.fit_gemm_curve` and reported (``measured.gemm_curve``) beside
  the constants simulator/gemm.py prices with (informational: the catalog's curve is not per GPU).

Then :func:`fit_curve` fits the cost model's attention efficiency curve (``attn_eff_fwd/bwd``,
``attn_kv_half*``, ``attn_causal_eff``; :meth:`CostModel.shape_efficiency`) to the attention rows by
a grid over the half-rate key count (the same formula the engine uses, so what is fitted is what is priced). Links are
taken from the catalog entry this GPU maps to (one GPU cannot measure its NVLink), else NVSwitch
defaults. The entry is named ``this-gpu`` and loads with ``--hardware-file``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.simulator.cost import AttentionShape, CostModel
from tokenloom.simulator.hardware import CATALOG, Cluster, Device, Link, NodeSpec, node_to_dict

SEQS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIM = 128
GEMM_SIZES = (1024, 2048, 4096, 8192)
# --quick keeps one large GEMM: the peak is the best size, and 1-2K reach only ~40% of it on an H200
QUICK_GEMM_SIZES = (1024, 8192)


def attention_flops(seq: int, batch: int, heads: int, head_dim: int, causal: bool, backward: bool) -> float:
    return 4.0 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)


def predicted_tflops(device: Device, seq: int, causal: bool, backward: bool, head_dim: int = HEAD_DIM) -> float:
    """What the cost model prices for one benchmark-shaped call on ``device`` (one GPU)."""
    from tokenloom.parallel.schedule import Block, Buf, Compute

    batch, heads = 16384 // seq, 2048 // head_dim
    node = NodeSpec("fit", device, 1, "switch", link=Link(1e12, 0.0), nic=Link(1e12, 0.0))
    cost = CostModel(AttentionShape(seq, heads, head_dim, batch=batch), Cluster(node, 1), "contiguous")
    op = Compute(Buf("qg" if backward else "q", 0, (0,)), Buf("kv", 0, (0,)), (Block((0,), (0,), causal),),
                 Buf("dq" if backward else "out", 0, (0,), at=0))
    return attention_flops(seq, batch, heads, head_dim, causal, backward) / cost.compute_s(op) / 1e12


# Keys at which a kernel reaches half its long-key rate: log-spaced from 8 to 32K tokens (a quarter
# octave apart). Measured on an H200 (sdpa, bf16, 2026-12-04) the half sits near 2K keys, far above
# the FlashAttention-2 H100 figures' 80-300 (docs/calibration.md): the grid must span both.
HALF_GRID = tuple(float(round(2 ** (k / 4))) for k in range(12, 61))
SCALE_GRID = (0.97, 0.985, 1.0, 1.015, 1.03)


def _minimax_scale(ratios: list[float]) -> float:
    """The factor ``x`` minimising ``max |x / r - 1|`` over ``ratios`` (measured / predicted at x = 1):
    equal relative errors at the smallest and largest ratio."""
    lo, hi = min(ratios), max(ratios)
    return 2 * lo * hi / (lo + hi)


def fit_curve(device: Device, rows: list[tuple[str, bool, int, float]],
              head_dim: int = HEAD_DIM) -> tuple[Device, float]:
    """Fit ``device``'s attention curve to ``rows`` of (pass "fwd"|"bwd", causal, seq, TFLOP/s);
    return (fitted device, worst relative error). Forward and backward unmasked first, then the
    causal pair (rows of ``head_dim``, the benchmark's heads x head_dim = 2048). For each half-rate
    key count of :data:`HALF_GRID` the efficiency is the minimax one (predicted TFLOP/s is nearly proportional to it), nudged on :data:`SCALE_GRID` for the launch
    cost; the pair with the smallest worst relative error wins."""
    def worst(dev: Device, subset) -> float:
        return max((abs(predicted_tflops(dev, s, c, p == "bwd", head_dim) / t - 1) for p, c, s, t in subset),
                   default=0.0)

    def fit_pair(dev: Device, subset, field_scale: str, field_half: str, hi: float) -> Device:
        best = (math.inf, dev)
        for half in HALF_GRID:
            probe = replace(dev, **{field_scale: 1.0, field_half: half})
            ratios = [t / predicted_tflops(probe, s, c, p == "bwd", head_dim) for p, c, s, t in subset]
            x = _minimax_scale(ratios)
            for f in SCALE_GRID:
                cand = replace(dev, **{field_scale: min(x * f, hi), field_half: half})
                best = min(best, (worst(cand, subset), cand), key=lambda b: b[0])
        return best[1]

    dev = device
    for backward, field_eff, field_half in ((False, "attn_eff_fwd", "attn_kv_half"),
                                            (True, "attn_eff_bwd", "attn_kv_half_bwd")):
        subset = [r for r in rows if (r[0] == "bwd") == backward and not r[1]]
        if subset:
            dev = fit_pair(dev, subset, field_eff, field_half, hi=100.0)
    causal = [r for r in rows if r[1]]
    if causal:
        dev = fit_pair(dev, causal, "attn_causal_eff", "attn_kv_half_causal", hi=1.0)
    return dev, worst(dev, rows)


# -- measuring (CUDA only) -------------------------------------------------------------------------
def time_ms(fn, iters: int = 5) -> float:
    """Median CUDA-event milliseconds of ``fn()`` over ``iters`` runs, after one warm-up."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def measure_attention(seqs: tuple[int, ...] = SEQS, iters: int = 5) -> list[tuple[str, bool, int, float]]:
    import torch

    from tokenloom.kernels import block_attention

    rows = []
    for seq, causal in itertools.product(seqs, (False, True)):
        batch, heads = 16384 // seq, 2048 // HEAD_DIM
        q, k, v = (torch.randn(batch, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        fwd = time_ms(lambda: block_attention(q, k, v, causal=causal), iters)

        def both() -> None:
            out, _ = block_attention(q, k, v, causal=causal)
            out.backward(dout)

        bwd = max(time_ms(both, iters) - fwd, 1e-6)
        for name, ms, backward in (("fwd", fwd, False), ("bwd", bwd, True)):
            rows.append((name, causal, seq, attention_flops(seq, batch, heads, HEAD_DIM, causal, backward) / ms / 1e9))
    return rows


def measure_gemm(sizes: tuple[int, ...] = GEMM_SIZES) -> dict[int, float]:
    import torch

    out = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out[n] = 2.0 * n ** 3 / time_ms(lambda: a @ b) / 1e9  # TFLOP/s
    return out


# The four projections of one Llama-3.3-70B layer at TP 8, (K, N): what simulate tokenweave prices
GEMM_SHAPES = ((8192, 1280), (1024, 8192), (8192, 7168), (3584, 8192))
GEMM_TOKENS = (128, 512, 2048, 8192, 32768)


def measure_gemm_shapes(tokens: tuple[int, ...] = GEMM_TOKENS) -> list[tuple[int, int, int, float]]:
    """(m, n, k, TFLOP/s) of ``x @ w`` for :data:`GEMM_SHAPES`, timed one call at a time (as the
    calibration set's h200-gemm rows were, so :func:`~tokenloom.simulator.gemm.fit_gemm_curve`
    applies)."""
    import torch

    rows = []
    for k, n in GEMM_SHAPES:
        w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rows.append((m, n, k, 2.0 * m * n * k / time_ms(lambda: x @ w) / 1e9))
    return rows


def measure_hbm(nbytes: int = 1 << 30) -> float:
    import torch

    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / (time_ms(lambda: dst.copy_(src)) / 1e3)


def _base_node() -> NodeSpec:
    from tokenloom.simulator.advisor import detect_hardware

    name = detect_hardware()
    return CATALOG.get(name) or CATALOG["h100-sxm"]


def measure_cuda_profile(*, quick: bool = False) -> dict:
    """Measure this GPU; the hardware-file entry (a dict) plus what was measured (``measured``)."""
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--device: cuda asked for, but torch.cuda.is_available() is False on this machine",
                         field="--device")
    props = torch.cuda.get_device_properties(0)
    seqs = SEQS[::2] if quick else SEQS
    gemm = measure_gemm(QUICK_GEMM_SIZES if quick else GEMM_SIZES)
    hbm = measure_hbm(1 << 28 if quick else 1 << 30)
    rows = measure_attention(seqs, 3 if quick else 5)
    base = _base_node()
    device = replace(base.device, name="this-gpu", sms=props.multi_processor_count, flops=max(gemm.values()) * 1e12,
                     hbm_bw=hbm)
    fitted, worst = fit_curve(device, rows)
    node = replace(base, name="this-gpu", device=fitted, gpus_per_node=max(1, torch.cuda.device_count()))
    from tokenloom.simulator.gemm import fit_gemm_curve

    shapes = measure_gemm_shapes(GEMM_TOKENS[1::2] if quick else GEMM_TOKENS)
    gemm_fit, gemm_worst = fit_gemm_curve(replace(fitted, flops=base.device.flops), shapes)
    entry = node_to_dict(node)
    entry["measured"] = {"gpu": props.name, "gemm_tflops": {str(k): v for k, v in gemm.items()}, "hbm_gbs": hbm / 1e9,
                         "attention_tflops": [{"pass": p, "causal": c, "seq": s, "tflops": t} for p, c, s, t in rows],
                         "fit_worst_rel_error": worst,
                         # against the datasheet peak, as simulator/gemm.py's constants are (informational)
                         "gemm_shapes": [{"m": m, "n": n, "k": k, "tflops": t} for m, n, k, t in shapes],
                         "gemm_curve": {**gemm_fit, "tile": list(gemm_fit["tile"]), "worst_rel_error": gemm_worst}}
    return entry


def format_profile(entry: dict) -> str:
    m, dev = entry["measured"], entry["device"]
    lines = [f"{m['gpu']}: GEMM peak {max(m['gemm_tflops'].values()):.0f} TFLOP/s, HBM {m['hbm_gbs']:.0f} GB/s",
             f"  attention eff fwd {dev['attn_eff_fwd']:.3f} (half at {dev['attn_kv_half']:.0f} keys), "
             f"bwd {dev['attn_eff_bwd']:.3f} (half at {dev['attn_kv_half_bwd']:.0f}), causal x{dev['attn_causal_eff']:.2f} "
             f"(half at {dev['attn_kv_half_causal']:.0f}); fit worst error {m['fit_worst_rel_error']:.1%}",
             f"  {'pass':<5}{'mask':<8}{'seq':>7}{'TFLOP/s':>10}"]
    for r in m["attention_tflops"]:
        lines.append(f"  {r['pass']:<5}{'causal' if r['causal'] else 'full':<8}{r['seq']:>7}{r['tflops']:>10.1f}")
    g = m.get("gemm_curve")
    if g:
        lines.append(f"  GEMM curve (simulator/gemm.py form): eff {g['eff']:.2f} of datasheet peak, K half {g['k_half']:.0f}, "
                     f"tile {g['tile'][0]}x{g['tile'][1]}, one-call cost {g['call_s'] * 1e6:.0f} us; "
                     f"worst error {g['worst_rel_error']:.1%} over {len(m['gemm_shapes'])} shapes")
    return "\n".join(lines)

