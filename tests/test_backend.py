"""The tide backend against the reference (custom runner without Inductor; a few Inductor tests)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import StaticCache

import tide_compile
from tide_compile import ExitStats, RouterSet, TIDEConfig
from tide_compile import backend as B
from tide_compile import reference as R
from tide_compile.options import parse_options
from tide_testing import (ARCHS5, CFG, compiled, equals_plain_model,
                          inductor_forced_decode_equals_reference, model_for, new_cache,
                          random_routers, run_both, skip_layers_executed)


# ------------------------------------------------------------------ compiled == reference
@settings(max_examples=10)
@given(arch=st.sampled_from(ARCHS5), cache=st.sampled_from(["static", "dynamic"]),
       strategy=st.sampled_from(["auto", "frozen", "skip"]), batch=st.integers(1, 3),
       prompt=st.integers(1, 6), threshold=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_compiled_equals_reference(arch, cache, strategy, batch, prompt, threshold, seed):
    """Every strategy equals the reference; the layers that ran are exactly what the
    strategy skips given the reference's exits (skip: a step stops after the checkpoint
    where its last token exits, when all do; frozen: every layer; auto: a multi-token
    prompt frozen, one-token steps skip, also once a DynamicCache makes them symbolic)."""
    model = model_for(arch)
    routers = random_routers(model, seed)
    fn, stats = compiled(model, routers, exit_threshold=threshold, strategy=strategy)
    steps = run_both(model, routers, fn, cache, batch, prompt, 3, threshold, seed)
    ref_stats = ExitStats(4)
    ref_stats.record(torch.cat(steps, 1))
    assert stats.exits_per_layer == ref_stats.exits_per_layer
    assert stats.total_tokens == ref_stats.total_tokens
    expected = sum(
        e.numel() * 4 if strategy == "frozen" or (strategy == "auto" and e.shape[1] > 1)
        else skip_layers_executed(e, 4)
        for e in steps)
    assert stats.layers_executed == expected


@pytest.mark.parametrize("arch", ARCHS5)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_forced_exit_skips_layers(arch, cache):
    """Every token exits at layer 1: decode runs 2 of 4 layers, outputs equal the reference."""
    model = model_for(arch)
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    fn, stats = compiled(model, routers, strategy="skip")
    run_both(model, routers, fn, cache, 1, 4, 3, CFG.exit_threshold, 0)
    assert stats.exits_per_layer == {1: 4 + 3}
    assert stats.steps_by_strategy == {"skip": 4}
    assert stats.mean_layers_executed == 2.0  # layers 2 and 3 really did not run
    assert stats.mean_depth == 2.0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_runs_all_layers_and_equals_skip(arch):
    model = model_for(arch)
    routers = RouterSet.forced(model, exit_at=0, config=CFG)
    outs = {}
    for strategy in ("frozen", "skip"):
        fn, stats = compiled(model, routers, strategy=strategy)
        cache = new_cache(model, "static")
        ids = torch.tensor([[5, 6, 7]])
        logits = [fn(input_ids=ids, past_key_values=cache, use_cache=True).logits]
        for t in range(3):
            logits.append(fn(input_ids=torch.tensor([[10 + t]]), past_key_values=cache,
                             use_cache=True).logits)
        outs[strategy] = (torch.cat(logits, 1), cache.layers[3].keys.clone(), stats)
    torch.testing.assert_close(outs["frozen"][0], outs["skip"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["frozen"][1], outs["skip"][1], rtol=1e-5, atol=1e-5)
    assert outs["frozen"][2].mean_layers_executed == 4.0
    assert outs["skip"][2].mean_layers_executed == 1.0
    assert outs["frozen"][2].exits_per_layer == outs["skip"][2].exits_per_layer


@settings(max_examples=6)
@given(arch=st.sampled_from(ARCHS5), batch=st.integers(1, 3), threshold=st.floats(0.05, 0.95),
       seed=st.integers(0, 10_000))
def test_frozen_one_token_steps_as_one_piece_equal_reference(monkeypatch, arch, batch,
                                                             threshold, seed):
    """Where CUDA graphs apply (faked here: the wrapper passes the runner through), the
    frozen strategy's one-token steps run the whole inserted graph as the one segment of a
    runner with no cuts: equal to the reference, every layer counted, exits counted."""
    wrapped = []
    facts = B.graph_facts
    monkeypatch.setattr(B, "graph_facts",
                        lambda *a: dataclasses.replace(facts(*a), on_cuda=True))
    monkeypatch.setattr(B, "GraphedSkipRunner",
                        lambda runner, mutated: wrapped.append(runner) or runner)
    model = model_for(arch)
    routers = random_routers(model, seed)
    fn, stats = compiled(model, routers, exit_threshold=threshold, strategy="frozen",
                         cuda_graphs=True)
    exits = torch.cat(run_both(model, routers, fn, "static", batch, 4, 3, threshold, seed), 1)
    (runner,) = wrapped  # the decode step only; the 4-token prefill is a FrozenRunner
    assert runner.strategy == "frozen" and runner.cuts == [] and len(runner.segments) == 1
    assert runner.last_segments_run == 1
    ref_stats = ExitStats(4)
    ref_stats.record(exits)
    assert stats.exits_per_layer == ref_stats.exits_per_layer
    assert stats.mean_layers_executed == 4.0


def test_graphed_runner_falls_back_when_capture_fails(monkeypatch):
    """GraphedSkipRunner's fallback logic (CPU; the CUDA path is tests/test_gpu.py): the
    warm-up calls run the runner, a failing capture warns once with the reason, and every
    later call runs the runner uncaptured, with no second attempt."""
    from tide_compile.runtime.cudagraphs import GraphedSkipRunner

    class Runner:
        strategy, stats = "skip", None

        def __init__(self):
            self.calls = 0

        def __call__(self, x):
            self.calls += 1
            return x * 2

    attempts = []

    def refuse(self, args):
        attempts.append(args)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedSkipRunner, "_capture", refuse)
    inner = Runner()
    graphed = GraphedSkipRunner(inner, set())
    x = torch.ones(2)
    for _ in range(graphed.warmup_calls - 1):
        assert torch.equal(graphed(x), x * 2)
    assert graphed.capture_error is None and not attempts
    with pytest.warns(RuntimeWarning, match="not permitted when stream is capturing"):
        assert torch.equal(graphed(x), x * 2)  # the warm-up call whose capture fails
    assert len(attempts) == 1 and "RuntimeError" in graphed.capture_error
    for _ in range(5):
        assert torch.equal(graphed(x), x * 2)
    assert len(attempts) == 1 and inner.calls == graphed.warmup_calls + 5
    assert not graphed.captured


@pytest.mark.parametrize("arch", ARCHS5)
def test_never_exit_equals_plain_model(arch):
    model = model_for(arch)
    routers = RouterSet.forced(model, exit_at=None, config=CFG)
    fn, stats = compiled(model, routers)
    equals_plain_model(fn, model, torch.randint(2, 97, (2, 5)), steps=3)
    assert stats.exit_rate == 0.0


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_no_recompilation_per_decode_step(cache):
    model = model_for("llama")
    routers = random_routers(model, 1)
    fn, _ = compiled(model, routers, exit_threshold=0.5)
    cc = new_cache(model, cache, length=40)
    ids = torch.randint(2, 97, (1, 5))
    counts = []
    for _ in range(12):
        fn(input_ids=ids, past_key_values=cc, use_cache=True)
        counts.append(sum(B.COMPILE_COUNTS.values()))
        ids = torch.randint(2, 97, (1, 1))
    # prefill, the first step, and (DynamicCache) one dynamic-shape recompile; then none.
    assert counts[3:] == [counts[3]] * (len(counts) - 3)
    assert counts[-1] - counts[0] <= 2


# ------------------------------------------------------------------ optimize / generate
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_optimize_generate_equals_reference_generate(arch):
    model = model_for(arch)
    routers = random_routers(model, 5)
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, routers, kv="propagate", exit_threshold=0.5, inductor=False)
    ids = torch.randint(2, 97, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    got = fast.generate(ids, max_new_tokens=6, attention_mask=mask, pad_token_id=0)
    ref = R.generate(model, routers, ids, 6, attention_mask=mask, pad_token_id=0,
                     exit_threshold=0.5, cache="static")
    assert torch.equal(got, ref.sequences)
    assert fast.tide_stats.exits_per_layer == ref.stats.exits_per_layer
    assert fast.tide_stats.total_tokens == ref.stats.total_tokens
    # the prompt step, then every one-token step on the skip strategy
    assert fast.tide_stats.steps_by_strategy == {"frozen": 1, "skip": got.shape[1] - 6 - 1}
    assert "Total tokens" in fast.tide_stats.summary()


def test_optimize_never_exit_generate_equals_hf_generate():
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=None, config=CFG)
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, routers, kv="propagate", inductor=False)
    ids = torch.randint(2, 97, (1, 5))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, max_new_tokens=8, pad_token_id=0), expected)


def test_attach_then_compile_whole_model():
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    torch._dynamo.reset()
    tide_compile.attach(model, routers, inductor=False)
    try:
        fn = torch.compile(model, backend="tide", fullgraph=True)
        ids = torch.randint(2, 97, (1, 4))
        out = fn(ids)
        ref = R.forward(model, routers, ids, CFG)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        # A decode step through the attached routers stops after layer 1.
        c_fast, c_ref = new_cache(model, "static"), new_cache(model, "static")
        fn(ids, past_key_values=c_fast, use_cache=True)
        R.forward(model, routers, ids, CFG, past_key_values=c_ref)
        step = ref.logits[:, -1:].argmax(-1)
        out = fn(step, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, step, CFG, past_key_values=c_ref)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        assert B.COMPILE_COUNTS["skip"] >= 1
    finally:
        tide_compile.detach(model)


# ------------------------------------------------------------------ errors
def test_backend_is_registered():
    assert "tide" in torch._dynamo.list_backends()


def test_option_errors():
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=None, config=CFG)
    with pytest.raises(ValueError, match="unknown tide backend option"):
        parse_options({"routers": routers, "threshold": 0.5})
    with pytest.raises(ValueError, match="strategy"):
        parse_options({"routers": routers, "strategy": "fast"})
    with pytest.raises(ValueError, match="exit_threshold"):
        parse_options({"routers": routers, "exit_threshold": 1.5})
    with pytest.raises(TypeError, match="RouterSet"):
        parse_options({"routers": 3})
    with pytest.raises(ValueError, match="another model"):
        tide_compile.optimize(model_for("qwen2"), routers)
    with pytest.raises(ValueError, match="inductor_mode='reduce-overhead'"):
        tide_compile.optimize(model, routers, mode="reduce-overhead")
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="tide", options={"inductor": False})
    with pytest.raises(Exception, match="tide_compile.attach"):
        fn(torch.ones(1, 3, dtype=torch.long))


def test_routers_from_path(tmp_path):
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    routers.save(tmp_path / "r.tide")
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, str(tmp_path / "r.tide"), kv="propagate", inductor=False)
    ids = torch.randint(2, 97, (1, 4))
    torch.testing.assert_close(fast(input_ids=ids).logits, R.forward(model, routers, ids).logits,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Inductor (slow on CPU)
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["frozen", "skip"])
def test_inductor_equals_reference(strategy):
    c1, c2, stats = inductor_forced_decode_equals_reference(strategy=strategy)
    torch.testing.assert_close(c1.layers[2].keys, c2.layers[2].keys, rtol=1e-4, atol=1e-4)
    assert stats.mean_layers_executed == (1.0 if strategy == "skip" else 3.0)


def test_hf_generate_with_compile_config_uses_tide():
    """transformers' own compiled generate (CompileConfig(backend="tide")) exits too."""
    from transformers import CompileConfig

    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    torch._dynamo.reset()
    tide_compile.attach(model, routers, inductor=False)
    before = B.COMPILE_COUNTS["skip"]
    try:
        cc = CompileConfig(backend="tide", fullgraph=True)
        cc._compile_all_devices = True  # HF compiles only on accelerators unless told
        ids = torch.randint(2, 97, (1, 5))
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             cache_implementation="static", compile_config=cc)
    finally:
        tide_compile.detach(model)
    # HF runs the prefill eagerly and compiles only the decode step: expected = a plain
    # prefill, then reference decode steps with exits.
    cache = StaticCache(config=model.config, max_cache_len=13)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
    seq = [ids, logits[:, -1:].argmax(-1)]
    for _ in range(7):
        step = R.forward(model, routers, seq[-1], CFG, past_key_values=cache)
        seq.append(step.logits[:, -1:].argmax(-1))
    assert torch.equal(out, torch.cat(seq, 1))
    assert B.COMPILE_COUNTS["skip"] > before


