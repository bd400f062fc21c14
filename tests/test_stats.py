import pytest
import torch
from hypothesis import given, strategies as st

from tide_compile import ExitStats


@given(st.lists(st.sampled_from([-1, 1, 3, 5]), min_size=0, max_size=60))
def test_stats_arithmetic(exits):
    s = ExitStats(num_layers=8)
    s.record(torch.tensor(exits, dtype=torch.int64))
    n = len(exits)
    exited = [e for e in exits if e >= 0]
    assert s.total_tokens == n
    assert s.exited_tokens == len(exited)
    assert s.ran_all_layers == n - len(exited)
    for layer in (1, 3, 5):
        assert s.exits_per_layer.get(layer, 0) == exits.count(layer)
    depth = sum(e + 1 for e in exited) + 8 * (n - len(exited))
    assert s.layers_executed == depth
    if n:
        assert s.exit_rate == pytest.approx(len(exited) / n)
        assert s.mean_depth == pytest.approx(depth / n)
    else:
        assert s.exit_rate == 0.0 and s.mean_depth == 0.0


def test_layers_executed_counts_what_ran_not_depth():
    s = ExitStats(num_layers=8)
    # a frozen path ran all 8 layers for 4 tokens, though two exited at layer 3
    s.record(torch.tensor([3, 3, -1, -1]), layers_executed=32)
    assert s.mean_depth == pytest.approx((4 + 4 + 8 + 8) / 4)
    assert s.mean_layers_executed == 8.0


def test_merge_and_reset():
    a, b = ExitStats(4), ExitStats(4)
    a.record(torch.tensor([0, -1]))
    b.record(torch.tensor([[0, 1], [2, -1]]))
    a.merge(b)
    assert a.total_tokens == 6 and a.exits_per_layer == {0: 2, 1: 1, 2: 1}
    with pytest.raises(ValueError):
        a.merge(ExitStats(5))
    a.reset()
    assert a.total_tokens == 0 and a.exits_per_layer == {} and a.layers_executed == 0


def test_summary_format():
    s = ExitStats(num_layers=8)
    s.record(torch.tensor([3, 3, 5, -1]))
    assert s.summary().splitlines() == [
        "Total tokens: 4, Exited: 3 (75.0%)",
        "  Layer 3: 2 (50.0%)",
        "  Layer 5: 1 (25.0%)",
        "Ran all layers: 1",
        "Mean depth: 5.50 / 8 layers",
        "Layers executed per token: 5.50 / 8",
    ]


def test_steps_by_strategy_are_counted_merged_and_summarized():
    s = ExitStats(num_layers=4)
    s.record(torch.tensor([1, 1]), layers_executed=4, strategy="skip")
    s.record_uniform(1, 2, 4, strategy="skip")
    s.record(torch.tensor([-1, 2, 3]), layers_executed=12, strategy="frozen")
    s.record(torch.tensor([0]))  # no strategy: not a step of any
    assert s.steps_by_strategy == {"skip": 2, "frozen": 1} and s.last_strategy is None
    other = ExitStats(num_layers=4)
    other.record(torch.tensor([2]), layers_executed=3, strategy="compact")
    s.merge(other)
    assert s.steps_by_strategy == {"skip": 2, "frozen": 1, "compact": 1}
    assert s.summary().splitlines()[-1] == "Steps by strategy: compact 1, frozen 1, skip 2"
    s.reset()
    assert s.steps_by_strategy == {} and "Steps by strategy" not in s.summary()
