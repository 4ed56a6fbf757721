"""Hugging Face transformers adapter: tokenloom's sequence-parallel attention as an attention backend.

::

    name = register(strategy="auto", group=sp_group)                 # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    batch = shard_inputs(input_ids, group=sp_group)                  # full batch in, this rank's part out
    out = model(**batch)                                             # out.loss: this rank's share
    out.loss.backward(); sum_gradients(model, group=sp_group)        # = single-device gradients
    logits = gather_sequence(out.logits, group=sp_group)             # = single-device logits

How it fits transformers 5.x: :func:`register` puts an attention function into
``transformers.AttentionInterface`` under ``name``. Every attention layer then calls it with
``(module, query, key, value, attention_mask, **kwargs)``, tensors ``(batch, heads, seq_local,
head_dim)``; it returns ``(attn_output (batch, seq_local, heads, head_dim), None)`` like
``sdpa_attention_forward``. Everything else in the model (embeddings, norms, MLPs, the LM head)
is per token, so it runs unchanged on this rank's tokens.

Three things a user must get right, which the helpers here do:

* **Positions.** Rotary embeddings see ``position_ids``; with sequence parallelism each rank's
  tokens are *not* ``0..seq_local-1`` but the global positions of the tokens it holds (with the
  zigzag layout, two separate ranges). :func:`shard_inputs` builds them; the attention function
  checks them and refuses a model call that let transformers default them to ``arange``.
* **Labels.** Shifting labels by one (token t predicts token t+1) must happen on the *full*
  sequence before sharding: a rank's last token predicts a token that lives on another rank.
  :func:`causal_lm_labels` shifts; :func:`shard_inputs` passes ``labels`` and ``shift_labels``
  (so transformers does not shift again) and ``num_items_in_batch`` (the global count of
  predicted tokens, so each rank's loss is its share of the global mean: the ranks' losses sum
  to the single-device loss).
* **Gradients.** Each rank's parameter gradients are its share; :func:`sum_gradients` sums them
  over the sequence-parallel group (or fold that group into your data-parallel reduction).

Masks: the attention is causal (``module.is_causal``) or full over the global sequence, with the
layer's ``sliding_window`` (per layer: models with ``layer_types`` pass None on their global
layers), logit ``softcap`` (Gemma 2) and attention sinks ``s_aux`` (GPT-OSS) when the model passes
them. A padding mask cannot be honoured across ranks, so a 2-D ``attention_mask`` is accepted only
when it masks nothing; anything else raises :class:`~tokenloom.common.errors.UsageError` on every rank
(the ranks agree first, so a mask on one rank is an error everywhere, not a hang). Dropout, an
additive position bias and KV caches are refused the same way.

transformers is imported only in this module, and only when a function here is called.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from tokenloom.comm.topology import LAYOUTS
from tokenloom.common.vocab import AUTO, STRATEGIES as SP_STRATEGIES
from tokenloom.common.errors import UsageError
from tokenloom.common.checks import check_choice

STRATEGIES = (AUTO,) + SP_STRATEGIES  # ("auto", "tokenring", "ring", "ulysses")
DEFAULT_NAME = "tokenloom"
IGNORE_INDEX = -100

# kwargs some transformers models pass that change the attention math in ways SP does not do
_UNSUPPORTED = {
    "position_bias": "an additive position bias",
}

# codes for problems that can differ between ranks (agreed on before any attention traffic)
_OK, _MASK, _POSITIONS = 0, 1, 2


def _groups(group: Any) -> Any:
    """The SP rank's communicators for ``group`` (flat group, 1-D or 2-D ("ulysses", "ring") mesh)."""
    from tokenloom.parallel.groups import resolve_sp_group

    return resolve_sp_group(group)


