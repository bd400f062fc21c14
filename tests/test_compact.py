"""Strategy ``compact``: prefill steps whose later layers run only the continuing tokens.

Properties: compact equals frozen equals the reference (logits, every layer's cached K/V,
the cache's write counters, and the decode steps after), on random routers, prompt
lengths, padding, batch sizes and architectures; compaction really happens; compiled
graphs stay bounded over prompt lengths and compacted sizes.
"""

import warnings

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st
from transformers import DynamicCache

import tide_compile
from tide_compile import ExitStats, RouterSet, TIDEConfig
from tide_compile import backend as B
from tide_compile import reference as R
from tide_compile.options import parse_options
from tide_compile.runtime.compact import CompactRunner, bucket
from tide_compile.runtime.runner import FrozenRunner, LazyGraph
from tide_testing import (ARCHS5, CFG, assert_caches_equal, compacted_prefill_equals_reference,
                          compile_prefill, dynamic_ids, initialized_cache, model_for,
                          prefill_equals_reference, random_routers, record_instances,
                          splitting_threshold)


@pytest.fixture
def compactions(monkeypatch):
    """Every compaction the runner makes: ``(kept, step length)``."""
    seen: list[tuple[int, int]] = []
    original = CompactRunner._compact

    def spy(self, env, k, c, cont, b, s):
        seen.append((b, s))
        return original(self, env, k, c, cont, b, s)

    monkeypatch.setattr(CompactRunner, "_compact", spy)
    return seen


@pytest.fixture
def compact_runners(monkeypatch):
    """Every CompactRunner built."""
    return record_instances(monkeypatch, CompactRunner)


