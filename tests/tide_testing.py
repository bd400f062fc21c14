"""Helpers shared by the backend's test modules (tests import this, never each other).

Models are tiny random-weight ones (:mod:`tiny_models`); every comparison is against
:mod:`tide_compile.reference`, and helpers that compile return the stats so tests can
assert that skipping (or compaction) really happened.
"""

from __future__ import annotations

import math
from collections import Counter
import zlib

import pytest
import torch
from transformers import DynamicCache, StaticCache

from tide_compile import ExitStats, RouterSet, TIDEConfig, TokenRouter
from tide_compile import reference as R
from tide_compile.runtime.compact import bucket
from tiny_models import make_model

#: Checkpoints after every layer, small routers.
CFG = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
#: The architectures the backend's CPU suite compiles.
ARCHS5 = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3")
_MODELS: dict = {}


def model_for(arch: str, num_layers: int = 4):
    """A cached tiny random model per ``(arch, num_layers)``.

    Its seed follows from the key alone, so a test sees the same weights whatever ran
    before it in the process (the seed once counted the models already made, and two
    tests of ``test_deferred.py`` failed under another test order).
    """
    key = (arch, num_layers)
    if key not in _MODELS:
        seed = 7 + zlib.crc32(f"{arch}:{num_layers}".encode()) % 997
        _MODELS[key] = make_model(arch, num_layers=num_layers, seed=seed)
    return _MODELS[key]


def random_routers(model, seed: int, scale: float = 4.0, config: TIDEConfig = CFG) -> RouterSet:
    """Routers with realistic, unsaturated scores so thresholds split tokens."""
    g = torch.Generator().manual_seed(seed)
    info = RouterSet.describe(model)
    routers = {}
    for c in config.checkpoint_layers(info["num_layers"]):
        r = TokenRouter(info["hidden_size"], config.router_bottleneck_dim)
        with torch.no_grad():
            for prm in r.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * scale / prm.shape[-1] ** 0.5)
        routers[c] = r
    return RouterSet(routers, model_info=info, config=config)


def record_instances(monkeypatch, cls) -> list:
    """Every instance of ``cls`` built while the test runs, in order (``__init__`` patched
    through ``monkeypatch``, so undone after the test)."""
    made: list = []
    init = cls.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(cls, "__init__", keep)
    return made


# ---------------------------------------------------------------- decode steps
def new_cache(model, kind: str, length: int = 24):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=length)
    return DynamicCache(config=model.config)


def compiled(model, routers, **options):
    """``model.forward`` under the tide backend without Inductor, after a Dynamo reset;
    returns it and its stats."""
    torch._dynamo.reset()
    stats = ExitStats(num_layers=routers.num_layers)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "inductor": False, "stats": stats, **options})
    return fn, stats


