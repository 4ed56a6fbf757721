"""Hardware catalog: GPUs, links and node fabrics as typed dataclasses, extendable from JSON.

Numbers come from vendor datasheets (REFERENCE.md §6) times an explicit efficiency, so what is a
datasheet fact and what is an estimate stays visible:

- ``flops`` is dense bf16 peak; ``attn_eff_fwd``/``attn_eff_bwd`` is the fraction an attention
  kernel achieves (FlashAttention-2 forward reaches ~35-45% of peak on H100, backward less:
  Dao, "FlashAttention-2", 2023, and the FlashAttention-3 paper's H100 figures).
- ``Link.bw`` is the datasheet bandwidth per direction; ``Link.efficiency`` the fraction NCCL-style
  point-to-point transfers reach; latencies are per-transfer estimates (NCCL p2p of a few µs
  inside a node, ~10-15 µs across InfiniBand).

A :class:`NodeSpec` is one server: ``gpus_per_node`` identical devices joined by a fabric:

- ``"switch"``: NVSwitch; one port per GPU to all peers (``link`` is the port, per direction);
- ``"mesh"``: a direct link per pair of GPUs (MI300X Infinity Fabric; ``link`` is one pair link);
- ``"pcie"``: GPUs behind PCIe switches of ``gpus_per_switch`` each (``link``: GPU to switch, its
  ``bw`` the x16 link's nominal rate each way and ``rate`` what one peer stream reaches; ``uplink``:
  switch upward, shared by its GPUs). Full duplex. ``p2p_via`` says how peer traffic between
  switches travels: ``"switch"`` through a parent PCIe switch (nvidia-smi PIX/PXB), ``"root"``
  through the CPU root complex (PHB/SYS), which all such traffic shares (:mod:`.network`), or
  ``"host"``: no GPU peer-to-peer at all (NCCL_P2P_DISABLE=1, NCCL's SHM path), every transfer
  bounces through host memory;
- ``"bus"``: one shared medium for all transfers (gloo over loopback on one host).

Between nodes every GPU has its own NIC (``nic``). ``host_cores`` > 0 marks a CPU profile whose
ranks share that many cores, so compute slows when ranks outnumber cores.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tokenloom.common.errors import UsageError
from tokenloom.common.files import read_json
from tokenloom.common.checks import check_choice, check_int, check_number

FABRICS = ("switch", "mesh", "pcie", "bus")
P2P_VIA = ("switch", "root", "host")
LOCAL_CPU = "local-cpu"
PROFILE_ENV = "TOKENLOOM_CPU_PROFILE"  # path of the calibrated local-cpu profile
_SHIPPED_PROFILE = Path(__file__).parent / "data" / "local-cpu.json"
MAX_CLUSTER_GPUS = 1 << 20  # what a Cluster can describe; what can be *simulated* is far less


# Ranges for every number of a node spec: (integer?, lowest, lowest is excluded, highest). Generous
# (1e30 is an "ideal", never-binding resource) but finite and bounded away from zero, so no value
# can overflow the cost model into inf/NaN or stall the engine (a NaN latency once made it spin
# forever; a rate of 1e-300 bytes/s would give infinite times).
_DEVICE_RANGES = {
    "sms": (True, 1, False, 10**7),
    "flops": (False, 1e3, False, 1e30),
    "hbm_bw": (False, 1e3, False, 1e30),
    "attn_eff_fwd": (False, 1e-6, False, 100.0),  # a CPU profile stores measured FLOP/s as flops: eff 1
    "attn_eff_bwd": (False, 1e-6, False, 100.0),  # ... and the backward/forward rate ratio here
    "launch_s": (False, 0.0, False, 10.0),
    # the attention efficiency curve (optional; 0 / 1 = flat): cost.CostModel.shape_efficiency
    "attn_kv_half": (False, 0.0, False, 1e9),
    "attn_kv_half_bwd": (False, 0.0, False, 1e9),
    "attn_kv_half_causal": (False, 0.0, False, 1e9),
    "attn_causal_eff": (False, 1e-6, False, 1.0),
}
_OPTIONAL_DEVICE = ("launch_s", "attn_kv_half", "attn_kv_half_bwd", "attn_kv_half_causal", "attn_causal_eff")
_LINK_RANGES = {
    "bw": (False, 1e3, False, 1e30),
    "latency_s": (False, 0.0, False, 10.0),
    "efficiency": (False, 1e-6, False, 1.0),
}
MAX_GPUS_PER_NODE = 1 << 16
_NODE_RANGES = {
    "gpus_per_node": (True, 1, False, MAX_GPUS_PER_NODE),
    "gpus_per_switch": (True, 0, False, MAX_GPUS_PER_NODE),
    "host_cores": (True, 0, False, 10**7),
}
MAX_HARDWARE_FILE_BYTES = 16 << 20


def _check(owner: str, ranges: dict, values: dict) -> None:
    for name, (integer, lo, lo_open, hi) in ranges.items():
        if name in values:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = "an integer" if integer else "a number"
                raise UsageError(f"{owner}.{name} must be {kind}, got {_kind(value)}", field=f"{owner}.{name}")
            check_number(values[name], f"{owner}.{name}", lo=lo, hi=hi, lo_open=lo_open, integer=integer)


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU rank)."""

    name: str
    sms: int  # streaming multiprocessors / compute units (cores for a CPU profile)
    flops: float  # dense bf16 FLOP/s, peak
    hbm_bw: float  # memory bytes/s
    attn_eff_fwd: float  # achieved fraction of ``flops`` in attention forward
    attn_eff_bwd: float  # ... and backward
    launch_s: float = 5e-6  # fixed cost per kernel call
    # Efficiency falls for short key lengths: x kv / (kv + half) (per pass; causal blocks use their
    # own half and x attn_causal_eff). 0 / 1: a flat efficiency. Fitted: docs/calibration.md.
    attn_kv_half: float = 0.0
    attn_kv_half_bwd: float = 0.0
    attn_kv_half_causal: float = 0.0
    attn_causal_eff: float = 1.0

    def __post_init__(self) -> None:
        _check(f"device {self.name}", _DEVICE_RANGES, asdict(self))


