"""The words every floor uses for a strategy and a sequence layout, named once.

Each is a ``str`` enum (Python 3.10: ``class X(str, Enum)``, no ``StrEnum``), so a member compares
equal to its plain string, hashes like it and prints as it: ``Strategy.RING == "ring"``,
``f"{Layout.ZIGZAG}" == "zigzag"``. Public functions keep accepting plain strings; the tuples below
are the plain values for messages and argparse ``choices``. Pure: no torch.
"""

from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    """A ``str`` enum that formats as its value (``str()``, f-strings, ``%s``)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Strategy(Word):
    """How sequence-parallel attention moves data: queries (TokenRing), K/V (Ring) or heads (Ulysses)."""

    TOKENRING = "tokenring"
    RING = "ring"
    ULYSSES = "ulysses"


class Layout(Word):
    """How a global sequence is cut over ranks (``tokenloom.comm.topology``)."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


AUTO = "auto"  # not a strategy: "ask the advisor", resolved before any schedule is built
STRATEGIES: tuple[str, ...] = Strategy.values()
RING_STRATEGIES: tuple[str, ...] = (Strategy.TOKENRING.value, Strategy.RING.value)  # move along the ring
STRATEGY_CHOICES: tuple[str, ...] = STRATEGIES + (AUTO,)
LAYOUTS: tuple[str, ...] = Layout.values()
PREFERRED_LAYOUTS: tuple[str, ...] = (Layout.ZIGZAG.value, Layout.CONTIGUOUS.value)  # zigzag first: ties go to it
