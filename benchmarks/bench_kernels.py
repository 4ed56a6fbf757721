"""Block-kernel throughput on one GPU: TFLOP/s of each tokenloom impl vs torch SDPA's flash backend.

    python benchmarks/bench_kernels.py                      # 8K/16K/32K tokens, d=128, bf16
    python benchmarks/bench_kernels.py --seqs 8192 --heads 16 --dtype fp16 --impls sdpa,triton

For each sequence length, causal and not, forward and forward+backward, it times (CUDA events,
median of --iters after a warm-up): torch's scaled_dot_product_attention restricted to the flash
backend (the yardstick), and tokenloom.kernels.block_attention with each impl and with the
selector's default (impl=None). FLOPs follow FlashAttention's count: forward 4*b*h*s*s*d (half for
causal), backward 2.5x forward. The last column is each row's time relative to flash; the summary
says whether the default is within 5% of the fastest tokenloom impl in every case (the issue's
goal) and how Triton's forward compares with flash's (goal: >= 0.8x). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch

from tokenloom.simulator.calibrate_gpu import time_ms  # one CUDA timer for the benchmark and the calibration

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _flash(q, k, v, dout, causal, backward):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        if backward:
            out.backward(dout.transpose(1, 2))
    return run


def _ours(q, k, v, dout, causal, backward, impl):
    from tokenloom.kernels import block_attention

    def run():
        out, _ = block_attention(q, k, v, causal=causal, impl=impl)
        if backward:
            out.backward(dout)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="8192,16384,32768")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", default="sdpa,triton")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (none found)")
    from tokenloom.kernels import select_impl

    impls = [i for i in args.impls.split(",") if i]
    default = select_impl(torch.device("cuda"))
    dt = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, batch {args.batch}, {args.heads} heads, "
          f"head_dim {args.head_dim}; selector default: {default}; median of {args.iters}")
    print(f"| {'seq':>6} | {'mask':<10} | {'pass':<7} | {'contender':<16} | {'ms':>8} | {'TFLOP/s':>8} | {'vs flash':>8} |")
    print(f"|{'-' * 8}|{'-' * 12}|{'-' * 9}|{'-' * 18}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    verdict_default, verdict_triton = [], []
    for seq in (int(s) for s in args.seqs.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (args.batch, seq, args.heads, args.head_dim)
        q, k, v, dout = (torch.randn(shape, generator=g, device="cuda", dtype=dt) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        for causal in (False, True):
            fwd_flop = 4 * args.batch * args.heads * seq * seq * args.head_dim * (0.5 if causal else 1.0)
            for backward in (False, True):
                flop = fwd_flop * (3.5 if backward else 1.0)
                runs = {"torch flash": _flash(q, k, v, dout, causal, backward)}
                runs.update({f"tokenloom {i}": _ours(q, k, v, dout, causal, backward, i) for i in impls})
                runs[f"default ({default})"] = _ours(q, k, v, dout, causal, backward, None)
                ms = {name: time_ms(fn, args.iters) for name, fn in runs.items()}
                for name, t in ms.items():
                    print(f"| {seq:>6} | {'causal' if causal else 'non-causal':<10} | "
                          f"{'fwd+bwd' if backward else 'fwd':<7} | {name:<16} | {t:8.2f} | "
                          f"{flop / t / 1e9:8.1f} | {ms['torch flash'] / t:7.2f}x |")
                best = min(ms[f"tokenloom {i}"] for i in impls)
                verdict_default.append(ms[f"default ({default})"] <= 1.05 * best)
                if "triton" in impls and not backward:
                    verdict_triton.append(ms["torch flash"] / ms["tokenloom triton"])
    print(f"default within 5% of the best impl in every case: {all(verdict_default)}")
    if verdict_triton:
        print(f"triton forward vs flash: min {min(verdict_triton):.2f}x, max {max(verdict_triton):.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
