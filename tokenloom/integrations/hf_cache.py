"""Hugging Face generation over a sharded KV cache: ``model.generate(...)`` on N ranks.

::

    cache = TokenloomCache(model.config, max_tokens=prompt + new, group=g)   # every rank
    with cache.attached(model):                                               # our attention backend
        ids = model.generate(input_ids, cache=cache, max_new_tokens=new, do_sample=False)
        # (transformers before the rename: past_key_values=cache)

Every rank runs the whole model on the same tokens (the prompt, then one token per step); only the
KV cache is sharded: :class:`TokenloomCache` is a ``transformers.Cache`` whose layers keep nothing
themselves: ``update`` hands the new keys/values straight back, and the attention function that
:meth:`TokenloomCache.attached` installs appends them to this rank's shard and attends the new
queries over the whole cache with :func:`tokenloom.parallel.decode.cached_attention` (replicated
queries; the prompt is a chunked prefill over an empty cache). Each rank then holds ~1/N of the
cache and reads ~1/N of it per token, and gets the same logits as one process.

For long prompts, :func:`prefill` runs the prompt sequence-parallel first (each rank its shard,
TokenRing/Ring/Ulysses attention) and fills the cache from the K/V each attention call received;
``generate`` then starts from the last prompt token.

Per-layer sliding windows (Gemma 2/3, GPT-OSS: transformers passes each layer's
``sliding_window``, None on its global layers), logit soft-capping (Gemma 2) and attention sinks
(GPT-OSS ``s_aux``) go to :func:`~tokenloom.parallel.decode.cached_attention`, which masks by the
cached tokens' positions; the mask transformers builds for a layer must be exactly causal (plus
that layer's window).

Greedy decoding, sampling and beam search are supported (beam search reorders every rank's
shard by the same beam index: every rank computes bitwise the same logits). Limits (refused, on
every rank, with a one-line UsageError naming what is unsupported): padding masks, left padding
included (a batch must be unpadded: pass no ``attention_mask`` or an all-ones one), a change of
the batch size after the cache was built (``batch_repeat_interleave``/``batch_select_indices``),
cropping.

transformers is imported only when a function here is called.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch

from tokenloom.common.errors import UsageError
from tokenloom.parallel.kv_cache import CacheSpec, ShardedKVCache

_REBATCH = ("TokenloomCache: changing the batch size of a sharded cache is not supported (build it "
            "with batch = prompts x max(num_beams, num_return_sequences), as hf_cache.generate does)")


def _base_classes() -> tuple[type, type]:
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


class _NoBatchChange:
    """What a batch size change calls on a cache and its layers: refused in one line."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UsageError(_REBATCH, field="batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise UsageError(_REBATCH, field="batch")


@functools.lru_cache(maxsize=1)
def _layer_class() -> type:
    _, mixin = _base_classes()

    class ShardedLayer(_NoBatchChange, mixin):
        """One layer's view of the sharded cache: ``update`` returns the new states unchanged
        (the attention function appends them); lengths are the whole sequence's."""

        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, owner: "ShardedKVCache", layer: int) -> None:
            super().__init__()
            self.owner, self.layer = owner, layer

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.is_initialized = True
            return key_states, value_states

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

        def get_seq_length(self) -> int:
            return self.owner.seq_len(self.layer)

        def get_max_length(self) -> int:
            return self.owner.max_tokens

        def reset(self) -> None:
            self.owner.truncate(self.layer, 0, 0)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.owner.reorder_batch(beam_idx, self.layer)


    return ShardedLayer


def _model_code(config: Any) -> str:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    return "|".join(str(getattr(config, k, None)) for k in keys)


