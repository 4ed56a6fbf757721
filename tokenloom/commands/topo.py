"""``tokenloom topo``: the GPUs of this node and how they are linked, read through NVML.

Without an NVIDIA driver (a CPU machine, a container without GPUs) it says so plainly and exits 0,
so scripts can call it anywhere; ``--json`` then prints ``{"gpus": [], "nvml": "unavailable: ..."}``.
"""

from __future__ import annotations

import argparse
import json

# nvmlDeviceGetTopologyCommonAncestor levels, nearest first (as `nvidia-smi topo -m` names them).
_LEVELS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def read_topology() -> dict:
    """GPUs (index, name, memory, bus id, NVLink count) and the pairwise link matrix."""
    try:
        import pynvml
    except ImportError as exc:
        return {"gpus": [], "links": [], "nvml": f"unavailable: nvidia-ml-py not installed ({exc})"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpus": [], "links": [], "nvml": f"unavailable: {exc} (no NVIDIA GPU or driver here)"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = []
        for i, h in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            bus = bus.decode() if isinstance(bus, bytes) else bus
            gpus.append({"index": i, "name": name, "bus_id": bus,
                         "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1),
                         "nvlinks": _nvlinks(pynvml, h)})
        links = [[_link(pynvml, handles, i, j) for j in range(count)] for i in range(count)]
        return {"gpus": gpus, "links": links, "nvml": "ok"}
    finally:
        pynvml.nvmlShutdown()


def _nvlinks(pynvml, handle) -> int:
    active = 0
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            active += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED)
        except pynvml.NVMLError:
            break
    return active


def _link(pynvml, handles, i: int, j: int) -> str:
    if i == j:
        return "X"
    try:
        status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
        if status == pynvml.NVML_P2P_STATUS_OK:
            return "NV"
    except (pynvml.NVMLError, AttributeError):
        pass
    try:
        level = pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
        return _LEVELS.get(int(level), str(level))
    except pynvml.NVMLError:
        return "?"


def _run(args: argparse.Namespace) -> int:
    topo = read_topology()
    if args.json:
        print(json.dumps(topo))
        return 0
    if not topo["gpus"]:
        print(f"no GPUs visible to NVML: {topo['nvml']}")
        print("tokenloom still runs on CPU (gloo); 'tokenloom simulate' prices GPU clusters you "
              "do not have.")
        return 0
    for g in topo["gpus"]:
        print(f"GPU{g['index']}  {g['name']}  {g['memory_gib']} GiB  bus {g['bus_id']}  "
              f"active NVLinks {g['nvlinks']}")
    n = len(topo["gpus"])
    print("\n      " + "".join(f"GPU{j:<3}" for j in range(n)))
    for i, row in enumerate(topo["links"]):
        print(f"GPU{i:<3}" + "".join(f"{c:<6}" for c in row))
    print("\nNV = NVLink peer-to-peer; PIX/PXB = PCIe switch; PHB = host bridge; NODE/SYS = "
          "across the CPU interconnect")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topo", help="GPUs of this node and their links (NVML)",
                       description="List this node's GPUs and the link between every pair, as "
                       "NVML reports them (NVLink, PCIe switch, host bridge, ...). Says so clearly "
                       "and exits 0 on a machine without NVIDIA GPUs.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
