"""One attention call's plan: its arguments, schedules, runners and the autograd function.

:class:`AttentionPlan` is what :mod:`tokenloom.parallel.attention` caches per shape and arguments:
the forward (and backward) schedule of the call's :class:`~tokenloom.parallel.dims.ParallelDims`,
the runtime's input buffers built from ``Schedule.inputs``, and the results read through
``Schedule.outputs``. What the backward needs from the forward is whatever the backward schedule
lists as inputs that are not plain local tensors: the forward run keeps exactly those.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from tokenloom.common.errors import UsageError
from tokenloom.kernels.masks import poison_dead_rows
from tokenloom.kernels.reference import attention_delta
from tokenloom.parallel.agree import Agreed, check_scale, check_softcap
from tokenloom.parallel.buffers import Dims, Held
from tokenloom.parallel.builders import schedule_for
from tokenloom.common.checks import check_choice
from tokenloom.common.vocab import AUTO, LAYOUTS, STRATEGIES, Strategy
from tokenloom.parallel.dims import AttentionProblem, ParallelDims, effective_window
from tokenloom.parallel.layout import SeqLayout, doc_lens_from_cu_seqlens
from tokenloom.parallel.runtime import Groups, Runner
from tokenloom.parallel.schedule import WIRE_FIELDS, Buf, Schedule
from tokenloom.parallel.sinks import apply_sinks, sink_grad

_LOCAL_FIELDS = ("q", "k", "v", "out", "lse")  # plain local tensors a backward may need


# ---------------------------------------------------------------------- resolution (pure-ish)
def resolve_strategy(strategy: str, problem: AttentionProblem | None = None, *, hardware: str | None = None,
                     **shape: Any) -> str:
    """The one place "auto" is decided: the simulator's advisor ranks the strategies for ``problem``
    (its window too: a short window favours the rings). A plain strategy name (or
    :class:`~tokenloom.common.vocab.Strategy`) is checked and returned as its string.

    Every rank gets the same answer from the same (agreed) shapes; the agreement that follows
    checks it anyway. On a 2-D mesh the choice is the ring dim's strategy ("tokenring" or "ring"),
    ranked the same way among the hybrids. The keyword form (``world_size=..., seq_len=...,
    heads=...``) builds the :class:`AttentionProblem`.
    """
    if strategy != AUTO:
        if strategy not in STRATEGIES:
            raise UsageError(f"strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}",
                             field="strategy")
        return Strategy(strategy).value
    return _auto(AttentionProblem.of(**shape) if problem is None else problem, hardware)


@functools.lru_cache(maxsize=128)
def _auto(problem: AttentionProblem, hardware: str | None) -> str:
    from tokenloom.simulator import choose_strategy

    chosen, _ = choose_strategy(problem, hardware=hardware)
    return chosen


@dataclass(frozen=True)
class CallArgs:
    """Every argument of one call that changes its result (hashable: the cache key)."""

    strategy: str
    layout: str
    causal: Any
    softmax_scale: Any
    impl: Any
    cu_seqlens: tuple[int, ...] | None
    window_size: Any
    softcap: Any
    hardware: str | None
    backward: bool
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    dtypes: tuple
    device: torch.device


class AttentionPlan:
    """Everything one attention call needs on this rank; shared by forward and backward."""

    def __init__(self, name: str, groups: Groups, a: CallArgs) -> None:
        b, s_local, h, d = a.q_shape
        hkv = a.k_shape[2]
        self.groups, self.rank = groups, groups.rank
        n, u = groups.world_size, groups.ulysses
        if not isinstance(a.causal, bool):
            raise UsageError(f"causal must be True or False, got {a.causal!r}", field="causal")
        doc_lens = None
        if a.cu_seqlens is not None:
            doc_lens = doc_lens_from_cu_seqlens(a.cu_seqlens)
        check_choice(a.layout, "layout", LAYOUTS)  # layout first: its error names the layout
        SeqLayout(n, a.layout, u)
        if doc_lens is None:
            seq_len = ParallelDims("ring", n, layout=a.layout, ulysses=u).dense_seq_len(s_local)
        else:
            seq_len = sum(doc_lens)
        window = effective_window(a.window_size, a.causal, seq_len)
        problem = AttentionProblem(world_size=n, seq_len=seq_len, heads=h, head_dim=d, kv_heads=hkv, batch=b,
                                   dtype_bytes=torch.empty((), dtype=a.dtypes[0]).element_size(),
                                   causal=a.causal, backward=a.backward, layout=a.layout, ulysses=u,
                                   window=window)
        strategy = resolve_strategy(a.strategy, problem, hardware=a.hardware)
        self.pdims = ParallelDims(strategy, n, layout=a.layout, ulysses=u, heads=h, kv_heads=hkv,
                                  doc_lens=doc_lens)
        seq = self.pdims.seq
        if doc_lens is not None and seq.local_len(self.rank) != s_local:
            raise UsageError(f"{name}: q.shape[1] is {s_local} but cu_seqlens gives rank {self.rank} "
                             f"{seq.local_len(self.rank)} tokens; shard with shard_sequence(..., "
                             f"cu_seqlens=...)", field="cu_seqlens")
        self.scale = check_scale(a.softmax_scale, d)
        self.impl = resolve_impl(a.impl, a.device)
        self.softcap = check_softcap(a.softcap)
        if window is not None:
            self.pdims = dataclasses.replace(self.pdims, window=window,
                                             seq_len=seq_len if doc_lens is None else None)
            seq = self.pdims.seq
        self.dims = Dims(b, seq.chunk_lens(seq_len), h, hkv, d, a.dtypes[0], a.device,
                         self.pdims.head_shards, self.pdims.kv_repeat, seq if seq.varlen else None)
        self.fwd = schedule_for(self.pdims, causal=a.causal, backward=False)
        self.bwd = schedule_for(self.pdims, causal=a.causal, backward=True) if a.backward else None
        self.agreed = Agreed.of({
            "strategy": self.pdims.name, "layout": a.layout, "causal": a.causal,
            "softmax_scale": self.scale, "impl": self.impl, "dtype": str(a.dtypes[0]), "batch": b,
            "seq": seq_len if doc_lens is not None else s_local, "heads": h, "kv_heads": hkv,
            "head_dim": d, "cu_seqlens": doc_lens, "mesh": f"{u}x{n // u}", "backward": a.backward,
            "call": "attention", "window_size": window, "softcap": self.softcap})

    def runner(self, sched: Schedule, keep=()) -> Runner:
        return Runner(sched, self.groups, self.dims, softmax_scale=self.scale, impl=self.impl, keep=keep,
                      softcap=self.softcap)

    # ------------------------------------------------------------------ buffers
    def _local(self, buf: Buf) -> bool:
        return buf.shard < 0 and tuple(buf.chunks) == self.pdims.seq.chunks_of(self.rank)

    @staticmethod
    def _bind(buf: Buf, tensors: dict[str, torch.Tensor]) -> Held:
        fields = {}
        for name, *_ in WIRE_FIELDS[buf.kind]:
            if name == "delta":
                fields[name] = attention_delta(tensors["out"], tensors["dout"])
            else:
                fields[name] = tensors[name].contiguous()
        return Held(tuple(buf.chunks), fields)

    def forward(self, q, k, v, sinks=None) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
        r = self.rank
        tensors = {"q": q, "k": k, "v": v}
        store = {b.key: self._bind(b, tensors) for b in self.fwd.inputs[r]}
        bwd_inputs = self.bwd.inputs[r] if self.bwd is not None else ()
        keep = [b.key for b in bwd_inputs if not self._local(b)]
        runner = self.runner(self.fwd, keep)
        runner.run(store)
        out = runner.output(store, "out", "out")
        lse = runner.output(store, "out", "lse").contiguous()  # fp32 (fp64 for fp64), as the reference
        if sinks is None:
            out, lse = poison_dead_rows(out, lse)  # rows whose every score was -inf (infinite inputs)
        else:  # once per query, after every partial merged; the kept head shards too (Ulysses)
            out, lse = apply_sinks(out, lse, sinks)
            for key in keep:
                held = store[key]
                if key[0] == "out":
                    h = held.fields["lse"].shape[1]
                    held.fields["out"], held.fields["lse"] = apply_sinks(
                        held.fields["out"], held.fields["lse"], sinks, max(key[3], 0) * h)
        out = out.to(q.dtype)
        tensors.update(out=out, lse=lse)
        need = {f for b in bwd_inputs if self._local(b) for f, *_ in WIRE_FIELDS[b.kind]}
        need |= {"q", "out", "lse"} if "delta" in need else set()
        need |= {"out", "lse"} if sinks is not None else set()
        saved, meta = [], {"local": [], "held": []}
        for name in _LOCAL_FIELDS:
            if name in need:
                meta["local"].append(name)
                saved.append(tensors[name])
        for key in keep:
            held = store[key]
            meta["held"].append((key, held.chunks, list(held.fields)))
            saved.extend(held.fields.values())
        return out, lse, saved, meta

    def backward(self, dout: torch.Tensor, saved, meta, sinks=None) -> tuple[torch.Tensor, ...]:
        assert self.bwd is not None, "backward of a call agreed without backward"
        it = iter(saved)
        tensors = {name: next(it) for name in meta["local"]}
        tensors["dout"] = dout
        kept = {key: Held(chunks, {f: next(it) for f in names}) for key, chunks, names in meta["held"]}
        store = {b.key: (self._bind(b, tensors) if self._local(b) else kept[b.key])
                 for b in self.bwd.inputs[self.rank]}
        runner = self.runner(self.bwd)
        runner.run(store)
        io = self.dims.dtype
        grads = tuple(runner.output(store, kind, name).to(io)
                      for kind, name in (("dq", "dq"), ("dkv", "dk"), ("dkv", "dv")))
        if sinks is None:
            return grads + (None,)
        return grads + (sink_grad(tensors["out"], tensors["lse"], dout, sinks),)


def resolve_impl(impl: Any, device: torch.device) -> str:
    from tokenloom.kernels import select_impl

    try:
        return select_impl(device, impl)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc), field="impl") from exc


class SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: AttentionPlan):
        out, lse, saved, meta = plan.forward(q, k, v, sinks)
        ctx.plan, ctx.meta, ctx.sinks = plan, meta, sinks
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv, dsinks = ctx.plan.backward(dout.contiguous(), ctx.saved_tensors, ctx.meta, ctx.sinks)
        return dq, dk, dv, dsinks, None
