"""Where tokenloom's block attention loses time against torch's flash SDPA on one GPU.

    python benchmarks/gpu_overhead.py [--seq 8192] [--heads 16] [--head-dim 128] [--iters 10]

The same call is timed peeled layer by layer (CUDA events, median of --iters, bf16, BSHD inputs as
the runtime holds them), so each row's difference from the one above is one layer's cost:

  flash          torch.nn.functional.scaled_dot_product_attention, flash backend only
  op             the aten flash op tokenloom calls (``sdpa._piece_forward``): transposed views, lse
  block_forward  ``kernels.block_forward`` (finiteness check, routing, fp32 accumulation output)
  block_attn     ``kernels.block_attention`` (the autograd function; output cast back to bf16)
  block_attn -check  the same with the finiteness check stubbed out (what the check costs)

then prints torch.profiler's table of one fwd+bwd ``block_attention`` call. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tokenloom.simulator.calibrate import median_time
from tokenloom.simulator.calibrate_gpu import time_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda (the point); cpu only checks the script runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    timer = time_ms if args.device == "cuda" else (lambda fn, iters: 1e3 * median_time(fn, iters))
    import tokenloom.kernels as K
    from tokenloom.kernels import sdpa

    shape = (1, args.seq, args.heads, args.head_dim)
    g = torch.Generator(device=args.device).manual_seed(0)
    q, k, v, dout = (torch.randn(shape, generator=g, device=args.device, dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = args.head_dim ** -0.5

    def flash(causal, bwd):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        if bwd:
            out.backward(dout.transpose(1, 2))

    def op(causal, bwd):
        with torch.no_grad():
            sdpa._piece_forward(q, k, v, causal, scale)

    def block_forward(causal, bwd):
        with torch.no_grad():
            K.block_forward(q, k, v, causal=causal, softmax_scale=None, impl="sdpa")

    def block_attn(causal, bwd):
        out, _ = K.block_attention(q, k, v, causal=causal, impl="sdpa")
        if bwd:
            out.backward(dout)

    def unchecked(causal, bwd):
        saved = K.all_finite, K.lse_ok
        K.all_finite, K.lse_ok = (lambda *t: True), (lambda t: True)
        try:
            block_attn(causal, bwd)
        finally:
            K.all_finite, K.lse_ok = saved

    rows = [("flash", flash, True), ("op", op, False), ("block_forward", block_forward, False),
            ("block_attn", block_attn, True), ("block_attn -check", unchecked, True)]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"{name}: bf16 b=1 s={args.seq} h={args.heads} d={args.head_dim}, "
          f"median of {args.iters} (ms)")
    print(f"{'layer':<18} {'causal':>6} {'fwd':>8} {'fwd+bwd':>8}")
    for causal in (False, True):
        for name, fn, has_bwd in rows:
            fwd = timer(lambda: fn(causal, False), args.iters)
            both = timer(lambda: fn(causal, True), args.iters) if has_bwd else float("nan")
            print(f"{name:<18} {str(causal):>6} {fwd:8.3f} {both:8.3f}")
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    block_attn(True, True)
    with profile(activities=acts) as prof:
        for _ in range(3):
            block_attn(True, True)
        if args.device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
