"""`tokenloom topo` without GPUs, and NVML topologies turned into simulator nodes."""

import json
import os
import sys

import pytest

from tokenloom.simulator.discovered import catalog_model, hardware_entry, node_spec
from procs import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args):
    return run([sys.executable, "-m", "tokenloom", *args], timeout=60, env=ENV)


def _has_gpu_driver() -> bool:
    from tokenloom.comm.nodes import read_topology

    return bool(read_topology()["gpus"])


@pytest.mark.skipif(_has_gpu_driver(), reason="this machine has GPUs")
def test_topo_without_gpus_says_so_and_exits_0(tmp_path):
    proc = _cli("topo")
    assert proc.returncode == 0 and "no GPUs visible to NVML" in proc.stdout and not proc.stderr
    proc = _cli("topo", "--json")
    assert proc.returncode == 0
    topo = json.loads(proc.stdout)
    assert topo["gpus"] == [] and topo["nvml"].startswith("unavailable") and topo["simulator"] is None
    out = tmp_path / "node.json"
    proc = _cli("topo", "--hardware-out", str(out))
    assert proc.returncode == 2 and "--hardware-out" in proc.stderr and not out.exists()


def _topo(name, links, sms=132):
    n = len(links)
    return {"gpus": [{"index": i, "name": name, "sms": sms, "memory_gib": 80.0, "bus_id": f"0{i}",
                      "nvlinks": 18} for i in range(n)], "links": links, "nvml": "ok"}


def test_nvswitch_node_becomes_a_switch_fabric_of_its_size():
    links = [["X" if i == j else "NV" for j in range(4)] for i in range(4)]
    spec = node_spec(_topo("NVIDIA H100 80GB HBM3", links))
    assert (spec.gpus_per_node, spec.fabric, spec.device.sms) == (4, "switch", 132)
    assert spec.device.flops == pytest.approx(989e12)


def test_pcie_node_groups_gpus_by_switch():
    level = {(0, 1): "PIX", (2, 3): "PIX"}
    links = [["X" if i == j else level.get((min(i, j), max(i, j)), "SYS") for j in range(4)]
             for i in range(4)]
    spec = node_spec(_topo("NVIDIA A10", links, sms=72))
    assert (spec.gpus_per_node, spec.fabric, spec.gpus_per_switch) == (4, "pcie", 2)
    assert catalog_model("NVIDIA A100-SXM4-80GB") == "a100-sxm" and catalog_model("Tesla T4") is None


def test_hardware_entry_loads_back_into_the_simulator(tmp_path):
    from tokenloom.simulator.hardware import load_hardware_file, make_cluster

    links = [["X", "NV"], ["NV", "X"]]
    path = tmp_path / "node.json"
    path.write_text(json.dumps(hardware_entry(_topo("NVIDIA H200", links))))
    nodes = load_hardware_file(path)
    assert nodes["this-node"].gpus_per_node == 2
    assert make_cluster("this-node", 2, 1, path).describe() == "2 x this-node"
    assert node_spec({"gpus": [], "links": []}) is None
