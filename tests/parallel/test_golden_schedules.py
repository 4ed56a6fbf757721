"""The printed schedules in docs/schedules/ are the builders' output, byte for byte.

A reader sees each strategy on one screen there (the way ring-flash-attention shows one file per
variant); this test rebuilds every one and compares, so the docs cannot drift from the code. After
an intended change to a builder, regenerate them with

    TOKENLOOM_REGEN_GOLDEN=1 python -m pytest -q tests/parallel/test_golden_schedules.py

and review the diff like code.
"""

import os
from pathlib import Path

import pytest

from tokenloom.parallel.builders import build_schedule
from tokenloom.parallel.check import check_schedule

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schedules"
# (file stem, build_schedule arguments): 4 ranks, zigzag, causal, the forward and the backward; the
# 2-D mesh; a sliding window.
GOLDEN = [
    (f"{strategy}-{'bwd' if backward else 'fwd'}-4ranks-zigzag-causal",
     dict(strategy=strategy, world_size=4, layout="zigzag", causal=True, backward=backward, **extra))
    for strategy, extra in (("tokenring", {}), ("ring", {}), ("ulysses", {"num_heads": 8, "num_kv_heads": 8}))
    for backward in (False, True)
] + [
    ("tokenring-fwd-2x2mesh-zigzag-causal",
     dict(strategy="tokenring", world_size=4, layout="zigzag", causal=True, ulysses=2, num_heads=8,
          num_kv_heads=8)),
    # a short window talks only to the neighbour: 3 steps on 8 ranks, pairs outside it never exist
    ("tokenring-fwd-8ranks-contiguous-causal-window16",
     dict(strategy="tokenring", world_size=8, layout="contiguous", causal=True, window_size=(16, 0),
          seq_len=256)),
]


def _render(args: dict) -> str:
    schedule = build_schedule(**args)
    check_schedule(schedule)  # a golden file is a proven schedule
    call = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"# build_schedule({call})\n{schedule}\n"


@pytest.mark.parametrize("stem,args", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_schedule(stem, args):
    path = DOCS / f"{stem}.txt"
    text = _render(args)
    if os.environ.get("TOKENLOOM_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: regenerate (see this file's docstring)"
    assert path.read_text() == text, f"{path.name} differs from the builder's output: regenerate and review"


def test_every_golden_file_is_checked():
    on_disk = {p.stem for p in DOCS.glob("*.txt")}
    assert on_disk == {stem for stem, _ in GOLDEN}, on_disk ^ {stem for stem, _ in GOLDEN}
