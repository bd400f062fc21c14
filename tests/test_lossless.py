"""mode="lossless": drafts from exits on deferred K/V, verified by the deep steps.

Greedy output equals the plain model's (HF ``generate`` with the model's own EOS, or a
full-recompute greedy loop when EOS is off) across the seven architectures with random
routers and forced ones; sampling follows the speculative-sampling rule (chi-square
against the exact distribution, fixed seeds: deterministic, cannot flake); the adaptive
fallback engages when drafts never pay and the output stays the same. CPU, fp32, FX
graphs (``inductor=False``).
"""

import copy
import math
from collections import Counter

import pytest
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st

import tide_compile
from tide_compile import ExitStats, RouterSet
from tide_compile import reference as R
from tide_compile.runtime.lossless import DraftController, LosslessStats
from tide_compile.runtime.runner import SkipRunner
from tide_compile.sampling import processed_probs
from tiny_models import make_model
from tide_testing import (ARCHS5, CFG, chi2_critical, chi2_statistic, model_for,
                          random_routers)

LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the models are tiny, and on a shared machine a second intra-op
    thread only waits for a core (a tiny matmul was 10x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lossless(model, routers, **kwargs):
    """A fresh lossless model (Dynamo reset first: every model adds cache entries on
    ``model.forward``'s code)."""
    torch._dynamo.reset()
    return tide_compile.optimize(model, routers, mode="lossless", inductor=False, **kwargs)


def prompt_ids(prompt: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 97, (1, prompt), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def plain_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The plain model's greedy tokens, no EOS, every step a full forward of the sequence."""
    seq = ids
    for _ in range(new):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=-1)
    return seq


def zero_layers_after(model, layer: int):
    """A copy of a Llama whose layers after ``layer`` add nothing to the residual stream
    (output projections zeroed): an exit there reads out exactly the full model's logits."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.model.layers[layer + 1:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture
def runner_calls(monkeypatch):
    """Per deferred-runner call: ``(live slots, force_deep, reached_end)``."""
    calls: list = []
    original = SkipRunner.__call__

    def spy(self, *args):
        live = self.live.clone() if self.live is not None else None
        force = self.force_deep
        out = original(self, *args)
        if self.strategy == "deferred":
            calls.append((live, force, self.reached_end))
        return out

    monkeypatch.setattr(SkipRunner, "__call__", spy)
    return calls


# ------------------------------------------------------------------ greedy == plain model
@pytest.mark.parametrize("arch", ARCHS5)
def test_greedy_equals_plain_generate(arch):
    """Random routers at thresholds that exit often (moved per example with
    ``fast.set_threshold``: one compile per architecture), random prompts (1 .. 8 tokens:
    the one- and two-token prompt paths too) and lengths, the model's own EOS: the tokens
    are HF ``generate``'s. Drafts were both accepted and rejected."""
    # Its own weights (model_for's depend on which tests built models before): the rejected
    # drafts this test needs must not depend on the order tests run in.
    model = make_model(arch, num_layers=LAYERS, seed=11)
    index = ARCHS5.index(arch)
    fast = lossless(model, random_routers(model, 100 + index), exit_threshold=0.3,
                    max_pending=1 + index % 4, adaptive=False)

    @settings(max_examples=3, database=None, derandomize=True, deadline=None)
    @given(prompt=st.integers(1, 8), new=st.integers(1, 14), seed=st.integers(0, 10_000),
           threshold=st.floats(0.15, 0.45))
    def prop(prompt, new, seed, threshold):
        fast.set_threshold(threshold)
        ids = prompt_ids(prompt, seed)
        expected = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
        got = fast.generate(ids, max_new_tokens=new, pad_token_id=0)
        assert torch.equal(got, expected), (got, expected)

    for prompt in (6, 2, 1):  # the three prompt paths, 12 tokens each
        ids = prompt_ids(prompt, index)
        assert torch.equal(fast.generate(ids, max_new_tokens=12, pad_token_id=0),
                           model.generate(ids, max_new_tokens=12, do_sample=False,
                                          pad_token_id=0))
    prop()
    s = fast.lossless_stats
    assert s.drafted > 0 and s.accepted > 0 and s.rejected > 0, s.summary()
    assert s.plain_steps <= 1 + 3  # two-token prompts only: adaptive is off
    assert isinstance(fast.tide_stats, ExitStats)
    assert fast.tide_stats.regret_checked == s.drafted


def test_forced_exits_draft_every_token_and_all_are_accepted(runner_calls):
    """Every token exits after layer 1 of 4 on a Llama whose layers 2-3 add nothing: each
    draft is the full model's token, so every one is accepted. A round is max_pending
    stopped steps (2 layers, only the current slot live) and one forced deep step (no
    slot live) that accepts them all and adds the verifier's token: W = max_pending + 1
    tokens per deep step. The last round is cut to the tokens left."""
    pending, new, prompt = 3, 14, 6
    model = zero_layers_after(model_for("llama", LAYERS), 1)
    fast = lossless(model, RouterSet.forced(model, exit_at=1, config=CFG), max_pending=pending,
                    adaptive=False)
    ids = prompt_ids(prompt, 0)
    runner_calls.clear()
    got = fast.generate(ids, max_new_tokens=new, eos_token_id=-1)
    assert torch.equal(got, plain_greedy(model, ids, new))
    s = fast.lossless_stats
    width = pending + 1
    rounds = math.ceil(new / width)
    assert (s.deep_steps, s.drafted, s.accepted, s.tokens) == (rounds, new - rounds,
                                                               new - rounds, new), s.summary()
    assert s.draft_depths == {2: new - rounds}
    calls = runner_calls[1:]  # the first call finds the runner (its live input)
    assert len(calls) == new
    for live, force, reached_end in calls:
        if force:
            assert reached_end and not bool(live.any())
        else:
            assert not reached_end and int(live.sum()) == 1
    assert sum(force for _, force, _ in calls) == rounds
    stats = fast.tide_stats
    assert stats.steps_by_strategy["deferred"] == new
    # decode steps: 2 layers per stopped step, 4 per deep step (plus the prompt's 5 tokens)
    assert stats.layers_executed == (prompt - 1) * LAYERS + 2 * (new - rounds) + LAYERS * rounds


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_forced_exits_without_zeroed_layers(arch):
    """Forced exits after layer 1 on unmodified models: drafts are often wrong, the output
    is still the plain model's, and the steps drafted (fewer deep steps than tokens)."""
    model = model_for(arch, LAYERS)
    fast = lossless(model, RouterSet.forced(model, exit_at=1, config=CFG), max_pending=4,
                    adaptive=False)
    for seed in range(2):
        ids = prompt_ids(5, seed)
        assert torch.equal(fast.generate(ids, max_new_tokens=16, eos_token_id=-1),
                           plain_greedy(model, ids, 16))
    s = fast.lossless_stats
    assert s.drafted > 0 and s.deep_steps < s.tokens, s.summary()
    assert s.tokens == 32 and s.accepted + s.deep_steps == s.tokens
    assert fast.tide_stats.regret_checked == s.drafted


def test_drafted_eos_is_verified():
    """An EOS the exit heads draft is verified before generate returns; with it accepted
    the output stops there, as the plain model's does."""
    model = zero_layers_after(model_for("llama", LAYERS), 1)
    fast = lossless(model, RouterSet.forced(model, exit_at=1, config=CFG), max_pending=7,
                    adaptive=False)
    ids = prompt_ids(4, 2)
    free = plain_greedy(model, ids, 12)
    eos = int(free[0, 4 + 5])  # the sixth new token: a draft (every token drafts)
    first = next(i for i in range(12) if int(free[0, 4 + i]) == eos)
    got = fast.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, free[:, :4 + first + 1])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    assert torch.equal(got, expected)
    s = fast.lossless_stats
    assert s.drafted > 0 and s.deep_steps == 1, s.summary()  # one round: EOS forced it


