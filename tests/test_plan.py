"""tide_compile.plan.plan on its own: facts and options in, a plan out (no graphs)."""

import pytest
from hypothesis import given, settings, strategies as st

from tide_compile import RouterSet, TIDEConfig
from tide_compile.options import parse_options, resolve_exits
from tide_compile.plan import GraphFacts, plan
from tide_testing import model_for

ROUTERS = RouterSet.forced(model_for("llama"), exit_at=1,
                           config=TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8))


def opts(**options):
    return parse_options({"routers": ROUTERS, **options})


def facts(step_length=1, symbolic=False, cache=True, cuda=False, **kw):
    return GraphFacts(step_length=step_length, symbolic=symbolic, writes_cache_in_place=cache,
                      on_cuda=cuda, **kw)


@settings(max_examples=200)
@given(step_length=st.sampled_from([1, None]), symbolic=st.booleans(), cache=st.booleans(),
       cuda=st.booleans(), inductor=st.booleans())
def test_one_token_steps_always_skip_under_auto(step_length, symbolic, cache, cuda, inductor):
    """Decode steps keep the skip strategy for every shape: static or symbolic batch and
    cache sizes, on any device, with or without Inductor."""
    if step_length is None:
        symbolic = True
    p = plan(facts(step_length, symbolic, cache, cuda), opts(inductor=inductor))
    if step_length == 1:
        assert p.strategy == "skip"
        assert p.cuda_graphs == (cuda and inductor and not symbolic)
        assert p.symbolic == symbolic
    else:
        assert p.strategy == ("compact" if cache else "frozen")


def test_plan_table():
    o = opts()
    assert plan(facts(None, True, True), o).strategy == "compact"
    assert plan(facts(None, True, True), o).compact_min_length == 2048
    assert plan(facts(7), o).strategy == "frozen"  # a static prompt step
    assert plan(facts(7), o).warning is None  # shorter than compact_min_length: policy
    long = plan(facts(4096), o)
    assert long.strategy == "frozen" and "mark_dynamic" in long.warning
    assert plan(facts(None, True, False), o).strategy == "frozen"  # DynamicCache prompt
    refused = facts(None, True, True).without_compaction("no in-place writes")
    assert plan(refused, o).strategy == "frozen"


def test_explicit_strategies():
    assert plan(facts(5), opts(strategy="skip")).strategy == "skip"
    assert plan(facts(1), opts(strategy="frozen")).strategy == "frozen"
    compact = plan(facts(None, True, True), opts(strategy="compact"))
    assert compact.strategy == "compact" and compact.compact_min_length == 0
    assert plan(facts(1), opts(strategy="compact")).strategy == "skip"
    static = plan(facts(5), opts(strategy="compact"))
    assert static.strategy == "frozen" and "falls back to 'frozen'" in static.warning
    assert "static length" in static.warning
    refused = plan(facts(None, True, True).without_compaction("a DynamicCache"),
                   opts(strategy="compact"))
    assert refused.strategy == "frozen" and refused.warning.endswith("a DynamicCache")


def test_kernels_cuda_graphs_and_stacking_follow_the_shapes():
    cuda = opts()  # defaults: Inductor, kernels auto, cuda_graphs auto, stack_kv auto
    static = plan(facts(1, cuda=True), cuda)
    assert (static.kernels, static.cuda_graphs, static.stack_kv) == ("triton", True, True)
    # Symbolic sizes: no hand kernels (their launch would specialize the length), no
    # CUDA graphs, no stacking; a warning names the cause.
    symbolic = plan(facts(1, symbolic=True, cuda=True), cuda)
    assert (symbolic.kernels, symbolic.cuda_graphs, symbolic.stack_kv) == ("inductor", False, False)
    assert "without CUDA graphs" in symbolic.warning
    prompt = plan(facts(None, symbolic=True, cuda=True), cuda)
    assert prompt.strategy == "compact" and prompt.kernels == "inductor"
    frozen_step = plan(facts(1, cuda=True), opts(strategy="frozen"))
    assert frozen_step.cuda_graphs and frozen_step.pipeline == "frozen_graphed"
    assert plan(facts(1), cuda).kernels == "inductor"  # CPU
    assert plan(facts(1, cuda=True), opts(kernels="triton", inductor=False)).kernels == "triton"
    with pytest.raises(ValueError, match="cuda_graphs"):
        plan(facts(1), opts(cuda_graphs=True))


def test_no_checkpoint_left_is_the_plain_model():
    assert plan(facts(1), opts(min_layers=4)).strategy == "plain"


def test_options_resolve_threshold_and_checkpoints_once():
    o = opts(exit_threshold=0.3, min_layers=3)
    assert o.threshold == 0.3 and o.checkpoints == (2,)
    assert o.checkpoints == resolve_exits(ROUTERS, 0.3, 3)[1]
    assert opts().threshold == ROUTERS.config.exit_threshold
    assert parse_options(o) is o  # already parsed: returned as is
    with pytest.raises(ValueError, match="beyond the model"):
        opts(min_layers=9)
    with pytest.raises(TypeError, match="stats"):
        opts(stats=3)
    with pytest.raises(ValueError, match="inductor"):  # TIDEError: a truthy string is not True
        opts(inductor="no")
