"""TokenWeave's two layer configs share one validation (issue 17.2): the planner's ``LayerShape``
and the layers' ``LayerConfig`` accept and refuse the same sizes, naming the same field; only
rotary's even head dim is the layers' own rule."""

from __future__ import annotations

import pytest

from tokenloom.common.errors import UsageError
from tokenloom.parallel.tokenweave_model import LayerConfig
from tokenloom.parallel.tokenweave_split import LayerShape

# (hidden, ffn, heads, kv_heads, tp, num_experts, top_k) -> field refused, or None
ROWS = [
    ((128, 256, 8, 2, 2, 0, 0), None),
    ((128, 256, 8, 8, 8, 4, 2), None),
    ((0, 256, 8, 2, 2, 0, 0), "hidden"),
    ((128, 256, 8, True, 2, 0, 0), "kv_heads"),
    ((128, 256.0, 8, 2, 2, 0, 0), "ffn"),
    ((130, 256, 8, 2, 2, 0, 0), "hidden"),
    ((128, 256, 8, 3, 2, 0, 0), "kv_heads"),
    ((128, 256, 8, 2, 3, 0, 0), "heads"),
    ((128, 250, 8, 2, 4, 0, 0), "ffn"),
    ((128, 256, 8, 2, 2, 4, 0), "top_k"),
    ((128, 256, 8, 2, 2, 4, 5), "top_k"),
    ((128, 256, 8, 2, 2, -1, 0), "top_k"),
]


def _field(make):
    try:
        make()
    except UsageError as exc:
        return exc.field
    return None


@pytest.mark.parametrize("row, field", ROWS)
def test_layer_shape_and_layer_config_agree(row, field):
    hidden, ffn, heads, kv, tp, experts, top_k = row
    shape = _field(lambda: LayerShape(hidden, ffn, heads, kv, tp, experts, top_k))
    config = _field(lambda: LayerConfig(hidden, heads, kv, ffn, experts, top_k).check_tp(tp))
    assert (shape, config) == (field, field)
    if field is None:
        assert LayerConfig(hidden, heads, kv, ffn, experts, top_k).shape(tp) == LayerShape(
            hidden, ffn, heads, kv, tp, experts, top_k)


def test_rotary_needs_an_even_head_dim_in_the_layers_only():
    LayerShape(96, 256, 32, 8, 2)  # head dim 3: the planner prices it
    with pytest.raises(UsageError) as e:
        LayerConfig(96, 32, 8, 256)
    assert e.value.field == "hidden" and "rotary" in str(e.value)
