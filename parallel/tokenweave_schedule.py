"""TokenWeave per-rank step lists: pure data, walked by the runtime and priced by the simulator.

Every rank runs the same list (tensor parallelism is symmetric). Steps:

- ``compute(op, piece)``: ``op`` is ``attn`` or ``mlp`` of one layer on one piece of the tokens;
  it leaves this rank's partial sum of the piece (row-parallel output projection).
- ``allreduce(piece)``: the baseline, blocking on the compute stream: AllReduce, add the
  replicated residual, RMSNorm every row.
- ``post(piece)``: start the fused ReduceScatter -> add+RMSNorm of this rank's rows -> AllGather
  on the communication stream; ``wait(piece)``: the compute stream needs its result.

TokenWeave with two pieces (arXiv 2505.11329, REFERENCE.md §4) runs four phases per layer,
``attn(0) attn(1) mlp(0) mlp(1)``, each overlapped with the fused communication of the other
piece; the last post of a layer is waited on only before ``attn(0)`` of the next layer, so it
overlaps with that. With one piece (fuse-only) each post is waited on at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.common.errors import UsageError

KINDS = ("compute", "allreduce", "post", "wait")
OPS = ("attn", "mlp")


@dataclass(frozen=True)
class Step:
    kind: str  # one of KINDS
    layer: int
    piece: int
    op: str = ""  # for compute, allreduce and post: the op whose output is communicated

    def __str__(self) -> str:
        if self.kind == "compute":
            return f"L{self.layer}.{self.op}({self.piece})"
        if self.kind == "wait":
            return f"L{self.layer}.wait({self.piece})"
        return f"L{self.layer}.{self.kind}:{self.op}({self.piece})"


def build_steps(num_layers: int, num_pieces: int, fused: bool) -> list[Step]:
    """The step list of a stack of ``num_layers`` layers.

    ``fused=False`` is the baseline (one piece, blocking AllReduce). ``fused=True`` with
    ``num_pieces`` 1 (fuse-only) or 2 (split) is TokenWeave.
    """
    if num_layers < 1:
        raise UsageError(f"num_layers must be >= 1, got {num_layers}", field="num_layers")
    if num_pieces not in (1, 2) or (not fused and num_pieces != 1):
        raise UsageError(f"num_pieces must be 1, or 2 with fused communication; got {num_pieces} "
                         f"(fused={fused})", field="num_pieces")
    steps: list[Step] = []
    pending: dict[int, int] = {}  # piece -> layer of its outstanding post
    for layer in range(num_layers):
        for op in OPS:
            for piece in range(num_pieces):
                if not fused:
                    steps += [Step("compute", layer, piece, op), Step("allreduce", layer, piece, op)]
                    continue
                if piece in pending:
                    steps.append(Step("wait", pending.pop(piece), piece))
                steps.append(Step("compute", layer, piece, op))
                steps.append(Step("post", layer, piece, op))
                pending[piece] = layer
                if num_pieces == 1:  # nothing else to overlap with: wait at once
                    steps.append(Step("wait", pending.pop(piece), piece))
    steps += [Step("wait", pending[p], p) for p in sorted(pending)]
    return steps


def check_steps(steps: list[Step], num_pieces: int) -> None:
    """Invariants: every post waited on exactly once, before the piece is computed again."""
    outstanding: set[int] = set()
    for i, step in enumerate(steps):
        if step.kind == "compute" and step.piece in outstanding:
            raise AssertionError(f"step {i} {step}: piece {step.piece} computed before its result arrived")
        if step.kind == "post":
            assert step.piece not in outstanding, f"step {i} {step}: second post in flight"
            outstanding.add(step.piece)
        if step.kind == "wait":
            assert step.piece in outstanding, f"step {i} {step}: wait without a post"
            outstanding.discard(step.piece)
    assert not outstanding, f"posts never waited on: {sorted(outstanding)}"


def format_steps(steps: list[Step]) -> str:
    """Compact one-line form, e.g. ``L0.attn(0) L0.post:attn(0) L0.attn(1) ...``."""
    return " ".join(str(s) for s in steps)
