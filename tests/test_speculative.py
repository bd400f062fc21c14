"""Speculative mode: early-exit drafts verified at full depth reproduce the plain model.

Greedy: token-identical to ``model.generate(do_sample=False)`` on random models, prompts and
routers (with real exits, so drafts are both accepted and rejected). Sampling: the
acceptance rule alone, and generate end to end, against exact distributions (chi-square
with a fixed seed). All on the CPU without Inductor.
"""

import math
from collections import Counter

import pytest
import torch
import transformers as T
from hypothesis import example, given, settings, strategies as st
from transformers import StaticCache

import tide_compile
from tide_compile import RouterSet, TIDEConfig
from tide_compile import reference as R
from tide_compile import sampling
from tide_compile.runtime.speculative import (SpeculativeModel, SpeculativeStats,
                                              speculative_accept)
from tide_compile.sampling import processed_probs
from tide_testing import random_routers
from tiny_models import make_model

CFG = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)


def speculative(model, routers, **kwargs):
    """A fresh speculative model. Dynamo is reset first: every speculative model adds two
    cache entries on ``model.forward``'s code, and past the recompile limit the draft
    would silently run as the plain model."""
    torch._dynamo.reset()
    return tide_compile.optimize(model, routers, mode="speculative", inductor=False, **kwargs)


def load_routers(target: RouterSet, source: RouterSet) -> None:
    """New router weights in place: the compiled draft reads the same tensors, so no
    recompilation per hypothesis example."""
    with torch.no_grad():
        for a, b in zip(target.parameters(), source.parameters()):
            a.copy_(b)


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
    unknown = sum(c for cell, c in counts.items() if cell not in probs)
    assert unknown == 0, "sampled a token with probability 0"
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        df += 1
    return stat, df


# ------------------------------------------------------------------ greedy == plain model
@pytest.mark.parametrize("arch,max_draft", [("llama", 3), ("gpt2", 2), ("qwen3", 4)])
def test_greedy_equals_model_generate(arch, max_draft):
    model = make_model(arch, num_layers=4, seed=11)
    routers = random_routers(model, 0)
    fast = speculative(model, routers, max_draft=max_draft, exit_threshold=0.5)
    assert isinstance(fast, SpeculativeModel)

    @settings(max_examples=14, database=None, derandomize=True)  # one fixed set per arch
    @given(prompt=st.integers(1, 8), new=st.integers(1, 14), seed=st.integers(0, 10_000),
           depth=st.integers(1, 4))
    @example(prompt=8, new=14, seed=10, depth=4)  # GPT-2 rejects drafts here
    def prop(prompt, new, seed, depth):
        load_routers(routers, random_routers(model, seed))
        fast.max_draft_depth = depth
        ids = torch.randint(2, 97, (1, prompt), generator=torch.Generator().manual_seed(seed))
        expected = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
        got = fast.generate(ids, max_new_tokens=new, pad_token_id=0)
        assert torch.equal(got, expected), (got, expected)

    prop()
    s = fast.spec_stats
    # Not vacuous: drafts were made at exit depths, and some were rejected, some accepted.
    assert s.accepted > 0 and s.rejected > 0, s.summary()
    assert any(d < 4 for d in s.draft_depths), s.summary()
    assert fast.draft_stats.exited_tokens > 0


def test_cache_holds_exact_kv_after_generate():
    """Rejected drafts' propagated K/V were overwritten by the verifier: the cache equals
    the plain model's, and every layer's write counter is where the next token goes."""
    model = make_model("llama", num_layers=4, seed=11)
    fast = speculative(model, random_routers(model, 3), max_draft=3, exit_threshold=0.5)
    ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    seq = fast.generate(ids, max_new_tokens=14, eos_token_id=[])
    assert seq.shape[1] == 5 + 14
    assert fast.spec_stats.rejected > 0
    n = seq.shape[1] - 1  # the last token is not in the cache yet
    plain = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=seq[:, :n], past_key_values=plain, use_cache=True)
    for ours, ref in zip(fast._cache.layers, plain.layers):
        assert int(ours.cumulative_length) == n
        torch.testing.assert_close(ours.keys[:, :, :n], ref.keys[:, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values[:, :, :n], ref.values[:, :, :n],
                                   rtol=1e-5, atol=1e-5)


def test_eos_stops_like_generate():
    model = make_model("llama", num_layers=4, seed=11)
    fast = speculative(model, random_routers(model, 4), max_draft=4, exit_threshold=0.4)
    ids = torch.randint(2, 97, (1, 4), generator=torch.Generator().manual_seed(2))
    free = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    eos = int(free[0, 4 + 5])  # the sixth generated token
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=eos)
    got = fast.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert int(got[0, -1]) == eos


