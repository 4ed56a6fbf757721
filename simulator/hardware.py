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
- ``"pcie"``: GPUs behind PCIe switches of ``gpus_per_switch`` each, the switches behind one root
  complex (``link``: GPU to switch, ``uplink``: switch to root, both shared by their GPUs);
- ``"bus"``: one shared medium for all transfers (gloo over loopback on one host).

Between nodes every GPU has its own NIC (``nic``). ``host_cores`` > 0 marks a CPU profile whose
ranks share that many cores, so compute slows when ranks outnumber cores.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FABRICS = ("switch", "mesh", "pcie", "bus")
LOCAL_CPU = "local-cpu"
PROFILE_ENV = "TOKENLOOM_CPU_PROFILE"  # path of the calibrated local-cpu profile
_SHIPPED_PROFILE = Path(__file__).parent / "data" / "local-cpu.json"


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")


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

    def __post_init__(self) -> None:
        _positive(f"device {self.name!r}", sms=self.sms, flops=self.flops, hbm_bw=self.hbm_bw,
                  attn_eff_fwd=self.attn_eff_fwd, attn_eff_bwd=self.attn_eff_bwd)
        if self.launch_s < 0:
            raise ValueError(f"device {self.name!r}: launch_s must be >= 0, got {self.launch_s}")


@dataclass(frozen=True)
class Link:
    """One direction of a link: ``bw * efficiency`` bytes/s after ``latency_s`` per transfer."""

    bw: float
    latency_s: float
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        _positive("link", bw=self.bw, efficiency=self.efficiency)
        if self.latency_s < 0:
            raise ValueError(f"link: latency_s must be >= 0, got {self.latency_s}")

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

    def __post_init__(self) -> None:
        if self.fabric not in FABRICS:
            raise ValueError(f"hardware {self.name!r}: fabric must be one of {FABRICS}, got {self.fabric!r}")
        _positive(f"hardware {self.name!r}", gpus_per_node=self.gpus_per_node)
        if self.fabric == "pcie" and (self.uplink is None or self.gpus_per_switch < 1):
            raise ValueError(f"hardware {self.name!r}: fabric 'pcie' needs uplink and gpus_per_switch >= 1")


@dataclass(frozen=True)
class Cluster:
    """``num_gpus`` ranks spread evenly over ``num_nodes`` nodes of one model; rank r is on node
    ``r // gpus_per_node`` (the ring crosses nodes only between blocks of consecutive ranks)."""

    node: NodeSpec
    num_gpus: int
    num_nodes: int = 1

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.num_gpus}")
        if self.num_nodes < 1 or self.num_gpus % self.num_nodes:
            raise ValueError(f"nodes ({self.num_nodes}) must be >= 1 and divide gpus ({self.num_gpus})")
        per_node = self.num_gpus // self.num_nodes
        if per_node > self.node.gpus_per_node:
            raise ValueError(f"gpus: {per_node} per node exceeds the {self.node.gpus_per_node} GPUs of "
                             f"one {self.node.name!r} node; raise --nodes")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def describe(self) -> str:
        nodes = f"{self.num_nodes} nodes x " if self.num_nodes > 1 else ""
        return f"{nodes}{self.gpus_per_node} x {self.node.name}"


def _nvswitch(name: str, sms: int, tflops: float, hbm_gbs: float, nvlink_gbs: float, nic_gbs: float,
              eff: tuple[float, float]) -> NodeSpec:
    return NodeSpec(name, Device(name, sms, tflops * 1e12, hbm_gbs * 1e9, *eff), 8, "switch",
                    link=Link(nvlink_gbs * 1e9, 6e-6, 0.8), nic=Link(nic_gbs * 1e9, 12e-6, 0.9))


# Datasheet numbers (REFERENCE.md §6; AMD MI300X datasheet). NIC: 400 Gb/s per GPU for H100 and
# MI300X nodes, 800 Gb/s for H200, 200 Gb/s HDR for A100.
CATALOG: dict[str, NodeSpec] = {
    "h100-sxm": _nvswitch("h100-sxm", 132, 989, 3350, 450, 50, (0.40, 0.30)),
    "h200-sxm": _nvswitch("h200-sxm", 132, 989, 4800, 450, 100, (0.40, 0.30)),
    "a100-sxm": _nvswitch("a100-sxm", 108, 312, 2039, 300, 25, (0.55, 0.45)),
    # 4 x A10 behind 2 PCIe Gen4 switches: ~25 GB/s per direction nominal, ~13 GB/s seen.
    "a10-pcie": NodeSpec("a10-pcie", Device("a10-pcie", 72, 125e12, 600e9, 0.50, 0.40, 8e-6), 4, "pcie",
                         link=Link(25e9, 10e-6, 0.52), uplink=Link(25e9, 2e-6, 0.52),
                         gpus_per_switch=2, nic=Link(25e9, 15e-6, 0.9)),
    # MI300X: 8 GPUs, 7 Infinity Fabric links each, 64 GB/s per direction per link.
    "mi300x": NodeSpec("mi300x", Device("mi300x", 304, 1307e12, 5300e9, 0.35, 0.25, 8e-6), 8, "mesh",
                       link=Link(64e9, 8e-6, 0.8), nic=Link(50e9, 12e-6, 0.9)),
}


def _node_from_dict(name: str, spec: dict) -> NodeSpec:
    try:
        device = Device(**{"name": name, **spec["device"]})
        links = {k: Link(**spec[k]) for k in ("link", "nic", "uplink") if spec.get(k) is not None}
        rest = {k: v for k, v in spec.items() if k not in ("device", "link", "nic", "uplink", "name", "measured")}
        return NodeSpec(name=name, device=device, **links, **rest)
    except (KeyError, TypeError) as exc:
        valid = [f.name for f in fields(NodeSpec)]
        raise ValueError(f"hardware {name!r}: bad or missing field ({exc}); fields are {valid}") from None


def node_to_dict(node: NodeSpec) -> dict:
    """JSON-ready form, the inverse of the hardware-file format."""
    out = asdict(node)
    out["device"].pop("name")
    return out


def load_hardware_file(path: str | os.PathLike) -> dict[str, NodeSpec]:
    """Read ``{name: {device: {...}, gpus_per_node, fabric, link: {...}, nic: {...}, ...}}``."""
    with open(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"hardware-file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"hardware-file {path}: expected an object mapping names to node specs")
    return {name: _node_from_dict(name, spec) for name, spec in data.items()}


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
    return load_hardware_file(src)[LOCAL_CPU], calibrated


def catalog(hardware_file: str | os.PathLike | None = None) -> dict[str, NodeSpec]:
    """Built-in nodes, the local-cpu profile, and the entries of ``hardware_file`` (which win)."""
    out = dict(CATALOG)
    out[LOCAL_CPU] = load_cpu_profile()[0]
    if hardware_file is not None:
        out.update(load_hardware_file(hardware_file))
    return out


def make_cluster(hardware: str, num_gpus: int, num_nodes: int = 1,
                 hardware_file: str | os.PathLike | None = None) -> Cluster:
    """Look up ``hardware`` and lay ``num_gpus`` ranks over ``num_nodes`` nodes of it."""
    nodes = catalog(hardware_file)
    if hardware not in nodes:
        raise ValueError(f"hardware must be one of {sorted(nodes)}, got {hardware!r} "
                         f"(add it with --hardware-file)")
    return Cluster(nodes[hardware], num_gpus, num_nodes)
