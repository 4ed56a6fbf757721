"""Simulated strategy table for long-context attention on 8 nodes x 8 H100 (docs/attention.md).

Flat TokenRing / Ring / Ulysses over 64 GPUs against the 2-D hybrid (Ulysses x8 inside each node,
TokenRing or Ring x8 across nodes), forward+backward of one causal attention layer, zigzag layout,
Llama-70B-like heads (64 query heads, 8 kv heads, head_dim 128, bf16). Prints a markdown table of
simulated milliseconds, the ratio to the best row, exposed communication and bytes sent per rank.

    python benchmarks/sp_hybrid_table.py [--seqs 128K,256K,512K,1M] [--nodes 8] [--gpus-per-node 8]
"""

from __future__ import annotations

import argparse
import time

from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import make_cluster
from tokenloom.simulator.scenario import simulate_attention

STRATEGIES = ("tokenring", "ring", "ulysses", "ulysses8+tokenring", "ulysses8+ring")


def _tokens(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1], 1)
    return int(text.rstrip("KM")) * scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="128K,256K,512K,1M", help="global sequence lengths")
    p.add_argument("--nodes", type=int, default=8, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    p.add_argument("--hardware", default="h100-sxm", help="catalog name")
    args = p.parse_args()
    n = args.nodes * args.gpus_per_node
    cluster = make_cluster(args.hardware, n, args.nodes)
    strategies = [s.replace("ulysses8", f"ulysses{args.gpus_per_node}") for s in STRATEGIES]
    print(f"{cluster.describe()}, causal fwd+bwd, zigzag, heads 64/8 kv, head_dim 128, bf16\n")
    print("| seq | strategy | total ms | vs best | exposed comm ms | GB sent/rank |")
    print("|---|---|---:|---:|---:|---:|")
    for seq_text in args.seqs.split(","):
        shape = AttentionShape(_tokens(seq_text), 64, 128, 8, 1, 2)
        rows = []
        for strategy in strategies:
            t0 = time.perf_counter()
            s = simulate_attention(strategy, cluster, shape, causal=True, backward=True).summary()
            rows.append((strategy, s["total_ms"], s["exposed_comm_ms"], s["bytes_per_rank"] / 1e9,
                         time.perf_counter() - t0))
        best = min(r[1] for r in rows)
        for strategy, total, exposed, gb, _ in rows:
            print(f"| {seq_text} | {strategy} | {total:.1f} | {total / best:.2f} | {exposed:.1f} | {gb:.2f} |")


if __name__ == "__main__":
    main()