def test_forced_exits_and_max_draft_depth():
    """Every draft exits at layer 1 (depth 2): still exact. A draft step deeper than
    max_draft_depth ends the round after one draft; otherwise rounds draft up to max_draft."""
    model = make_model("gpt2", num_layers=4, seed=11)
    fast = speculative(model, RouterSet.forced(model, exit_at=1, config=CFG), max_draft=3)
    ids = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=13, do_sample=False, pad_token_id=0)
    for depth, per_round in [(2, 3.0), (1, 1.0)]:
        fast.spec_stats.reset()
        fast.max_draft_depth = depth
        assert torch.equal(fast.generate(ids, max_new_tokens=13), expected)
        assert set(fast.spec_stats.draft_depths) == {2}
        s = fast.spec_stats
        full_rounds = s.verify_calls - 1  # the last round may be cut by max_new_tokens
        assert s.drafted >= per_round * full_rounds, s.summary()
        assert s.mean_draft_length <= per_round


def test_capped_drafts_stop_at_the_cap():
    """max_draft_depth=1 on checkpoints 0, 1, 2: draft steps never run past layer 1 (the
    cap, a forced exit), exits at layer 0 continue the draft, and the output is exact."""
    model = make_model("qwen3", num_layers=4, seed=11)
    fast = speculative(model, random_routers(model, 6), max_draft=4, max_draft_depth=1,
                       exit_threshold=0.5)
    assert fast.draft_cap == 1 and fast.draft_routers is not fast.routers
    for seed in range(3):
        ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(seed))
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(ids, max_new_tokens=12), expected)
    s = fast.spec_stats
    assert set(s.draft_depths) <= {1, 2} and s.draft_depths.get(2, 0) > 0, s.summary()
    assert fast.draft_stats.mean_layers_executed <= 2.0
    assert fast.draft_stats.ran_all_layers == 0


# ------------------------------------------------------------------ sampling
def test_processed_probs_is_sample_next():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    for kw in [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8},
               {"temperature": 1.3, "top_k": 9, "top_p": 0.9}]:
        for seed in range(5):
            tok = sampling.sample_next(logits, do_sample=True,
                                       generator=torch.Generator().manual_seed(seed), **kw)
            probs = processed_probs(logits, **kw)
            ours = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(tok, ours.squeeze(-1)), kw
    with pytest.raises(ValueError, match="temperature"):
        processed_probs(logits, temperature=0.0)


def test_accept_rule_preserves_distribution():
    """Draft two tokens from q, accept/reject against p: the first emitted token is
    distributed as p_0, the second (after an accepted first draft) as p_1."""
    g = torch.Generator().manual_seed(0)
    vocab = 5
    p = torch.softmax(2 * torch.randn(3, vocab, generator=g), -1)
    q = torch.softmax(2 * torch.randn(2, vocab, generator=g), -1)
    q[0, 3] = 0.0  # a token the draft never proposes: reachable only through the residual
    q[0] /= q[0].sum()
    first, second = Counter(), Counter()
    trials = 12_000
    ks = Counter()
    for _ in range(trials):
        d = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(2)])
        k, tok = speculative_accept(d, q, p, g)
        emitted = d[:int(k)].tolist() + [int(tok)]
        ks[int(k)] += 1
        first[emitted[0]] += 1
        if int(k) >= 1:
            second[emitted[1]] += 1
    assert ks[0] > 0 and ks[2] > 0
    n2 = sum(second.values())
    for counts, probs, n in [(first, p[0], trials), (second, p[1], n2)]:
        stat, df = chi2_statistic(counts, dict(enumerate(probs.tolist())), n)
        assert stat < chi2_critical(df), (stat, df)
    # The residual reached the token the draft never proposes.
    assert first[3] > 0


def _small_vocab_model():
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=6,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
                        pad_token_id=None)
    torch.manual_seed(5)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init: distinct p and q
        model.lm_head.weight.mul_(16.0)
    return model


