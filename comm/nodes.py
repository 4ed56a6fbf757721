"""This node's GPUs and links, read through NVML (nvidia-ml-py): node discovery, plain data.

:func:`read_topology` never raises for a missing driver or library: without GPUs it returns
``{"gpus": [], "links": [], "nvml": "unavailable: ..."}``. Turning a topology into a node the
simulator can price is the simulator's business (:mod:`tokenloom.simulator.discovered`).
"""

from __future__ import annotations

from typing import Any

# nvmlDeviceGetTopologyCommonAncestor levels, nearest first (as `nvidia-smi topo -m` names them).
LEVELS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
NODE_NAME = "this-node"


def read_topology() -> dict:
    """GPUs (index, name, SMs, memory, bus id, NVLink count) and the pairwise link matrix."""
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
        gpus = [_gpu(pynvml, i, h) for i, h in enumerate(handles)]
        links = [[_link(pynvml, handles, i, j) for j in range(count)] for i in range(count)]
        return {"gpus": gpus, "links": links, "nvml": "ok"}
    except pynvml.NVMLError as exc:
        return {"gpus": [], "links": [], "nvml": f"unavailable: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gpu(pynvml, i: int, h) -> dict:
    return {"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)),
            "bus_id": _text(pynvml.nvmlDeviceGetPciInfo(h).busId),
            "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1),
            "sms": _sms(pynvml, h), "nvlinks": _nvlinks(pynvml, h)}


def _sms(pynvml, h) -> int | None:
    try:
        return int(pynvml.nvmlDeviceGetAttributes(h).multiprocessorCount)
    except (pynvml.NVMLError, AttributeError):
        return None


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
        return LEVELS.get(int(level), str(level))
    except pynvml.NVMLError:
        return "?"