@functools.lru_cache(maxsize=1)
def _check_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """``cu_seqlens`` as a CPU int64 tensor after checking it (``seq_len``: the total, if known)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype.is_floating_point:
        raise UsageError("cu_seqlens must be a 1-D integer tensor (num_docs + 1,) of document "
                         "boundaries", field="cu_seqlens")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    total = int(cu[-1]) if seq_len is None else seq_len
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] <= cu[:-1]).any()):
        raise UsageError(f"cu_seqlens must rise strictly from 0 to the sequence length {total}, "
                         f"got {cu.tolist()}", field="cu_seqlens")
    return cu


def causal_lm_labels(input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels for the *full* sequence: ``labels[:, t] = input_ids[:, t + 1]``.

    The last token of the sequence (and, for a packed batch, of every document: it must not
    predict the next document's first token) gets ``ignore_index``. Shard the result with the
    same layout as the inputs and pass it as ``shift_labels`` (:func:`shard_inputs` does).

    Args:
        input_ids: ``(batch, seq)`` integer tensor, the whole sequence.
        cu_seqlens: optional ``(num_docs + 1,)`` document boundaries of a packed sequence.
    Returns:
        ``(batch, seq)`` int64 labels.
    """
    if input_ids.dim() != 2:
        raise UsageError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}",
                         field="input_ids")
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.int64)
    labels[:, :-1] = input_ids[:, 1:]
    if cu_seqlens is not None:
        cu = _check_cu_seqlens(cu_seqlens, input_ids.shape[1])
        labels[:, (cu[1:] - 1).to(labels.device)] = ignore_index
    return labels


def global_position_ids(seq_len: int, *, cu_seqlens: torch.Tensor | None = None,
                        device: Any = None) -> torch.Tensor:
    """``(1, seq_len)`` positions of the full sequence: ``arange``, restarting at every document."""
    pos = torch.arange(seq_len, dtype=torch.int64)
    if cu_seqlens is not None:
        cu = _check_cu_seqlens(cu_seqlens, seq_len)
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
        pos = pos - starts
    return pos.unsqueeze(0).to(device)


def _shard(x: torch.Tensor, group: Any, layout: str, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """This SP rank's part of ``x`` along dim 1 (``group=None``: the default group)."""
    from tokenloom.parallel import shard_sequence

    if group is None:  # shard_sequence wants the rank spelled out for the default group
        g = _groups(None)
        return shard_sequence(x, g.rank, g.world_size, layout=layout, dim=1, cu_seqlens=cu_seqlens)
    return shard_sequence(x, group=group, layout=layout, dim=1, cu_seqlens=cu_seqlens)


def shard_inputs(input_ids: torch.Tensor, *, group: Any = None, layout: str = "zigzag",
                 cu_seqlens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """This rank's model inputs from the full batch (the same full batch on every rank).

    Returns a dict for ``model(**batch)``: ``input_ids`` and ``position_ids`` (the *global*
    positions of this rank's tokens, restarting per document when packed) of shape
    ``(batch, seq_local)``; ``labels`` and ``shift_labels`` (this rank's part of the labels
    shifted on the full sequence, :func:`causal_lm_labels`, unless ``labels`` gives already
    shifted full-sequence labels); ``num_items_in_batch`` (labels other than ``ignore_index`` in
    the whole batch, so the ranks' losses sum to the global mean); and ``cu_seqlens`` when packed.
    ``layout`` must be the one given to :func:`register`.
    """
    check_choice(layout, "layout", LAYOUTS)
    if input_ids.dim() != 2:
        raise UsageError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}",
                         field="input_ids")
    seq_len = input_ids.shape[1]
    if labels is None:
        labels = causal_lm_labels(input_ids, cu_seqlens=cu_seqlens, ignore_index=ignore_index)
    elif labels.shape != input_ids.shape:
        raise UsageError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape)}", field="labels")
    positions = global_position_ids(seq_len, cu_seqlens=cu_seqlens, device=input_ids.device)
    positions = positions.expand(input_ids.shape[0], -1)
    local_labels = _shard(labels, group, layout, cu_seqlens)
    batch = {
        "input_ids": _shard(input_ids, group, layout, cu_seqlens),
        "position_ids": _shard(positions, group, layout, cu_seqlens),
        "labels": local_labels,
        "shift_labels": local_labels,
        "num_items_in_batch": (labels != ignore_index).sum(),
    }
    if cu_seqlens is not None:
        batch["cu_seqlens"] = cu_seqlens
    return batch


