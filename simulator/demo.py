"""The simulator's section of ``tokenloom demo``: TokenRing vs Ring vs Ulysses on an 8xH100 node."""

from __future__ import annotations

from typing import TextIO

from tokenloom.simulator.advisor import advise_attention
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import make_cluster

SEQ, HEADS, HEAD_DIM = 128 * 1024, 32, 128


def demo_section(out: TextIO) -> None:
    """Write a short comparison (simulated, causal, forward+backward) to ``out``; well under 2 s."""
    cluster = make_cluster("h100-sxm", 8)
    print(f"Simulated on {cluster.describe()} (NVSwitch): seq {SEQ // 1024}K, causal, forward+backward, "
          f"head_dim {HEAD_DIM}, bf16", file=out)
    for kv_heads, label in ((HEADS, "MHA"), (8, "GQA 4:1")):
        shape = AttentionShape(SEQ, HEADS, HEAD_DIM, kv_heads)
        advice = advise_attention(cluster, shape, causal=True, backward=True, layouts=("zigzag",))
        print(f"  {label} ({HEADS} heads, {kv_heads} kv heads):", file=out)
        print(f"    {'strategy':<11}{'time ms':>9}{'exposed comm ms':>17}{'GB sent/rank':>14}", file=out)
        for res in advice.ranking:
            s = res.summary()
            print(f"    {res.strategy:<11}{s['total_ms']:>9.2f}{s['exposed_comm_ms']:>17.3f}"
                  f"{s['bytes_per_rank'] / 1e9:>14.2f}", file=out)
        print(f"    -> {advice.winner.strategy} wins. {advice.explain().split('. ', 1)[1]}", file=out)
