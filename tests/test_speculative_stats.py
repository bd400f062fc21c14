"""``SpeculativeModel.tide_stats``: the same kind of record as ``TIDEModel``'s in every
mode (issue 19). Every forward is counted from what ran: the eager prefill, each draft
(its exit checkpoint and depth, from the draft runner), each verify (every layer), and
the drafts' exit regret against the verify's top-1."""

import pytest
import torch

import tide_compile
from tide_compile import ExitStats, RouterSet
from tide_testing import CFG, model_for

LAYERS = 4


@pytest.mark.parametrize("do_sample", [False, True])
def test_speculative_tide_stats_count_every_forward(do_sample):
    model = model_for("llama", LAYERS)
    routers = RouterSet.forced(model, exit_at=1, config=CFG)  # every draft exits after 2
    torch._dynamo.reset()
    fast = tide_compile.optimize(model, routers, mode="speculative", inductor=False,
                                 max_draft=3)
    # Spies: the drafts of each round, then the verify's input window and logits.
    calls = []
    draft, verify = fast._draft, fast._verify

    def spy_draft(*args):
        logits, depth = draft(*args)
        calls.append(logits.argmax(-1))  # the draft's exit top-1
        return logits, depth

    def spy_verify(window, pos, cache):
        logits = verify(window, pos, cache)
        calls.append((logits.clone(),))
        return logits

    fast._draft, fast._verify = spy_draft, spy_verify
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    out = fast.generate(ids, max_new_tokens=9, eos_token_id=-1, do_sample=do_sample,
                        generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 15)
    stats, spec = fast.tide_stats, fast.spec_stats
    assert isinstance(stats, ExitStats)
    drafts, verifies = spec.draft_steps, spec.verify_calls
    assert drafts > 0 and verifies > 0
    assert stats.steps_by_strategy == {"plain": 1, "skip": drafts, "verify": verifies}
    assert stats.exits_per_layer == {1: drafts}  # the drafts really stopped after 2 layers
    assert stats.total_tokens == 6 + drafts + verifies
    assert stats.layers_executed == 6 * LAYERS + drafts * 2 + verifies * LAYERS
    # Regret, recounted from the spies: drafts whose exit top-1 differs from the verify's
    # top-1 at their position.
    regrets, tops = 0, []
    for call in calls:
        if isinstance(call, tuple):
            (logits,) = call
            if tops:
                regrets += int((torch.stack(tops) != logits[:len(tops)].argmax(-1)).sum())
            tops = []
        else:
            tops.append(call)
    assert stats.regret_checked == spec.drafted
    assert stats.regrets == regrets > 0
    if not do_sample:  # greedy: a rejected draft differs (a later one may agree again)
        assert spec.drafted - spec.accepted >= regrets
    # A second call adds to the same record.
    fast.generate(ids, max_new_tokens=4, eos_token_id=-1, do_sample=do_sample)
    assert stats.steps_by_strategy["plain"] == 2