def test_generate_twice_does_not_recompile():
    model = model_for("llama")
    routers = random_routers(model, 2)
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, routers, kv="propagate", exit_threshold=0.5, inductor=False)
    ids = torch.randint(2, 97, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    first = fast.generate(ids, max_new_tokens=6, attention_mask=mask, pad_token_id=0)
    compiled = sum(B.COMPILE_COUNTS.values())
    second = fast.generate(ids, max_new_tokens=6, attention_mask=mask, pad_token_id=0)
    assert torch.equal(first, second)
    third = fast.generate(ids, max_new_tokens=6, attention_mask=mask, pad_token_id=0)
    assert torch.equal(first, third)
    assert sum(B.COMPILE_COUNTS.values()) == compiled  # the bucket's graphs are reused


@pytest.mark.slow
def test_inductor_dynamic_cache_equals_reference():
    """DynamicCache decode recompiles with dynamic shapes at the second step: that graph is
    compiled inside Dynamo's tracing context (the static ones at their first call)."""
    model = model_for("llama", num_layers=3)
    cfg = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
    routers = random_routers(model, 4, config=cfg)
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "strategy": "frozen", "exit_threshold": 0.5})
    c1, c2 = new_cache(model, "dynamic"), new_cache(model, "dynamic")
    ids = torch.tensor([[3, 4, 5]])
    for _ in range(4):
        out = fn(input_ids=ids, past_key_values=c1, use_cache=True)
        ref = R.forward(model, routers, ids, cfg, past_key_values=c2, exit_threshold=0.5)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        ids = ref.logits[:, -1:].argmax(-1)