@dataclass(frozen=True)
class Link:
    """One direction of a link: ``bw * efficiency`` bytes/s after ``latency_s`` per transfer."""

    bw: float
    latency_s: float
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        _check("link", _LINK_RANGES, asdict(self))

    @property
    def rate(self) -> float:
        return self.bw * self.efficiency


@dataclass(frozen=True)
class NodeSpec:
    """One server model (see module docstring for the fabrics)."""

    name: str
    device: Device
    gpus_per_node: int
    fabric: str
    link: Link
    nic: Link
    uplink: Link | None = None
    gpus_per_switch: int = 0
    host_cores: int = 0
    p2p_via: str = "switch"  # PCIe only: peer traffic between switches via a parent "switch" or the "root"

    def __post_init__(self) -> None:
        owner = f"hardware {self.name}"
        check_choice(self.fabric, f"{owner}.fabric", FABRICS)
        check_choice(self.p2p_via, f"{owner}.p2p_via", P2P_VIA)
        _check(owner, _NODE_RANGES, {k: getattr(self, k) for k in _NODE_RANGES})
        for name in ("device", "link", "nic", "uplink"):
            kind = Device if name == "device" else Link
            value = getattr(self, name)
            if not (isinstance(value, kind) or (name == "uplink" and value is None)):
                raise UsageError(f"{owner}.{name} must be a {kind.__name__}, got {value!r}", field=name)
        if self.fabric == "pcie" and (self.uplink is None or self.gpus_per_switch < 1):
            raise UsageError(f"{owner}: fabric 'pcie' needs uplink and gpus_per_switch >= 1", field="uplink")


@dataclass(frozen=True)
class Cluster:
    """``num_gpus`` ranks spread evenly over ``num_nodes`` nodes of one model; rank r is on node
    ``r // gpus_per_node`` (the ring crosses nodes only between blocks of consecutive ranks)."""

    node: NodeSpec
    num_gpus: int
    num_nodes: int = 1

    def __post_init__(self) -> None:
        check_int(self.num_gpus, "gpus", lo=1, hi=MAX_CLUSTER_GPUS)
        check_int(self.num_nodes, "nodes", lo=1, hi=MAX_CLUSTER_GPUS)
        if self.num_gpus % self.num_nodes:
            raise UsageError(f"nodes ({self.num_nodes}) must divide gpus ({self.num_gpus})", field="nodes")
        per_node = self.num_gpus // self.num_nodes
        if per_node > self.node.gpus_per_node:
            raise UsageError(f"gpus: {per_node} per node exceeds the {self.node.gpus_per_node} GPUs of "
                             f"one {self.node.name!r} node; raise --nodes", field="gpus")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def describe(self) -> str:
        nodes = f"{self.num_nodes} nodes x " if self.num_nodes > 1 else ""
        return f"{nodes}{self.gpus_per_node} x {self.node.name}"