def run_both(model, routers, fn, cache_kind, batch, prompt, steps, threshold, seed):
    """Prefill + decode steps through the compiled fn and the reference; compare each.
    Returns the reference's exit layers of each step (``[batch, prompt]``, then
    ``[batch, 1]`` per step)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (batch, prompt), generator=g)
    c_fast, c_ref = new_cache(model, cache_kind), new_cache(model, cache_kind)
    exits = []
    for step in range(steps + 1):
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=threshold)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"step {step}: {m}")
        exits.append(ref.exit_layers)
        ids = ref.logits[:, -1:].argmax(-1)
    return exits


def skip_layers_executed(step_exits: torch.Tensor, num_layers: int) -> int:
    """Token-layers the skip strategy runs for a step whose tokens exit at ``step_exits``
    (the reference's, -1 = none): it stops after the checkpoint where the last token
    exits when every token exits, else runs every layer."""
    n = step_exits.numel()
    if bool((step_exits >= 0).all()):
        return n * (int(step_exits.max()) + 1)
    return n * num_layers


def decode_equals_reference(fn, model, routers, cfg, steps=3):
    """Prefill ``[[3, 4, 5]]`` then ``steps - 1`` greedy steps through ``fn`` and the
    reference (default threshold) on static caches; the logits agree at every step.
    Returns both caches."""
    c_fast, c_ref = new_cache(model, "static"), new_cache(model, "static")
    ids = torch.tensor([[3, 4, 5]])
    for _ in range(steps):
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, ids, cfg, past_key_values=c_ref)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        ids = ref.logits[:, -1:].argmax(-1)
    return c_fast, c_ref


def inductor_forced_decode_equals_reference(**options):
    """A 3-layer Llama under Inductor, every token exiting after layer 0 (checkpoints
    every layer), through :func:`decode_equals_reference`. Returns both caches and the
    stats."""
    model = model_for("llama", num_layers=3)
    cfg = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
    routers = RouterSet.forced(model, exit_at=0, config=cfg)
    torch._dynamo.reset()
    stats = ExitStats(3)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "stats": stats, **options})
    return (*decode_equals_reference(fn, model, routers, cfg), stats)


def equals_plain_model(fn, model, ids, steps, cache_len=24):
    """Prefill ``ids`` then ``steps - 1`` greedy steps through ``fn`` and the plain model
    on static caches; the logits agree at every step."""
    c1, c2 = new_cache(model, "static", cache_len), new_cache(model, "static", cache_len)
    for _ in range(steps):
        out = fn(input_ids=ids, past_key_values=c1, use_cache=True)
        with torch.no_grad():
            ref = model(input_ids=ids, past_key_values=c2, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        ids = ref.logits[:, -1:].argmax(-1)


# ---------------------------------------------------------------- prefill (compaction)
def initialized_cache(model, batch, length=40):
    """A StaticCache whose tensors exist (one eager token), reset."""
    cache = StaticCache(config=model.config, max_cache_len=length)
    model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=model.device),
          past_key_values=cache, use_cache=True)
    cache.reset()
    return cache


def compile_prefill(model, routers, **options):
    """``model.forward`` under the tide backend without Inductor (no Dynamo reset)."""
    stats = ExitStats(num_layers=routers.num_layers)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "inductor": False, "stats": stats, **options})
    return fn, stats


def dynamic_ids(batch, prompt, seed):
    """Random token ids with the length marked dynamic."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (batch, prompt), generator=g)
    torch._dynamo.mark_dynamic(ids, 1)
    return ids


def assert_caches_equal(a, b):
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-4)
        if hasattr(la, "cumulative_length"):
            assert int(la.cumulative_length) == int(lb.cumulative_length)


def splitting_threshold(model, routers, ids, cfg):
    """A threshold at which some positions, but few enough to compact, keep a continuing
    token (in any row) after the first checkpoint."""
    first = min(c for c in routers.checkpoint_layers if c + 1 >= cfg.min_layers)
    for threshold in [i / 20 for i in range(1, 20)]:
        probe = R.forward(model, routers, ids, cfg,
                          past_key_values=initialized_cache(model, ids.shape[0]),
                          exit_threshold=threshold)
        m = int((probe.exit_layers != first).any(0).sum())
        if 0 < m and bucket(m) < ids.shape[1]:
            return threshold
    pytest.fail("no threshold splits the tokens at the first checkpoint")


def prefill_equals_reference(fn, model, routers, ids, threshold):
    """``fn`` on fresh initialized caches against the reference: logits and every layer's
    cache. Returns the reference output and both caches."""
    batch = ids.shape[0]
    c_fast, c_ref = initialized_cache(model, batch), initialized_cache(model, batch)
    out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=threshold)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert_caches_equal(c_fast, c_ref)
    return ref, c_fast, c_ref


def compacted_prefill_equals_reference(model, routers, ids, threshold, **options):
    """A compacting prefill (compaction_threshold 1) against the reference: logits and
    every layer's cache. Returns the stats and both caches."""
    torch._dynamo.reset()
    fn, stats = compile_prefill(model, routers, exit_threshold=threshold, strategy="compact",
                                compaction_threshold=1.0, **options)
    return (stats, *prefill_equals_reference(fn, model, routers, ids, threshold))


# ------------------------------------------------------------ sampling statistics
def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 3.09: tail probability 1e-3."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts: Counter, probs: dict, n: int, min_expected: float = 5.0
                   ) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= min_expected, the rest pooled."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        e = n * p
        if e >= min_expected:
            stat += (counts.get(cell, 0) - e) ** 2 / e
            df += 1
        else:
            pooled_obs += counts.get(cell, 0)
            pooled_exp += e
    assert not set(counts) - set(probs), "sampled a token with probability 0"
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        df += 1
    return stat, df