# ------------------------------------------------------------------ sampling
def small_vocab_model():
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
    """The first two sampled tokens over 400 seeded runs against the exact joint
    distribution of plain sampling (temperature, top-k): both may be drafts (the prompt's
    last token is the first current token; two may be pending), accepted or resampled by
    the deep step. The same counts are far from what the drafts' own distribution would
    give (power)."""
    model = small_vocab_model()
    routers = random_routers(model, 1)
    threshold = 0.3
    fast = lossless(model, routers, max_pending=2, exit_threshold=threshold, adaptive=False)
    kw = {"temperature": 1.2, "top_k": 5}
    prompt = [0, 3, 1]

    def dist(prefix):
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1]
        return processed_probs(logits, **kw).tolist()

    def exit_dist(prefix):
        """The exit head's distribution for the last token (deferred K/V: exact)."""
        out = R.forward(model, routers, torch.tensor([prefix]), exit_threshold=threshold,
                        kv="deferred")
        return processed_probs(out.logits[0, -1], **kw).tolist()

    p1, q1 = dist(prompt), exit_dist(prompt)
    pair, pair_draft = {}, {}
    for a in range(6):
        p2, q2 = dist(prompt + [a]), exit_dist(prompt + [a])
        for b in range(6):
            pair[(a, b)] = p1[a] * p2[b]
            pair_draft[(a, b)] = q1[a] * q2[b]
    g = torch.Generator().manual_seed(0)
    counts: Counter = Counter()
    runs = 400
    for _ in range(runs):  # 3 new tokens: the second may be a draft too (2 pending)
        seq = fast.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=True,
                            generator=g, **kw)
        counts[tuple(seq[0, 3:5].tolist())] += 1
    s = fast.lossless_stats
    assert s.accepted > 0 and s.rejected > 0, s.summary()
    stat, df = chi2_statistic(counts, {k: v for k, v in pair.items() if v > 0}, runs)
    assert stat < chi2_critical(df), ("tokens 1-2", stat, df)
    draft = {k: v for k, v in pair_draft.items() if v > 0}
    observed = Counter({k: n for k, n in counts.items() if k in draft})
    stat, df = chi2_statistic(observed, draft, sum(observed.values()))
    assert stat > 3 * chi2_critical(df), ("draft distribution not rejected", stat, df)


