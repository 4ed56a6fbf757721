"""``tokenloom simulate sweep``: one attention shape over several GPU counts, sequence lengths and
strategies, each point simulated independently (serially, or as Ray tasks with ``--ray``).

Each point is a plain dict in and the simulator's plain summary out, so the Ray fan-out returns
exactly what the serial loop returns, in the same order.
"""

from __future__ import annotations

import argparse
import itertools
import json

from tokenloom.commands.args import arg_int
from tokenloom.common.vocab import PREFERRED_LAYOUTS, STRATEGIES

MAX_POINTS = 4096

_EPILOG = """\
examples:
  tokenloom simulate sweep --hardware h100-sxm --gpus 8,16,32 --nodes-of 8 --seq 32K,128K,512K \\
      --heads 32 --kv-heads 8 --head-dim 128 --causal --strategies tokenring,ring --ray
"""


def _list(parse):
    def convert(text: str) -> list:
        items = [parse(t) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return items
    return convert


def simulate_point(point: dict) -> dict:
    """One point of the sweep: the simulator's summary (plain data), or the reason it cannot run."""
    from tokenloom.commands.simulate import _DTYPES
    from tokenloom.common.errors import UsageError
    from tokenloom.simulator.cost import AttentionShape
    from tokenloom.simulator.hardware import make_cluster
    from tokenloom.simulator.scenario import simulate_attention

    try:
        cluster = make_cluster(point["hardware"], point["gpus"], point["nodes"], point["hardware_file"])
        shape = AttentionShape(point["seq"], point["heads"], point["head_dim"], point["kv_heads"],
                               point["batch"], _DTYPES[point["dtype"]])
        result = simulate_attention(point["strategy"], cluster, shape, causal=point["causal"],
                                    backward=point["backward"], layout=point["layout"],
                                    max_transfers=point["max_transfers"])
    except UsageError as exc:
        return {**point, "skipped": str(exc)}
    return {**point, "summary": result.summary()}


def points_from_args(args: argparse.Namespace) -> list[dict]:
    from tokenloom.common.errors import UsageError
    from tokenloom.simulator.advisor import detect_hardware

    from tokenloom.parallel.builders import parse_strategy
    from tokenloom.common.checks import check_choice

    for strategy in args.strategies:
        try:
            parse_strategy(strategy)
        except (UsageError, ValueError) as exc:
            raise UsageError(f"--strategies: {exc}", field="strategies") from None
    for layout in args.layouts:
        check_choice(layout, "--layouts", PREFERRED_LAYOUTS)
    hardware = args.hardware or detect_hardware()
    grid = list(itertools.product(args.gpus, args.seq, args.strategies, args.layouts))
    if len(grid) > MAX_POINTS:
        raise UsageError(f"--gpus/--seq/--strategies/--layouts: {len(grid)} points exceed the limit of "
                         f"{MAX_POINTS}", field="gpus")
    return [{"hardware": hardware, "hardware_file": args.hardware_file, "gpus": gpus,
             "nodes": max(1, gpus // args.nodes_of) if args.nodes_of else 1, "seq": seq,
             "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
             "batch": args.batch, "dtype": args.dtype, "causal": args.causal, "backward": args.backward,
             "strategy": strategy, "layout": layout, "max_transfers": args.max_transfers}
            for gpus, seq, strategy, layout in grid]


def check_sweep_work(points: list[dict], limit: int | None = None) -> int:
    """Refuse (UsageError, exit 2) a sweep whose points together need more simulated transfers than
    ``limit`` (the simulator's work limit, default its own); return the estimate.

    Each point is also checked alone when it runs; this is the sum, checked before any point runs
    (three points of 256 GPUs each pass alone but together run for minutes). Points that will be
    skipped at once (infeasible, or over the limit alone) cost nothing and are not counted.
    """
    from tokenloom.commands.simulate import _DTYPES
    from tokenloom.common.errors import UsageError
    from tokenloom.simulator.cost import AttentionShape
    from tokenloom.simulator.scenario import check_feasible, check_work

    runs = []
    for p in points:
        run = (p["strategy"], p["gpus"], p["backward"])
        try:
            shape = AttentionShape(p["seq"], p["heads"], p["head_dim"], p["kv_heads"], p["batch"],
                                   _DTYPES[p["dtype"]])
            check_feasible(p["strategy"], p["gpus"], shape, layout=p.get("layout", "zigzag"))
            check_work([run], limit=limit)
        except UsageError:
            continue  # skipped when it runs, before building anything
        runs.append(run)
    if not runs:
        return 0
    return check_work(runs, "--gpus/--seq/--strategies/--layouts", limit=limit)


def run_sweep(points: list[dict], *, ray: bool = False, address: str | None = None) -> list[dict]:
    if ray:
        from tokenloom.comm.launch.ray import map_tasks

        return map_tasks(simulate_point, points, address=address)
    return [simulate_point(p) for p in points]


def _sweep(args: argparse.Namespace) -> int:
    points = points_from_args(args)
    check_sweep_work(points, args.max_transfers)  # the sum of all points, before any runs
    rows = run_sweep(points, ray=args.ray, address=args.address)
    if args.json:
        print(json.dumps({"points": rows}, allow_nan=False))
        return 0
    print(f"{'gpus':>5} {'seq':>9} {'strategy':<20}{'layout':<12}{'total ms':>10}{'exposed':>10}"
          f"{'GB/rank':>9}")
    for r in rows:
        head = f"{r['gpus']:>5} {r['seq']:>9} {r['strategy']:<20}{r['layout']:<12}"
        if "skipped" in r:
            print(f"{head}skipped: {r['skipped']}")
            continue
        s = r["summary"]
        print(f"{head}{s['total_ms']:>10.3f}{s['exposed_comm_ms']:>10.3f}{s['bytes_per_rank'] / 1e9:>9.3f}")
    return 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    from tokenloom.commands.simulate import _DTYPES, MAX_TRANSFERS_CEILING, tokens

    p = sub.add_parser("sweep", help="simulate attention over lists of GPU counts, lengths, strategies",
                       description="Simulate one attention shape at every combination of --gpus, --seq, "
                       "--strategies and --layouts; with --ray the points run as Ray tasks (same "
                       "results, same order).", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", default=None, metavar="NAME", help="catalog name (default: this machine)")
    p.add_argument("--hardware-file", default=None, metavar="FILE", help="JSON adding catalog entries")
    p.add_argument("--gpus", type=_list(arg_int(1, 1 << 16)), required=True, metavar="N[,N...]",
                   help="GPU counts")
    p.add_argument("--nodes-of", type=arg_int(1, 1 << 16), default=0, metavar="G",
                   help="GPUs per node: N GPUs span N/G nodes (default: one node)")
    p.add_argument("--seq", type=_list(tokens), required=True, metavar="S[,S...]",
                   help="global sequence lengths, e.g. 32K,128K")
    p.add_argument("--heads", type=arg_int(1, 1 << 14), required=True, metavar="H", help="query heads")
    p.add_argument("--kv-heads", type=arg_int(1, 1 << 14), default=None, metavar="HK", help="key/value heads")
    p.add_argument("--head-dim", type=arg_int(1, 1 << 12), required=True, metavar="D", help="head dimension")
    p.add_argument("--batch", type=arg_int(1, 1 << 16), default=1, metavar="B", help="batch size")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--causal", action="store_true", help="causal mask")
    p.add_argument("--backward", action="store_true", help="also simulate the backward pass")
    p.add_argument("--strategies", type=_list(str), default=list(STRATEGIES),
                   metavar="S[,S...]", help=f"of {', '.join(STRATEGIES)} (default: the three flat ones)")
    p.add_argument("--layouts", type=_list(str), default=["zigzag"], metavar="L[,L...]",
                   help="zigzag and/or contiguous (default zigzag)")
    p.add_argument("--max-transfers", type=arg_int(1, MAX_TRANSFERS_CEILING), default=None, metavar="N",
                   help="work limit: simulated transfers of all points together, checked before any runs "
                        f"(default: the simulator's, 150,000; at most {MAX_TRANSFERS_CEILING:,})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ray", action="store_true", help="run the points as Ray tasks")
    p.add_argument("--address", default=None, help="with --ray: Ray cluster ('auto'); default: a local Ray")
    p.set_defaults(func=_sweep)
