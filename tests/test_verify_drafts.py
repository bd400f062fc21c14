"""Draft verification used by mode="lossless" (``tide_compile.runtime.speculative``).

The speculative-sampling acceptance rule preserves the target distribution (chi-square
against the exact one, fixed seed: deterministic), ``verify_drafts`` accepts, cuts at EOS
and at the room left as documented, and the removed ``mode="speculative"`` raises an
error pointing at ``mode="lossless"``. All on the CPU.
"""

from collections import Counter

import pytest
import torch

import tide_compile
from tide_compile import RouterSet
from tide_compile import sampling
from tide_compile.runtime.speculative import speculative_accept, verify_drafts
from tide_compile.sampling import processed_probs
from tide_testing import CFG, chi2_critical, chi2_statistic, random_routers
from tiny_models import make_model

VOCAB = 7


def logits_with_argmax(tops: list[int]) -> torch.Tensor:
    """``[len(tops), VOCAB]`` logits whose row ``i`` has its argmax at ``tops[i]``."""
    out = torch.zeros(len(tops), VOCAB)
    out[torch.arange(len(tops)), torch.tensor(tops)] = 5.0
    return out


# ------------------------------------------------------------------ sampling rule
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


# ------------------------------------------------------------------ verify_drafts
def test_verify_greedy_accepts_the_matching_prefix():
    full = logits_with_argmax([2, 3, 4, 5])  # the full model's tokens after each slot
    v = verify_drafts(full, torch.tensor([2, 3, 6]), eos=set(), room=10)
    assert (v.accepted, int(v.next_token), v.emitted, v.ended) == (2, 4, [2, 3, 4], False)
    assert v.regrets == 1
    v = verify_drafts(full, torch.tensor([2, 3, 4]), eos=set(), room=10)
    assert (v.accepted, v.emitted, v.regrets) == (3, [2, 3, 4, 5], 0)
    v = verify_drafts(full, torch.tensor([1, 3, 4]), eos=set(), room=10)
    assert (v.accepted, v.emitted) == (0, [2])  # a later draft agreeing again is not taken
    v = verify_drafts(full[:1], torch.tensor([], dtype=torch.long), eos=set(), room=10)
    assert (v.accepted, v.emitted, v.regrets) == (0, [2], 0)


def test_verify_cuts_at_eos_and_room():
    full = logits_with_argmax([2, 3, 4, 5])
    drafts = torch.tensor([2, 3, 4])
    v = verify_drafts(full, drafts, eos={3}, room=10)
    assert (v.accepted, v.emitted, v.ended) == (3, [2, 3], True)
    v = verify_drafts(full, drafts, eos={5}, room=10)
    assert (v.emitted, v.ended) == ([2, 3, 4, 5], True)
    v = verify_drafts(full, drafts, eos=set(), room=2)
    assert (v.emitted, v.ended) == ([2, 3], False)


def test_verify_sampling_uses_the_acceptance_rule():
    """q == p: every draft is accepted (u * q < p for u < 1); regrets count the drafts
    whose exit top-1 differs from the full model's."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, VOCAB, generator=g)
    kw = {"temperature": 0.9, "top_k": None, "top_p": None}
    p = processed_probs(full, **kw)
    drafts = torch.stack([torch.multinomial(p[i], 1, generator=g)[0] for i in range(2)])
    tops = full[:2].argmax(-1).clone()
    tops[1] = (tops[1] + 1) % VOCAB
    v = verify_drafts(full, drafts, eos=set(), room=10, sampling=kw, draft_probs=p[:2],
                      exit_tops=tops, generator=g)
    assert v.accepted == 2 and v.emitted[:2] == drafts.tolist() and len(v.emitted) == 3
    assert int(v.regrets) == 1
    assert p[2, v.emitted[2]] > 0
    v = verify_drafts(full[:1], drafts[:0], eos=set(), room=10, sampling=kw, generator=g)
    assert v.accepted == 0 and len(v.emitted) == 1 and v.regrets == 0


# ------------------------------------------------------------------ modes
def test_speculative_mode_was_removed():
    model = make_model("llama", num_layers=4, seed=11)
    routers = random_routers(model, 0)
    with pytest.raises(ValueError, match=r"mode='speculative' was replaced by "
                                         r"mode='lossless'.*mode='lossless'\)$"):
        tide_compile.optimize(model, routers, mode="speculative", max_draft=4)
    with pytest.raises(ValueError, match="mode must be 'exit' or 'lossless'"):
        tide_compile.optimize(model, routers, mode="spec")


def test_optimize_default_mode_is_unchanged():
    model = make_model("llama", num_layers=4, seed=11)
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, RouterSet.forced(model, exit_at=1, config=CFG),
                                 inductor=False)
    assert isinstance(fast, tide_compile.TIDEModel)