def TokenloomCache(config: Any, *, max_tokens: int, group: Any = None, strategy: str = "auto",
                   batch: int = 1, dtype: torch.dtype | None = None, device: Any = "cpu",
                   memory_limit: int | None = None, impl: str | None = None,
                   layout: str = "appended") -> Any:
    """A ``transformers.Cache`` over this rank's :class:`ShardedKVCache` (see module docstring).

    ``config``: the model's config (layers, heads, head_dim, dtype); ``max_tokens``: prompt plus
    new tokens (memory is estimated for it before anything is allocated); ``strategy``: "auto",
    "gather", "ring" or "passkv" (:func:`~tokenloom.parallel.decode.cached_attention`);
    ``layout``: "appended" (the prompt goes through ``generate``) or the layout of a
    sequence-parallel :func:`prefill` ("zigzag", "contiguous").
    """
    from tokenloom.comm.communicator import Communicator

    cls = _cache_class()
    comm = group if isinstance(group, Communicator) else Communicator(group)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = dtype or getattr(config, "dtype", None) or torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    spec = CacheSpec(config.num_hidden_layers, batch, kv_heads, head_dim, dtype, comm.world_size,
                     comm.rank, layout=layout, model=_model_code(config))
    return cls(ShardedKVCache(spec, max_tokens, device=device, memory_limit=memory_limit), comm,
               strategy, impl)


@functools.lru_cache(maxsize=1)
def _cache_class() -> type:
    cache_base, _ = _base_classes()
    layer_cls = _layer_class()

    class _TokenloomCache(_NoBatchChange, cache_base):
        """See :func:`TokenloomCache`."""

        def __init__(self, sharded: ShardedKVCache, comm: Any, strategy: str, impl: str | None) -> None:
            layers = [layer_cls(sharded, i) for i in range(sharded.spec.num_layers)]
            super().__init__(layers=layers)
            self.sharded, self.comm, self.strategy, self.impl = sharded, comm, strategy, impl
            self.name = f"tokenloom_kv_{id(self):x}"
            from transformers import AttentionInterface

            AttentionInterface.register(self.name, self._attention)
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            # a mask builder of its own: without one transformers builds no mask at all for a
            # custom attention, and a padding mask would be silently ignored instead of refused
            AttentionMaskInterface.register(self.name, sdpa_mask)

        def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
            return self.sharded.seq_len(layer_idx)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            """Beam search: every layer's rows in the beams' new order (on every rank alike)."""
            self.sharded.reorder_batch(beam_idx)


        def crop(self, max_length: int) -> None:
            raise UsageError("TokenloomCache: cropping a sharded cache is not supported (assisted "
                             "or speculative decoding)", field="crop")

        @contextlib.contextmanager
        def attached(self, model: Any) -> Iterator[None]:
            """Run ``model`` with this cache's attention function, restoring the old one after."""
            before = model.config._attn_implementation
            model.set_attn_implementation(self.name)
            try:
                yield
            finally:
                model.set_attn_implementation(before)

        def _attention(self, module: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: Any, *, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
            from tokenloom.integrations.hf import window_size_of
            from tokenloom.parallel.decode import cached_attention

            if query.shape[0] != self.sharded.spec.batch:
                raise UsageError(f"TokenloomCache was built for batch {self.sharded.spec.batch} but "
                                 f"the model runs batch {query.shape[0]}: build it with batch = "
                                 f"prompts x max(num_beams, num_return_sequences) "
                                 f"(hf_cache.generate does)", field="batch")
            window = window_size_of(kwargs.get("sliding_window"), True)
            _check_causal_mask(attention_mask, query.shape[2], key.shape[2],
                               self.sharded.seq_len(module.layer_idx), window[0] if window else -1)
            if dropout:
                raise UsageError("TokenloomCache: attention dropout is not supported (call "
                                 "model.eval())", field="dropout")
            out = cached_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   self.sharded, module.layer_idx, group=self.comm,
                                   strategy=self.strategy, softmax_scale=scaling, impl=self.impl,
                                   window_size=window, softcap=kwargs.get("softcap"),
                                   sinks=kwargs.get("s_aux"))
            return out, None

    return _TokenloomCache


