"""Tensor-parallel transformer stack in two modes with the same weights: baseline and TokenWeave.

The runtime only walks a step list (:mod:`tokenloom.parallel.tokenweave_schedule`); the decisions
(split or not, where) come from the planner (:mod:`tokenloom.parallel.tokenweave_split`).

- *baseline*: one piece; after attention and after the MLP, AllReduce the partial sums, add the
  (replicated) residual and RMSNorm every row, all on the compute stream.
- *tokenweave*: one or two pieces of the tokens; after each op, the fused ReduceScatter ->
  add+RMSNorm of this rank's rows -> AllGather runs on a :class:`CommStream` while the other piece
  computes; the residual stays sharded by token rows. Each piece is padded with zero rows to a
  multiple of the group size for the collectives and unpadded before compute (an all-zero row
  normalises to zero, so padding never produces NaN and never reaches real rows).

Attention of piece 1 reads the keys and values of piece 0 of the same layer (one causal
sequence, prefill), so piece 0 is always computed first; positions are global token indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenloom.comm.communicator import Communicator
from tokenloom.common.errors import UsageError
from tokenloom.kernels import block_forward
from tokenloom.parallel.tokenweave_comm import (CommStream, allreduce_residual_rmsnorm,
                                                fused_allreduce_residual_rmsnorm, residual_rmsnorm)
from tokenloom.parallel.tokenweave_model import LayerConfig, kv_heads_of_rank, moe_route, rope
from tokenloom.parallel.tokenweave_schedule import Step, build_steps, check_steps
from tokenloom.parallel.tokenweave_split import GpuShape, SplitPlan, plan_split, round_up

MODES = ("baseline", "tokenweave")


@dataclass(frozen=True)
class Pieces:
    """Token ranges the runtime walks and the rows each is padded to for the collectives."""

    ranges: tuple[tuple[int, int], ...]
    padded: tuple[int, ...]

    @classmethod
    def from_plan(cls, plan: SplitPlan) -> "Pieces":
        return cls(plan.pieces, plan.padded)

    @classmethod
    def whole(cls, tokens: int, multiple: int = 1) -> "Pieces":
        return cls(((0, tokens),), (round_up(tokens, multiple),))


def plan_for(cfg: LayerConfig, tp: int, tokens: int, gpu: GpuShape | None = None, *,
             threshold: int | None = None) -> SplitPlan:
    """The planner's decision for this layer on ``tp`` ranks (``threshold`` overrides the paper's)."""
    shape = cfg.shape(tp)
    return plan_split(shape, tokens, gpu, threshold=threshold)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (``t`` itself when it has them already)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


class TPStack:
    """One rank's part of a stack of tensor-parallel layers.

    Args:
        cfg: layer sizes. shard: this rank's weights (:func:`~tokenloom.parallel.tokenweave_model.shard_weights`).
        comm: the tensor-parallel group's communicator.
        path: fused-communication path (``multimem``/``nccl``/``gloo``; None selects).
        norm_impl, attn_impl: kernel selectors passed through (None: device default).
    """

    def __init__(self, cfg: LayerConfig, shard: dict, comm: Communicator, *, path: str | None = None,
                 norm_impl: str | None = None, attn_impl: str | None = None) -> None:
        cfg.check_tp(comm.world_size)
        self.cfg, self.w, self.comm = cfg, shard, comm
        self.path, self.norm_impl, self.attn_impl = path, norm_impl, attn_impl
        self.num_layers = len(shard["layers"])
        tp, rank = comm.world_size, comm.rank
        self.q_heads = cfg.heads // tp
        self.f_local = cfg.ffn // tp
        kv = kv_heads_of_rank(cfg, rank, tp)
        group = cfg.heads // cfg.kv_heads
        first_q = rank * self.q_heads
        self.kv_local = len(kv)
        self.kv_index = torch.tensor([(first_q + i) // group - kv.start for i in range(self.q_heads)])
        regular = self.q_heads % self.kv_local == 0 and torch.equal(
            self.kv_index, torch.arange(self.kv_local).repeat_interleave(self.q_heads // self.kv_local))
        self.expand_kv = not regular  # irregular local GQA groups: give every query head its kv head

    # ------------------------------------------------------------------ compute on one piece
    def attention(self, layer: int, a: torch.Tensor, start: int, cache: list) -> torch.Tensor:
        """Partial output ``(tokens, hidden)`` of this rank's heads for tokens ``start...``;
        ``cache`` holds the (k, v) of the earlier pieces of this layer and gains this piece's."""
        w, n, d = self.w["layers"][layer], a.shape[0], self.cfg.head_dim
        qkv = a @ w["wqkv"].T
        q, k, v = qkv.split([self.q_heads * d, self.kv_local * d, self.kv_local * d], dim=1)
        q = rope(q.reshape(n, self.q_heads, d), start, self.cfg.rope_theta)
        k = rope(k.reshape(n, self.kv_local, d), start, self.cfg.rope_theta)
        cache.append((k, v.reshape(n, self.kv_local, d)))
        keys = torch.cat([c[0] for c in cache]) if len(cache) > 1 else k
        values = torch.cat([c[1] for c in cache]) if len(cache) > 1 else cache[0][1]
        if self.expand_kv:
            idx = self.kv_index.to(keys.device)
            keys, values = keys.index_select(1, idx), values.index_select(1, idx)
        out, _ = block_forward(q[None], keys[None], values[None], causal=True, softmax_scale=None,
                               impl=self.attn_impl)
        return out[0].reshape(n, self.q_heads * d).to(a.dtype) @ w["wo"].T

    def _swiglu(self, a: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = (a @ gate_up.T).split(self.f_local, dim=1)
        return (F.silu(gate) * up) @ down.T

    def mlp(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """Partial MLP output ``(tokens, hidden)`` of this rank's ``ffn / tp`` columns."""
        w = self.w["layers"][layer]
        if not self.cfg.moe:
            return self._swiglu(a, w["w_gate_up"], w["w_down"])
        weights, experts = moe_route(a @ w["router"].T, self.cfg.top_k)
        out = torch.zeros_like(a)
        for e in range(self.cfg.num_experts):
            tok, slot = (experts == e).nonzero(as_tuple=True)
            if tok.numel():
                y = self._swiglu(a[tok], w["w_gate_up"][e], w["w_down"][e])
                out.index_add_(0, tok, weights[tok, slot, None] * y)
        return out

    def _norm_after(self, layer: int, op: str) -> torch.Tensor:
        if op == "attn":
            return self.w["layers"][layer]["post_norm"]
        if layer + 1 < self.num_layers:
            return self.w["layers"][layer + 1]["in_norm"]
        return self.w["final_norm"]

    # ------------------------------------------------------------------ the walker
    def run(self, x: torch.Tensor, mode: str, pieces: Pieces | None = None,
            steps: list[Step] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the stack on ``x`` ``(tokens, hidden)`` (replicated on every rank).

        Returns the final normed output ``(tokens, hidden)`` (replicated) and the residual per
        piece: full rows for the baseline, this rank's padded shard for TokenWeave.
        """
        n, tp, rank = x.shape[0], self.comm.world_size, self.comm.rank
        if mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {mode!r}", field="mode")
        fused = mode == "tokenweave"
        pieces = pieces or Pieces.whole(n, tp if fused else 1)
        if pieces.ranges[-1][1] != n:
            raise UsageError(f"pieces must cover the {n} tokens (rows) of x, they cover {pieces.ranges[-1][1]}",
                             field="pieces")
        steps = steps or build_steps(self.num_layers, len(pieces.ranges), fused)
        check_steps(steps, len(pieces.ranges))
        eps, w0 = self.cfg.eps, self.w["layers"][0]["in_norm"]
        normed, residual = [], []
        for (s, e), rows in zip(pieces.ranges, pieces.padded):
            xp = pad_rows(x[s:e], rows)
            m = rows // tp if fused else rows
            residual.append(xp[rank * m:(rank + 1) * m].clone() if fused else xp.clone())
            normed.append(residual_rmsnorm(xp, None, w0, eps, impl=self.norm_impl)[0])
        partial: dict[int, torch.Tensor] = {}
        pending: dict[int, object] = {}
        caches: dict[int, list] = {}
        stream = CommStream(x.device) if fused else None
        try:
            for step in steps:
                p = step.piece
                (s, e), rows = pieces.ranges[p], pieces.padded[p]
                if step.kind == "compute":
                    a = normed[p][: e - s]
                    if step.op == "attn":
                        caches.pop(step.layer - 1, None)
                        out = self.attention(step.layer, a, s, caches.setdefault(step.layer, []))
                    else:
                        out = self.mlp(step.layer, a)
                    partial[p] = pad_rows(out, rows)
                elif step.kind == "allreduce":
                    normed[p], residual[p] = allreduce_residual_rmsnorm(
                        partial.pop(p), residual[p], self._norm_after(step.layer, step.op), eps, self.comm,
                        norm_impl=self.norm_impl)
                elif step.kind == "post":
                    pending[p] = stream.submit(fused_allreduce_residual_rmsnorm, partial.pop(p), residual[p],
                                               self._norm_after(step.layer, step.op), eps, self.comm,
                                               path=self.path, norm_impl=self.norm_impl)
                else:  # wait
                    normed[p], residual[p] = pending.pop(p).wait()
        except BaseException:
            for handle in pending.values():  # let in-flight collectives finish before re-raising
                try:
                    handle.wait()
                except Exception:  # the first error is the one to report
                    pass
            raise
        finally:
            if stream is not None:
                stream.close()
        out = torch.cat([normed[p][: e - s] for p, (s, e) in enumerate(pieces.ranges)])
        return out, residual

    def gather_residual(self, residual: list[torch.Tensor], pieces: Pieces) -> torch.Tensor:
        """Full residual ``(tokens, hidden)`` from TokenWeave's sharded pieces (collective)."""
        parts = []
        for shard, (s, e) in zip(residual, pieces.ranges):
            parts.append(self.comm.all_gather(shard).reshape(-1, shard.shape[-1])[: e - s])
        return torch.cat(parts)