def _nvswitch(name: str, sms: int, tflops: float, hbm_gbs: float, nvlink_gbs: float, nic_gbs: float,
              eff: tuple[float, float], link_eff: float = 0.8, curve: dict | None = None,
              nvlink_latency: float = 6e-6) -> NodeSpec:
    return NodeSpec(name, Device(name, sms, tflops * 1e12, hbm_gbs * 1e9, *eff, **(curve or {})), 8, "switch",
                    link=Link(nvlink_gbs * 1e9, nvlink_latency, link_eff), nic=Link(nic_gbs * 1e9, 12e-6, 0.9))


# Fitted to the calibration set (simulator/data/calibration.json, docs/calibration.md): FlashAttention-2
# on H100 (forward 0.39 / backward 0.34 of dense peak at long keys, the curve below for short ones and
# causal masks) and NCCL-tests on 8 x H100 (NVLink 450 GB/s per direction at 0.83: ring busbw ~370).
# Per-message latency on NVSwitch-3 nodes: a 1 KB sendrecv_perf call took 3.7 us on 4 x H800 (the same
# NVSwitch; NVIDIA/nccl#1984, no CUDA graphs). A100 and the others keep the 6 us estimate.
HOPPER_MSG_LATENCY = 3.7e-6
HOPPER_FA2 = {"attn_kv_half": 80.0, "attn_kv_half_bwd": 250.0, "attn_kv_half_causal": 300.0, "attn_causal_eff": 0.92}
# H200: tokenloom's own kernel (block_attention over torch sdpa, bf16) measured on one H200 with
# `tokenloom simulate calibrate --device cuda` (2026-12-04; rows h200-sdpa-* of the calibration set),
# fitted by calibrate_gpu.fit_curve against the datasheet peak (worst 7.8 %). It reaches half its rate
# at ~2K keys, not FlashAttention-2's 80: what the runtime runs there today, slower than the H100 entry's
# published FlashAttention-2 curve at short sequences (70 vs ~190 TFLOP/s at 512 tokens).
H200_SDPA = {"attn_kv_half": 2048.0, "attn_kv_half_bwd": 2435.0, "attn_kv_half_causal": 4871.0, "attn_causal_eff": 1.0}


# PCIe Gen4, fitted to NCCL-tests rows of the calibration set (docs/calibration.md, "PCIe"):
# - PCIE4_X16_RATE: what an NCCL ring moves per direction over a GPU's x16 link with peer-to-peer
#   through a PCIe switch: busbw 25.72-25.95 GB/s, 256 MB-1 GB, 4 x RTX 4090 (tinygrad/open-gpu-kernel-
#   modules#36), the minimax rate of those rows;
# - PCIE_ROOT_RATE: the CPU root complex forwarding peer traffic between root ports, shared by every
#   such transfer in both directions: 4 x RTX 4090 without a PCIe switch, AllReduce busbw 22 GB/s with
#   P2P through the CPU (NVIDIA/nccl#1603): 4 ring streams x 22 GB/s (one row: an estimate);
# - PCIE_HOST_COPY_RATE: one transfer bounced through host memory (no peer-to-peer): the minimax rate of
#   NCCL's SHM AllReduce (busbw 18 GB/s, nccl#1603) and a P2P-disabled cudaMemcpyPeer (22.16 GB/s,
#   6 x RTX 4090, NVIDIA/nccl#814).
PCIE4_X16_RATE = 25.8e9
PCIE_ROOT_RATE = 88e9
PCIE_HOST_COPY_RATE = 19.9e9
PCIE_PEER_STREAM = 13e9  # one peer-to-peer stream through a PCIe switch (REFERENCE §6)


def pcie_box(gpus: int, gpus_per_switch: int, p2p_via: str, name: str = "pcie-gen4") -> NodeSpec:
    """A generic PCIe Gen4 x16 node of ``gpus`` GPUs (an A10 device: collectives do not use it), ``gpus_per_switch``
    behind each switch (1: every GPU on its own root port): the boxes of the PCIe calibration rows."""
    link = Link(PCIE4_X16_RATE, 10e-6, 1.0)
    return NodeSpec(name, CATALOG["a10-pcie"].device, gpus, "pcie", link=link, uplink=replace(link, latency_s=2e-6),
                    gpus_per_switch=gpus_per_switch, nic=Link(25e9, 15e-6, 0.9), p2p_via=p2p_via)


# A10 (GA102): FlashAttention-2 on an RTX A5000, the same die with 64 of its 72 SMs at the same clock
# (gpu-mode/ring-attention#10: head dim 64, no mask, 512-8K tokens, fwd 81-84 / bwd 53-77 TFLOP/s of
# 111.1), fitted by calibrate_gpu.fit_curve (worst 2.7 %). The efficiencies are quoted at head dim 128,
# reached through HEAD_DIM_EFF's H100 ratio (0.88 at 64), unverified on GA102; no causal GA102 rows,
# so causal blocks get no short-key penalty (docs/calibration.md).
GA102_FA2 = {"attn_kv_half": 8.0, "attn_kv_half_bwd": 256.0}


