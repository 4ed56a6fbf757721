"""PlanOptions: every keyword plan_placement took maps onto it, validated where it is built."""

import json

import numpy as np
import pytest

from tokenloom.common.errors import UsageError
from tokenloom.placement import PlanOptions, SynthConfig, plan_placement, synth_topk, trace_from_topk


def _trace():
    return trace_from_topk(synth_topk(SynthConfig(num_layers=3, num_experts=16, top_k=2, num_tokens=300, seed=4)), 16)


def _same(a, b):
    strip = lambda p: {k: v for k, v in p.to_dict()["solver"].items() if k != "seconds"}  # noqa: E731
    assert np.array_equal(a.phy2log, b.phy2log)
    assert json.dumps(a.metrics) == json.dumps(b.metrics) and strip(a) == strip(b)


@pytest.mark.parametrize("method", ["greedy", "ilp"])
def test_keywords_and_an_options_object_are_the_same_call(method):
    trace = _trace()
    kw = dict(gpus_per_node=4, num_redundant=8, method=method, holdout=0.2, seed=3, progress=False, time_limit=30)
    by_keywords = plan_placement(trace, 8, **kw)
    by_options = plan_placement(trace, 8, PlanOptions(**kw))
    overridden = plan_placement(trace, 8, PlanOptions(**{**kw, "seed": 0}), seed=3)  # keywords win
    _same(by_keywords, by_options)
    _same(by_keywords, overridden)


def test_every_old_keyword_is_a_field():
    old = ("gpus_per_node", "num_redundant", "method", "time_limit", "intra_node_gbps", "inter_node_gbps", "previous",
           "max_moves", "progress", "token_home", "replica_choice", "max_imbalance", "expert_groups", "holdout", "seed",
           "map_fn")
    assert set(old) <= set(PlanOptions.__dataclass_fields__)


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="num_gpu"):
        plan_placement(_trace(), 8, num_gpu=8)


@pytest.mark.parametrize("field, value", [("method", "milp"), ("token_home", "gpu"), ("replica_choice", "random"),
                                          ("time_limit", 0), ("max_imbalance", 0.5), ("holdout", 1.0)])
def test_options_are_validated_where_built(field, value):
    with pytest.raises(UsageError, match=f"^{field}:"):
        PlanOptions(**{field: value})