@pytest.mark.slow
def test_inductor_symbolic_one_token_steps_skip():
    """Under Inductor, a DynamicCache's decode steps recompile with symbolic sizes after
    the first; strategy auto keeps them on the skip strategy (each piece compiled once
    from the symbolic fakes): equal to the reference, one layer per decode token."""
    model = model_for("llama", num_layers=3)
    cfg = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
    routers = RouterSet.forced(model, exit_at=0, config=cfg)
    torch._dynamo.reset()
    stats = ExitStats(3)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "stats": stats})
    c1, c2 = new_cache(model, "dynamic"), new_cache(model, "dynamic")
    ids = torch.tensor([[3, 4, 5]])
    for step in range(5):
        out = fn(input_ids=ids, past_key_values=c1, use_cache=True)
        ref = R.forward(model, routers, ids, cfg, past_key_values=c2)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        if step:
            assert stats.last_layers_executed == 1 and stats.last_strategy == "skip"
        ids = ref.logits[:, -1:].argmax(-1)
    assert B.COMPILE_COUNTS["skip"] >= 2  # the static first step and the symbolic ones


@settings(max_examples=6)
@given(min_layers=st.integers(1, 4), seed=st.integers(0, 1000), strategy=st.sampled_from(["frozen", "skip"]))
def test_min_layers_option_equals_reference(min_layers, seed, strategy):
    model = model_for("llama")
    routers = random_routers(model, seed)
    fn, stats = compiled(model, routers, exit_threshold=0.3, min_layers=min_layers,
                         strategy=strategy)
    cfg = CFG.replace(min_layers=min_layers)
    ids = torch.randint(2, 97, (1, 4), generator=torch.Generator().manual_seed(seed))
    c1, c2 = new_cache(model, "static"), new_cache(model, "static")
    expected = 0
    for _ in range(3):
        out = fn(input_ids=ids, past_key_values=c1, use_cache=True)
        ref = R.forward(model, routers, ids, cfg, past_key_values=c2, exit_threshold=0.3)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        assert (ref.exit_layers < 0).logical_or(ref.exit_layers + 1 >= min_layers).all()
        expected += (ids.numel() * 4 if strategy == "frozen"
                     else skip_layers_executed(ref.exit_layers, 4))
        ids = ref.logits[:, -1:].argmax(-1)
    if min_layers == 4:  # no checkpoint left (the last layer never is one): the plain model
        expected = 0
    assert stats.layers_executed == expected


def test_inductor_config_and_mode_reach_compile_fx(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = []
    monkeypatch.setattr(cfx, "compile_fx",
                        lambda gm, inputs, config_patches=None: seen.append(config_patches) or gm.forward)
    opts = parse_options({"routers": RouterSet.forced(model_for("llama"), None, CFG),
                            "inductor_config": {"max_autotune": False},
                            "mode": "max-autotune-no-cudagraphs"})
    B._compiler(opts)(torch.fx.symbolic_trace(torch.nn.Identity()), [])
    B._compiler(opts, dynamic=True)(torch.fx.symbolic_trace(torch.nn.Identity()), [])
    assert seen[0]["max_autotune"] is False  # the user's patch wins over the mode's
    assert "shape_padding" not in seen[0] and seen[1]["shape_padding"] is False
