"""``tokenloom simulate attention`` and ``tokenloom simulate calibrate``."""

from __future__ import annotations

import argparse
import json
import sys

from tokenloom.common.errors import UsageError
from tokenloom.commands.args import WINDOW_HELP, arg_int, arg_window, flag_error
from tokenloom.common.vocab import PREFERRED_LAYOUTS, STRATEGIES

_EPILOG_ATTENTION = """\
The simulator walks the same schedules the runtime executes (one compute stream per rank,
communication beside it, links shared under contention) and prices them with the hardware
catalog: h100-sxm, h200-sxm, a100-sxm (8 GPUs on NVSwitch), a10-pcie (4 GPUs behind PCIe
switches), mi300x (8 GPUs, full mesh), local-cpu (this machine, see 'simulate calibrate').

examples:
  tokenloom simulate attention --hardware h100-sxm --gpus 8 --seq 128K --heads 32 --head-dim 128 --causal --backward
  tokenloom simulate attention --hardware h100-sxm --gpus 32 --nodes 4 --seq 1M --heads 32 --kv-heads 8 \\
      --head-dim 128 --causal --strategy ring --json
  tokenloom simulate attention --hardware mi300x --gpus 8 --seq 32K --heads 16 --head-dim 128 \\
      --chrome-trace trace.json --png gantt.png    # open trace.json in ui.perfetto.dev
  tokenloom simulate attention --hardware h100-sxm --gpus 8 --seq 128K --heads 32 --head-dim 128 --causal \\
      --window 4096 --strategy ring    # a sliding window: hidden blocks are neither computed nor sent
"""

_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


MAX_SEQ = 1 << 40  # the cost model's limit (tokenloom.simulator.cost.SHAPE_LIMITS)
MAX_HEADS = MAX_HEAD_DIM = 1 << 16
MAX_BATCH = 1 << 20
MAX_GPUS = 1 << 20  # what a cluster may describe; the work limit (--max-transfers) refuses far fewer
MAX_TRANSFERS_CEILING = 2_000_000  # tokenloom.simulator.scenario.MAX_SIM_TRANSFERS_CEILING (not imported: startup)


def tokens(text: str) -> int:
    """``131072``, ``128K`` or ``1M`` (K = 1024, M = 1024^2), between 1 and 2^40."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    digits = digits.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
        raise argparse.ArgumentTypeError(f"expected a token count like 4096, 128K or 1M, got {text[:40]!r}")
    value = int(digits) * scale
    if not 1 <= value <= MAX_SEQ:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_SEQ} (1T tokens), got {text[:40]}")
    return value


def add_problem_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``simulate attention`` and ``advise attention``."""
    hw = p.add_argument_group("hardware")
    hw.add_argument("--hardware", default=None, metavar="NAME",
                    help="catalog name (h100-sxm, h200-sxm, a100-sxm, a10-pcie, mi300x, local-cpu, or one "
                         "from --hardware-file); default: this machine's GPU, else local-cpu")
    hw.add_argument("--hardware-file", default=None, metavar="FILE",
                    help="JSON adding or overriding catalog entries (format: docs/simulator.md)")
    hw.add_argument("--gpus", type=arg_int(1, MAX_GPUS), required=True, metavar="N", help="total number of GPUs (ranks)")
    hw.add_argument("--nodes", type=arg_int(1, MAX_GPUS), default=1, metavar="K",
                    help="spread the GPUs evenly over K nodes; ranks are filled node by node (default 1)")
    shape = p.add_argument_group("attention shape")
    shape.add_argument("--seq", type=tokens, required=True, metavar="S",
                       help="global sequence length over all ranks, e.g. 131072, 128K, 1M")
    shape.add_argument("--heads", type=arg_int(1, MAX_HEADS), required=True, metavar="H", help="query heads")
    shape.add_argument("--kv-heads", type=arg_int(1, MAX_HEADS), default=None, metavar="HK",
                       help="key/value heads (GQA; must divide --heads); default: --heads")
    shape.add_argument("--head-dim", type=arg_int(1, MAX_HEAD_DIM), required=True, metavar="D", help="head dimension")
    shape.add_argument("--batch", type=arg_int(1, MAX_BATCH), default=1, metavar="B", help="batch size (default 1)")
    shape.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="input dtype (default bf16)")
    shape.add_argument("--causal", action="store_true", help="causal mask (default: full attention)")
    shape.add_argument("--window", type=arg_window, default=None, metavar="LEFT[,RIGHT]",
                       help=WINDOW_HELP + "; hidden blocks cost nothing, masked ones their visible share (event engine)")
    shape.add_argument("--backward", action="store_true",
                       help="also simulate the backward pass (after the forward pass)")
    p.add_argument("--max-transfers", type=arg_int(1, MAX_TRANSFERS_CEILING), default=None, metavar="N",
                   help="work limit: refuse runs needing more simulated transfers (~2-3 x gpus^2 per pass "
                        "and strategy, ~0.1-0.2 ms and ~4 KB each); default 150000 (256 GPUs, one pass, "
                        f"~30 s), at most {MAX_TRANSFERS_CEILING}")