# Datasheet numbers (REFERENCE.md §6; AMD MI300X datasheet). NIC: 400 Gb/s per GPU for H100 and
# MI300X nodes, 800 Gb/s for H200, 200 Gb/s HDR for A100.
CATALOG: dict[str, NodeSpec] = {
    "h100-sxm": _nvswitch("h100-sxm", 132, 989, 3350, 450, 50, (0.39, 0.34), 0.83, HOPPER_FA2, HOPPER_MSG_LATENCY),
    "h200-sxm": _nvswitch("h200-sxm", 132, 989, 4800, 450, 100, (0.373, 0.313), 0.83, H200_SDPA,
                          HOPPER_MSG_LATENCY),
    "a100-sxm": _nvswitch("a100-sxm", 108, 312, 2039, 300, 25, (0.55, 0.45)),
    # 4 x A10 behind 2 PCIe Gen4 switches: the fitted Gen4 x16 rate each way, ~13 GB/s seen by one peer
    # stream (REFERENCE.md §6; not fitted: no A10 transfer row); full duplex. The TokenRing authors' 4 x A10
    # box (ACA-Lab-SJTU/token-ring README) pairs GPUs on a switch (PIX) and joins them without the host bridge (PXB).
    "a10-pcie": NodeSpec("a10-pcie", Device("a10-pcie", 72, 125e12, 600e9, 0.86, 0.81, 8e-6, **GA102_FA2), 4, "pcie",
                         link=Link(PCIE4_X16_RATE, 10e-6, PCIE_PEER_STREAM / PCIE4_X16_RATE),
                         uplink=Link(PCIE4_X16_RATE, 2e-6, 1.0),
                         gpus_per_switch=2, nic=Link(25e9, 15e-6, 0.9), p2p_via="switch"),
    # MI300X: 8 GPUs, 7 Infinity Fabric links each, 64 GB/s per direction per link.
    "mi300x": NodeSpec("mi300x", Device("mi300x", 304, 1307e12, 5300e9, 0.35, 0.25, 8e-6), 8, "mesh",
                       link=Link(64e9, 8e-6, 0.8), nic=Link(50e9, 12e-6, 0.9)),
}


_NODE_KEYS = ("device", "gpus_per_node", "fabric", "link", "nic", "uplink", "gpus_per_switch", "host_cores",
              "p2p_via")
_IGNORED_KEYS = ("name", "measured")  # written by node_to_dict / calibrate; informational


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a JSON object, got {_kind(value)}", field=where)
    return value


def _kind(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", list: "a list", str: "a string", dict: "an object"}
    return names.get(type(value), f"{value!r}") if not isinstance(value, str) else f"the string {value!r}"


def _fields(spec: dict, where: str, ranges: dict, *, required: tuple[str, ...]) -> dict:
    """``spec`` checked against ``ranges``: no unknown keys, every required key, typed numbers."""
    unknown = sorted(set(spec) - set(ranges))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r}; valid: {', '.join(ranges)}", field=where)
    missing = [k for k in required if k not in spec]
    if missing:
        raise UsageError(f"{where}.{missing[0]} is missing (required: {', '.join(required)})", field=where)
    _check(where, ranges, spec)
    return dict(spec)


