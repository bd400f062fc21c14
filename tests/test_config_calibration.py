"""Validation of the calibration fields of TIDEConfig."""

import math

import pytest
from hypothesis import given, strategies as st

from tide_compile import TIDEConfig


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_convergence_threshold_range(value):
    if math.isfinite(value) and 0.0 <= value <= 1.0:
        assert TIDEConfig(convergence_threshold=value).convergence_threshold == value
    else:
        with pytest.raises(ValueError, match="convergence_threshold"):
            TIDEConfig(convergence_threshold=value)


@given(st.integers(min_value=-5, max_value=10_000))
def test_calibration_samples_range(value):
    if value >= 1:
        assert TIDEConfig(calibration_samples=value).calibration_samples == value
    else:
        with pytest.raises(ValueError, match="calibration_samples"):
            TIDEConfig(calibration_samples=value)


@pytest.mark.parametrize("value", [1.5, "4", True, None])
def test_calibration_samples_rejects_non_integers(value):
    with pytest.raises(ValueError, match="calibration_samples"):
        TIDEConfig(calibration_samples=value)


@pytest.mark.parametrize("value", ["identity", "projection"])
def test_exit_strategy_values(value):
    assert TIDEConfig(exit_strategy=value).exit_strategy == value


@pytest.mark.parametrize("value", ["Identity", "lowrank", "", None, 1])
def test_exit_strategy_rejects(value):
    with pytest.raises(ValueError, match="exit_strategy"):
        TIDEConfig(exit_strategy=value)


@pytest.mark.parametrize("value", [None, "wikitext", "data/shakespeare/train"])
def test_calibration_dataset_values(value):
    assert TIDEConfig(calibration_dataset=value).calibration_dataset == value


@pytest.mark.parametrize("value", ["", "   ", 3, ["a.txt"]])
def test_calibration_dataset_rejects(value):
    with pytest.raises(ValueError, match="calibration_dataset"):
        TIDEConfig(calibration_dataset=value)


def test_defaults_and_roundtrip():
    cfg = TIDEConfig()
    assert (cfg.calibration_samples, cfg.calibration_dataset) == (2000, None)
    assert (cfg.convergence_threshold, cfg.exit_strategy) == (0.95, "identity")
    cfg = TIDEConfig(exit_strategy="projection", calibration_dataset="x", convergence_threshold=0.5)
    assert TIDEConfig.from_dict(cfg.to_dict()) == cfg
