"""The simulator's API edges under hostile values (issue 9, classes 2, 4, 5): typed hardware specs,
shapes, the engine's no-progress guard, the work limit and the advisor's fallback for huge worlds."""

from __future__ import annotations

import json
import math
import time
import warnings

import pytest

from tokenloom.common.errors import UsageError
from tokenloom.parallel.schedule import Recv, Schedule, Send, Step
from tokenloom.simulator import (AttentionShape, Cluster, CostModel, Device, Link, NodeSpec, SimulationError,
                                 make_cluster, simulate, simulate_attention)
from tokenloom.simulator.hardware import CATALOG, load_hardware_file, node_to_dict
from tokenloom.simulator.scenario import MAX_SIM_TRANSFERS, check_work, estimated_transfers
from bounds import NO_SPIN_S

GOOD_DEVICE = dict(name="d", sms=8, flops=1e12, hbm_bw=1e12, attn_eff_fwd=0.5, attn_eff_bwd=0.4)


@pytest.mark.parametrize("field, value", [
    ("flops", math.nan), ("flops", math.inf), ("flops", 0.0), ("flops", -1.0), ("hbm_bw", math.nan),
    ("attn_eff_fwd", 0.0), ("attn_eff_bwd", math.inf), ("launch_s", -1e-6), ("launch_s", math.nan),
    ("sms", 0), ("sms", 2.5), ("sms", True), ("flops", "fast"), ("flops", None),
])
def test_device_rejects_non_finite_and_out_of_range(field, value):
    with pytest.raises(UsageError, match=field):
        Device(**{**GOOD_DEVICE, field: value})


@pytest.mark.parametrize("field, value", [("bw", math.nan), ("bw", 0), ("latency_s", math.nan),
                                          ("latency_s", -1.0), ("latency_s", math.inf), ("efficiency", 1.5),
                                          ("efficiency", 0.0)])
def test_link_rejects_non_finite_and_out_of_range(field, value):
    with pytest.raises(UsageError, match=field):
        Link(**{"bw": 1e9, "latency_s": 1e-6, **{field: value}})


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq_len=0), "seq_len"), (dict(seq_len=1 << 41), "seq_len"), (dict(num_heads=0), "num_heads"),
    (dict(head_dim=-1), "head_dim"), (dict(batch=2.5), "batch"), (dict(num_kv_heads=3), "kv_heads"),
    (dict(num_kv_heads=0), "kv_heads"), (dict(dtype_bytes=0), "dtype_bytes"), (dict(seq_len=math.nan), "seq_len"),
])
def test_shape_limits(kwargs, field):
    with pytest.raises(UsageError, match=field):
        AttentionShape(**{"seq_len": 4096, "num_heads": 8, "head_dim": 64, **kwargs})


def test_cluster_and_lookup_errors_are_usage_errors():
    node = CATALOG["h100-sxm"]
    for kwargs, field in ((dict(num_gpus=0), "gpus"), (dict(num_gpus=16), "gpus"),
                          (dict(num_gpus=16, num_nodes=3), "nodes"), (dict(num_gpus=8, num_nodes=0), "nodes")):
        with pytest.raises(UsageError, match=field):
            Cluster(node, **kwargs)
    with pytest.raises(UsageError, match="hardware must be one of"):
        make_cluster("tpu", 8)


def test_loader_round_trips_the_catalog(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({name: node_to_dict(node) for name, node in CATALOG.items()}))
    assert load_hardware_file(path) == CATALOG


def test_loader_names_file_entry_and_field(tmp_path):
    spec = node_to_dict(CATALOG["a10-pcie"])
    spec["uplink"]["latency_s"] = -5
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"slow": spec}))
    with pytest.raises(UsageError) as info:
        load_hardware_file(path)
    msg = str(info.value)
    assert "hw.json" in msg and "slow.uplink.latency_s" in msg and ">=" in msg and "\n" not in msg