def test_sampling_matches_plain_sampling_distribution():
    """The first three sampled tokens over many seeds against the exact joint distribution
    of the plain model: token 1 comes from the prefill, token 2 from a draft round (drafted
    from the exit distribution q, accepted or resampled against p), token 3 from the bonus
    or the next round. The same samples are far from what q alone would give."""
    model = _small_vocab_model()
    routers = random_routers(model, 1)
    threshold = 0.3
    fast = speculative(model, routers, max_draft=2, exit_threshold=threshold)
    kw = {"temperature": 1.2, "top_k": 5}
    prompt = [0, 3, 1]

    def dist(prefix):
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1]
        return processed_probs(logits, **kw).tolist()

    def draft_dist(a):
        """q(. | prompt, a): the draft step's own exit distribution (reference semantics)."""
        cache = StaticCache(config=model.config, max_cache_len=8)
        with torch.no_grad():
            model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        out = R.forward(model, routers, torch.tensor([[a]]), past_key_values=cache,
                        exit_threshold=threshold)
        return processed_probs(out.logits[0, -1], **kw).tolist()

    p1 = dist(prompt)
    joint: dict = {}
    pair: dict = {}
    pair_draft: dict = {}
    for a in range(6):
        if p1[a] == 0:
            continue
        p2, q2 = dist(prompt + [a]), draft_dist(a)
        for b in range(6):
            pair[(a, b)] = p1[a] * p2[b]
            pair_draft[(a, b)] = p1[a] * q2[b]
            p3 = dist(prompt + [a, b]) if p2[b] > 0 else [0.0] * 6
            for c in range(6):
                joint[(a, b, c)] = p1[a] * p2[b] * p3[c]
    joint = {k: v for k, v in joint.items() if v > 0}
    g = torch.Generator().manual_seed(0)
    counts: Counter = Counter()
    runs = 300
    for _ in range(runs):
        seq = fast.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=True,
                            generator=g, **kw)
        counts[tuple(seq[0, 3:].tolist())] += 1
    s = fast.spec_stats
    assert s.accepted > 0 and s.rejected > 0, s.summary()
    stat, df = chi2_statistic(counts, joint, runs)
    assert stat < chi2_critical(df), ("joint", stat, df)
    pairs: Counter = Counter()
    for (a, b, _), n in counts.items():
        pairs[(a, b)] += n
    stat, df = chi2_statistic(pairs, {k: v for k, v in pair.items() if v > 0}, runs)
    assert stat < chi2_critical(df), ("tokens 1-2", stat, df)
    # Power: drafts alone (token 2 from q) would fail the same test by far.
    draft_pairs = {k: v for k, v in pair_draft.items() if v > 0}
    observed = Counter({k: n for k, n in pairs.items() if k in draft_pairs})
    stat, df = chi2_statistic(observed, draft_pairs, sum(observed.values()))
    assert stat > 3 * chi2_critical(df), ("draft distribution not rejected", stat, df)


def test_sampling_is_seeded():
    model = make_model("qwen3", num_layers=4, seed=11)
    fast = speculative(model, random_routers(model, 2), max_draft=3, exit_threshold=0.5)
    ids = torch.randint(2, 97, (1, 4), generator=torch.Generator().manual_seed(0))
    a, b = (fast.generate(ids, 10, do_sample=True, top_p=0.9,
                          generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)


# ------------------------------------------------------------------ stats and errors
def test_stats_summary():
    s = SpeculativeStats(num_layers=8)
    s.record_round([2, 2, 8], accepted=2, emitted=3)
    s.record_round([4], accepted=0, emitted=1)
    assert s.acceptance_rate == 0.5
    assert s.tokens_per_verify == 2.0
    assert s.mean_draft_depth == 4.0
    assert s.mean_draft_length == 2.0
    assert "Drafted: 4, accepted: 2 (50.0%)" in s.summary()
    s.reset()
    assert s.verify_calls == 0 and s.acceptance_rate == 0.0


def test_errors():
    model = make_model("llama", num_layers=4, seed=11)
    routers = random_routers(model, 0)
    fast = speculative(model, routers, max_draft=2)
    with pytest.raises(ValueError, match="batch 1"):
        fast.generate(torch.ones(2, 3, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="num_beams"):
        fast.generate(torch.ones(1, 3, dtype=torch.long), 4, num_beams=2)
    with pytest.raises(ValueError, match="max_draft"):
        speculative(model, routers, max_draft=0)
    with pytest.raises(ValueError, match="max_draft_depth"):
        speculative(model, routers, max_draft_depth=9)
    with pytest.raises(ValueError, match="min_layers"):
        speculative(model, routers, min_layers=4)
    with pytest.raises(ValueError, match="another model"):
        speculative(make_model("qwen2", num_layers=4), routers)
    mistral = T.MistralForCausalLM(T.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, sliding_window=4)).eval()
    with pytest.raises(NotImplementedError, match="sliding"):
        speculative(mistral, random_routers(mistral, 0)).generate(
            torch.ones(1, 3, dtype=torch.long), 4)


def test_optimize_default_mode_is_unchanged():
    model = make_model("llama", num_layers=4, seed=11)
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, RouterSet.forced(model, exit_at=1, config=CFG),
                                 inductor=False)
    assert isinstance(fast, tide_compile.TIDEModel)