def test_sampling_is_seeded():
    model = model_for("qwen3", LAYERS)
    fast = lossless(model, random_routers(model, 2), max_pending=3, exit_threshold=0.3,
                    adaptive=False)
    ids = prompt_ids(4, 0)
    a, b = (fast.generate(ids, 10, do_sample=True, top_p=0.9, eos_token_id=-1,
                          generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and a.shape[1] == 14
    assert fast.lossless_stats.drafted > 0


# ------------------------------------------------------------------ adaptive fallback
def test_fallback_engages_when_drafts_never_pay():
    """Forced exits at layer 0 of a Llama whose later layers dominate the residual stream:
    the layer-0 drafts are nearly always wrong, a round yields about one token for
    max_pending stopped steps and a deep step, so the controller falls back to plain
    one-token steps, probes again, and falls back again. The output is the plain model's."""
    model = copy.deepcopy(model_for("llama", LAYERS))
    with torch.no_grad():
        for block in model.model.layers[1:]:
            block.self_attn.o_proj.weight.mul_(8.0)
            block.mlp.down_proj.weight.mul_(8.0)
    controller = DraftController(probe_every=8, warmup=1, min_samples=2, min_rounds=2)
    fast = lossless(model, RouterSet.forced(model, exit_at=0, config=CFG), max_pending=3,
                    adaptive=controller)
    ids = prompt_ids(5, 1)
    new = 48
    assert torch.equal(fast.generate(ids, max_new_tokens=new, eos_token_id=-1),
                       plain_greedy(model, ids, new))
    s = fast.lossless_stats
    assert s.acceptance_rate < 0.3, s.summary()
    assert s.fallbacks >= 2 and s.probes >= 1 and s.plain_steps >= 8, s.summary()
    assert s.tokens == new
    (ctl,) = [fast.lossless.controller(key) for key in fast.lossless.states]
    assert ctl.gain is not None and ctl.gain < 1.0
    assert fast.tide_stats.steps_by_strategy["plain"] == s.plain_steps
    # The controller's state carries over to the next generate: it starts in fallback
    # or probes, and the output is again the plain model's.
    assert torch.equal(fast.generate(ids, max_new_tokens=new, eos_token_id=-1),
                       plain_greedy(model, ids, new))


def test_controller_decisions():
    """The decision rule on given costs: gain = tokens * t_plain / (stops * t_stop +
    rounds * t_deep); a measurement of the plain step first; fallback below 1 (doubling the
    interval after each failed probe), drafting kept at or above it."""
    s = LosslessStats(num_layers=8)
    c = DraftController(probe_every=4, max_probe_every=8, min_rounds=2, decay=0.0, warmup=0,
                        min_samples=1, plain_window=1)
    for kind, t in (("stop", 0.5), ("deep", 1.0)):
        c.observe(kind, t)
    c.end_round(stops=3, tokens=1, stats=s)
    assert c.phase == "draft"  # min_rounds not reached
    c.end_round(stops=3, tokens=1, stats=s)
    assert c.phase == "plain" and s.fallbacks == 0  # t_plain unknown: measure it first
    c.observe("plain", 1.0)
    c.end_plain_step(s)
    assert c.phase == "draft"
    c.end_round(stops=3, tokens=1, stats=s)
    assert c.gain == pytest.approx(1 / 2.5) and c.phase == "plain" and c.remaining == 4
    assert s.fallbacks == 1
    for _ in range(4):
        c.end_plain_step(s)
    assert c.phase == "draft" and s.probes == 1
    c.end_round(stops=3, tokens=1, stats=s)
    c.end_round(stops=3, tokens=1, stats=s)
    assert c.phase == "plain" and c.remaining == 8 and s.fallbacks == 2  # doubled
    for _ in range(8):
        c.end_plain_step(s)
    c.end_round(stops=3, tokens=4, stats=s)
    c.end_round(stops=3, tokens=4, stats=s)
    assert c.gain == pytest.approx(4 / 2.5) and c.phase == "draft"
    assert c._interval == 4  # a probe that paid resets the interval
    with pytest.raises(ValueError, match="probe_every"):
        DraftController(probe_every=0)


def test_controller_times_plain_steps_in_windows(monkeypatch):
    """A plain step's cost is a window's throughput: one sample per ``plain_window``
    consecutive plain steps (their mean), after ``warmup`` steps; a window that the phase
    or the generate ends early counts the steps it held."""
    clock = iter(float(t) for t in range(1000))
    import tide_compile.runtime.lossless as lossless_mod

    monkeypatch.setattr(lossless_mod.time, "perf_counter", lambda: next(clock))
    s = LosslessStats(num_layers=8)
    c = DraftController(plain_window=4, warmup=2, min_samples=1, min_rounds=1, decay=0.0)
    c._enter_plain(2 + 4 + 3, fallback=False)
    for _ in range(2):  # warm-up steps: no window
        c.begin_plain_step(cuda=False)
        assert c._window_t0 is None
        c.end_plain_step(s)
    for _ in range(4):  # one full window: clock 0 at its start, 1 at its end
        c.begin_plain_step(cuda=False)
        c.end_plain_step(s)
    assert list(c._times["plain"]) == [pytest.approx(1 / 4)]
    for _ in range(3):  # the phase ends after 3 steps: the window closes with 3
        c.begin_plain_step(cuda=False)
        c.end_plain_step(s)
    assert list(c._times["plain"]) == [pytest.approx(1 / 4), pytest.approx(1 / 3)]
    assert c.phase == "draft" and c._window_t0 is None
    c._enter_plain(10, fallback=False)
    c.begin_plain_step(cuda=False)
    c.end_plain_step(s)
    c.close_window(cuda=False)  # the generate ended mid-window
    assert len(c._times["plain"]) == 3 and c._window_t0 is None
    c.close_window(cuda=False)  # nothing open: no sample
    assert len(c._times["plain"]) == 3
    with pytest.raises(ValueError, match="plain_window"):
        DraftController(plain_window=0)


def test_controller_on_cuda_times_whole_runs_after_wide_steps(monkeypatch):
    """On CUDA, once the plain cost has samples, no window opens inside a run (a
    synchronize there stalls the GPU); a run that follows a wide step is one window,
    not capped at ``plain_window``, with one synchronize at each end; a run that does
    not follow one is not timed."""
    clock = iter(float(t) for t in range(1000))
    syncs = []
    import tide_compile.runtime.lossless as lossless_mod

    monkeypatch.setattr(lossless_mod.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(lossless_mod.torch.cuda, "synchronize", lambda: syncs.append(1))
    s = LosslessStats(num_layers=8)
    c = DraftController(plain_window=2, warmup=0, min_samples=1, min_rounds=1, decay=0.0)
    c._enter_plain(2, fallback=False)  # calibration: windows of plain_window steps
    for _ in range(2):
        c.begin_run(cuda=True, drained=True)  # no cost yet: begin_run opens nothing
        c.begin_plain_step(cuda=True)
        c.end_plain_step(s, cuda=True)
    assert len(c._times["plain"]) == 1 and len(syncs) == 2
    c._enter_plain(12, fallback=True)
    c.begin_run(cuda=True, drained=False)  # not after a wide step: not timed
    for _ in range(5):
        c.begin_plain_step(cuda=True)
        c.end_plain_step(s, cuda=True)
    assert len(c._times["plain"]) == 1 and len(syncs) == 2 and c._window_t0 is None
    syncs.clear()
    t_start = next(clock) + 1
    c.begin_run(cuda=True, drained=True)
    for _ in range(7):  # past plain_window: the window spans the run
        c.begin_plain_step(cuda=True)
        assert c._window_t0 == t_start
        c.end_plain_step(s, cuda=True)
    assert c.phase == "draft" and c._window_t0 is None
    assert list(c._times["plain"])[-1] == pytest.approx(1 / 7)  # the clock ran once more
    assert len(syncs) == 2  # one before the clock starts, one when the phase ended
    # A run cut by the end of the generate: close_window takes its sample.
    c._enter_plain(12, fallback=True)
    c.begin_run(cuda=True, drained=True)
    for _ in range(3):
        c.begin_plain_step(cuda=True)
        c.end_plain_step(s, cuda=True)
    c.close_window(cuda=True)
    assert len(c._times["plain"]) == 3 and len(syncs) == 4 and not c._run_window


def test_stats_summary():
    s = LosslessStats(num_layers=8, drafted=4, accepted=3, tokens=6, deep_steps=2,
                      plain_steps=1, fallbacks=1, probes=1, draft_depths={2: 3, 4: 1})
    assert s.acceptance_rate == 0.75 and s.rejected == 1
    assert s.mean_draft_depth == 2.5 and s.tokens_per_deep_step == 3.0
    text = s.summary()
    assert "Drafted: 4, accepted: 3 (75.0%)" in text and "1 rounds, 1 probes" in text
    s.reset()
    assert s.drafted == 0 and s.acceptance_rate == 0.0 and s.draft_depths == {}


# ------------------------------------------------------------------ errors
def test_errors():
    model = model_for("llama", LAYERS)
    routers = random_routers(model, 0)
    fast = lossless(model, routers, adaptive=False)
    assert isinstance(fast, tide_compile.TIDEModel) and fast.options.kv == "deferred"
    with pytest.raises(ValueError, match="batch 1"):
        fast.generate(torch.ones(2, 3, dtype=torch.long), 4)
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="unpadded"):
        fast.generate(torch.ones(1, 3, dtype=torch.long), 4, attention_mask=mask)
    with pytest.raises(TypeError, match="num_beams"):
        fast.generate(torch.ones(1, 3, dtype=torch.long), 4, num_beams=2)
    with pytest.raises(ValueError, match="mode must be 'exit' or 'lossless'"):
        tide_compile.optimize(model, routers, mode="losless")
    with pytest.raises(ValueError, match="kv='deferred'"):
        tide_compile.optimize(model, routers, mode="lossless", kv="propagate")
    with pytest.raises(ValueError, match="target_agreement"):
        tide_compile.optimize(model, routers, mode="lossless", target_agreement=0.9)
    with pytest.raises(ValueError, match="dynamic"):
        tide_compile.optimize(model, routers, mode="lossless", dynamic=True)
    with pytest.raises(TypeError, match="adaptive"):
        tide_compile.optimize(model, routers, mode="lossless", adaptive="yes")
    with pytest.raises(ValueError, match="max_cache_len"):
        fast.generate(torch.ones(1, 3, dtype=torch.long), 4, max_cache_len=8)


# ------------------------------------------------------------------ CUDA (GPU session)
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["zeroed", "random"])
def test_lossless_on_cuda(kind):
    """The CUDA defaults (Inductor, captured deferred runner, the plain step under CUDA
    graph trees): greedy tokens equal the plain model's over prompt lengths 1, 2, 9 (every
    prompt path), with the adaptive controller on (on a model this small drafting may not
    pay: the fallback may run); zeroed layers after the exit accept every draft."""
    torch._dynamo.reset()
    model = make_cuda_model(kind)
    routers = (RouterSet.forced(model, exit_at=1, config=CFG) if kind == "zeroed"
               else random_routers(model, 5))
    fast = tide_compile.optimize(model, routers, mode="lossless", exit_threshold=0.3,
                                 max_pending=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for prompt in (1, 2, 9):
            ids = torch.randint(3, 97, (1, prompt), generator=g).cuda()
            got = fast.generate(ids, max_new_tokens=24, eos_token_id=-1)
            assert torch.equal(got, plain_greedy(model, ids, 24)), prompt
    s = fast.lossless_stats
    assert s.drafted > 0, s.summary()
    if kind == "zeroed":
        assert s.accepted == s.drafted, s.summary()


@pytest.mark.gpu
def test_unguarded_fallback_on_cuda():
    """On CUDA (Inductor, the plain step under CUDA graph trees), runs of fallback steps
    whose steps after the first skip Dynamo's full guard evaluation: greedy tokens equal
    the plain model's over several prompts and generates, the spy sees the first step of
    each run guarded and the rest not."""
    from torch._dynamo import eval_frame

    torch._dynamo.reset()
    model = make_cuda_model("random")
    controller = DraftController(probe_every=256, max_probe_every=256, warmup=1,
                                 min_samples=1, min_rounds=1)
    fast = tide_compile.optimize(model, RouterSet.forced(model, exit_at=None, config=CFG),
                                 mode="lossless", max_pending=3, adaptive=controller)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (1, 6), generator=g).cuda()
    assert torch.equal(fast.generate(ids, max_new_tokens=24, eos_token_id=-1),
                       plain_greedy(model, ids, 24))
    # Whether drafting pays here depends on the GPU: put the controller in a long plain
    # phase (the fallback's state) directly.
    (ctl,) = [fast.lossless.controller(key) for key in fast.lossless.states]
    ctl.phase, ctl.remaining = "plain", 10**6
    (kind,) = fast.lossless._plain
    fn, graphs = fast.lossless._plain[kind]
    assert graphs, "the CUDA plain step runs under CUDA graph trees"
    seen: list[bool] = []

    def spy(**kwargs):
        seen.append(eval_frame._stance.skip_guard_eval_unsafe)
        return fn(**kwargs)

    fast.lossless._plain[kind] = (spy, graphs)
    for prompt in (3, 9, 6):
        ids = torch.randint(3, 97, (1, prompt), generator=g).cuda()
        seen.clear()
        got = fast.generate(ids, max_new_tokens=24, eos_token_id=-1)
        assert torch.equal(got, plain_greedy(model, ids, 24)), prompt
        assert seen == [False] + [True] * 23, seen
    assert fast.lossless_stats.plain_steps >= 72, fast.lossless_stats.summary()


def make_cuda_model(kind: str):
    model = copy.deepcopy(model_for("llama", LAYERS)).cuda()
    return zero_layers_after(model, 1) if kind == "zeroed" else model


def test_drafted_eos_is_read_one_step_late():
    """Whether a draft is EOS is read one step late (the host never waits for the GPU
    between steps): the step after a drafted EOS drafts once more, the next verifies, and
    the output still stops at the EOS exactly as the plain model's does."""
    model = zero_layers_after(model_for("llama", LAYERS), 1)
    fast = lossless(model, RouterSet.forced(model, exit_at=1, config=CFG), max_pending=7,
                    adaptive=False)
    for seed in range(20):  # a prompt whose second new token first appears there
        ids = prompt_ids(4, seed)
        free = plain_greedy(model, ids, 12)
        new = free[0, 4:].tolist()
        if new[1] != new[0]:
            break
    eos = new[1]  # drafted by the second stopped step (every token drafts)
    got = fast.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, free[:, :4 + 2])
    s = fast.lossless_stats
    # drafts 1 and 2 (EOS), then one more before the flag is read, then the verify
    assert (s.drafted, s.deep_steps, s.accepted, s.tokens) == (3, 1, 2, 2), s.summary()


