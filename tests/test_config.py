import math

import pytest
from hypothesis import given, settings, strategies as st

from tide_compile import TIDEConfig
from tide_compile.config import checkpoint_layers


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_exit_threshold_range(value):
    if math.isfinite(value) and 0.0 <= value <= 1.0:
        assert TIDEConfig(exit_threshold=value).exit_threshold == value
    else:
        with pytest.raises(ValueError, match="exit_threshold"):
            TIDEConfig(exit_threshold=value)


@pytest.mark.parametrize("field", ["min_layers", "checkpoint_interval", "router_bottleneck_dim"])
@given(value=st.integers(min_value=-5, max_value=200))
def test_integer_fields(field, value):
    if value >= 1:
        assert getattr(TIDEConfig(**{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=field):
            TIDEConfig(**{field: value})


@pytest.mark.parametrize("field", ["min_layers", "checkpoint_interval", "router_bottleneck_dim"])
@pytest.mark.parametrize("value", [1.5, "4", True, None])
def test_integer_fields_reject_non_integers(field, value):
    with pytest.raises(ValueError, match=field):
        TIDEConfig(**{field: value})


@settings(max_examples=300)
@given(
    num_layers=st.integers(2, 80),
    interval=st.integers(1, 20),
    min_layers=st.integers(1, 80),
)
def test_checkpoint_rule(num_layers, interval, min_layers):
    expected = [
        k * interval - 1
        for k in range(1, num_layers + 1)
        if k * interval - 1 + 1 >= min_layers and k * interval - 1 < num_layers - 1
    ]
    if expected:
        got = checkpoint_layers(num_layers, interval, min_layers)
        assert got == expected
        assert num_layers - 1 not in got
        assert all(c + 1 >= min_layers for c in got)
    else:
        with pytest.raises(ValueError, match="min_layers|checkpoint_interval"):
            checkpoint_layers(num_layers, interval, min_layers)


def test_checkpoint_examples():
    assert TIDEConfig().checkpoint_layers(32) == [3, 7, 11, 15, 19, 23, 27]
    assert TIDEConfig(checkpoint_interval=1).checkpoint_layers(4) == [0, 1, 2]
    assert TIDEConfig(checkpoint_interval=2, min_layers=3).checkpoint_layers(8) == [3, 5]
    with pytest.raises(ValueError, match="checkpoint_interval"):
        TIDEConfig(checkpoint_interval=4).checkpoint_layers(4)
    with pytest.raises(ValueError, match="min_layers"):
        TIDEConfig(min_layers=9).checkpoint_layers(8)
    with pytest.raises(ValueError, match="at least 2 layers"):
        checkpoint_layers(1, 1, 1)


def test_replace_and_dict_roundtrip():
    cfg = TIDEConfig(exit_threshold=0.5, checkpoint_interval=2)
    assert TIDEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(min_layers=3).min_layers == 3
    with pytest.raises(TypeError, match="unknown"):
        cfg.replace(nonsense=1)
    with pytest.raises(ValueError, match="exit_threshold"):
        cfg.replace(exit_threshold=2.0)
