"""Option ``adaptive`` (strategy auto, one-token steps on CUDA graphs): per step the skip
runner or the whole step as one piece, from the exits of recent steps.

On CPU the CUDA-graph capture is faked (the wrapper passes the runner through), so the
runners themselves, the choice and the outputs are the real ones."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tide_compile import ExitStats, RouterSet
from tide_compile import backend as B
from tide_compile.runtime.adaptive import AdaptiveSkipRunner, saved_fraction
from test_backend import ARCHS5, CFG, SETTINGS, compiled, equals_plain_model, model_for, run_both
from test_reference import random_routers
from conftest import record_instances


@pytest.fixture
def adaptive_runners(monkeypatch):
    """Fake CUDA graphs; every AdaptiveSkipRunner built."""
    monkeypatch.setattr(B, "_on_cuda", lambda example_inputs: True)
    monkeypatch.setattr(B, "GraphedSkipRunner", lambda runner, mutated: runner)
    return record_instances(monkeypatch, AdaptiveSkipRunner)


def test_saved_fraction():
    assert saved_fraction(torch.tensor([[1], [3]]), 8) == 4 / 8  # all exited by layer 3
    assert saved_fraction(torch.tensor([[1], [-1]]), 8) == 0.0  # a row went on
    assert saved_fraction(torch.tensor([5]), 8) == 2 / 8
    assert saved_fraction(torch.tensor([], dtype=torch.long), 8) == 0.0


class _Fake:
    """A runner whose steps exit as scripted (for the choice alone)."""

    def __init__(self, script):
        self.script = script
        self.calls = 0
        self.stats = None
        self.last_exit_layer = None

    def __call__(self, x):
        self.last_exit_layer = torch.tensor(self.script(x))
        self.calls += 1
        return x


def test_choice_follows_the_recent_exits():
    # Steps 0-29: a row never exits (nothing to save); steps 30-: every row exits at 0.
    exits = lambda step: [[0], [0]] if step >= 30 else [[0], [-1]]  # noqa: E731
    skip, through = _Fake(exits), _Fake(exits)
    r = AdaptiveSkipRunner(skip, through, num_layers=8)
    paths = [(r(step), r.last_path)[1] for step in range(60)]
    assert paths[0] == "skip"  # tried first
    assert "through" in paths[:30]  # nothing saved: the one graph
    assert paths[25:30] == ["through"] * 5
    assert paths[-5:] == ["skip"] * 5  # exits return: skip again
    assert skip.calls + through.calls == 60 == sum(r.calls.values())


@settings(SETTINGS, max_examples=8)
@given(arch=st.sampled_from(ARCHS5), batch=st.integers(1, 3), threshold=st.floats(0.05, 0.95),
       seed=st.integers(0, 10_000))
def test_adaptive_equals_reference(adaptive_runners, arch, batch, threshold, seed):
    model = model_for(arch)
    routers = random_routers(model, seed)
    adaptive_runners.clear()
    fn, stats = compiled(model, routers, exit_threshold=threshold, adaptive=True,
                         cuda_graphs=True)
    exits = run_both(model, routers, fn, "static", batch, 4, 6, threshold, seed)
    (runner,) = adaptive_runners
    assert sum(runner.calls.values()) == 6
    ref = ExitStats(4)
    ref.record(exits)
    assert stats.exits_per_layer == ref.exits_per_layer
    assert stats.total_tokens == ref.total_tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_never_exiting_steps_go_to_the_one_graph(adaptive_runners, arch):
    model = model_for(arch)
    routers = RouterSet.forced(model, exit_at=None, config=CFG)
    fn, stats = compiled(model, routers, adaptive=True, cuda_graphs=True)
    equals_plain_model(fn, model, torch.randint(2, 97, (2, 3)), steps=16, cache_len=40)
    (runner,) = adaptive_runners
    assert runner.last_path == "through" and runner.calls["through"] >= 5
    assert runner.through.strategy == "frozen" and runner.through.cuts == []


def test_exiting_steps_stay_on_skip(adaptive_runners):
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    fn, stats = compiled(model, routers, adaptive=True, cuda_graphs=True)
    run_both(model, routers, fn, "static", 2, 3, 10, CFG.exit_threshold, 0)
    (runner,) = adaptive_runners
    assert runner.calls == {"skip": 10, "through": 0}
    assert stats.last_layers_executed == 2 * 2  # two rows, layers 0 and 1


def test_adaptive_off_by_default_and_validated(adaptive_runners):
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    fn, _ = compiled(model, routers, cuda_graphs=True)
    run_both(model, routers, fn, "static", 1, 3, 2, CFG.exit_threshold, 0)
    assert adaptive_runners == []
    with pytest.raises(TypeError, match="adaptive"):
        B.parse_options({"adaptive": "yes"})
    # strategy "skip" (explicit) is never adaptive
    fn, _ = compiled(model, routers, strategy="skip", adaptive=True, cuda_graphs=True)
    run_both(model, routers, fn, "static", 1, 3, 2, CFG.exit_threshold, 0)
    assert adaptive_runners == []
