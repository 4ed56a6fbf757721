"""A discovered node (:func:`tokenloom.comm.nodes.read_topology`) as a simulator NodeSpec.

:func:`node_spec` takes the catalog entry of the same GPU model and gives it this node's GPU count,
SM count and fabric (NVLink/NVSwitch when every pair has NVLink, PCIe with the observed switch
grouping otherwise), so ``simulate``/``advise`` price the node that is really here (``tokenloom
topo --hardware-out F`` writes it as a hardware file).
"""

from __future__ import annotations

from dataclasses import replace

from tokenloom.comm.nodes import NODE_NAME
from tokenloom.simulator.hardware import CATALOG, PCIE4_X16_RATE, PCIE_PEER_STREAM, Link, node_to_dict

# Substrings of the NVML device name -> catalog name; first match wins (A100 before A10).
MODELS = (("h200", "h200-sxm"), ("h100", "h100-sxm"), ("a100", "a100-sxm"), ("a10", "a10-pcie"),
          ("mi300", "mi300x"))


def catalog_model(gpu_name: str) -> str | None:
    """Catalog name of an NVML device name ("NVIDIA H100 80GB HBM3" -> "h100-sxm"), if known."""
    low = gpu_name.lower()
    return next((cat for key, cat in MODELS if key in low), None)


def _pcie_groups(links: list[list[str]]) -> int:
    """GPUs per PCIe switch: the largest group whose pairs meet at a switch (PIX/PXB) or NVLink."""
    n = len(links)
    return max(sum(1 for j in range(n) if links[i][j] in ("X", "NV", "PIX", "PXB")) for i in range(n))


def node_spec(topo: dict, *, name: str = NODE_NAME, base: str | None = None):
    """The simulator's NodeSpec for ``topo`` (from :func:`read_topology`), or None without GPUs.

    The model's catalog entry gives FLOP/s, memory and link rates; the node gives the GPU count,
    SMs and fabric. ``base`` forces the catalog entry (default: matched from the GPU name, else
    h100-sxm, as the advisor prices an unknown GPU).
    """
    gpus = topo.get("gpus") or []
    if not gpus:
        return None
    model = CATALOG[base or catalog_model(gpus[0]["name"]) or "h100-sxm"]
    links = topo.get("links") or [["X"]]
    n = len(gpus)
    all_nvlink = all(links[i][j] in ("X", "NV") for i in range(n) for j in range(n))
    device = replace(model.device, name=name, sms=gpus[0].get("sms") or model.device.sms)
    if all_nvlink or n == 1:
        fabric = model.fabric if model.fabric in ("switch", "mesh") else "switch"
        link = model.link if model.fabric in ("switch", "mesh") else Link(450e9, 6e-6, 0.8)
        return replace(model, name=name, device=device, gpus_per_node=n, fabric=fabric, link=link,
                       uplink=None, gpus_per_switch=0)
    per_switch = _pcie_groups(links)
    # PCIe Gen4 x16 per direction as calibrated (hardware.PCIE4_X16_RATE), one peer stream ~13 GB/s
    # (REFERENCE §6), the same link the a10-pcie catalog entry uses
    pcie = Link(PCIE4_X16_RATE, 10e-6, PCIE_PEER_STREAM / PCIE4_X16_RATE)
    # groups meet through the CPU (PHB/NODE/SYS): that peer traffic shares the root complex
    via = "root" if any(links[i][j] in ("PHB", "NODE", "SYS") for i in range(n) for j in range(n)) else "switch"
    return replace(model, name=name, device=device, gpus_per_node=n, fabric="pcie", link=pcie,
                   uplink=model.uplink or Link(PCIE4_X16_RATE, 2e-6, 1.0), gpus_per_switch=per_switch, p2p_via=via)


def hardware_entry(topo: dict, *, name: str = NODE_NAME) -> dict | None:
    """``{name: spec}`` in the hardware-file format (``--hardware-file``), or None without GPUs."""
    spec = node_spec(topo, name=name)
    return None if spec is None else {name: node_to_dict(spec)}