# ---------------------------------------------------------------- compact == reference
@settings(max_examples=10, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no slow shrinking
@given(arch=st.sampled_from(ARCHS5), batch=st.integers(1, 3), prompt=st.integers(2, 17),
       threshold=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_compact_prefill_equals_reference_and_frozen(compactions, arch, batch, prompt,
                                                     threshold, seed):
    model = model_for(arch)
    routers = random_routers(model, seed)
    torch._dynamo.reset()
    # compaction_threshold 1: compact whenever the bucket is smaller than the step.
    fn, stats = compile_prefill(model, routers, exit_threshold=threshold, strategy="compact",
                                compaction_threshold=1.0)
    ids = dynamic_ids(batch, prompt, seed)
    c_fast, c_ref = initialized_cache(model, batch), initialized_cache(model, batch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tide:")  # no fallback to frozen
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=threshold)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert_caches_equal(c_fast, c_ref)
    ref_stats = ExitStats(4)
    ref_stats.record(ref.exit_layers)
    assert stats.exits_per_layer == ref_stats.exits_per_layer
    assert B.COMPILE_COUNTS["compact"] >= 1
    # The frozen strategy on the same dynamic-length step: the same logits and cache.
    torch._dynamo.reset()
    frozen, _ = compile_prefill(model, routers, exit_threshold=threshold, strategy="frozen")
    c_frozen = initialized_cache(model, batch)
    out_frozen = frozen(input_ids=ids, past_key_values=c_frozen, use_cache=True)
    torch.testing.assert_close(out.logits, out_frozen.logits, rtol=1e-4, atol=1e-4)
    assert_caches_equal(c_fast, c_frozen)
    # A decode step after the compacted prefill reads the K/V it left.
    torch._dynamo.reset()
    step, _ = compile_prefill(model, routers, exit_threshold=threshold, strategy="frozen")
    nxt = ref.logits[:, -1:].argmax(-1)
    out2 = step(input_ids=nxt, past_key_values=c_fast, use_cache=True)
    ref2 = R.forward(model, routers, nxt, CFG, past_key_values=c_ref, exit_threshold=threshold)
    torch.testing.assert_close(out2.logits, ref2.logits, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(arch=st.sampled_from(ARCHS5), batch=st.integers(1, 3), prompt=st.integers(2, 17),
       threshold=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_auto_short_steps_run_the_frozen_graph_equal_reference(compactions, compact_runners,
                                                              arch, batch, prompt, threshold,
                                                              seed):
    """auto, a dynamic-length step shorter than compact_min_length: the frozen strategy's
    own runner (its graph compiled with the backend call, as strategy="frozen" compiles
    it) equals the reference, every layer counted."""
    model = model_for(arch)
    routers = random_routers(model, seed)
    torch._dynamo.reset()
    compact_runners.clear()
    fn, stats = compile_prefill(model, routers, exit_threshold=threshold,
                                compaction_threshold=1.0, compact_min_length=18)
    ids = dynamic_ids(batch, prompt, seed)
    before = len(compactions)
    ref, _, _ = prefill_equals_reference(fn, model, routers, ids, threshold)
    (runner,) = compact_runners
    assert runner.last_frozen and len(compactions) == before
    assert type(runner.frozen) is FrozenRunner and not isinstance(runner.frozen.fn, LazyGraph)
    ref_stats = ExitStats(4)
    ref_stats.record(ref.exit_layers)
    assert stats.exits_per_layer == ref_stats.exits_per_layer
    assert stats.mean_layers_executed == 4.0


@pytest.mark.parametrize("arch", ARCHS5)
def test_compaction_happens_and_counts_what_ran(compactions, arch):
    model = model_for(arch)
    routers = random_routers(model, 11)
    ids = dynamic_ids(1, 16, 3)
    threshold = splitting_threshold(model, routers, ids, CFG)
    stats, _, _, _ = compacted_prefill_equals_reference(model, routers, ids, threshold)
    assert compactions
    kept, s = compactions[-1]
    assert s == 16 and kept <= 8 and kept == bucket(kept)
    # Layers that ran: every token up to layer 0, the kept ones after.
    assert stats.layers_executed == 16 * 1 + kept * 3


def test_compact_generate_with_padding_equals_reference_generate(compactions):
    model = model_for("llama")
    routers = random_routers(model, 5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    for threshold in (0.1, 0.3, 0.5, 0.7):
        torch._dynamo.reset()
        fast = tide_compile.optimize(model, routers, kv="propagate", exit_threshold=threshold,
                                     inductor=False, strategy="compact", compaction_threshold=1.0)
        got = fast.generate(ids, max_new_tokens=5, attention_mask=mask, pad_token_id=0)
        ref = R.generate(model, routers, ids, 5, attention_mask=mask, pad_token_id=0,
                         exit_threshold=threshold, cache="static")
        assert torch.equal(got, ref.sequences)
        assert fast.tide_stats.exits_per_layer == ref.stats.exits_per_layer
    assert compactions, "no threshold made the padded prefill compact"


def test_compiled_graphs_stay_bounded_over_lengths(compactions):
    model = model_for("llama")
    routers = random_routers(model, 5)
    torch._dynamo.reset()
    B.COMPILE_COUNTS.clear()
    fast = tide_compile.optimize(model, routers, kv="propagate", exit_threshold=0.3,
                                 inductor=False, compaction_threshold=1.0,
                                 compact_min_length=0)  # auto
    sizes = set()
    for prompt in (5, 9, 14, 23, 31):
        # one cache length: a new length is a new cache shape (as for Inductor)
        fast.generate(torch.randint(2, 97, (1, prompt)), max_new_tokens=2, max_cache_len=40)
        sizes.update(kept for kept, s in compactions if s == prompt)
    # One dynamic prefill graph (compact) and one decode-step graph (skip), whatever the
    # prompt lengths and compacted sizes.
    assert B.COMPILE_COUNTS["compact"] == 1
    assert B.COMPILE_COUNTS["skip"] == 1
    assert len(compactions) >= 3 and len({s for _, s in compactions}) >= 3
    assert all(k & (k - 1) == 0 for k in sizes)  # powers of two


def test_auto_runs_short_steps_frozen_and_long_ones_compacted(compactions, compact_runners):
    """``auto``: a step shorter than ``compact_min_length`` runs the whole frozen graph (no
    compaction, no segments); from that length on, the same compiled function compacts.
    Both equal the reference."""
    model = model_for("llama")
    routers = random_routers(model, 0)
    runners = compact_runners
    torch._dynamo.reset()
    fn, stats = compile_prefill(model, routers, exit_threshold=0.5, compaction_threshold=1.0,
                                compact_min_length=12)
    for prompt, seed in ((6, 1), (11, 2), (12, 3), (16, 4)):
        ids = dynamic_ids(1, prompt, seed)
        threshold = splitting_threshold(model, routers, ids, CFG) if prompt >= 12 else 0.5
        if prompt >= 12:  # a threshold that compacts: recompile with it
            torch._dynamo.reset()
            runners.clear()
            fn, stats = compile_prefill(model, routers, exit_threshold=threshold,
                                        compaction_threshold=1.0, compact_min_length=12)
        before = len(compactions)
        prefill_equals_reference(fn, model, routers, ids, threshold)
        (runner,) = runners
        assert runner.last_frozen == (prompt < 12)
        if prompt < 12:
            assert len(compactions) == before and runner.last_segments_run == 0
        else:
            assert len(compactions) == before + 1
    assert B.COMPILE_COUNTS["compact"] >= 1


def test_compact_min_length_is_validated_and_ignored_by_compact(compact_runners):
    model = model_for("llama")
    routers = random_routers(model, 3)
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="compact_min_length"):
            parse_options({"routers": routers, "compact_min_length": bad})
    torch._dynamo.reset()
    fn, _ = compile_prefill(model, routers, strategy="compact", compact_min_length=1000)
    fn(input_ids=dynamic_ids(1, 6, 0), past_key_values=initialized_cache(model, 1),
       use_cache=True)
    # strategy "compact" builds its runner without a frozen graph: never the short path.
    (runner,) = compact_runners
    assert runner.frozen is None and not runner.last_frozen and runner.last_segments_run > 0


def test_compaction_threshold_zero_never_compacts(compactions):
    model = model_for("llama")
    routers = random_routers(model, 11)
    torch._dynamo.reset()
    fn, _ = compile_prefill(model, routers, exit_threshold=0.2, strategy="compact",
                            compaction_threshold=0.0)
    c_fast, c_ref = initialized_cache(model, 1), initialized_cache(model, 1)
    ids = dynamic_ids(1, 16, 3)
    out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=0.2)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert not compactions


# ---------------------------------------------------------------- fallbacks
def test_dynamic_cache_falls_back_to_frozen_with_one_warning():
    model = model_for("llama")
    routers = random_routers(model, 5)
    torch._dynamo.reset()
    B._WARNED.clear()
    fn, stats = compile_prefill(model, routers, exit_threshold=0.3, strategy="compact")
    ids = dynamic_ids(2, 7, 1)
    with pytest.warns(UserWarning, match="falls back to 'frozen'.*StaticCache"):
        out = fn(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    ref = R.forward(model, routers, ids, CFG, past_key_values=DynamicCache(config=model.config),
                    exit_threshold=0.3)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tide:")  # once only
        torch._dynamo.reset()
        fn2, _ = compile_prefill(model, routers, exit_threshold=0.3, strategy="compact")
        fn2(input_ids=dynamic_ids(2, 7, 1), past_key_values=DynamicCache(config=model.config),
            use_cache=True)


def test_static_shape_prefill_falls_back_and_decode_steps_skip():
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    torch._dynamo.reset()
    B._WARNED.clear()
    B.COMPILE_COUNTS.clear()
    fn, stats = compile_prefill(model, routers, strategy="compact")
    cache = initialized_cache(model, 1)
    with pytest.warns(UserWarning, match="static"):
        fn(input_ids=torch.tensor([[3, 4, 5]]), past_key_values=cache, use_cache=True)
    fn(input_ids=torch.tensor([[6]]), past_key_values=cache, use_cache=True)
    assert B.COMPILE_COUNTS["frozen"] == 1 and B.COMPILE_COUNTS["skip"] == 1
    assert stats.last_layers_executed == 2  # the decode step stopped after layer 1


def test_bucket_sizes():
    assert [bucket(m) for m in (0, 1, 2, 3, 4, 5, 8, 9, 100)] == [2, 2, 2, 4, 4, 8, 8, 16, 128]


def test_compaction_threshold_is_validated():
    with pytest.raises(ValueError, match="compaction_threshold"):
        TIDEConfig(compaction_threshold=1.5)
    with pytest.raises(ValueError, match="compaction_threshold"):
        parse_options({"compaction_threshold": -0.1})
    with pytest.raises(ValueError, match="'compact'"):
        parse_options({"strategy": "compacted"})


# ---------------------------------------------------------------- Inductor (slow on CPU)
@pytest.mark.slow
def test_inductor_compact_prefill_equals_reference(compactions, compact_runners):
    """Under Inductor, one compile serves two lengths; strategy auto with
    compact_min_length 14 compacts the 16-token step and runs the 11-token one through
    the frozen strategy's runner (compiled in the backend call)."""
    model = model_for("llama", num_layers=3)
    cfg = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
    routers = random_routers(model, 11, config=cfg)
    torch._dynamo.reset()
    B.COMPILE_COUNTS.clear()
    stats = ExitStats(3)
    threshold = splitting_threshold(model, routers, dynamic_ids(2, 16, 16), cfg)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "strategy": "auto", "stats": stats,
                                "compaction_threshold": 1.0, "exit_threshold": threshold,
                                "compact_min_length": 14})
    for prompt in (16, 11):  # one compile serves both lengths
        ids = dynamic_ids(2, prompt, prompt)  # batch 2: stride-0 (expanded) inputs occur
        c_fast, c_ref = initialized_cache(model, 2), initialized_cache(model, 2)
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, ids, cfg, past_key_values=c_ref,
                        exit_threshold=threshold)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        assert_caches_equal(c_fast, c_ref)
        assert compact_runners[-1].last_frozen == (prompt < 14)
    assert B.COMPILE_COUNTS["compact"] == 1
    assert compactions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compact_and_skip_with_exit_projections_equal_reference(arch):
    """Exit projections E_c (exit_strategy "projection") on the compacted prefill, its
    exit-all path and the skip strategy's decode steps."""
    from tide_compile import ExitProjection

    model = model_for(arch)
    base = random_routers(model, 11)
    g = torch.Generator().manual_seed(2)
    projections = {}
    for c in base.checkpoint_layers:
        proj = ExitProjection(base.hidden_size, 3)
        with torch.no_grad():
            for prm in proj.parameters():
                prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
        projections[c] = proj
    routers = RouterSet({c: base.router(c) for c in base.checkpoint_layers},
                        model_info=RouterSet.describe(model), config=CFG,
                        exit_projections=projections)
    ids = dynamic_ids(2, 16, 3)
    threshold = splitting_threshold(model, routers, ids, CFG)
    _, ref, c_fast, c_ref = compacted_prefill_equals_reference(model, routers, ids, threshold)
    torch._dynamo.reset()
    step, _ = compile_prefill(model, routers, exit_threshold=threshold)  # auto: skip
    nxt = ref.logits[:, -1:].argmax(-1)
    for _ in range(3):
        out = step(input_ids=nxt, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, nxt, CFG, past_key_values=c_ref, exit_threshold=threshold)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        nxt = ref.logits[:, -1:].argmax(-1)