def _tiny(cluster_gpus: int = 2) -> tuple[Schedule, CostModel]:
    sched = Schedule("custom", "contiguous", False, False, 2,
                     ((Step((Send(1, _buf(), "q"),)),), (Step((Recv(0, _buf(), "q"),)),)), ((), ()))
    cost = CostModel(AttentionShape(1024, 1, 64), make_cluster("h100-sxm", cluster_gpus), "contiguous")
    return sched, cost


def _buf():
    from tokenloom.parallel.schedule import Buf

    return Buf("q", 0, (0,))


@pytest.mark.parametrize("field, value", [("latency_s", math.nan), ("latency_s", math.inf), ("bw", math.nan),
                                          ("bw", 0.0)])
def test_engine_refuses_non_finite_inputs_that_slipped_past_validation(field, value):
    """Bypass the dataclass checks (as a buggy caller could): the engine still never spins."""
    sched, cost = _tiny()
    link = Link(1e9, 1e-6)
    object.__setattr__(link, field, value)
    node = NodeSpec("bad", CATALOG["h100-sxm"].device, 8, "switch", link=Link(1e9, 1e-6), nic=Link(1e9, 1e-6))
    object.__setattr__(node, "link", link)
    cluster = Cluster(node, 2)
    cost = CostModel(AttentionShape(1024, 1, 64), cluster, "contiguous")
    t0 = time.perf_counter()
    with pytest.raises(SimulationError, match="finite|capacit"):
        simulate(sched, cost)
    assert time.perf_counter() - t0 < NO_SPIN_S


def test_engine_loop_guard_stops_a_nan_clock(monkeypatch):
    """If a NaN time appears anyway (here: injected into the network), the loop raises, not spins."""
    from tokenloom.simulator import network

    sched, cost = _tiny()
    monkeypatch.setattr(network.FluidNetwork, "next_finish", lambda self: math.nan if self.active else math.inf)
    t0 = time.perf_counter()
    with pytest.raises(SimulationError, match="no progress"):
        simulate(sched, cost)
    assert time.perf_counter() - t0 < NO_SPIN_S


def test_engine_still_prices_the_tiny_case():
    sched, cost = _tiny()
    tl = simulate(sched, cost)
    assert 0 < tl.total_s < 1e-3


def test_work_estimate_bounds_the_real_transfer_count():
    """The estimate used for refusing must not undercount (else a huge run slips through)."""
    from tokenloom.parallel.builders import build_schedule
    from tokenloom.parallel.schedule import AllToAll

    for strategy in ("tokenring", "ring", "ulysses"):
        for n in (4, 16):
            for backward in (False, True):
                real = 0
                for bwd in ((False, True) if backward else (False,)):
                    s = build_schedule(strategy, n, layout="zigzag", causal=True, backward=bwd, num_heads=16,
                                       num_kv_heads=16)
                    real += sum(isinstance(op, Send) for r in s.ranks for st in r for op in st.comms)
                    real += n * (n - 1) * sum(isinstance(op, AllToAll) for st in s.ranks[0] for op in st.comms)
                assert real <= estimated_transfers(strategy, n, backward) < 2 * real + 16 * n


def test_work_limit_refuses_before_building(monkeypatch):
    from tokenloom.simulator import scenario

    monkeypatch.setattr(scenario, "_schedule", lambda *a: pytest.fail("built a schedule it should refuse"))
    monkeypatch.setattr(scenario, "compile_ring", lambda *a, **k: pytest.fail("compiled a schedule it should refuse"))
    with pytest.raises(UsageError, match="limit"):  # the event engine: 1024 ranks are ~2M transfers
        simulate_attention("tokenring", make_cluster("h100-sxm", 1024, 128), AttentionShape(1 << 20, 32, 128),
                           causal=True, engine="event")
    with pytest.raises(UsageError, match="limit"):  # the lockstep path counts 1/64 of each: 4096 ranks
        simulate_attention("tokenring", make_cluster("h100-sxm", 4096, 512), AttentionShape(1 << 24, 32, 128),
                           causal=True)
    assert check_work([("ring", 64, True)]) <= MAX_SIM_TRANSFERS