def fallen_back(seed: int, new: int):
    """A lossless model with routers that never exit, whose controller has fallen back
    to plain steps after one generate of ``new`` tokens (checked: output equal to the
    plain model's, a plain phase longer than ``new``): (fast, ids, plain output, ctl)."""
    model = model_for("llama", LAYERS)
    controller = DraftController(probe_every=256, max_probe_every=256, warmup=1,
                                 min_samples=1, min_rounds=1, plain_window=1)
    fast = lossless(model, RouterSet.forced(model, exit_at=None, config=CFG), max_pending=3,
                    adaptive=controller)
    ids = prompt_ids(5, seed)
    free = plain_greedy(model, ids, new)
    assert torch.equal(fast.generate(ids, max_new_tokens=new, eos_token_id=-1), free)
    (ctl,) = [fast.lossless.controller(key) for key in fast.lossless.states]
    assert ctl.phase == "plain" and ctl.remaining > new, "never-exit drafts should fall back"
    return fast, ids, free, ctl


def test_plain_step_eos_is_read_one_step_late():
    """In the adaptive fallback (plain steps), whether a token is EOS is read one step
    late: the plain step after the EOS runs, its token is dropped and not counted, and
    the output stops at the EOS exactly as the plain model's does."""
    new = 24
    fast, ids, free, ctl = fallen_back(3, new)
    tokens = free[0, 5:].tolist()
    j = next(i for i in range(2, new) if tokens[i] not in tokens[:i])  # first occurrence
    fast.lossless_stats.reset()
    fast.tide_stats.reset()
    got = fast.generate(ids, max_new_tokens=new, eos_token_id=tokens[j])
    assert torch.equal(got, free[:, :5 + j + 1])
    s = fast.lossless_stats
    assert (s.plain_steps, s.tokens, s.drafted) == (j + 1, j + 1, 0), s.summary()
    assert fast.tide_stats.steps_by_strategy["plain"] == j + 1
    # The plain phase ends exactly at the EOS: the next (wide) step reads the flag first
    # and the generate ends there, with no deep step.
    ctl.remaining = j + 1
    fast.lossless_stats.reset()
    got = fast.generate(ids, max_new_tokens=new, eos_token_id=tokens[j])
    assert torch.equal(got, free[:, :5 + j + 1])
    assert ctl.phase == "draft"
    assert (s.plain_steps, s.tokens, s.deep_steps) == (j + 1, j + 1, 0), s.summary()