def _node_from_dict(name: str, spec: object, where: str | None = None) -> NodeSpec:
    """One typed, range-checked node spec; :class:`UsageError` naming ``where.field`` otherwise."""
    where = where or f"hardware {name}"
    spec = _object(spec, where)
    unknown = sorted(set(spec) - set(_NODE_KEYS) - set(_IGNORED_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r}; valid: {', '.join(_NODE_KEYS)}", field=where)
    for key in ("device", "gpus_per_node", "fabric", "link", "nic"):
        if key not in spec:
            raise UsageError(f"{where}.{key} is missing (required: device, gpus_per_node, fabric, link, "
                             f"nic)", field=where)
    device = _fields(_object(spec["device"], f"{where}.device"), f"{where}.device", _DEVICE_RANGES,
                     required=tuple(k for k in _DEVICE_RANGES if k not in _OPTIONAL_DEVICE))
    links = {}
    for key in ("link", "nic", "uplink"):
        if spec.get(key) is not None or key != "uplink":
            links[key] = Link(**_fields(_object(spec[key], f"{where}.{key}"), f"{where}.{key}", _LINK_RANGES,
                                        required=("bw", "latency_s")))
    fabric = spec["fabric"]
    if not isinstance(fabric, str) or fabric not in FABRICS:
        raise UsageError(f"{where}.fabric must be one of {', '.join(FABRICS)}, got {_kind(fabric)}",
                         field=f"{where}.fabric")
    _check(where, _NODE_RANGES, spec)
    rest = {k: int(spec[k]) for k in _NODE_RANGES if k in spec}
    via = spec.get("p2p_via", "switch")
    if not isinstance(via, str) or via not in P2P_VIA:
        raise UsageError(f"{where}.p2p_via must be one of {', '.join(P2P_VIA)}, got {_kind(via)}",
                         field=f"{where}.p2p_via")
    return NodeSpec(name=name, device=Device(name=name, **device), fabric=fabric, p2p_via=via, **links, **rest)


def node_to_dict(node: NodeSpec) -> dict:
    """JSON-ready form, the inverse of the hardware-file format."""
    out = asdict(node)
    out["device"].pop("name")
    return out


def load_hardware_file(path: str | os.PathLike, field: str = "--hardware-file") -> dict[str, NodeSpec]:
    """Read ``{name: {device: {...}, gpus_per_node, fabric, link: {...}, nic: {...}, ...}}``.

    The one loader of the format: strict JSON (UTF-8, finite numbers), every field typed and
    range-checked; a :class:`UsageError` names ``field``, the file and the entry's field.
    """
    data = read_json(path, field, max_bytes=MAX_HARDWARE_FILE_BYTES)
    where = f"{field} {os.fspath(path)}"
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{where}: expected a non-empty JSON object mapping names to node specs, got "
                         f"{_kind(data) if data != {} else 'an empty object'}", field=field)
    out = {}
    for name, spec in data.items():
        if not name.strip() or len(name) > 128:
            raise UsageError(f"{where}: entry name {name[:40]!r} must be 1-128 characters", field=field)
        try:
            out[name] = _node_from_dict(name, spec, f"{name}")
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}", field=field) from None
    return out


def cpu_profile_path() -> Path:
    """Where ``simulate calibrate`` writes (and the catalog reads) the local-cpu profile."""
    env = os.environ.get(PROFILE_ENV)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tokenloom" / "local-cpu.json"


def load_cpu_profile() -> tuple[NodeSpec, bool]:
    """The calibrated local-cpu profile if one exists, else the shipped default; (spec, calibrated)."""
    path = cpu_profile_path()
    calibrated = path.is_file()
    src = path if calibrated else _SHIPPED_PROFILE
    field = f"local-cpu profile (${PROFILE_ENV} or 'simulate calibrate')" if calibrated else "shipped profile"
    entries = load_hardware_file(src, field)
    if LOCAL_CPU not in entries:
        raise UsageError(f"{field} {src}: has no {LOCAL_CPU!r} entry; rerun 'tokenloom simulate calibrate'",
                         field=PROFILE_ENV)
    return entries[LOCAL_CPU], calibrated


def register_node(spec: NodeSpec) -> None:
    """Add (or replace) a node in the built-in catalog under ``spec.name``: the node discovered on
    this machine (``detect_hardware``), so every later lookup prices the real node."""
    CATALOG[spec.name] = spec


def catalog(hardware_file: str | os.PathLike | None = None) -> dict[str, NodeSpec]:
    """Built-in nodes, the local-cpu profile, and the entries of ``hardware_file`` (which win)."""
    out = dict(CATALOG)
    out[LOCAL_CPU] = load_cpu_profile()[0]
    if hardware_file is not None:
        out.update(load_hardware_file(hardware_file))
    return out


def make_cluster(hardware: str, num_gpus: int, num_nodes: int = 1,
                 hardware_file: str | os.PathLike | None = None) -> Cluster:
    """Look up ``hardware`` and lay ``num_gpus`` ranks over ``num_nodes`` nodes of it.

    The local-cpu profile is read only when asked for, so a damaged profile cannot break
    simulations of other hardware.
    """
    nodes = dict(CATALOG)
    if hardware_file is not None:
        nodes.update(load_hardware_file(hardware_file))
    if hardware not in nodes:
        if hardware != LOCAL_CPU:
            names = sorted(set(nodes) | {LOCAL_CPU})
            raise UsageError(f"hardware must be one of {', '.join(names)}, got {hardware!r} "
                             f"(add it with --hardware-file)", field="hardware")
        nodes[LOCAL_CPU] = load_cpu_profile()[0]
    return Cluster(nodes[hardware], num_gpus, num_nodes)
