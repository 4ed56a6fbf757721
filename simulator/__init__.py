"""tokenloom.simulator: price the runtime's own schedules on clusters we do not have.

- :mod:`.hardware`  catalog of GPUs, links and node fabrics (typed, extendable from JSON)
- :mod:`.network`   routes over shared resources and the fluid model of contention
- :mod:`.cost`      bytes on the wire and kernel seconds (formulas with sources)
- :mod:`.engine`    the discrete-event walk of a ``Schedule`` -> :class:`Timeline`
- :mod:`.scenario`  one attention layer, forward and backward; :mod:`.advisor` ranks strategies
- :mod:`.export`    Chrome trace and Gantt PNG; :mod:`.calibrate` the ``local-cpu`` profile

The simulator imports schedules from ``tokenloom.parallel`` but never the runtime.
"""

from tokenloom.common.shadow import hand_back

hand_back(__name__, __file__)  # imported by its bare name from the checkout: the installed package wins

from tokenloom.simulator.advisor import Advice, advise_attention, choose_strategy, detect_hardware
from tokenloom.simulator.cost import AttentionShape, CostModel
from tokenloom.simulator.engine import DeadlockError, SimulationError, simulate
from tokenloom.simulator.hardware import CATALOG, Cluster, Device, Link, NodeSpec, catalog, make_cluster
from tokenloom.simulator.scenario import AttentionResult, simulate_attention
from tokenloom.simulator.timeline import Timeline

__all__ = [
    "Advice",
    "AttentionResult",
    "AttentionShape",
    "CATALOG",
    "Cluster",
    "CostModel",
    "DeadlockError",
    "Device",
    "Link",
    "NodeSpec",
    "SimulationError",
    "Timeline",
    "advise_attention",
    "catalog",
    "choose_strategy",
    "detect_hardware",
    "make_cluster",
    "simulate",
    "simulate_attention",
]
