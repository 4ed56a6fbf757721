"""Atomic output: nothing on failure, normal permissions on success."""

import os
import stat

import pytest

from tokenloom.common.files import atomic_write


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
    from tokenloom.common.errors import UsageError
    from tokenloom.commands.outputs import OutputFiles

    src = tmp_path / "in.json"
    src.write_text("{}")
    out = OutputFiles(inputs=[src])
    for bad, words in (("/dev/null", "not a regular file"), (tmp_path, "is a directory"),
                       (tmp_path / "no" / "x", "does not exist"), (src, "also an input")):
        with pytest.raises(UsageError, match=words):
            out.claim("--out", bad)
    assert src.read_text() == "{}"


def test_outputs_all_or_nothing_and_symlink_target(tmp_path):
    from tokenloom.commands.outputs import OutputFiles

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


@pytest.mark.parametrize("content, words", [
    ("[NaN]", "NaN"), ('{"a": Infinity}', "Infinity"), ("[1e400]", "1e400"), ("[-1e999]", "1e999"),
    ("[" + "9" * 5000 + "]", "digits"), ("[" * 50000, "deep"), ("{", "not valid JSON"),
    (b"\xff\xfe[]", "UTF-8"), ("", "not valid JSON"),
])
def test_read_json_is_strict_and_names_the_flag(content, words, tmp_path):
    from tokenloom.common.errors import UsageError
    from tokenloom.common.files import read_json

    path = tmp_path / "f.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError, match=words) as info:
        read_json(path, "--trace")
    assert str(info.value).startswith("--trace") and "\n" not in str(info.value)
    assert read_json(_write(tmp_path / "ok.json", '{"a": [1, 2.5e10, -3]}'), "--trace") == {"a": [1, 2.5e10, -3]}


def _write(path, text):
    path.write_text(text)
    return path


def test_read_json_refuses_non_files_without_opening_them(tmp_path):
    from tokenloom.common.errors import UsageError
    from tokenloom.common.files import read_json

    os.mkfifo(tmp_path / "fifo")  # opening a FIFO with no writer would block forever
    big = _write(tmp_path / "big.json", "[" + "0," * 600 + "0]")
    for path, words in ((tmp_path / "fifo", "not a regular file"), (tmp_path, "directory"),
                        ("/dev/null", "not a regular file"), (tmp_path / "none.json", "no such file"),
                        ("", "empty path"), ("a\0b", "cannot read"), (big, "limit")):
        with pytest.raises(UsageError, match=words):
            read_json(path, "--plan", max_bytes=1024)


def test_output_paths_with_odd_names_are_usage_errors(tmp_path):
    from tokenloom.common.errors import UsageError
    from tokenloom.common.files import resolve_output

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / ("x" * 300), "a\0b", tmp_path / "loop", tmp_path / "file" / "child", "",
                f"{tmp_path}/new/", f"{tmp_path}/.", ".."):
        with pytest.raises(UsageError, match="--out"):
            resolve_output(bad, "--out")


def test_commit_rechecks_a_target_replaced_during_the_work(tmp_path):
    from tokenloom.common.errors import UsageError
    from tokenloom.commands.outputs import OutputFiles

    target = tmp_path / "out.json"
    with OutputFiles() as out:
        out.claim("--out", target)
        out.write("--out", lambda p: p.write_text("new"))
        os.mkfifo(target)  # someone put a FIFO there while we worked
        with pytest.raises(UsageError, match="not a regular file"):
            out.commit()
    assert stat.S_ISFIFO(os.stat(target).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
