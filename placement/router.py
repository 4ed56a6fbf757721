"""A DeepSeek-V3-style router model for synthetic traces: group-limited routing, latent topics.

Per layer ``l`` and token ``t`` (one seeded generator, so a seed reproduces the trace):

- affinity logit of expert ``e``: ``bias_l[e] + topic_strength * topic_l[z_t, e] + noise * N(0, 1)``,
  where ``bias_l`` makes popularity Zipf-like (``-skew * log(rank)`` over a random ranking),
  ``topic_l`` is a (num_topics, E) standard-normal table drawn per layer, and ``z_t`` is the
  token's latent topic (Zipf over topics with exponent ``topic_skew``), kept through all layers;
- score ``s = sigmoid(logit)`` (DeepSeek-V3 gates with a sigmoid);
- group-limited selection: the E experts form ``num_groups`` contiguous groups; a group's score is
  the sum of its two best scores; the token keeps its ``topk_group`` best groups and takes its
  top-``top_k`` experts inside them (DeepSeek-V3: 8 groups, 4 kept, top-8 of 256).

``num_groups=1`` is plain top-k routing (Qwen3, Mixtral). ``topic_strength=0`` removes the
co-activation structure, leaving popularity and noise only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenloom.common.errors import UsageError
from tokenloom.common.checks import check_int, check_number

MAX_CELLS = 1 << 31  # tokens x experts x layers drawn; refuse beyond (minutes and gigabytes)


@dataclass(frozen=True)
class RouterConfig:
    """Shape and statistics of a router-model trace; validated on construction."""

    num_layers: int
    num_experts: int
    top_k: int
    num_tokens: int
    num_groups: int = 1
    topk_group: int = 1
    num_topics: int = 32
    topic_strength: float = 1.5
    topic_skew: float = 0.5
    skew: float = 0.6
    noise: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "num_tokens", "num_groups", "topk_group", "num_topics"):
            check_int(getattr(self, name), name, lo=1)
        check_int(self.seed, "seed", lo=0)
        for name in ("topic_strength", "topic_skew", "skew", "noise"):
            check_number(getattr(self, name), name, lo=0, hi=100)
        if self.num_experts % self.num_groups:
            raise UsageError(f"num_groups: {self.num_groups} does not divide num_experts={self.num_experts}", field="num_groups")
        if self.topk_group > self.num_groups:
            raise UsageError(f"topk_group: {self.topk_group} exceeds num_groups={self.num_groups}", field="topk_group")
        reachable = self.topk_group * (self.num_experts // self.num_groups)
        if self.top_k > reachable:
            raise UsageError(f"top_k: {self.top_k} exceeds the {reachable} experts in {self.topk_group} kept groups", field="top_k")
        cells = self.num_layers * self.num_tokens * self.num_experts
        if cells > MAX_CELLS:
            raise UsageError(f"num_tokens: layers x tokens x experts = {cells:.3g} exceeds the limit {MAX_CELLS:.3g} "
                             f"(about 16 B of work each); use fewer tokens", field="num_tokens")


def router_topk(config: RouterConfig) -> np.ndarray:
    """int64 ``topk_ids (num_layers, num_tokens, top_k)``, distinct per token, best score first."""
    rng = np.random.default_rng(config.seed)
    topic_weight = np.arange(1, config.num_topics + 1, dtype=np.float64) ** -config.topic_skew
    topics = rng.choice(config.num_topics, size=config.num_tokens, p=topic_weight / topic_weight.sum())
    out = np.empty((config.num_layers, config.num_tokens, config.top_k), dtype=np.int64)
    chunk = max(1, (1 << 22) // config.num_experts)  # tokens per step: bounded memory
    for layer in range(config.num_layers):
        bias = -config.skew * np.log(rng.permutation(config.num_experts) + 1.0)
        table = rng.standard_normal((config.num_topics, config.num_experts))
        for lo in range(0, config.num_tokens, chunk):
            hi = min(lo + chunk, config.num_tokens)
            logits = bias + config.topic_strength * table[topics[lo:hi]]
            logits += config.noise * rng.standard_normal(logits.shape)
            out[layer, lo:hi] = _group_limited_topk(1.0 / (1.0 + np.exp(-logits)), config)
    return out


def _group_limited_topk(scores: np.ndarray, config: RouterConfig) -> np.ndarray:
    """(T, E) scores -> (T, K) ids: best ``topk_group`` groups by top-2 sum, then top-k inside."""
    num_tokens, num_experts = scores.shape
    if config.topk_group < config.num_groups:
        grouped = scores.reshape(num_tokens, config.num_groups, -1)
        best_two = np.sort(grouped, axis=-1)[..., -2:].sum(-1) if grouped.shape[-1] > 1 else grouped[..., 0]
        keep = np.argsort(-best_two, axis=1, kind="stable")[:, : config.topk_group]
        mask = np.zeros((num_tokens, config.num_groups), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scores = np.where(np.repeat(mask, num_experts // config.num_groups, axis=1), scores, -1.0)
    k = config.top_k
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < num_experts else np.tile(np.arange(k), (num_tokens, 1))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
