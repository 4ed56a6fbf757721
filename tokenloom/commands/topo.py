"""``tokenloom topo``: the GPUs of this node and how they are linked, read through NVML.

Without an NVIDIA driver (a CPU machine, a container without GPUs) it says so plainly and exits 0,
so scripts can call it anywhere; ``--json`` then prints ``{"gpus": [], "nvml": "unavailable: ..."}``.
With GPUs it also shows how the simulator prices this node (:mod:`tokenloom.comm.nodes`).
"""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from tokenloom.commands.outputs import OutputFiles
    from tokenloom.comm.nodes import read_topology

    with OutputFiles() as out:
        out.claim("--hardware-out", args.hardware_out)  # before any work
        return _report(args, read_topology(), out)


def _report(args: argparse.Namespace, topo: dict, out) -> int:
    from tokenloom.comm.nodes import NODE_NAME
    from tokenloom.simulator.discovered import catalog_model, hardware_entry

    entry = hardware_entry(topo) if topo["gpus"] else None
    topo["simulator"] = None if entry is None else {
        "hardware": NODE_NAME, "model": catalog_model(topo["gpus"][0]["name"]), "entry": entry[NODE_NAME]}
    if args.hardware_out:
        if entry is None:
            from tokenloom.common.errors import UsageError

            raise UsageError(f"--hardware-out: no GPUs visible to NVML ({topo['nvml']}); nothing to "
                             f"write", field="hardware_out")
        out.write("--hardware-out", lambda p: p.write_text(json.dumps(entry, indent=1) + "\n"))
        out.commit()
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
    sim = topo["simulator"]
    spec = sim["entry"]
    print(f"\nsimulator: priced as {sim['model'] or 'h100-sxm (unknown model)'} with this node's "
          f"{spec['gpus_per_node']} GPUs, {spec['device']['sms']} SMs, fabric {spec['fabric']}"
          + (f" ({spec['gpus_per_switch']} per PCIe switch)" if spec["fabric"] == "pcie" else ""))
    if args.hardware_out:
        print(f"wrote {args.hardware_out}: use --hardware-file {args.hardware_out} --hardware {NODE_NAME}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topo", help="GPUs of this node and their links (NVML)",
                       description="List this node's GPUs and the link between every pair, as "
                       "NVML reports them (NVLink, PCIe switch, host bridge, ...). Says so clearly "
                       "and exits 0 on a machine without NVIDIA GPUs.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hardware-out", metavar="FILE", default=None,
                   help="write this node as a simulator hardware file (entry 'this-node') for "
                        "'simulate/advise --hardware-file FILE --hardware this-node'")
    p.set_defaults(func=_run)