def problem_from_args(args: argparse.Namespace):
    """(cluster, shape) from the shared flags; ValueError naming the field on bad input."""
    from tokenloom.simulator.advisor import detect_hardware
    from tokenloom.simulator.cost import AttentionShape
    from tokenloom.simulator.hardware import make_cluster

    hardware = args.hardware or detect_hardware()
    cluster = make_cluster(hardware, args.gpus, args.nodes, args.hardware_file)
    try:  # the API's GQA rule, with the flag in front
        shape = AttentionShape(args.seq, args.heads, args.head_dim, args.kv_heads, args.batch, _DTYPES[args.dtype])
    except UsageError as exc:
        if exc.field != "kv_heads":
            raise
        raise flag_error(exc) from None
    return cluster, shape


def _print_summary(s: dict, out=None) -> None:
    out = out or sys.stdout
    window = f", window {tuple(s['window'])}" if s.get("window") else ""
    print(f"{s['strategy']} ({s['layout']}) on {s['hardware']}: seq {s['seq']}, heads {s['heads']}/"
          f"{s['kv_heads']} kv, head_dim {s['head_dim']}, {'causal' if s['causal'] else 'full'}{window}, "
          f"{'forward+backward' if s['backward'] else 'forward'}", file=out)
    rows = [("total", f"{s['total_ms']:.3f} ms"), ("compute", f"{s['compute_ms']:.3f} ms"),
            ("exposed communication", f"{s['exposed_comm_ms']:.3f} ms"),
            ("communication overlapped", f"{s['overlap_fraction']:.1%}"),
            ("bubbles (idle after finishing)", f"{s['bubble_ms']:.3f} ms"),
            ("bytes sent per rank (max)", f"{s['bytes_per_rank'] / 1e9:.3f} GB")]
    for name, value in rows:
        print(f"  {name:<32}{value}", file=out)
    for name, p in s["passes"].items():
        steps = " ".join(f"{x:.3g}" for x in p["step_ms"][:12]) + (" ..." if len(p["step_ms"]) > 12 else "")
        print(f"  {name}: {p['total_ms']:.3f} ms over {p['num_steps']} steps (ms per step, max over ranks: "
              f"{steps})", file=out)


def _attention(args: argparse.Namespace) -> int:
    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.simulator.export import write_chrome_trace, write_gantt
    from tokenloom.simulator.scenario import simulate_attention

    with OutputFiles(inputs=[args.hardware_file]) as out:
        out.claim("--chrome-trace", args.chrome_trace)  # before any work: exit 2 if unusable
        out.claim("--png", args.png)
        cluster, shape = problem_from_args(args)
        engine = "event" if (args.chrome_trace or args.png) and args.engine == "auto" else args.engine
        try:
            result = simulate_attention(args.strategy, cluster, shape, causal=args.causal, backward=args.backward,
                                        layout=args.layout, max_transfers=args.max_transfers, engine=engine,
                                        window_size=args.window)
        except UsageError as exc:
            if exc.field != "window_size":
                raise
            raise flag_error(exc, {"window_size": "--window"}) from None
        out.write("--chrome-trace", lambda path: write_chrome_trace(result, path))
        out.write("--png", lambda path: write_gantt(result, path))
        out.commit()  # both files appear only now, after everything succeeded
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        _print_summary(summary)
        for path in (args.chrome_trace, args.png):
            if path:
                print(f"wrote {path}")
    return 0


def _calibrate_cuda(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.simulator.calibrate_gpu import format_profile, measure_cuda_profile

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    out = Path(args.out) if args.out else Path(cache) / "tokenloom" / "this-gpu.json"
    if not args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
    with OutputFiles() as files:
        files.claim("--out", out)  # checked before the ~1 min of measuring
        entry = measure_cuda_profile(quick=args.quick)

        def write(path) -> None:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"this-gpu": entry}, f, indent=1, allow_nan=False)

        files.write("--out", write)
        files.commit()
    if args.json:
        print(json.dumps({"path": str(out), "this-gpu": entry}, allow_nan=False))
    else:
        print(f"wrote {out} (use: --hardware-file {out} --hardware this-gpu)")
        print(format_profile(entry))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    if args.device == "cuda":
        return _calibrate_cuda(args)

    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.simulator.calibrate import measure_profile, write_profile
    from tokenloom.simulator.hardware import PROFILE_ENV, cpu_profile_path

    out = Path(args.out) if args.out else cpu_profile_path()
    field = "--out" if args.out else f"${PROFILE_ENV}" if os.environ.get(PROFILE_ENV) else "profile path"
    if not args.out:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{field}: cannot create {out.parent}: {exc.strerror}", field=field) from None
    with OutputFiles() as files:
        files.claim(field, out)  # checked before the ~10 s of measuring
        entry = measure_profile(quick=args.quick)
        files.write(field, lambda path: write_profile(entry, path))
        files.commit()
    if args.json:
        print(json.dumps({"path": str(out), "local-cpu": entry}, allow_nan=False))
        return 0
    dev, link = entry["device"], entry["link"]
    print(f"wrote {out}")
    print(f"  attention: {dev['flops'] / 1e9:.2f} GFLOP/s forward, x{dev['attn_eff_bwd']:.2f} backward, "
          f"{dev['launch_s'] * 1e6:.0f} us per call; memory {dev['hbm_bw'] / 1e9:.2f} GB/s")
    print(f"  gloo loopback: {link['bw'] / 1e9:.3f} GB/s, {link['latency_s'] * 1e6:.0f} us latency; "
          f"{entry['host_cores']} cores")
    return 0