def sum_gradients(model: torch.nn.Module, *, group: Any = None) -> None:
    """Sum every parameter gradient over the sequence-parallel group (in place).

    After it each rank holds the single-device gradient of the global loss. Skip it when the
    group is already part of your data-parallel gradient reduction (e.g. FSDP over dp x sp).
    """
    groups = _groups(group)
    if groups.world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])  # one collective, not one per tensor
    if groups.ulysses > 1:  # a 2-D mesh: sum inside each Ulysses group, then across the ring
        groups.a2a.all_reduce(flat, "sum_gradients (ulysses)")
    groups.p2p.all_reduce(flat, "sum_gradients")
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class _SPAttention:
    """The function transformers calls in every attention layer (see the module docstring)."""

    def __init__(self, strategy: str, group: Any, layout: str, impl: str | None,
                 hardware: str | None) -> None:
        self.strategy, self.group, self.layout = strategy, group, layout
        self.impl, self.hardware = impl, hardware
        self._positions: tuple[tuple, torch.Tensor] | None = None  # (key, expected) of the last call

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        self._refuse_unsupported(module, query, key, dropout, kwargs)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        groups = _groups(self.group)
        packed = _cu_seqlens_of(kwargs)  # global boundaries: local lengths may differ by rank
        cu_seqlens = None if packed is None else _check_cu_seqlens(packed, None)
        window = window_size_of(kwargs.get("sliding_window"), causal)
        code = self._local_problem(attention_mask, kwargs.get("position_ids"), groups, cu_seqlens)
        _agree(groups, code)
        from tokenloom.parallel import sp_attention

        out = sp_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           strategy=self.strategy, group=self.group, causal=causal,
                           layout=self.layout, softmax_scale=scaling, impl=self.impl,
                           hardware=self.hardware, cu_seqlens=packed, window_size=window,
                           softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
        return out, None

    @staticmethod
    def _refuse_unsupported(module, query, key, dropout, kwargs) -> None:
        if dropout:
            raise UsageError(f"dropout: tokenloom attention has no attention dropout, got {dropout}; "
                             f"set config.attention_dropout=0 (or call model.eval())", field="dropout")
        for name, what in _UNSUPPORTED.items():
            if kwargs.get(name) is not None:
                raise UsageError(f"{name}: tokenloom attention does not support {what} "
                                 f"(got {name}={kwargs[name]!r})", field=name)
        if key.shape[2] != query.shape[2]:
            raise UsageError(f"key length {key.shape[2]} != query length {query.shape[2]}: tokenloom "
                             f"attention is for training and prefill without a KV cache; pass "
                             f"use_cache=False", field="use_cache")
        groups = getattr(module, "num_key_value_groups", 1)
        if query.shape[1] != key.shape[1] * groups:
            raise UsageError(f"heads: query has {query.shape[1]} heads, key {key.shape[1]} with "
                             f"num_key_value_groups={groups}", field="num_key_value_groups")

    def _local_problem(self, attention_mask, position_ids, groups: Any,
                       cu_seqlens: torch.Tensor | None) -> int:
        if attention_mask is not None:
            if attention_mask.dim() != 2 or not bool(attention_mask.bool().all()):
                return _MASK
        if position_ids is not None:
            pos = position_ids.detach().to("cpu", torch.int64)
            pos = pos.reshape(-1, pos.shape[-1])
            want = self._expected_positions(pos.shape[-1], groups, cu_seqlens)
            if pos.shape[-1] != want.shape[-1] or not bool((pos == want).all()):
                return _POSITIONS
        return _OK

    def _expected_positions(self, s_local: int, groups: Any, cu_seqlens: torch.Tensor | None
                            ) -> torch.Tensor:
        """``(1, s_local)`` global positions of this rank's tokens; every layer asks the same."""
        total = s_local * groups.world_size if cu_seqlens is None else int(cu_seqlens[-1])
        key = (total, groups.rank, groups.world_size,
               None if cu_seqlens is None else tuple(cu_seqlens.tolist()))
        if self._positions is None or self._positions[0] != key:
            full = global_position_ids(total, cu_seqlens=cu_seqlens)
            self._positions = (key, _shard(full, self.group, self.layout, cu_seqlens))
        return self._positions[1]