def test_plain_runs_skip_guard_evaluation():
    """A run of fallback steps calls the plain graph with the same objects every step:
    after its first step (guarded in full) the rest run with Dynamo checking only the
    guards that tell its cache entries apart. The output is still the plain model's, the
    stance is restored after the run, and a stance the caller set is left alone."""
    from torch._dynamo import eval_frame

    new = 20
    fast, ids, free, ctl = fallen_back(4, new)
    model = fast.model
    (kind,) = fast.lossless._plain
    fn, graphs = fast.lossless._plain[kind]
    seen: list[tuple[str, bool]] = []

    def spy(**kwargs):
        seen.append((eval_frame._stance.stance, eval_frame._stance.skip_guard_eval_unsafe))
        return fn(**kwargs)

    fast.lossless._plain[kind] = (spy, graphs)
    assert torch.equal(fast.generate(ids, max_new_tokens=new, eos_token_id=-1), free)
    assert fast.lossless_stats.drafted == 0
    assert seen == [("default", False)] + [("default", True)] * (new - 1), seen
    assert not eval_frame._stance.skip_guard_eval_unsafe  # restored after the run
    seen.clear()
    with torch.compiler.set_stance("eager_on_recompile"):
        assert torch.equal(fast.generate(ids, max_new_tokens=new, eos_token_id=-1), free)
    assert seen == [("eager_on_recompile", False)] * new, seen
    # unguarded=False (other threads run compiled code): every step guarded in full
    fast.lossless.unguarded = False
    seen.clear()
    assert torch.equal(fast.generate(ids, max_new_tokens=new, eos_token_id=-1), free)
    assert seen == [("default", False)] * new, seen
    assert lossless(model, RouterSet.forced(model, exit_at=None, config=CFG),
                    unguarded=False).lossless.unguarded is False
    with pytest.raises(TypeError, match="unguarded must be True or False"):
        lossless(model, RouterSet.forced(model, exit_at=None, config=CFG), unguarded="yes")


def test_many_models_of_one_class_share_dynamos_recompile_limit():
    """Every compiled forward of one model class shares one code object, and Dynamo's
    recompile limit counts its cache entries: five lossless models of one class (and the
    caller's own compiled forward) in one process all compile and generate. Before the
    limit counted the entries already there, the fifth failed with "recompile limit
    exceeded"."""
    torch._dynamo.reset()
    model = model_for("llama", LAYERS)
    ids = prompt_ids(6, 5)
    want = plain_greedy(model, ids, 8)
    own = torch.compile(model.forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        own(input_ids=ids)
    limit = torch._dynamo.config.recompile_limit
    for _ in range(5):
        fast = tide_compile.optimize(model, RouterSet.forced(model, exit_at=1, config=CFG),
                                     mode="lossless", inductor=False, max_pending=3)
        assert torch.equal(fast.generate(ids, max_new_tokens=8, eos_token_id=-1), want)
        assert fast.lossless_stats.drafted > 0
    assert torch._dynamo.config.recompile_limit == limit  # raised only around first calls
