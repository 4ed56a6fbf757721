"""A node discovered through NVML is what advise / strategy="auto" price (no GPU needed: the
topology dict is the one tokenloom.comm.nodes.read_topology returns on a real node)."""

from tokenloom.simulator.advisor import choose_strategy, hardware_from_topology
from tokenloom.simulator.cost import AttentionShape
from tokenloom.simulator.hardware import CATALOG, make_cluster
from tokenloom.simulator.scenario import simulate_attention

SHAPE = AttentionShape(32768, 32, 128, 32)


def _time(name: str) -> float:
    return simulate_attention("ulysses", make_cluster(name, 4), SHAPE, causal=True).total_s


def _topology(name: str, n: int, link: str, sms: int) -> dict:
    gpus = [{"index": i, "name": name, "bus_id": f"0000:{i:02x}:00.0", "memory_gib": 80.0,
             "sms": sms, "nvlinks": 18 if link == "NV" else 0} for i in range(n)]
    links = [["X" if i == j else link for j in range(n)] for i in range(n)]
    return {"gpus": gpus, "links": links, "nvml": "ok"}


def test_no_gpus_registers_nothing():
    assert hardware_from_topology({"gpus": [], "links": [], "nvml": "unavailable"}) is None


def test_discovered_nodes_are_priced_as_found():
    try:
        name = hardware_from_topology(_topology("NVIDIA A10", 4, "SYS", 72))
        node = CATALOG[name]
        assert (node.gpus_per_node, node.fabric, node.device.sms) == (4, "pcie", 72)
        assert make_cluster(name, 4).num_gpus == 4
        pcie_s = _time(name)
        pcie = choose_strategy(world_size=4, seq_len=32768, num_heads=32, num_kv_heads=32, head_dim=128,
                               causal=True, hardware=name)
        # the same GPUs on NVLink: re-discovery replaces the node and the advisor's cached answers
        name = hardware_from_topology(_topology("NVIDIA A10", 4, "NV", 72))
        node = CATALOG[name]
        assert (node.gpus_per_node, node.fabric) == (4, "switch")
        nvlink = choose_strategy(world_size=4, seq_len=32768, num_heads=32, num_kv_heads=32, head_dim=128,
                                 causal=True, hardware=name)
        assert pcie[0] == "tokenring"  # MHA over PCIe switches: both directions of every link work
        assert nvlink[0] in ("tokenring", "ring", "ulysses")
        # all-to-all over NVLink, not PCIe: the root complex forwards 88 GB/s in all (fitted to
        # NVIDIA/nccl#1603, docs/calibration.md), so PCIe pays ~25 % over NVLink's compute-bound time
        assert _time(name) < 0.9 * pcie_s
    finally:
        CATALOG.pop("this-node", None)
