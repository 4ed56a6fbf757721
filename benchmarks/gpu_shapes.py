"""Measured shape curves on one GPU, for the simulator's GEMM and decode models (issue 20, 19).

    python benchmarks/gpu_shapes.py [--out shapes.json]

Two tables, CUDA events (median of 5 after a warm-up), bf16:

1. GEMM efficiency against the token count M, for the four projections of one Llama-3.3-70B layer
   sharded TP=8 (hidden 8192, 64 q heads / 8 kv heads of 128, MLP 28672): what TokenWeave splits.
   Small M and M that leave the last wave of tiles part-empty run below the dense peak (wave
   quantisation); the simulator prices each projection at this measured efficiency.
2. Decode attention (one new token, 8 query heads / 8 kv heads, d=128) over a cached context of
   4K..1M tokens through torch SDPA: time against the bytes of K and V read, as a share of the
   copy bandwidth measured in the same run. Decode is memory-bound; this is the rate the decode
   scenario's HBM term assumes.

Prints both tables and writes them as JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tokenloom.simulator.calibrate_gpu import measure_hbm, time_ms

HIDDEN, HEAD, QH, KVH, FFN, TP = 8192, 128, 64, 8, 28672, 8
PROJECTIONS = {  # name: (K, N) per rank under TP=8
    "qkv": (HIDDEN, (QH + 2 * KVH) * HEAD // TP),
    "o": (QH * HEAD // TP, HIDDEN),
    "gate_up": (HIDDEN, 2 * FFN // TP),
    "down": (FFN // TP, HIDDEN),
}
TOKENS = (128, 256, 512, 1000, 1024, 2048, 3000, 4096, 8192, 16384, 32768)
CONTEXTS = (4096, 16384, 65536, 262144, 1048576)


def gemm_table() -> list[dict]:
    rows = []
    for name, (k, n) in PROJECTIONS.items():
        w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ms = time_ms(lambda: x @ w)
            rows.append({"proj": name, "m": m, "k": k, "n": n, "ms": ms, "tflops": 2.0 * m * k * n / ms / 1e9})
    return rows


def decode_table(hbm: float) -> list[dict]:
    rows = []
    for ctx in CONTEXTS:
        q = torch.randn(1, KVH, 1, HEAD, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, KVH, ctx, HEAD, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        nbytes = 2 * k.numel() * k.element_size()
        rows.append({"context": ctx, "ms": ms, "kv_bytes": nbytes, "gbs": nbytes / ms / 1e6,
                     "share_of_copy_bw": nbytes / (ms / 1e3) / hbm})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the tables as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2.0 * 8192 ** 3 / time_ms(lambda: a @ a) / 1e9
    hbm = measure_hbm()
    gemm, decode = gemm_table(), decode_table(hbm)
    print(f"{torch.cuda.get_device_name(0)}: 8192^3 bf16 GEMM {peak:.0f} TFLOP/s, copy {hbm / 1e9:.0f} GB/s")
    print(f"{'proj':8} {'M':>6} {'K':>6} {'N':>6} {'ms':>8} {'TFLOP/s':>8} {'eff':>6}")
    for r in gemm:
        print(f"{r['proj']:8} {r['m']:>6} {r['k']:>6} {r['n']:>6} {r['ms']:8.4f} {r['tflops']:8.1f} {r['tflops'] / peak:6.3f}")
    print(f"{'context':>8} {'ms':>8} {'GB/s':>8} {'of copy bw':>10}")
    for r in decode:
        print(f"{r['context']:>8} {r['ms']:8.4f} {r['gbs']:8.0f} {r['share_of_copy_bw']:10.3f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "gemm_peak_tflops": peak, "copy_gbs": hbm / 1e9,
                       "gemm": gemm, "decode": decode}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
