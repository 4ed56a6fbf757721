"""The simulator's section of ``tokenloom demo``: TokenRing vs Ring vs Ulysses on an 8xH100 node."""

from __future__ import annotations

from typing import TextIO

from tokenloom.simulator.advisor import advise_attention
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import make_cluster

HEADS, HEAD_DIM = 32, 128
CASES = ((32 * 1024, 32, "MHA"), (32 * 1024, 8, "GQA 4:1"), (128 * 1024, 32, "MHA"), (128 * 1024, 8, "GQA 4:1"))


def demo_section(out: TextIO) -> None:
    """Write a short comparison (simulated, causal, forward+backward) to ``out``; well under 2 s."""
    cluster = make_cluster("h100-sxm", 8)
    print(f"Simulated on {cluster.describe()} (NVSwitch), causal, forward+backward, {HEADS} heads x {HEAD_DIM}, "
          f"bf16, zigzag (tokenloom simulate / advise attention):", file=out)
    print(f"  {'seq':<6}{'heads':<9}{'strategy':<11}{'time ms':>9}{'exposed comm ms':>17}{'GB sent/rank':>14}",
          file=out)
    for seq, kv_heads, label in CASES:
        shape = AttentionShape(seq, HEADS, HEAD_DIM, kv_heads)
        advice = advise_attention(cluster, shape, causal=True, backward=True, layouts=("zigzag",))
        for i, res in enumerate(advice.ranking):
            s = res.summary()
            head = f"{seq // 1024}K" if i == 0 else ""
            print(f"  {head:<6}{label if i == 0 else '':<9}{res.strategy:<11}{s['total_ms']:>9.2f}"
                  f"{s['exposed_comm_ms']:>17.3f}{s['bytes_per_rank'] / 1e9:>14.2f}", file=out)
        print(f"  {'':<15}-> {advice.verdict()}", file=out)
