"""Traces: derived loads/transitions against plain loops, both file formats, validation messages."""

import json

import numpy as np
import pytest

from tokenloom.placement import SynthConfig, Trace, load_trace, save_aggregated, save_topk, synth_topk, trace_from_topk


def _loop_counts(ids, num_experts):
    """Independent reference: loads and 1/K-weighted pair counts by explicit loops."""
    num_layers, num_tokens, top_k = ids.shape
    loads = np.zeros((num_layers, num_experts))
    trans = np.zeros((num_layers - 1, num_experts, num_experts))
    for l in range(num_layers):
        for t in range(num_tokens):
            for a in ids[l, t]:
                loads[l, a] += 1
                if l + 1 < num_layers:
                    for b in ids[l + 1, t]:
                        trans[l, a, b] += 1.0 / top_k
    return loads, trans


def test_derived_counts_match_loops_and_marginals():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 5, size=(3, 40, 2))
    trace = trace_from_topk(ids, 5)
    loads, trans = _loop_counts(ids, 5)
    np.testing.assert_array_equal(trace.loads, loads)
    np.testing.assert_allclose(trace.transitions, trans)
    # every routed copy spreads one unit of flow: row sums are this layer's loads, columns the next's
    np.testing.assert_allclose(trace.transitions.sum(axis=2), loads[:-1])
    np.testing.assert_allclose(trace.transitions.sum(axis=1), loads[1:])
    assert trace.top_k == 2 and trace.num_tokens == 40


def test_synth_is_seeded_distinct_and_affine():
    cfg = SynthConfig(num_layers=4, num_experts=16, top_k=4, num_tokens=500, skew=0.0, affinity=0.9, seed=3)
    ids = synth_topk(cfg)
    assert ids.shape == (4, 500, 4) and ids.min() >= 0 and ids.max() < 16
    np.testing.assert_array_equal(ids, synth_topk(cfg))
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4))  # distinct experts per token
    strong = trace_from_topk(ids, 16).transitions
    weak = trace_from_topk(synth_topk(SynthConfig(4, 16, 4, 500, skew=0.0, affinity=0.0, seed=3)), 16).transitions
    top = lambda t: np.sort(t / t.sum(axis=2, keepdims=True), axis=2)[..., -2:].sum()  # mass on 2 best successors
    assert top(strong) > 1.5 * top(weak)


def test_synth_domains_keep_tokens_together():
    ids = synth_topk(SynthConfig(3, 32, 4, 400, skew=0.0, affinity=1.0, num_domains=4, seed=0))
    trans = trace_from_topk(ids, 32).transitions[0]
    # with affinity 1 each token's experts all sit in one 8-expert domain: each expert reaches <= 8 successors
    assert ((trans > 0).sum(axis=1) <= 8).all()


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_aggregated_round_trip(tmp_path, suffix):
    trace = trace_from_topk(np.random.default_rng(0).integers(0, 6, size=(3, 50, 2)), 6)
    save_aggregated(tmp_path / f"t{suffix}", trace)
    back = load_trace(tmp_path / f"t{suffix}")
    np.testing.assert_allclose(back.loads, trace.loads)
    np.testing.assert_allclose(back.transitions, trace.transitions)


def test_raw_round_trip_and_loads_only(tmp_path):
    ids = np.random.default_rng(0).integers(0, 6, size=(2, 30, 3))
    save_topk(tmp_path / "raw.npz", ids, 6)
    np.testing.assert_allclose(load_trace(tmp_path / "raw.npz").transitions, trace_from_topk(ids, 6).transitions)
    (tmp_path / "l.json").write_text(json.dumps({"loads": [[1, 2, 3]]}))
    only = load_trace(tmp_path / "l.json")
    assert only.transitions is None and not only.has_transitions


BAD = [
    ({"topk_ids": [[[0, 7]]], "num_experts": 4}, "topk_ids: expert id 7 out of range"),
    ({"topk_ids": [[[0, -1]]], "num_experts": 4}, "topk_ids: expert id -1 out of range"),
    ({"topk_ids": [[0, 1]], "num_experts": 4}, "topk_ids: 2-D array"),
    ({"topk_ids": [[[0.5, 1.0]]], "num_experts": 4}, "topk_ids: dtype float64"),
    ({"topk_ids": [[[0], [1, 2]]], "num_experts": 4}, "topk_ids: not a rectangular array"),
    ({"topk_ids": [[[0, 1]]]}, "num_experts: missing key"),
    ({"topk_ids": [[[0, 1]]], "num_experts": 0}, "num_experts: must be >= 1"),
    ({"topk_ids": [[]], "num_experts": 4}, "topk_ids: empty trace"),
    ({"loads": [[1, -2, 3]]}, "loads: contains negative counts"),
    ({"loads": [[1, "NaN", 3]]}, "loads: dtype"),
    ({"loads": [[0, 0, 0]]}, "loads: every count is zero"),
    ({"loads": [[1, 2], [3, 4]], "transitions": [[[1, 2]]]}, "transitions: shape (1, 1, 2)"),
    ({"loads": [1, 2, 3]}, "loads: 1-D array"),
    ({"counts": [1, 2]}, "loads: missing key"),
]


@pytest.mark.parametrize("payload,message", BAD)
def test_malformed_traces_name_the_field(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError) as err:
        load_trace(path)
    assert message in str(err.value) and str(path) in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_nan_in_npz_and_unreadable_files(tmp_path):
    np.savez(tmp_path / "nan.npz", loads=np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="loads: contains NaN"):
        load_trace(tmp_path / "nan.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="^trace: cannot read .* as .npz"):
        load_trace(tmp_path / "junk.npz")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="^trace: .*junk.json is not valid JSON"):
        load_trace(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="^trace: no such file: .*missing.npz"):
        load_trace(tmp_path / "missing.npz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="^trace: unsupported file type '.csv'"):
        load_trace(tmp_path / "x.csv")


def test_trace_dataclass_validates():
    with pytest.raises(ValueError, match="^loads: empty trace"):
        Trace(loads=np.zeros((0, 3)))