def _user_mask(*, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor | None:
    """Mask builder of the filling prefill: the user's 2-D mask as given (None: none)."""
    return attention_mask


def _check_causal_mask(mask: Any, num_new: int, num_keys: int, cached: int, left: int = -1) -> None:
    """Refuse a mask that hides more than the causal mask (with the layer's window ``left``:
    padding): it cannot be honoured over a sharded cache. Every rank holds the same mask
    (replicated queries), so all refuse alike."""
    if not isinstance(mask, torch.Tensor):
        return
    total = cached + num_new
    if mask.shape[-1] < total or mask.shape[-2] != num_new:
        raise UsageError(f"TokenloomCache: an attention mask of shape {tuple(mask.shape)} does not "
                         f"cover {total} keys for {num_new} queries", field="attention_mask")
    rows = torch.arange(num_new, device=mask.device)[:, None] + cached
    keys = torch.arange(total, device=mask.device)[None, :]
    visible = (keys <= rows) & ((keys >= rows - left) if left >= 0 else True)
    m = mask[..., :total]
    seen = m if m.dtype == torch.bool else m == 0
    if not bool((seen == visible).all()):
        raise UsageError("TokenloomCache: the attention mask hides more than the causal mask "
                         "(padding?): a padding mask cannot be honoured over a sharded cache; pass "
                         "unpadded prompts", field="attention_mask")


def generate(model: Any, input_ids: torch.Tensor, *, group: Any = None, strategy: str = "auto",
             max_new_tokens: int = 16, memory_limit: int | None = None, **kwargs: Any) -> torch.Tensor:
    """``model.generate`` with a fresh :func:`TokenloomCache` (the same tokens on every rank),
    built for the batch generate runs: the prompts times ``max(num_beams, num_return_sequences)``
    (from ``kwargs`` or the model's generation config)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    expand = [kwargs[name] if name in kwargs else getattr(config, name, None) or 1
              for name in ("num_beams", "num_return_sequences")]
    for name, value in zip(("num_beams", "num_return_sequences"), expand):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"generate: {name} must be a positive integer, got {value!r}", field=name)
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise UsageError("generate: a padding attention_mask (left padding included) is not "
                         "supported over a sharded cache; pass unpadded prompts", field="attention_mask")
    if input_ids.dim() != 2:
        raise UsageError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}",
                         field="input_ids")
    dtype = next(model.parameters()).dtype
    cache = TokenloomCache(model.config, max_tokens=input_ids.shape[1] + max_new_tokens, group=group,
                           strategy=strategy, batch=input_ids.shape[0] * max(expand), dtype=dtype,
                           device=input_ids.device, memory_limit=memory_limit)
    import inspect

    # transformers renamed past_key_values to cache (5.2x); pass whichever this version takes
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with cache.attached(model):
        return model.generate(input_ids, max_new_tokens=max_new_tokens, **{name: cache}, **kwargs)


def prefill(model: Any, input_ids: torch.Tensor, cache: Any, *, group: Any = None,
            strategy: str = "auto", layout: str = "zigzag") -> None:
    """Sequence-parallel prefill of the prompt (all but its last token) that fills ``cache``.

    Each rank runs the model on its shard of ``input_ids[:, :-1]`` with tokenloom's SP attention
    (:mod:`tokenloom.integrations.hf`, ``strategy`` "auto" | "tokenring" | "ring" | "ulysses"), and
    every layer's K/V shard, as the attention received it, goes into this rank's cache
    (:meth:`~tokenloom.parallel.kv_cache.ShardedKVCache.fill_shard`; ``cache`` built with the same
    ``layout``). Then ``model.generate(input_ids, cache=cache, ...)`` starts from the last prompt
    token: the non-attention layers ran on 1/N of the prompt per rank, not all of it.
    """
    from transformers import AttentionInterface

    from tokenloom.integrations import hf
    from tokenloom.parallel.groups import resolve_sp_group

    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise UsageError(f"input_ids must be (batch, seq >= 2), got {tuple(input_ids.shape)}",
                         field="input_ids")
    seq = input_ids.shape[1] - 1
    ulysses = getattr(resolve_sp_group(group), "ulysses", 1)
    sp_name = hf.register(strategy, group, layout=layout, name=f"{cache.name}_sp")
    sp = AttentionInterface._global_mapping[sp_name]

    def filling(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = sp(module, query, key, value, attention_mask, **kwargs)  # agrees and checks first
        cache.sharded.fill_shard(module.layer_idx, key.transpose(1, 2), value.transpose(1, 2), seq,
                                 layout=layout, ulysses=ulysses)
        return out

    fill_name = f"{cache.name}_fill"
    AttentionInterface.register(fill_name, filling)
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(fill_name, _user_mask)  # the SP attention refuses padding
    batch = hf.shard_inputs(input_ids[:, :-1], group=group, layout=layout)
    before = model.config._attn_implementation
    model.set_attn_implementation(fill_name)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        model.set_attn_implementation(before)
