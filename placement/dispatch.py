"""The messages a serving system really sends for a placement, per token home model.

Cluster: G GPUs, N nodes of ``gpus_per_node``; one NIC per GPU. A token's k experts are each
served by one replica, chosen by the ``replica_choice`` rule:

- ``uniform``: a replica drawn uniformly (the even split EPLB's load model assumes);
- ``local``: a replica on the sender's GPU if there is one, else one on the sender's node
  (uniform among them), else uniform over all (a locality-aware dispatch map, as SGLang's
  static EP dispatch aims to be).

``token_home="dp"`` (DeepEP with data-parallel attention, SGLang/vLLM): the token returns to its
DP rank after every MoE layer; homes are uniform over GPUs. Dispatch sends one RDMA message per
*remote node* holding any chosen replica (DeepEP forwards inside the node over NVLink), and
combine mirrors it, so messages per token and layer = 2 x distinct remote nodes.

``token_home="expert"`` (MoETuner / ExFlow): the token stays where its top-1 expert (the first id,
best score first) combined it. At each layer it is dispatched from that node to the distinct
remote nodes of its k replicas, and combined on the node of its new top-1 replica from the
other distinct nodes. The first MoE layer starts from a uniform home.

Everything is an exact expectation over homes and replica choices (replica choices independent
across a token's experts), per node, except the GPU-level count under ``local``: there at most
``GPU_SAMPLE_TOKENS`` tokens per layer, each with one home GPU, are drawn with a fixed seed (exact
over homes would cost G times more); it is exact over replica choices for those.

NIC messages: a token homed on GPU (h, i) sends to GPU (n, i) of each remote node n (DeepEP's
rail-aligned RDMA), so per GPU NIC out = its tokens' remote nodes and in = what other nodes'
homes send to its node; dispatch + combine make each direction out + in. The busiest NIC is the
max over GPUs of that, per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

TOKEN_HOMES = ("dp", "expert")
REPLICA_CHOICES = ("uniform", "local")
GPU_SAMPLE_SEED = 0
GPU_SAMPLE_TOKENS = 2048  # tokens per layer in the sampled GPU-level count under ``local``


@dataclass(frozen=True)
class Layout:
    """One layer's placement as counts: ``held`` (E, G) replicas per GPU, ``node`` (E, N) per node."""

    held: np.ndarray
    node: np.ndarray
    gpus_per_node: int

    @classmethod
    def from_row(cls, row: np.ndarray, num_experts: int, num_gpus: int, gpus_per_node: int) -> "Layout":
        held = np.zeros((num_experts, num_gpus))
        np.add.at(held, (row, np.arange(row.shape[0]) // (row.shape[0] // num_gpus)), 1.0)
        node = held.reshape(num_experts, num_gpus // gpus_per_node, gpus_per_node).sum(-1)
        return cls(held, node, gpus_per_node)

    @property
    def count(self) -> np.ndarray:
        return self.node.sum(1)

    def node_probs(self, rule: str, home: int | None) -> np.ndarray:
        """(E, N) probability that expert e is served on node n for a token homed on node ``home``."""
        uniform = self.node / self.count[:, None]
        if rule == "uniform" or home is None:
            return uniform
        local = self.node[:, home] > 0
        out = np.where(local[:, None], 0.0, uniform)
        out[local, home] = 1.0
        return out


def node_hits(ids: np.ndarray, layout: Layout, rule: str) -> np.ndarray:
    """(N_home, T, N): probability that a token homed on node h sends to node n (ids (T, K))."""
    num_nodes = layout.node.shape[1]
    homes = [None] if rule == "uniform" else range(num_nodes)
    hits = []
    for home in homes:
        probs = layout.node_probs(rule, home)
        hits.append(1.0 - np.prod(1.0 - probs[ids], axis=1))  # (T, K, N) -> (T, N)
    hits = np.stack(hits)
    return np.broadcast_to(hits, (num_nodes,) + hits.shape[1:]) if rule == "uniform" else hits


def gpu_loads_rule(loads: np.ndarray, layout: Layout, rule: str) -> np.ndarray:
    """(G,) expected tokens per GPU: expert loads (E,) split by the replica choice rule, homes uniform."""
    held, gpn = layout.held, layout.gpus_per_node
    share = held / layout.count[:, None]
    if rule == "uniform":
        return loads @ share
    num_experts, num_gpus = held.shape
    has = held > 0
    holders = has.reshape(num_experts, -1, gpn).sum(-1)  # (E, N) GPUs of node n holding e
    node_of = np.arange(num_gpus) // gpn
    node_count = layout.node[:, node_of]  # (E, G) replicas on g's node
    in_node = np.where(node_count > 0, held / np.maximum(node_count, 1), 0.0)
    from_node = (gpn - holders[:, node_of]) * in_node  # homes of g's node without e, served here
    remote_homes = ((layout.node == 0).sum(1) * gpn)[:, None] * share  # homes on nodes without e
    per_gpu = has.astype(float) + from_node + remote_homes
    return loads @ (per_gpu / num_gpus)


def _gpu_remote(ids: np.ndarray, layout: Layout, rule: str) -> float:
    """Expected distinct GPUs other than the home GPU per token (dispatch), mean over tokens."""
    held = layout.held
    num_experts, num_gpus = held.shape
    uniform = held / layout.count[:, None]
    if rule == "uniform":  # exact: homes uniform, hit probabilities independent of the home
        hit = 1.0 - np.prod(1.0 - uniform[ids], axis=1)
        return float(hit.sum(1).mean() * (num_gpus - 1) / num_gpus)
    rng = np.random.default_rng(GPU_SAMPLE_SEED)
    if ids.shape[0] > GPU_SAMPLE_TOKENS:
        ids = ids[np.sort(rng.choice(ids.shape[0], GPU_SAMPLE_TOKENS, replace=False))]
    home = rng.integers(num_gpus, size=ids.shape[0])
    gpn = layout.gpus_per_node
    node_mask = (np.arange(num_gpus)[None, :] // gpn) == (home // gpn)[:, None]  # (T, G)
    rows = held[ids]  # (T, K, G)
    on_gpu = np.take_along_axis(rows, home[:, None, None].repeat(ids.shape[1], 1), axis=2)[..., 0] > 0
    in_node = rows * node_mask[:, None, :]
    node_total = in_node.sum(-1, keepdims=True)
    probs = np.where(node_total > 0, in_node / np.maximum(node_total, 1), uniform[ids])
    probs = np.where(on_gpu[..., None], np.eye(num_gpus)[home][:, None, :], probs)
    hit = 1.0 - np.prod(1.0 - probs, axis=1)
    hit[np.arange(ids.shape[0]), home] = 0.0
    return float(hit.sum(1).mean())


@dataclass
class MessageMetrics:
    """Messages of one plan on one raw trace under one execution model.

    Per-layer lists have one entry per MoE layer. ``messages_per_token``: remote node messages
    (dispatch + combine) per token and MoE layer, averaged over layers; ``gpu_messages_per_token``
    the same counted per remote GPU (``dp`` only; None for ``expert``). ``busiest_nic`` per layer: messages through the busiest
    GPU NIC for the traced tokens (each direction); ``nic_max_mean`` its ratio to the mean NIC.
    ``max_mean_load``: per-layer busiest GPU over the mean under the replica choice rule.
    """

    token_home: str
    replica_choice: str
    num_tokens: int
    messages_per_token: float
    gpu_messages_per_token: float | None
    busiest_nic_per_token: float
    worst_max_mean_load: float
    messages_per_layer: list[float] = field(default_factory=list)
    busiest_nic: list[float] = field(default_factory=list)
    nic_max_mean: list[float] = field(default_factory=list)
    max_mean_load: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def message_metrics(rows: np.ndarray, topk_ids: np.ndarray, num_experts: int, num_gpus: int, gpus_per_node: int,
                    token_home: str = "dp", replica_choice: str = "uniform") -> MessageMetrics:
    """Metrics of ``rows`` (L, num_slots) phy2log on raw ``topk_ids`` (L, T, K); duplicates allowed."""
    assert token_home in TOKEN_HOMES and replica_choice in REPLICA_CHOICES
    num_layers, num_tokens, _ = topk_ids.shape
    num_nodes = num_gpus // gpus_per_node
    layouts = [Layout.from_row(rows[l], num_experts, num_gpus, gpus_per_node) for l in range(num_layers)]
    per_layer, gpu_per_layer, nic, nic_ratio, balance = [], [], [], [], []
    home = np.full((num_tokens, num_nodes), 1.0 / num_nodes)  # expert model: node distribution of each token
    for l, layout in enumerate(layouts):
        ids = topk_ids[l]
        hits = node_hits(ids, layout, replica_choice)  # (H, T, N)
        remote = hits.sum(2) - np.diagonal(hits, axis1=0, axis2=2).T  # (H, T): sum over n != h
        if token_home == "dp":
            weight = np.full((num_tokens, num_nodes), 1.0 / num_nodes)
            out_node = (weight.T * remote).sum(1)  # dispatch out of each home node
            in_node = np.einsum("th,htn->n", weight, hits) - np.einsum("th,hth->h", weight, hits)
            total = 2 * float((weight.T * remote).sum())
            nic_node = out_node + in_node
        else:
            weight = home
            dispatch = (weight.T * remote).sum()
            out_node = (weight.T * remote).sum(1)
            in_node = np.einsum("th,htn->n", weight, hits) - np.einsum("th,hth->h", weight, hits)
            combine, combine_in, combine_out, home = _combine(ids, layout, replica_choice, weight)
            total = float(dispatch + combine)
            nic_node = out_node + in_node + combine_in + combine_out
        per_layer.append(total / num_tokens)
        if token_home == "dp":
            gpu_per_layer.append(2.0 * _gpu_remote(ids, layout, replica_choice))
        per_nic = nic_node / gpus_per_node
        nic.append(float(per_nic.max()))
        nic_ratio.append(float(per_nic.max() / per_nic.mean()) if per_nic.mean() > 0 else 1.0)
        loads = np.bincount(ids.ravel(), minlength=num_experts).astype(float)
        gpu = gpu_loads_rule(loads, layout, replica_choice)
        balance.append(float(gpu.max() / gpu.mean()) if gpu.mean() > 0 else 1.0)
    return MessageMetrics(
        token_home=token_home, replica_choice=replica_choice, num_tokens=int(num_tokens),
        messages_per_token=float(np.mean(per_layer)), gpu_messages_per_token=float(np.mean(gpu_per_layer)) if gpu_per_layer else None,
        busiest_nic_per_token=float(sum(nic) / num_tokens), worst_max_mean_load=float(max(balance)),
        messages_per_layer=per_layer, busiest_nic=nic, nic_max_mean=nic_ratio, max_mean_load=balance,
    )


def _combine(ids: np.ndarray, layout: Layout, rule: str, weight: np.ndarray):
    """Expert model: combine onto the node of the top-1 replica, from the other distinct nodes.

    Returns (expected messages over all tokens, in per node, out per node, new home (T, N)).
    """
    num_tokens, num_nodes = weight.shape
    total, comb_in, comb_out = 0.0, np.zeros(num_nodes), np.zeros(num_nodes)
    new_home = np.zeros_like(weight)
    rest = ids[:, 1:]
    for h in range(num_nodes):
        probs = layout.node_probs(rule, h)
        first = probs[ids[:, 0]]  # (T, N) node of the top-1 replica
        others = 1.0 - np.prod(1.0 - probs[rest], axis=1) if rest.shape[1] else np.zeros_like(first)  # (T, N)
        w = weight[:, h:h + 1]
        # combine target m with prob first[t, m]; senders: nodes n != m hit by the other experts
        sent_to = others.sum(1, keepdims=True) - others  # (T, M): other nodes hit when target is m
        total += float((w * first * sent_to).sum())
        comb_in += (w * first * sent_to).sum(0)
        comb_out += (w * (others * (1.0 - first))).sum(0)
        new_home += w * first
    return total, comb_in, comb_out, new_home