def add_attention_command(subparsers: argparse._SubParsersAction, command: str, help_: str, description: str,
                          attention_help: str, epilog: str) -> tuple[argparse._SubParsersAction,
                                                                       argparse.ArgumentParser]:
    """``tokenloom COMMAND attention`` with the shared problem flags; returns (its subparsers, it)."""
    p = subparsers.add_parser(command, help=help_, description=description)
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    sub.required = True
    att = sub.add_parser("attention", help=attention_help, description=description,
                         epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_args(att)
    return sub, att


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenloom.parallel.dims import parse_strategy

    def strategy_arg(text: str) -> str:  # also the 2-D hybrids, "ulysses8+tokenring"
        try:
            parse_strategy(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    sub, att = add_attention_command(
        subparsers, "simulate", "predict the time of parallel attention on a cluster",
        "Discrete-event simulation of the runtime's own schedules.",
        "one attention layer: time, exposed communication, bytes", _EPILOG_ATTENTION)
    att.add_argument("--strategy", type=strategy_arg, default="tokenring", metavar="NAME",
                     help=f"{' | '.join(STRATEGIES)} | ulysses<N>+tokenring | ulysses<N>+ring (2-D hybrid: "
                          f"Ulysses inside groups of N ranks, the ring across); default tokenring")
    att.add_argument("--layout", choices=PREFERRED_LAYOUTS, default="zigzag",
                     help="sequence layout over ranks (default zigzag: balanced causal work)")
    att.add_argument("--engine", choices=("auto", "event", "lockstep"), default="auto",
                     help="auto (default): price step by step across all ranks where every link is owned by "
                          "one rank (same times, 1024 ranks in seconds), else event by event; event: always "
                          "event by event (what --chrome-trace/--png use)")
    out = att.add_argument_group("output")
    out.add_argument("--chrome-trace", metavar="FILE", help="write a Chrome/Perfetto trace (one track per "
                     "rank and stream)")
    out.add_argument("--png", metavar="FILE", help="write a Gantt chart (first 8 ranks)")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    att.set_defaults(func=_attention)
    cal = sub.add_parser("calibrate", help="measure this machine into the local-cpu profile",
                         description="Measure attention FLOP/s, memory bandwidth and gloo loopback latency/"
                         "bandwidth (2 forked ranks) and write the local-cpu hardware profile, so "
                         "'--hardware local-cpu' predicts this machine's own CPU runs. Takes ~10 s.")
    cal.add_argument("--out", metavar="FILE", help="where to write (default: $TOKENLOOM_CPU_PROFILE or "
                     "~/.cache/tokenloom/local-cpu.json, which the catalog reads)")
    cal.add_argument("--quick", action="store_true", help="smaller, faster measurements (tests)")
    cal.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="cpu (default): the local-cpu profile; cuda: this GPU's attention curve, GEMM peak "
                          "and memory bandwidth into a 'this-gpu' hardware-file entry (~1 min; default "
                          "~/.cache/tokenloom/this-gpu.json)")
    cal.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    cal.set_defaults(func=_calibrate)
    from tokenloom.commands.simulate_tokenweave import add_tokenweave

    add_tokenweave(sub)
    from tokenloom.commands.simulate_sweep import add_sweep  # the sweep form (serial or --ray)

    add_sweep(sub)
    from tokenloom.commands.simulate_check import add_check  # accepted predictions, for CI

    add_check(sub)
    from tokenloom.commands.simulate_validate import add_validate  # calibration set vs published

    add_validate(sub)
    from tokenloom.commands.simulate_moe import add_moe  # MoE dispatch/combine under a placement plan

    add_moe(sub)
    from tokenloom.commands.simulate_decode import add_decode  # sharded-KV-cache decode

    add_decode(sub)
