"""Properties of the executable spec, tide_compile.reference (tiny random models, fp32)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import DynamicCache, StaticCache

from tide_compile import RouterSet, TIDEConfig
from tide_compile import reference as R
from tide_compile import sampling
from tide_compile.model_probe import probe
from tiny_models import ARCHS, make_model
from tide_testing import random_routers

CFG = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_MODELS: dict = {}


def model_for(arch, num_layers=4):
    key = (arch, num_layers)
    if key not in _MODELS:
        _MODELS[key] = make_model(arch, num_layers=num_layers, seed=len(_MODELS))
    return _MODELS[key]


# ----------------------------------------------------------------- never exit
@SETTINGS
@given(arch=st.sampled_from(ARCHS), batch=st.integers(1, 3), seq=st.integers(1, 9),
       pad=st.integers(0, 3), seed=st.integers(0, 1000))
def test_never_exit_equals_model_forward(arch, batch, seq, pad, seed):
    model = model_for(arch)
    torch.manual_seed(seed)
    ids = torch.randint(2, 97, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, : min(pad, seq - 1)] = 0
    rs = RouterSet.forced(model, exit_at=None, config=CFG)
    out = R.forward(model, rs, ids, CFG, attention_mask=mask)
    torch.testing.assert_close(out.logits, model(ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert out.stats.exit_rate == 0.0
    assert out.stats.total_tokens == int(mask.sum())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_never_exit_generate_equals_model_generate(arch, cache):
    model = model_for(arch)
    torch.manual_seed(1)
    ids = torch.randint(2, 97, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
                              pad_token_id=0)
    rs = RouterSet.forced(model, exit_at=None, config=CFG)
    got = R.generate(model, rs, ids, 7, attention_mask=mask, pad_token_id=0, cache=cache)
    assert torch.equal(got.sequences, expected)


def test_eos_stops_rows_and_pads():
    model = model_for("llama")
    ids = torch.randint(2, 97, (2, 5))
    rs = RouterSet.forced(model, exit_at=None, config=CFG)
    free = R.generate(model, rs, ids, 6, pad_token_id=0).sequences
    eos = int(free[0, 6])  # row 0's second generated token
    got = R.generate(model, rs, ids, 6, pad_token_id=0, eos_token_id=eos).sequences
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=eos, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, expected)
    assert (got[0, 7:] == 0).all()


# ----------------------------------------------------------------- forced exits, brute force
def _kv_from_state_llama(model, layer_idx, h, positions):
    """Independent K/V of a Llama-family layer from state h: norm, k/v proj, k-norm, rotary."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    cos, sin = model.model.rotary_emb(x, positions)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k, v


def _kv_from_state_gpt2(model, layer_idx, h, positions):
    block = model.transformer.h[layer_idx]
    x = block.ln_1(h)
    _, k, v = block.attn.c_attn(x).split(model.config.n_embd, dim=2)
    heads = model.config.n_head
    shape = (*x.shape[:-1], heads, -1)
    return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


BRUTE = {"llama": _kv_from_state_llama, "qwen3": _kv_from_state_llama,
         "mistral": _kv_from_state_llama, "gpt2": _kv_from_state_gpt2}


@SETTINGS
@given(arch=st.sampled_from(sorted(BRUTE)), exit_at=st.sampled_from([0, 1, 2]),
       seq=st.integers(1, 8), cache=st.sampled_from(["dynamic", "static"]),
       seed=st.integers(0, 1000))
