"""Hostile input for ``simulate``, ``advise``, ``calibrate`` and ``demo`` (issue 9, classes 2-5, 8).

Every row is bad input and must end the same boring way: exit code 2, exactly one line on stderr
that names the field, no traceback, nothing on stdout, every input byte-for-byte unchanged and no
file left behind (not even a temp). Rows run in-process through ``tokenloom.cli.main`` (a
subprocess costs ~1 s here); a few subprocess rows at the end prove the real entry point.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tokenloom.cli import main
from tokenloom.simulator.hardware import CATALOG, PROFILE_ENV, node_to_dict
from procs import run
from no_work import WorkStarted, no_work

SIM = ["simulate", "attention", "--hardware", "h100-sxm", "--gpus", "8", "--seq", "16K", "--heads", "16",
       "--head-dim", "64"]
ADV = ["advise"] + SIM[1:]


def _with(argv: list[str], **flags: str) -> list[str]:
    """``argv`` with ``--flag value`` replaced (or appended)."""
    out = list(argv)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Name -> (kind, bytes or link target) of everything in ``folder`` (recursively)."""
    snap = {}
    for path in sorted(folder.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            snap[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            snap[str(path)] = ("file", path.read_bytes())
        else:
            snap[str(path)] = (stat.S_IFMT(st.st_mode),)
    return snap


def run_main(argv: list[str]) -> int:
    """``main(argv)``'s exit code, also for argparse's own errors (which exit via SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def assert_refused(argv: list[str], field: str, capsys, folder: Path | None = None, *words: str) -> str:
    """Run ``argv``; assert exit 2, one stderr line naming ``field``, no traceback, nothing written,
    and no work started (:func:`no_work`: the command's expensive steps raise if reached)."""
    before = _snapshot(folder) if folder else None
    with no_work() as started:
        code = run_main(argv)
    cap = capsys.readouterr()
    assert started == [], f"work started before the refusal: {started}"
    assert code == 2, (code, cap.err)
    assert cap.err.count("\n") == 1 and cap.err.endswith("\n"), cap.err
    assert "Traceback" not in cap.err
    assert field in cap.err, (field, cap.err)
    for word in words:
        assert word in cap.err, (word, cap.err)
    assert cap.out == ""
    if folder is not None:
        assert _snapshot(folder) == before  # inputs unchanged, no output, no temp file
    return cap.err


# -- class 2 and 4: flag values ---------------------------------------------------------------------
FLAG_ROWS = [
    # (argv, field named in the one-line error)
    (_with(SIM, gpus="0"), "--gpus"),
    (_with(SIM, gpus="-8"), "--gpus"),
    (_with(SIM, gpus="nan"), "--gpus"),
    (_with(SIM, gpus="inf"), "--gpus"),
    (_with(SIM, gpus="8.5"), "--gpus"),
    (_with(SIM, gpus="1e3"), "--gpus"),
    (_with(SIM, gpus=""), "--gpus"),
    (_with(SIM, gpus="9" * 5000), "--gpus"),
    (_with(SIM, gpus="99999999999"), "--gpus"),
    (_with(SIM, gpus="16"), "gpus"),  # 16 on one 8-GPU node
    (_with(SIM, nodes="0"), "--nodes"),
    (_with(SIM, gpus="16", nodes="3"), "nodes"),
    (_with(SIM, seq="0"), "--seq"),
    (_with(SIM, seq="-4K"), "--seq"),
    (_with(SIM, seq="1e12"), "--seq"),
    (_with(SIM, seq="nan"), "--seq"),
    (_with(SIM, seq="16KK"), "--seq"),
    (_with(SIM, seq=str(1 << 41)), "--seq"),
    (_with(SIM, seq="1000"), "seq"),  # not a multiple of 2 * gpus
    (_with(SIM, heads="0"), "--heads"),
    (_with(SIM, heads="1e9"), "--heads"),
    (_with(SIM, heads=str(1 << 17)), "--heads"),
    (_with(SIM, kv_heads="0"), "--kv-heads"),
    (_with(SIM, kv_heads="5"), "kv-heads"),
    (_with(SIM, head_dim="0"), "--head-dim"),
    (_with(SIM, head_dim="-1"), "--head-dim"),
    (_with(SIM, batch="0"), "--batch"),
    (_with(SIM, batch=str(1 << 30)), "--batch"),
    (_with(SIM, dtype="fp8"), "--dtype"),
    (_with(SIM, strategy="magic"), "--strategy"),
    (_with(SIM, layout="diagonal"), "--layout"),
    (_with(SIM, strategy="ulysses", heads="12"), "heads"),
    (_with(SIM, hardware="tpu-v9"), "hardware"),
    (_with(SIM, hardware="tpu\nv9"), "hardware"),
    # class 4: sizes the engine cannot walk in reasonable time are refused up front
    (_with(SIM, gpus="1024", nodes="128") + ["--engine", "event"], "gpus"),
    (_with(SIM, gpus="256", nodes="32") + ["--backward", "--engine", "event"], "gpus"),
    (_with(SIM, gpus="4096", nodes="512"), "gpus"),  # the lockstep path counts 1/64 per transfer
    (_with(ADV, gpus="4096", nodes="512"), "gpus"),
    (_with(ADV, gpus="0"), "--gpus"),
    (_with(ADV, seq="1001"), "seq"),
    (_with(ADV, heads="12", seq="1001"), "seq"),
    (["simulate", "calibrate", "--quick", "--bogus"], "--bogus"),
    (["demo", "--world-size", "0"], "--world-size"),
    (["demo", "--world-size", "3"], "world-size"),
    (["demo", "--world-size", "nan"], "--world-size"),
    (["demo", "--seq", "2050", "--world-size", "4"], "seq"),
    (["demo", "--seq", "1e12"], "--seq"),
    (["demo", "--seq", str(1 << 30)], "--seq"),
]


@pytest.mark.parametrize("argv, field", FLAG_ROWS, ids=[f"{r[0][0]}-{r[1]}-{i}" for i, r in enumerate(FLAG_ROWS)])
def test_bad_flag_values(argv, field, capsys):
    assert_refused(argv, field, capsys)


def test_work_limit_says_the_limit_and_why(capsys):
    err = assert_refused(_with(SIM, gpus="1024", nodes="128") + ["--engine", "event"], "gpus", capsys)
    assert "limit" in err and "transfers" in err


# -- class 2 and 5: malformed hardware files --------------------------------------------------------
def _spec() -> dict:
    return node_to_dict(CATALOG["h100-sxm"])


def _edit(path: list[str], value):
    def make() -> str:
        spec = _spec()
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return json.dumps({"mine": spec})
    return make


def _drop(*path: str):
    def make() -> str:
        spec = _spec()
        node = spec
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return json.dumps({"mine": spec})
    return make


_GOOD = json.dumps({"mine": _spec()})
_LAT = f'"latency_s": {json.dumps(_spec()["link"]["latency_s"])}'  # the first latency field of _GOOD
HW_ROWS = [
    # (id, file content: str | bytes | callable, words the error must contain)
    ("nan latency", _GOOD.replace(_LAT, '"latency_s": NaN', 1), ["NaN"]),
    ("infinity", _GOOD.replace(_LAT, '"latency_s": -Infinity', 1), ["Infinity"]),
    ("1e400", _GOOD.replace(_LAT, '"latency_s": 1e400', 1), ["1e400"]),
    ("null bw", _edit(["link", "bw"], None), ["mine.link.bw", "null"]),
    ("list bw", _edit(["link", "bw"], [1, 2]), ["mine.link.bw", "list"]),
    ("string bw", _edit(["link", "bw"], "fast"), ["mine.link.bw", "fast"]),
    ("bool sms", _edit(["device", "sms"], True), ["mine.device.sms"]),
    ("fractional sms", _edit(["device", "sms"], 1.5), ["mine.device.sms", "integer"]),
    ("1e30 int gpus", _edit(["gpus_per_node"], 10 ** 30), ["mine.gpus_per_node", "<="]),
    ("1e30 float gpus", _edit(["gpus_per_node"], 1e30), ["mine.gpus_per_node", "<="]),
    ("zero bw", _edit(["link", "bw"], 0), ["mine.link.bw", ">="]),
    ("negative latency", _edit(["nic", "latency_s"], -1e-6), ["mine.nic.latency_s", ">="]),
    ("efficiency 2", _edit(["link", "efficiency"], 2.0), ["mine.link.efficiency", "<="]),
    ("tiny flops", _edit(["device", "flops"], 1e-300), ["mine.device.flops"]),
    ("fabric torus", _edit(["fabric"], "torus"), ["mine.fabric", "switch"]),
    ("fabric number", _edit(["fabric"], 3), ["mine.fabric"]),
    ("pcie without uplink", _edit(["fabric"], "pcie"), ["pcie", "uplink"]),
    ("device is a list", _edit(["device"], [1, 2]), ["mine.device", "object"]),
    ("link is null", _edit(["link"], None), ["mine.link", "object"]),
    ("unknown field", _edit(["colour"], "red"), ["colour"]),
    ("unknown device field", _edit(["device", "tflops"], 1), ["tflops"]),
    ("missing nic", _drop("nic"), ["mine.nic", "missing"]),
    ("missing flops", _drop("device", "flops"), ["mine.device.flops", "missing"]),
    ("entry is a number", json.dumps({"mine": 3}), ["mine", "object"]),
    ("top is a list", json.dumps([_spec()]), ["object"]),
    ("empty object", "{}", ["empty"]),
    ("empty file", "", ["not valid JSON"]),
    ("truncated", _GOOD[:100], ["not valid JSON", "line 1"]),
    ("non-UTF-8", b'{"mine": "\xff\xfe"}', ["UTF-8"]),
    ("deep nesting", "[" * 100000, ["deep"]),
    ("5000-digit int", '{"mine": ' + "9" * 5000 + "}", ["digits"]),
    ("ragged/garbage", '{"mine": {"device": [[1, 2], [3]]}}', ["mine"]),
]


@pytest.mark.parametrize("content, words", [r[1:] for r in HW_ROWS], ids=[r[0] for r in HW_ROWS])
def test_malformed_hardware_file(content, words, tmp_path, capsys):
    path = tmp_path / "hw.json"
    content = content() if callable(content) else content
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = _with(SIM, hardware="mine") + ["--hardware-file", str(path)]
    err = assert_refused(argv, "--hardware-file", capsys, tmp_path, *words)
    assert "hw.json" in err  # names the file


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing", "device", "empty name"])
def test_hardware_file_that_is_not_a_file(kind, tmp_path, capsys):
    path = {"directory": tmp_path, "fifo": tmp_path / "fifo", "missing": tmp_path / "nope.json",
            "device": Path("/dev/null"), "empty name": ""}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block forever: it must be refused by stat alone
    assert_refused(SIM + ["--hardware-file", str(path)], "--hardware-file", capsys, tmp_path)


def test_good_hardware_file_still_works(tmp_path, capsys):
    path = tmp_path / "hw.json"
    path.write_text(_GOOD)
    assert main(_with(SIM, hardware="mine") + ["--hardware-file", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_ms"] > 0


def test_damaged_cpu_profile_names_the_variable_and_spares_other_hardware(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "cpu.json"
    bad.write_text('{"local-cpu": {"device": {"sms": NaN}}}')
    monkeypatch.setenv(PROFILE_ENV, str(bad))
    assert_refused(_with(SIM, hardware="local-cpu"), PROFILE_ENV, capsys, tmp_path)
    assert main(SIM + ["--json"]) == 0  # h100 does not read the local-cpu profile
    capsys.readouterr()


# -- class 3: output files --------------------------------------------------------------------------
def _root_can_write_anyway() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


OUT_ROWS = ["device", "fifo", "directory", "missing parent", "read-only dir", "equals input",
            "second output bad", "same file twice", "bad input after claim", "empty path",
            "parent is a file", "symlink loop", "looks writable, is not"]


@pytest.mark.parametrize("case", OUT_ROWS)
def test_output_hazards(case, tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(_GOOD)
    old = tmp_path / "old.json"
    old.write_text("keep me")
    base = SIM + ["--hardware-file", str(hw)]
    field, folder = "--chrome-trace", tmp_path
    if case == "device":
        argv, folder = base + ["--chrome-trace", "/dev/null"], tmp_path
    elif case == "fifo":
        os.mkfifo(tmp_path / "fifo")
        argv = base + ["--png", str(tmp_path / "fifo")]
        field = "--png"
    elif case == "directory":
        argv = base + ["--chrome-trace", str(tmp_path)]
    elif case == "missing parent":
        argv = base + ["--chrome-trace", str(tmp_path / "no" / "t.json")]
    elif case == "read-only dir":
        if _root_can_write_anyway():
            pytest.skip("root can write into a read-only directory")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        argv = base + ["--chrome-trace", str(ro / "t.json")]
    elif case == "equals input":
        argv = base + ["--chrome-trace", str(hw)]
    elif case == "second output bad":  # the first output must not appear either
        argv = base + ["--chrome-trace", str(tmp_path / "a.json"), "--png", str(tmp_path / "no" / "g.png")]
        field = "--png"
    elif case == "same file twice":
        argv = base + ["--chrome-trace", str(old), "--png", str(old)]
        field = "same file"
    elif case == "bad input after claim":  # a valid path, but the work fails: old content stays
        argv = _with(base, seq="1000") + ["--chrome-trace", str(old), "--png", str(tmp_path / "g.png")]
        field = "seq"
    elif case == "empty path":
        argv = base + ["--chrome-trace", ""]
    elif case == "parent is a file":
        argv = base + ["--chrome-trace", str(old / "t.json")]
    elif case == "looks writable, is not":  # os.access says yes (root); only creating a file tells
        if not os.path.isdir("/sys") or not os.access("/sys", os.W_OK):
            pytest.skip("no /sys that claims to be writable")
        argv = base + ["--chrome-trace", "/sys/t.json"]
    elif case == "symlink loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        argv = base + ["--chrome-trace", str(tmp_path / "loop")]
    assert_refused(argv, field, capsys, folder)
    if case == "device":
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_symlink_output_writes_the_target_and_keeps_the_link(tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert main(SIM + ["--chrome-trace", str(link), "--json"]) == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["traceEvents"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]  # no temp left


def test_two_outputs_appear_together(tmp_path, capsys):
    trace, png = tmp_path / "t.json", tmp_path / "g.png"
    assert main(_with(SIM, gpus="2") + ["--chrome-trace", str(trace), "--png", str(png)]) == 0
    capsys.readouterr()
    assert trace.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "t.json"]


@pytest.mark.parametrize("target", ["/dev/null", "dir", "missing/x.json"])
def test_calibrate_refuses_bad_out_before_measuring(target, tmp_path, capsys):
    out = target if target.startswith("/") else str(tmp_path if target == "dir" else tmp_path / target)
    assert_refused(["simulate", "calibrate", "--quick", "--out", out], "--out", capsys, tmp_path)


def test_calibrate_refuses_bad_profile_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path))  # a directory
    assert_refused(["simulate", "calibrate", "--quick"], PROFILE_ENV, capsys, tmp_path)


# -- the real entry point (subprocesses: ~1 s each, so only a few) ----------------------------------
def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "tokenloom", *argv], timeout=timeout)


def test_entry_point_nan_hardware_file_does_not_spin(tmp_path):
    hw = tmp_path / "hw.json"
    hw.write_text(_GOOD.replace(_LAT, '"latency_s": NaN', 1))
    res = _cli(*_with(SIM, hardware="mine"), "--hardware-file", str(hw), timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "--hardware-file" in res.stderr and "NaN" in res.stderr


def test_entry_point_size_limit_and_device_output(tmp_path):
    res = _cli(*_with(SIM, gpus="1024", nodes="128"), "--chrome-trace", "/dev/null")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "/dev/null" in res.stderr
    res = _cli(*_with(SIM, gpus="1024", nodes="128"), "--engine", "event")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "limit" in res.stderr
    res = _cli(*_with(SIM, gpus="nan"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--gpus" in res.stderr


def test_demo_sections_still_run():
    """The tour's attention section (through the launcher) and simulator section work end to end;
    it once broke silently when the launcher moved. One rank, a tiny sequence: a few seconds."""
    import io

    from tokenloom.commands.demo import attention_section
    from tokenloom.simulator.demo import demo_section

    out = io.StringIO()
    assert attention_section(out, world_size=1, seq=16) is True
    text = out.getvalue()
    assert all(f"{s} " in text for s in ("tokenring", "ring", "ulysses")) and "FAILED" not in text
    out = io.StringIO()
    demo_section(out)
    assert out.getvalue().count("->") == 4  # one verdict per simulated case


@pytest.mark.parametrize("body", ['{"loads": [[1, 2], [3, 4]], "num_experts": 99999999999999999999999}',
                                  '{"topk_ids": [[[0], [1]]], "num_experts": 99999999999999999999999}',
                                  '{"topk_ids": [[[0], [1]]], "num_experts": -99999999999999999999999}'])
def test_entry_point_num_experts_beyond_int64(tmp_path, body):
    trace, out = tmp_path / "t.json", tmp_path / "plan.json"
    trace.write_text(body)
    proc = _cli("plan", "--trace", str(trace), "--gpus", "2", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and "num_experts" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("argv, step", [
    (SIM, "tokenloom.simulator.scenario.compile_ring"),
    (SIM + ["--engine", "event"], "tokenloom.simulator.scenario._schedule"),
    (ADV, "tokenloom.simulator.scenario.compile_ring"),
    (["demo", "--world-size", "2", "--seq", "64"], "tokenloom.comm.launch.run_job"),
    (["run", "attention", "--launcher", "local", "--seq", "64"], "tokenloom.comm.launch.run_job"),
])
def test_no_work_sees_good_input_start_working(argv, step, capsys):
    """The yardstick of every refusal above: input that passes its checks reaches its work step."""
    with no_work() as started, pytest.raises(WorkStarted):  # a bug to the CLI: it propagates
        run_main(argv)
    capsys.readouterr()
    assert started == [step]
