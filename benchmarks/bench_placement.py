"""Placement benchmark (issue 13): remote messages per token under DeepEP with DP attention, side by side
with DeepSeek EPLB (hierarchical and global, re-implemented in tokenloom.placement.eplb) on router-model traces.

    python benchmarks/bench_placement.py [--tokens 8192] [--time-limit 60] [--cases deepseek-v3,qwen3-235b,...]

For each case: one router-model trace (tokenloom.placement.router), 20% of its tokens held out
(seed 0). EPLB, greedy and the planner see only the other 80%. The planner runs as the real CLI
(`tokenloom plan`, a subprocess, so its wall time includes Python start and imports). Columns:
remote node messages per token and MoE layer (dispatch + combine, exact expectation, uniform
replica choice, DP homes) in-sample and held-out, the held-out change against the EPLB policy
EPLB itself picks for the model (hierarchical for DeepSeek-V3's 8 routing groups, global for
Qwen3, which has none; the planner's default balance cap follows the same choice), the same held-out under `local` replica choice,
the busiest NIC's messages per token (held-out), and the worst in-sample max/mean GPU load.
Prints one markdown table and a PASS/FAIL line per goal. Not a test: timings depend on the machine.

    python benchmarks/bench_placement.py --check-time-limit [--time-limit 2]

instead checks that ``--time-limit`` bounds the whole ``tokenloom plan`` command (in-process, imports
warm), for both token homes on a small router trace: PASS when it ends within the limit plus
``TIME_LIMIT_SLACK`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from tokenloom.placement import trace_from_topk
from tokenloom.placement.dispatch import message_metrics
from tokenloom.placement.eplb import eplb_rows
from tokenloom.placement.greedy import baseline_plan
from tokenloom.placement.metrics import gpu_loads
from tokenloom.placement.problem import PlacementProblem
from tokenloom.placement.router import RouterConfig, router_topk

CASES = {  # name: (router config kwargs, gpus, gpus_per_node, redundant, the model's routing groups)
    "deepseek-v3": (dict(num_layers=58, num_experts=256, top_k=8, num_groups=8, topk_group=4), 32, 8, 32, 8),
    "qwen3-235b": (dict(num_layers=94, num_experts=128, top_k=8), 64, 8, 64, 1),
    "deepseek-v3 no-structure": (dict(num_layers=58, num_experts=256, top_k=8, num_groups=8, topk_group=4,
                                      topic_strength=0.0), 32, 8, 32, 8),
    "qwen3-235b no-structure": (dict(num_layers=94, num_experts=128, top_k=8, topic_strength=0.0), 64, 8, 64, 1),
    # sensitivity, not a goal: twice the default topic strength (more co-activation structure)
    "deepseek-v3 strong-topics": (dict(num_layers=58, num_experts=256, top_k=8, num_groups=8, topk_group=4,
                                       topic_strength=3.0), 32, 8, 32, 8),
}
HIER_GROUPS = 8  # EPLB hierarchical needs groups that are a multiple of the nodes; Qwen3 has none, so 8 contiguous


def _row(name, method, rows, train, test, problem, seconds=None):
    args = (problem.num_experts, problem.num_gpus, problem.gpus_per_node)
    inside = message_metrics(rows, train.topk_ids, *args)
    held = message_metrics(rows, test.topk_ids, *args)
    local = message_metrics(rows, test.topk_ids, *args, replica_choice="local")
    balance = max(float(gpu_loads(train.loads[l], rows[l], problem.num_gpus).max() / (train.loads[l].sum() / problem.num_gpus))
                  for l in range(train.num_layers))
    return {"case": name, "method": method, "in": inside.messages_per_token, "out": held.messages_per_token,
            "local": local.messages_per_token, "nic": held.busiest_nic_per_token, "balance": balance, "seconds": seconds}


def run_case(name: str, tokens: int, time_limit: float, workdir: str) -> list[dict]:
    config, gpus, gpn, redundant, groups = CASES[name]
    ids = router_topk(RouterConfig(num_tokens=tokens, seed=0, **config))
    trace = trace_from_topk(ids, config["num_experts"])
    train, test = trace.split(0.2, seed=0)
    problem = PlacementProblem.build(trace.num_layers, trace.num_experts, gpus, gpn, redundant)
    path = os.path.join(workdir, f"{name.replace(' ', '_')}.npz")
    np.savez(path, topk_ids=ids.astype(np.int16), num_experts=np.int64(config["num_experts"]))
    rows = []
    for policy in ("hierarchical", "global"):
        eplb = eplb_rows(train.loads, problem.num_slots, gpus, gpn, policy, HIER_GROUPS)
        rows.append(_row(name, f"EPLB {policy}", eplb, train, test, problem))
    rows.append(_row(name, "greedy", baseline_plan("greedy", problem, train.loads), train, test, problem))
    plan_path = os.path.join(workdir, "plan.json")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tokenloom", "plan", "--trace", path, "--gpus", str(gpus),
                           "--gpus-per-node", str(gpn), "--redundant", str(redundant), "--expert-groups", str(groups),
                           "--holdout", "0.2", "--seed", "0", "--time-limit", str(time_limit), "--out", plan_path, "--json"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"plan failed on {name}: {proc.stderr}")
    plan = json.load(open(plan_path))
    rows.append(_row(name, "tokenloom dp", np.array(plan["phy2log"]), train, test, problem, seconds))
    for r in rows:
        r["reference"] = "EPLB hierarchical" if groups > 1 else "EPLB global"  # what EPLB itself picks here
    return rows


def _table(rows: list[dict]) -> list[str]:
    lines = ["| case | method | msgs/token in-sample | msgs/token held-out | vs EPLB's choice (held-out) | held-out, local choice | "
             "busiest NIC/token | worst max/mean | plan s (wall) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {r["case"]: r for r in rows if r["method"] == r["reference"]}
    for r in rows:
        vs = r["out"] / ref[r["case"]]["out"] - 1
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
        lines.append(f"| {r['case']} | {r['method']} | {r['in']:.4f} | {r['out']:.4f} | {vs:+.2%} | {r['local']:.4f} | "
                     f"{r['nic']:.3f} | {r['balance']:.4f} | {secs} |")
    return lines


def _goals(rows: list[dict], time_limit: float) -> list[str]:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["method"]: r for r in rows if r["case"] == case}
        ours = by["tokenloom dp"]
        ref_name = ours["reference"]
        ref = by[ref_name]
        cut = 1 - ours["out"] / ref["out"]
        if "strong-topics" in case:
            out.append(f"INFO {case}: held-out messages {cut:.2%} below {ref_name} (sensitivity, no goal)")
            continue
        if "no-structure" in case:
            over = max(ours["out"] / ref["out"], ours["in"] / ref["in"]) - 1
            out.append(f"{'PASS' if over <= 0.01 else 'FAIL'} {case}: messages {over:+.2%} vs {ref_name} (goal: <= +1%)")
        else:
            out.append(f"{'PASS' if cut >= 0.05 else 'FAIL'} {case}: held-out messages {cut:.2%} below {ref_name} (goal >= 5%)")
        out.append(f"{'PASS' if ours['balance'] <= ref['balance'] * (1 + 1e-9) else 'FAIL'} {case}: worst max/mean "
                   f"{ours['balance']:.4f} vs {ref_name} {ref['balance']:.4f} (goal: no worse)")
        out.append(f"{'PASS' if ours['seconds'] <= 60 else 'FAIL'} {case}: plan {ours['seconds']:.1f} s wall incl. imports "
                   f"(--time-limit {time_limit:g}; goal <= 60 s)")
    return out


TIME_LIMIT_SLACK = 1.5  # seconds over --time-limit allowed to the whole command (a loaded 2-core machine)


def check_time_limit(time_limit: float, workdir: str) -> list[str]:
    """PASS/FAIL lines: ``tokenloom plan --time-limit`` bounds the whole command, per token home."""
    from tokenloom.cli import main as cli

    trace = os.path.join(workdir, "time_limit.npz")
    ids = router_topk(RouterConfig(num_layers=8, num_experts=64, top_k=4, num_tokens=2000, num_groups=4, topk_group=2))
    np.savez(trace, topk_ids=ids.astype(np.int16), num_experts=np.int64(64))
    out = []
    for home in ("dp", "expert"):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the command's own summary is not part of this table
            code = cli(["plan", "--trace", trace, "--gpus", "16", "--gpus-per-node", "4", "--token-home", home,
                        "--time-limit", str(time_limit), "--out", os.path.join(workdir, f"{home}.json")])
        seconds = time.perf_counter() - start
        ok = code == 0 and seconds < time_limit + TIME_LIMIT_SLACK
        out.append(f"{'PASS' if ok else 'FAIL'} time limit, {home} token home: plan took {seconds:.2f} s "
                   f"(--time-limit {time_limit:g}, goal < {time_limit + TIME_LIMIT_SLACK:g} s, exit {code})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="tokenloom plan --time-limit (default 55; 2 with --check-time-limit)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per trace (default 8192)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--check-time-limit", action="store_true",
                        help="only check that --time-limit (default here 2) bounds the whole plan command")
    args = parser.parse_args()
    if args.check_time_limit:
        with tempfile.TemporaryDirectory() as workdir:
            print("\n".join(check_time_limit(2.0 if args.time_limit is None else args.time_limit, workdir)))
        return
    args.time_limit = 55.0 if args.time_limit is None else args.time_limit
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    with tempfile.TemporaryDirectory() as workdir:
        rows = []
        for name in names:
            rows += run_case(name, args.tokens, args.time_limit, workdir)
            print(f"# {name} done", file=sys.stderr, flush=True)
    print(f"# placement benchmark ({platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"--tokens {args.tokens}, --time-limit {args.time_limit:g})")
    print("\n".join(_table(rows)))
    print()
    print("\n".join(_goals(rows, args.time_limit)))


if __name__ == "__main__":
    main()
