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
    with pytest.raises(ValueError, match="does not exist"):
        with atomic_write(tmp_path / "missing" / "x.txt"):
            pass


def test_outputs_refuse_devices_dirs_and_inputs(tmp_path):
    from tokenloom.errors import UsageError
    from tokenloom.io import OutputFiles

    src = tmp_path / "in.json"
    src.write_text("{}")
    out = OutputFiles(inputs=[src])
    for bad, words in (("/dev/null", "not a regular file"), (tmp_path, "is a directory"),
                       (tmp_path / "no" / "x", "does not exist"), (src, "also an input")):
        with pytest.raises(UsageError, match=words):
            out.claim("--out", bad)
    assert src.read_text() == "{}"


def test_outputs_all_or_nothing_and_symlink_target(tmp_path):
    from tokenloom.io import OutputFiles

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with OutputFiles() as out:  # a failing second writer leaves both targets untouched
        out.claim("--a", link)
        out.claim("--b", tmp_path / "b.png")
        out.write("--a", lambda p: p.write_text("new"))
        with pytest.raises(RuntimeError):
            out.write("--b", lambda p: (_ for _ in ()).throw(RuntimeError("boom")))
    assert real.read_text() == "old" and not (tmp_path / "b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]
    with OutputFiles() as out:
        out.claim("--a", link)
        out.write("--a", lambda p: p.write_text("new"))
        out.commit()
    assert link.is_symlink() and real.read_text() == "new"
