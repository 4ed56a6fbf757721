"""``tokenloom advise attention``: rank strategies and layouts by simulated time."""

from __future__ import annotations

import argparse
import json

from tokenloom.commands.simulate import add_attention_command, problem_from_args

_EPILOG = """\
Every (strategy, layout) pair that fits the shape is simulated on the same hardware; the table is
sorted by time and the winner is explained by bytes moved and exposed communication. Pairs that
cannot run (e.g. Ulysses when heads do not divide by GPUs) are listed with the reason.
'sp_attention(strategy="auto")' asks the same advisor (forward+backward).

examples:
  tokenloom advise attention --hardware h100-sxm --gpus 8 --seq 128K --heads 32 --head-dim 128 --causal --backward
  tokenloom advise attention --hardware a10-pcie --gpus 4 --seq 32K --heads 32 --kv-heads 8 --head-dim 128 --json
"""


def _advise_pair(task: tuple) -> tuple[str, object]:
    """One (strategy, layout) of the ranking, as a Ray task: ("ok", result) or ("skip", why)."""
    from tokenloom.common.errors import UsageError
    from tokenloom.simulator.advisor import advise_attention

    cluster, shape, causal, backward, strategy, layout, max_transfers, window = task
    try:
        advice = advise_attention(cluster, shape, causal=causal, backward=backward, strategies=(strategy,),
                                  layouts=(layout,), max_transfers=max_transfers, window_size=window)
    except UsageError as exc:
        if not advice_skipped(str(exc)):
            raise
        return "skip", (strategy, layout, str(exc).split(": ", 1)[1])
    return "ok", advice.ranking[0]


def advice_skipped(message: str) -> bool:
    return message.startswith("no strategy fits this shape: ")


def advise_on_ray(cluster, shape, *, causal: bool, backward: bool, max_transfers: int | None = None,
                  address: str | None = None, window_size=None):
    """The advisor's ranking with every (strategy, layout) simulated as a Ray task; the same
    Advice as the serial ``advise_attention`` (the work limit applies per simulation)."""
    from tokenloom.common.errors import UsageError
    from tokenloom.comm.launch.ray import map_tasks
    from tokenloom.common.vocab import PREFERRED_LAYOUTS, STRATEGIES
    from tokenloom.simulator.advisor import Advice, hybrid_candidates

    strategies = STRATEGIES + hybrid_candidates(cluster)
    pairs = [(s, lay) for s in strategies for lay in PREFERRED_LAYOUTS]
    done = map_tasks(_advise_pair, [(cluster, shape, causal, backward, s, lay, max_transfers, window_size)
                                    for s, lay in pairs],
                     address=address)
    results = [r for kind, r in done if kind == "ok"]
    skipped = [r for kind, r in done if kind == "skip"]
    if not results:
        raise UsageError(f"no strategy fits this shape: {skipped[0][2]}")
    order = {pair: i for i, pair in enumerate(pairs)}
    results.sort(key=lambda r: (r.total_s, order[(r.strategy, r.layout)]))
    return Advice(results, skipped, cluster.gpus_per_node)


def _advise(args: argparse.Namespace) -> int:
    from tokenloom.simulator.advisor import advise_attention

    cluster, shape = problem_from_args(args)
    if args.ray:
        advice = advise_on_ray(cluster, shape, causal=args.causal, backward=args.backward,
                               max_transfers=args.max_transfers, address=args.address, window_size=args.window)
    else:
        advice = advise_attention(cluster, shape, causal=args.causal, backward=args.backward,
                                  max_transfers=args.max_transfers, window_size=args.window)
    if args.json:
        print(json.dumps(advice.to_dict(), allow_nan=False))
        return 0
    print(f"{cluster.describe()}: seq {shape.seq_len}, heads {shape.num_heads}/{shape.kv_heads} kv, head_dim "
          f"{shape.head_dim}, {'causal' if args.causal else 'full'}"
          f"{f', window {advice.winner.window}' if advice.winner.window else ''}, "
          f"{'forward+backward' if args.backward else 'forward'}")
    print(f"  {'strategy':<20}{'layout':<12}{'total ms':>10}{'compute':>10}{'exposed':>10}{'overlap':>9}"
          f"{'GB/rank':>10}")
    for row in advice.to_dict()["ranking"]:
        print(f"  {row['strategy']:<20}{row['layout']:<12}{row['total_ms']:>10.3f}{row['compute_ms']:>10.3f}"
              f"{row['exposed_comm_ms']:>10.3f}{row['overlap_fraction']:>9.0%}{row['bytes_per_rank'] / 1e9:>10.3f}")
    for strategy, layout, why in advice.skipped:
        print(f"  {strategy} ({layout}) skipped: {why}")
    print(advice.explain())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    _, att = add_attention_command(
        subparsers, "advise", "rank parallel-attention strategies by simulated time",
        "Ask the simulator which strategy and layout to use.",
        "rank tokenring / ring / ulysses x zigzag / contiguous", _EPILOG)
    att.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    att.add_argument("--ray", action="store_true",
                     help="simulate the candidates as Ray tasks (same ranking as the serial run)")
    att.add_argument("--address", default=None,
                     help="with --ray: the cluster to use ('auto': the running one); default: a local Ray")
    att.set_defaults(func=_advise)