def test_forced_exit_matches_brute_force(arch, exit_at, seq, cache, seed):
    model = model_for(arch)
    p = probe(model)
    torch.manual_seed(seed)
    ids = torch.randint(2, 97, (2, seq))
    rs = RouterSet.forced(model, exit_at=exit_at, config=CFG)
    past = (DynamicCache(config=model.config) if cache == "dynamic"
            else StaticCache(config=model.config, max_cache_len=16))
    out = R.forward(model, rs, ids, CFG, past_key_values=past)
    # Brute force: h_c from the layers up to c, read out through final norm + lm_head.
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = p.layers[exit_at].register_forward_hook(grab)
    with torch.no_grad():
        model(ids)
    handle.remove()
    h = captured["h"]
    with torch.no_grad():
        expected_logits = p.head(h)
        torch.testing.assert_close(out.logits, expected_logits, rtol=1e-5, atol=1e-5)
        positions = torch.arange(seq)[None].expand(2, -1)
        for layer in range(exit_at + 1, p.num_layers):
            k, v = BRUTE[arch](model, layer, h, positions)
            torch.testing.assert_close(past.layers[layer].keys[:, :, :seq], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(past.layers[layer].values[:, :, :seq], v, rtol=1e-5, atol=1e-5)
    assert out.stats.exits_per_layer == {exit_at: 2 * seq}
    assert out.stats.mean_depth == exit_at + 1


# ----------------------------------------------------------------- consistency properties
@SETTINGS
@given(arch=st.sampled_from(ARCHS), seq=st.integers(2, 8), threshold=st.floats(0.2, 0.8),
       seed=st.integers(0, 1000), cache=st.sampled_from(["dynamic", "static"]))
def test_step_by_step_decode_equals_prefill(arch, seq, threshold, seed, cache):
    model = model_for(arch)
    rs = random_routers(model, seed)
    torch.manual_seed(seed)
    ids = torch.randint(2, 97, (2, seq))

    def new_cache():
        return (DynamicCache(config=model.config) if cache == "dynamic"
                else StaticCache(config=model.config, max_cache_len=16))

    whole = R.forward(model, rs, ids, CFG, past_key_values=new_cache(), exit_threshold=threshold)
    past = new_cache()
    pieces, exits = [], []
    for t in range(seq):
        step = R.forward(model, rs, ids[:, t: t + 1], CFG, past_key_values=past,
                         exit_threshold=threshold)
        pieces.append(step.logits)
        exits.append(step.exit_layers)
    torch.testing.assert_close(torch.cat(pieces, 1), whole.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.cat(exits, 1), whole.exit_layers)


@SETTINGS
@given(arch=st.sampled_from(ARCHS), seq=st.integers(1, 7), threshold=st.floats(0.2, 0.8),
       seed=st.integers(0, 1000))
def test_rows_are_independent(arch, seq, threshold, seed):
    model = model_for(arch)
    rs = random_routers(model, seed)
    torch.manual_seed(seed)
    ids = torch.randint(2, 97, (3, seq))
    batch = R.forward(model, rs, ids, CFG, past_key_values=DynamicCache(config=model.config),
                      exit_threshold=threshold)
    for row in range(3):
        alone = R.forward(model, rs, ids[row: row + 1], CFG,
                          past_key_values=DynamicCache(config=model.config),
                          exit_threshold=threshold)
        torch.testing.assert_close(batch.logits[row: row + 1], alone.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(batch.exit_layers[row: row + 1], alone.exit_layers)


def test_random_routers_exit_some_tokens_at_several_layers():
    """The routers the properties use really split tokens (the tests above are not vacuous)."""
    model = model_for("llama")
    rs = random_routers(model, 3)
    ids = torch.randint(2, 97, (4, 16))
    out = R.forward(model, rs, ids, CFG, exit_threshold=0.5)
    assert 0.0 < out.stats.exit_rate < 1.0
    assert len(out.stats.exits_per_layer) >= 2


def test_sampling_is_seeded_and_respects_top_k():
    model = model_for("llama")
    rs = random_routers(model, 0)
    ids = torch.randint(2, 97, (2, 4))
    a = R.generate(model, rs, ids, 5, do_sample=True, top_k=3, temperature=0.7,
                   generator=torch.Generator().manual_seed(0), pad_token_id=0, eos_token_id=[])
    b = R.generate(model, rs, ids, 5, do_sample=True, top_k=3, temperature=0.7,
                   generator=torch.Generator().manual_seed(0), pad_token_id=0, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)
    logits = torch.randn(4, 50)
    for _ in range(20):
        tok = sampling.sample_next(logits, do_sample=True, top_k=3)
        top3 = logits.topk(3).indices
        assert all(t in row for t, row in zip(tok.tolist(), top3.tolist()))
        tok = sampling.sample_next(logits, do_sample=True, top_p=1e-6)
        assert torch.equal(tok, logits.argmax(-1))


def test_errors():
    model = model_for("llama")
    rs = RouterSet.forced(model, exit_at=None, config=CFG)
    with pytest.raises(ValueError, match="exit_threshold"):
        R.forward(model, rs, torch.ones(1, 2, dtype=torch.long), exit_threshold=1.5)
    with pytest.raises(ValueError, match="another model"):
        R.forward(model_for("qwen2"), rs, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cache"):
        R.generate(model, rs, torch.ones(1, 2, dtype=torch.long), 2, cache="paged")


# ----------------------------------------------------------------- deferred K/V
def independent_exits(model, routers, ids, threshold):
    """Each token's own exit head over the full model's states (all K/V exact), computed
    directly from ``output_hidden_states``: the definition deferred K/V must meet."""
    p = probe(model)
    out = model(ids, output_hidden_states=True)
    logits = out.logits.clone()
    done = torch.zeros(ids.shape, dtype=torch.bool)
    exit_layer = torch.full(ids.shape, -1)
    for c in routers.checkpoint_layers:
        h = out.hidden_states[c + 1]  # the residual stream after layer c
        new = ~done & (routers.score(c, h) > threshold)
        if bool(new.any()):
            head = p.final_norm(routers.exit_state(c, h))
            if p.project_out is not None:
                head = p.project_out(head)
            logits = torch.where(new[..., None], p.lm_head(head), logits)
            exit_layer[new] = c
        done |= new
    return logits, exit_layer


@SETTINGS
@given(arch=st.sampled_from(ARCHS), batch=st.integers(1, 3), seq=st.integers(2, 9),
       threshold=st.floats(0.2, 0.8), seed=st.integers(0, 1000))
def test_deferred_teacher_forced_equals_independent_exits(arch, batch, seq, threshold, seed):
    model = model_for(arch)
    torch.manual_seed(seed)
    ids = torch.randint(2, 97, (batch, seq))
    rs = random_routers(model, seed)
    out = R.forward(model, rs, ids, CFG, exit_threshold=threshold, kv="deferred")
    want_logits, want_exits = independent_exits(model, rs, ids, threshold)
    assert torch.equal(out.exit_layers, want_exits)
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(arch=st.sampled_from(ARCHS), seq=st.integers(3, 8), threshold=st.floats(0.2, 0.8),
       seed=st.integers(0, 1000))
def test_deferred_step_by_step_equals_teacher_forced_and_cache_is_exact(arch, seq, threshold, seed):
    """Token by token through a cache, deferred gives the teacher-forced logits (rows exit
    independently), and the cache ends equal to a plain forward's over the same tokens."""
    model = model_for(arch)
    torch.manual_seed(seed)
    ids = torch.randint(2, 97, (2, seq))
    rs = random_routers(model, seed)
    whole = R.forward(model, rs, ids, CFG, exit_threshold=threshold, kv="deferred")
    past = DynamicCache(config=model.config)
    logits = []
    for t in range(seq):
        step = R.forward(model, rs, ids[:, t:t + 1], CFG, past_key_values=past,
                         exit_threshold=threshold, kv="deferred")
        past = step.past_key_values
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=1e-4, atol=1e-4)
    plain = model(ids, use_cache=True).past_key_values
    for layer in range(len(plain.layers)):
        torch.testing.assert_close(past.layers[layer].keys, plain.layers[layer].keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(past.layers[layer].values, plain.layers[layer].values, rtol=1e-4, atol=1e-4)


def test_propagate_and_deferred_differ_once_tokens_exit():
    """The mode matters: a token that goes deep after one that exited attends to propagated
    K/V in one mode and to exact ones in the other; without exits both are the plain model."""
    model = model_for("llama")
    torch.manual_seed(0)
    ids = torch.randint(2, 97, (1, 12))
    rs = random_routers(model, 3)
    prop = R.forward(model, rs, ids, CFG, exit_threshold=0.5, kv="propagate")
    defer = R.forward(model, rs, ids, CFG, exit_threshold=0.5, kv="deferred")
    exits = defer.exit_layers[0]
    first = int((exits >= 0).nonzero()[0])  # the same first exit in both modes: nothing before it exited
    assert int(prop.exit_layers[0, first]) == int(exits[first])
    deep_after = (exits == -1) & (prop.exit_layers[0] == -1) & (torch.arange(12) > first)
    assert bool(deep_after.any()), "the example needs a deep token after an exit"
    assert not torch.allclose(prop.logits[0, deep_after], defer.logits[0, deep_after], atol=1e-4)
    torch.testing.assert_close(prop.logits[0, : first + 1], defer.logits[0, : first + 1])
    never = RouterSet.forced(model, exit_at=None, config=CFG)
    torch.testing.assert_close(R.forward(model, never, ids, CFG, kv="deferred").logits,
                               model(ids).logits, rtol=0, atol=0)


def test_kv_mode_is_checked():
    model = model_for("llama")
    rs = RouterSet.forced(model, exit_at=None, config=CFG)
    with pytest.raises(ValueError, match="kv must be one of"):
        R.forward(model, rs, torch.ones(1, 2, dtype=torch.long), CFG, kv="exact")
