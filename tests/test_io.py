"""Atomic output: nothing on failure, normal permissions on success."""

import os
import stat

import pytest

from tokenloom.io import atomic_write


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "plan.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_with_umask_mode(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(ValueError, match="output directory does not exist"):
        with atomic_write(tmp_path / "missing" / "x.txt"):
            pass
