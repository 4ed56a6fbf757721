"""Synthetic routing traces with skewed expert popularity and cross-layer affinity.

Model (one seeded generator, so a seed reproduces the trace exactly):

- popularity: in each layer the experts get a random rank ``r`` (1 = hottest) and weight
  ``r ** -skew`` (Zipf); ``skew=0`` is uniform routing.
- affinity: every expert ``i`` of layer ``l`` has ``num_successors`` preferred successors in layer
  ``l+1`` (distinct, drawn uniformly). A token routed to ``{a_1..a_K}`` in layer ``l`` draws its
  ``K`` experts of layer ``l+1`` without replacement from the mixture
  ``(1 - affinity) * popularity + affinity * uniform(successors of a_k, k uniform)``: each next
  expert comes from the current experts' preferred successors with probability ``affinity``.
- domains (``num_domains = D > 0``, off by default): each layer splits its experts at random
  into ``D`` domains and every token belongs to one domain (uniformly drawn, kept through all
  layers, like a topic, or DeepSeek-V3's group-limited routing keeping a token in a few expert
  groups). Then expert ``a``'s preferred successors are the experts of ``a``'s domain in the next
  layer, and each of a token's ``K`` experts in every layer comes, with probability ``affinity``,
  from its domain (by popularity inside the domain), else from the whole layer by popularity.
- sampling without replacement uses the Gumbel-top-k trick, vectorised over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenloom.common.errors import UsageError


@dataclass(frozen=True)
class SynthConfig:
    """Shape and statistics of a synthetic trace; validated on construction."""

    num_layers: int
    num_experts: int
    top_k: int
    num_tokens: int
    skew: float = 1.0
    affinity: float = 0.5
    num_successors: int = 2
    num_domains: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_experts", "top_k", "num_tokens", "num_successors"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UsageError(f"{field}: must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise UsageError(f"top_k: {self.top_k} exceeds num_experts={self.num_experts}; valid: 1..{self.num_experts}")
        if isinstance(self.num_domains, bool) or not isinstance(self.num_domains, (int, np.integer)) or not 0 <= self.num_domains <= self.num_experts:
            raise UsageError(f"num_domains: must be an integer in 0..num_experts={self.num_experts}, got {self.num_domains!r}")
        if self.num_domains and self.top_k > self.num_experts // self.num_domains:
            raise UsageError(f"num_domains: {self.num_domains} domains leave {self.num_experts // self.num_domains} experts each, fewer than top_k={self.top_k}")
        cells = self.num_layers * self.num_tokens * self.num_experts
        if cells > 1 << 31:
            raise UsageError(f"num_tokens: layers x tokens x experts = {cells:.3g} exceeds the limit {1 << 31:.3g}; use fewer tokens")
        if self.num_successors > self.num_experts:
            raise UsageError(f"num_successors: {self.num_successors} exceeds num_experts={self.num_experts}")
        if not np.isfinite(self.skew) or self.skew < 0:
            raise UsageError(f"skew: must be a finite number >= 0, got {self.skew!r}")
        if not np.isfinite(self.affinity) or not 0.0 <= self.affinity <= 1.0:
            raise UsageError(f"affinity: must be in [0, 1], got {self.affinity!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise UsageError(f"seed: must be an integer >= 0, got {self.seed!r}")


def synth_topk(config: SynthConfig) -> np.ndarray:
    """Return int64 ``topk_ids`` of shape ``(num_layers, num_tokens, top_k)``, ids distinct per token."""
    rng = np.random.default_rng(config.seed)
    if config.num_domains:
        return _synth_domains(rng, config)
    num_experts, top_k = config.num_experts, config.top_k
    out = np.empty((config.num_layers, config.num_tokens, top_k), dtype=np.int64)
    popularity = _popularity(rng, num_experts, config.skew)
    prob = np.broadcast_to(popularity, (config.num_tokens, num_experts))
    out[0] = _gumbel_top_k(rng, prob, top_k)
    for layer in range(1, config.num_layers):
        successors = _successors(rng, num_experts, config.num_successors)
        popularity = _popularity(rng, num_experts, config.skew)
        prob = _next_layer_prob(out[layer - 1], successors, popularity, config.affinity)
        out[layer] = _gumbel_top_k(rng, prob, top_k)
    return out


def _synth_domains(rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """The domain model (module docstring): tokens keep one domain through every layer."""
    num_experts, num_domains = config.num_experts, config.num_domains
    token_domain = rng.integers(num_domains, size=config.num_tokens)
    out = np.empty((config.num_layers, config.num_tokens, config.top_k), dtype=np.int64)
    for layer in range(config.num_layers):
        popularity = _popularity(rng, num_experts, config.skew)
        domain_of = np.empty(num_experts, dtype=np.int64)
        for d, members in enumerate(np.array_split(rng.permutation(num_experts), num_domains)):
            domain_of[members] = d
        inside = np.where(domain_of[None, :] == np.arange(num_domains)[:, None], popularity[None, :], 0.0)
        inside /= inside.sum(axis=1, keepdims=True)  # (D, E) popularity within each domain
        prob = (1.0 - config.affinity) * popularity[None, :] + config.affinity * inside[token_domain]
        out[layer] = _gumbel_top_k(rng, prob + 1e-12 * popularity[None, :], config.top_k)
    return out


def _popularity(rng: np.random.Generator, num_experts: int, skew: float) -> np.ndarray:
    """(E,) probabilities: Zipf weights over a random ranking of the experts."""
    ranks = rng.permutation(num_experts) + 1.0
    weights = ranks ** (-skew)
    return weights / weights.sum()


def _successors(rng: np.random.Generator, num_experts: int, num_successors: int) -> np.ndarray:
    """(E, m) distinct preferred successors per expert (first m of a random permutation per row)."""
    keys = rng.random((num_experts, num_experts))
    return np.argsort(keys, axis=1)[:, :num_successors]


def _next_layer_prob(prev_ids: np.ndarray, successors: np.ndarray, popularity: np.ndarray, affinity: float) -> np.ndarray:
    """(T, E) per-token mixture of popularity and the current experts' preferred successors."""
    num_tokens, top_k = prev_ids.shape
    num_experts, num_successors = successors.shape
    cand = successors[prev_ids].reshape(num_tokens, top_k * num_successors)
    rows = np.repeat(np.arange(num_tokens), top_k * num_successors)
    flat = np.bincount(rows * num_experts + cand.ravel(), minlength=num_tokens * num_experts)
    affine = flat.reshape(num_tokens, num_experts) / (top_k * num_successors)
    # A tiny popularity floor keeps every expert drawable, so affinity=1 still yields K distinct ids.
    return (1.0 - affinity) * popularity[None, :] + affinity * affine + 1e-12 * popularity[None, :]


def _gumbel_top_k(rng: np.random.Generator, prob: np.ndarray, top_k: int) -> np.ndarray:
    """(T, K) samples without replacement from each row of ``prob`` (T, E), hottest key first."""
    keys = np.log(prob) - np.log(-np.log(rng.random(prob.shape)))
    if top_k == prob.shape[1]:
        part = np.broadcast_to(np.arange(top_k), (prob.shape[0], top_k)).copy()
    else:
        part = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    order = np.argsort(-np.take_along_axis(keys, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)