def test_huge_but_valid_shape_gives_finite_times():
    cluster = make_cluster("h100-sxm", 8)
    shape = AttentionShape(1 << 40, 1 << 16, 1 << 16, None, 1 << 20, 8)
    s = simulate_attention("ring", cluster, shape, causal=True).summary()
    assert math.isfinite(s["total_ms"]) and s["total_ms"] > 0 and math.isfinite(s["bytes_per_rank"])


def test_auto_strategy_on_a_huge_world_falls_back_with_a_warning():
    from tokenloom.simulator.advisor import choose_strategy

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = choose_strategy(world_size=4096, seq_len=1 << 24, num_heads=32, num_kv_heads=8, head_dim=128,
                              causal=True, hardware="h100-sxm")
    assert got == ("tokenring", "zigzag") and time.perf_counter() - t0 < NO_SPIN_S
    assert any("too many" in str(w.message) for w in caught)
    with pytest.raises(UsageError, match="seq"):
        choose_strategy(world_size=4096, seq_len=(1 << 24) + 1, num_heads=32, num_kv_heads=8, head_dim=128,
                        causal=True, hardware="h100-sxm")


@pytest.mark.parametrize("kwargs, field", [
    (dict(world_size=0), "world_size"), (dict(world_size=-3), "world_size"), (dict(world_size=2.5), "world_size"),
    (dict(layout="bogus"), "layout"), (dict(hardware="tpu"), "hardware"), (dict(seq_len=math.nan), "seq_len"),
    (dict(num_heads=0), "num_heads"), (dict(dtype_bytes=0), "dtype_bytes"), (dict(seq_len=1001), "seq"),
])
def test_choose_strategy_refuses_bad_arguments(kwargs, field):
    from tokenloom.simulator.advisor import choose_strategy

    args = {**dict(world_size=2, seq_len=1024, num_heads=4, num_kv_heads=None, head_dim=8, causal=True,
                   hardware="h100-sxm"), **kwargs}
    with pytest.raises(UsageError, match=field):
        choose_strategy(**args)


def test_calibration_refuses_nonsense_measurements():
    from tokenloom.simulator.calibrate import profile_from

    compute = {"fwd_flops": 1e10, "bwd_flops": 1e10, "mem_bw": 1e10, "launch_s": 1e-5}
    gloo = {"bw": 1e9, "latency_s": 1e-5}
    assert profile_from(compute, gloo, cores=2).device.flops == 1e10
    for bad in (-1e10, math.inf, math.nan):
        with pytest.raises(RuntimeError, match="noisy"):
            profile_from({**compute, "fwd_flops": bad}, gloo, cores=2)


def test_max_transfers_raises_and_lowers_the_limit(capsys):
    from tokenloom.cli import main
    from tokenloom.simulator.scenario import MAX_SIM_TRANSFERS_CEILING

    argv = ["simulate", "attention", "--hardware", "h100-sxm", "--gpus", "16", "--nodes", "2", "--seq", "16K",
            "--heads", "16", "--head-dim", "64", "--json"]
    assert main(argv + ["--max-transfers", "100", "--engine", "event"]) == 2  # 16 ranks: ~512 transfers
    assert "--max-transfers" in capsys.readouterr().err
    assert main(argv + ["--max-transfers", "600", "--engine", "event"]) == 0
    capsys.readouterr()
    assert main(argv + ["--max-transfers", "100"]) == 0  # lockstep: 512 / 64 = 8 units
    capsys.readouterr()
    assert main(argv + ["--max-transfers", "7"]) == 2
    capsys.readouterr()
    assert main(["advise"] + argv[1:] + ["--max-transfers", "20"]) == 2  # advise: several simulations
    capsys.readouterr()
    with pytest.raises(UsageError, match="max_transfers"):
        check_work([("ring", 8, False)], limit=MAX_SIM_TRANSFERS_CEILING + 1)
    assert check_work([("ring", 512, False)], limit=MAX_SIM_TRANSFERS_CEILING) == 2 * 512 * 512
