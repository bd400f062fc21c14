"""Option ``stack_kv``: the KV-fill graphs' projections as one batched matmul."""

import pytest
import torch
from hypothesis import given, strategies as st

from hypothesis import settings

from tide_compile import ExitStats, RouterSet
from tide_compile.options import parse_options
from tide_compile.passes import kv_stack
from tide_compile.passes._fx import target_name
from tide_compile.runtime.runner import SkipRunner
from tide_testing import (ARCHS5, CFG, compacted_prefill_equals_reference, decode_equals_reference,
                          dynamic_ids, inductor_forced_decode_equals_reference, model_for,
                          new_cache, random_routers, record_instances, run_both,
                          skip_layers_executed, splitting_threshold)


def compiled(model, routers, **options):
    torch._dynamo.reset()
    stats = ExitStats(num_layers=routers.num_layers)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "inductor": False, "stats": stats,
                                "stack_kv": True, **options})
    return fn, stats


@settings(max_examples=10)
@given(arch=st.sampled_from(ARCHS5), strategy=st.sampled_from(["skip", "auto"]),
       batch=st.integers(1, 2), prompt=st.integers(1, 5), threshold=st.floats(0.05, 0.95),
       seed=st.integers(0, 10_000))
def test_stacked_kv_fill_equals_reference(monkeypatch, arch, strategy, batch, prompt, threshold,
                                          seed):
    """Equal to the reference; the one-token steps stopped where the reference's exits
    let them, and every KV-fill ran stacked."""
    stacked = []
    real = kv_stack.run
    monkeypatch.setattr(kv_stack, "run", lambda *a: stacked.append(real(*a)) or stacked[-1])
    model = model_for(arch)
    routers = random_routers(model, seed)
    fn, stats = compiled(model, routers, exit_threshold=threshold, strategy=strategy)
    steps = run_both(model, routers, fn, "static", batch, prompt, 3, threshold, seed)
    assert stats.layers_executed == sum(
        skip_layers_executed(e, 4) if e.shape[1] == 1 or strategy == "skip" else e.numel() * 4
        for e in steps)
    assert stacked
    if arch != "gpt2":  # GPT-2's Conv1D projections are addmm, which the pass leaves
        assert max(stacked) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_forced_exit_with_stacked_kv_fill_writes_the_reference_cache(arch, monkeypatch):
    model = model_for(arch)
    routers = RouterSet.forced(model, exit_at=0, config=CFG)
    runners = record_instances(monkeypatch, SkipRunner)
    fn, stats = compiled(model, routers, strategy="skip")
    c_fast, c_ref = decode_equals_reference(fn, model, routers, CFG)
    for a, b in zip(c_fast.layers, c_ref.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
    assert stats.last_layers_executed == 1  # the decode step stopped after layer 0
    kv = runners[-1].kv_meta
    # One product per KV-fill graph: batched, or the one fused QKV projection of a
    # single skipped layer (Phi-3), which has nothing to stack with.
    for c, g in kv.items():
        names = [target_name(n) for n in g.gm.graph.nodes]
        assert names.count("stacked_linear") + names.count("linear") == 1
        assert names.count("stacked_linear") == 1 or g.layers[0] == g.layers[1]
    # Later checkpoints' stacks are views of the first's (no second copy).
    first = dict(kv[0].gm.named_buffers())
    assert first
    for c in (1, 2):
        for name, buf in kv[c].gm.named_buffers():
            base = first[name]
            assert buf.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            assert buf.shape[0] < base.shape[0]


def test_stacked_kv_option_is_validated():
    assert parse_options({"stack_kv": True}).stack_kv is True
    assert parse_options({}).stack_kv is None
    with pytest.raises(ValueError, match="unknown"):
        parse_options({"stack_kvs": True})
    with pytest.raises(TypeError, match="stack_kv"):
        parse_options({"stack_kv": "yes"})


@pytest.mark.parametrize("given, stacked", [(None, False), (True, True), (False, False)])
def test_stack_kv_default_is_off_on_cpu(monkeypatch, given, stacked):
    """None (the default) stacks only for a CUDA model compiled with Inductor."""
    calls = []
    real = kv_stack.run
    monkeypatch.setattr(kv_stack, "run", lambda *a: (calls.append(1), real(*a))[1])
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at=0, config=CFG)
    torch._dynamo.reset()
    options = {"routers": routers, "strategy": "skip", "inductor": False}
    if given is not None:
        options["stack_kv"] = given
    fn = torch.compile(model.forward, backend="tide", fullgraph=True, options=options)
    fn(input_ids=torch.tensor([[3, 4]]), past_key_values=new_cache(model, "static"),
       use_cache=True)
    assert bool(calls) == stacked


@pytest.mark.slow
def test_inductor_stacked_kv_fill_equals_reference():
    c1, c2, stats = inductor_forced_decode_equals_reference(strategy="skip", stack_kv=True)
    for a, b in zip(c1.layers, c2.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
    assert stats.mean_layers_executed == 1.0


def test_compact_prefill_with_stacked_kv_fill_equals_reference():
    model = model_for("qwen2")
    routers = random_routers(model, 11)
    ids = dynamic_ids(2, 16, 3)
    threshold = splitting_threshold(model, routers, ids, CFG)
    stats, _, _, _ = compacted_prefill_equals_reference(model, routers, ids, threshold,
                                                        stack_kv=True)
    assert stats.layers_executed < ids.numel() * 4  # it compacted
