"""Liveness bounds, named once. Tests assert no speed: speed goals live in benchmarks/.

A bound here is what must never be exceeded for the behaviour to be right at all, set far above
what a loaded 2-core machine needs, so it catches a spin, a hang or a missed deadline, never a
slow machine.
"""

# A refused input, a loop guard that fires, a fallback: each ends in well under a second; a spin
# (the NaN clock that once made the simulator loop forever) never ends.
NO_SPIN_S = 10.0
# Slack over a fault-detection bound (--timeout): process start-up and reaping on 2 busy cores.
DETECTION_SLACK_S = 8.0
# Several cold processes importing torch (torchrun workers, Ray actors) plus a fault bound.
COLD_START_S = 90.0
