"""The error policy (issue 9, class 8): bad input is exit 2 with one line naming the field; anything
else is a bug: exit 1 with the traceback, never disguised as bad input."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tokenloom import cli
from tokenloom.common.errors import UsageError, one_line
from procs import run

ADVISE = ["advise", "attention", "--hardware", "h100-sxm", "--gpus", "2", "--seq", "1K", "--heads", "2",
          "--head-dim", "8"]


def _raising(exc: BaseException):
    def handler(args):
        raise exc
    return handler


@pytest.fixture
def handler(monkeypatch):
    """Make ``tokenloom advise attention`` run a handler that raises what the test gives."""
    from tokenloom.commands import advise

    def install(exc: BaseException) -> None:
        monkeypatch.setattr(advise, "_advise", _raising(exc))
    return install


def test_usage_error_is_exit_2_one_line(handler, capsys):
    handler(UsageError("--gpus must be >= 1, got 0\nsecond line", field="gpus"))
    assert cli.main(ADVISE) == 2
    err = capsys.readouterr().err
    assert err == "tokenloom advise attention: error: --gpus must be >= 1, got 0\n"


def test_os_error_is_exit_2_one_line_with_the_file(handler, capsys):
    handler(PermissionError(13, "Permission denied", "/some/file.json"))
    assert cli.main(ADVISE) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "/some/file.json" in err


@pytest.mark.parametrize("exc", [ValueError("a bug, not input"), KeyError("k"), TypeError("t"),
                                 ZeroDivisionError("z"), AssertionError("invariant")])
def test_other_exceptions_are_bugs_not_bad_input(exc, handler, capsys):
    handler(exc)
    with pytest.raises(type(exc)):  # propagates: the interpreter prints the traceback, exit 1
        cli.main(ADVISE)
    assert "error:" not in capsys.readouterr().err


def test_interrupt_is_130(handler, capsys):
    handler(KeyboardInterrupt())
    assert cli.main(ADVISE) == 130


def test_argparse_errors_are_one_line_without_usage(capsys):
    for argv in (["advise", "attention", "--gpus", "0"], ["simulate", "attention", "--gpus", "2"],
                 ["nonsense"], ["simulate", "attention", "--hardware", "h100-sxm", "--gpus", "2\n3", "--seq",
                                "1K", "--heads", "2", "--head-dim", "8"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage:" not in err and "error:" in err, err


def test_one_line():
    assert one_line(ValueError("a\nb")) == "a" and one_line(ValueError("")) == "ValueError"


def test_real_entry_point_exit_codes(tmp_path):
    """A bug is exit 1 with a traceback; bad input exit 2 with one line (real interpreter)."""
    script = textwrap.dedent(f"""
        import sys
        from tokenloom import cli
        from tokenloom.commands import advise
        def bug(args):
            raise ValueError("internal invariant broken")
        advise._advise = bug
        sys.exit(cli.main({ADVISE!r}))
    """)
    res = run([sys.executable, "-c", script], timeout=60)
    assert res.returncode == 1 and "Traceback" in res.stderr and "internal invariant broken" in res.stderr
    res = run([sys.executable, "-m", "tokenloom", *ADVISE[:-1], "0"], timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--head-dim" in res.stderr