def window_size_of(sliding_window: Any, causal: bool) -> tuple[int, int] | None:
    """transformers' ``sliding_window`` W as tokenloom's ``window_size``: its causal overlay is
    ``kv_idx > q_idx - W`` (``masking_utils.sliding_window_overlay``), so query i sees keys
    i-W+1 .. i, i.e. ``(W - 1, 0)``; the bidirectional one (Gemma 3) is ``|q_idx - kv_idx| < W``,
    ``(W - 1, W - 1)``. None (a full-attention layer of a model with ``layer_types``): no window."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise UsageError(f"sliding_window must be a positive integer, got {sliding_window!r}",
                         field="sliding_window")
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _cu_seqlens_of(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``cu_seqlens`` (ours) or transformers' ``cu_seq_lens_q``/``cu_seq_lens_k`` (must match)."""
    cu = kwargs.get("cu_seqlens")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    for name, other in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if other is None:
            continue
        if cu is None:
            cu = other
        elif not torch.equal(cu.detach().cpu().long(), other.detach().cpu().long()):
            raise UsageError(f"{name} differs from cu_seqlens: tokenloom needs one set of global "
                             f"document boundaries", field=name)
    return cu


def _agree(groups: Any, code: int) -> None:
    """Raise the same UsageError on every rank if any rank found a problem (no rank left waiting)."""
    from tokenloom.parallel.groups import gather_all

    every = [code]
    if groups.world_size > 1:
        mine = torch.tensor([code], dtype=torch.int64, device=groups.p2p.device)
        every = gather_all(groups, mine, "hf attention checks").flatten().tolist()
    bad = {r: c for r, c in enumerate(every) if c != _OK}
    if not bad:
        return
    ranks = sorted(bad)
    if _MASK in bad.values():
        raise UsageError(f"attention_mask: ranks {ranks} pass a mask that masks tokens (padding or a "
                         f"4-D mask); sequence-parallel attention cannot honour it: pack documents "
                         f"(cu_seqlens) or drop padding and pass attention_mask=None",
                         field="attention_mask")
    raise UsageError(f"position_ids: ranks {ranks} pass positions that are not the global positions "
                     f"of their tokens; build the inputs with tokenloom.integrations.hf.shard_inputs "
                     f"(layout must match register's)", field="position_ids")


def register(strategy: str = "auto", group: Any = None, *, layout: str = "zigzag",
             name: str = DEFAULT_NAME, impl: str | None = None,
             hardware: str | None = None) -> str:
    """Register tokenloom's SP attention with transformers as ``attn_implementation=name``.

    Args:
        strategy: ``"auto"`` (the simulator's advisor picks per shape and ``hardware``),
            ``"tokenring"``, ``"ring"`` or ``"ulysses"`` (needs heads divisible by the group size).
        group: the sequence-parallel ProcessGroup, a 1-D DeviceMesh, or a 2-D DeviceMesh with
            dims ``("ulysses", "ring")`` (USP: Ulysses inside, ``strategy`` across; None: the
            default group).
        layout: how sequences are sharded, ``"zigzag"`` or ``"contiguous"``; shard inputs with the
            same layout (:func:`shard_inputs`).
        name: the ``attn_implementation`` name; register several names for several groups.
        impl: block kernel, ``"torch"`` | ``"triton"`` | None (by device).
        hardware: catalog name for ``"auto"`` (None: detected).
    Returns:
        ``name``, to pass as ``attn_implementation``.
    """
    check_choice(strategy, "strategy", STRATEGIES)
    check_choice(layout, "layout", LAYOUTS)
    from transformers import AttentionInterface, AttentionMaskInterface

    taken = AttentionInterface._global_mapping.get(name)
    if not isinstance(name, str) or not name or name == "eager" or "|" in name or \
            (taken is not None and not isinstance(taken, _SPAttention)):
        raise UsageError(f"name must not be one of transformers' attention implementations, got "
                         f"{name!r}", field="name")
    fn: Callable = _SPAttention(strategy, group, layout, impl, hardware)
    AttentionInterface.register(name, fn)
    # Without a mask function of its own, transformers drops a user's 2-D padding mask for a
    # custom attention name (it returns None early); this one hands it through so the attention
    # function can refuse it instead of silently attending to padding.
    AttentionMaskInterface.register(name, _pass_padding_mask)
    return name


def _pass_padding_mask(*, attention_mask: torch.Tensor | None = None,
                       **_: Any) -> torch.Tensor | None:
    """Mask builder for ``name``: the user's 2-D padding mask as given (or None)."""
    return attention_mask


__all__ = [
    "DEFAULT_NAME",
    "STRATEGIES",
    "causal_lm_labels",
    "global_position_ids",
    "register",
    "shard_inputs",
    "sum_gradients",
]
