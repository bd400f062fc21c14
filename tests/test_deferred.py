"""kv="deferred" in compiled generate: exact K/V, the skipped layers run later, batched.

Every test compares the compiled decode loop (FX graphs: ``inductor=False``; the loop and
the pieces are the same under Inductor, which the GPU suite runs) with the executable
spec, ``reference.generate(..., kv="deferred")``, and checks that steps really stopped
early (layers executed, steps that did not reach the end).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import StaticCache

import tide_compile
from tide_compile import ExitStats, RouterSet
from tide_compile import reference as R
from tide_compile.runtime.deferred import RegretController
from tide_compile.runtime.runner import SkipRunner
from tide_testing import ARCHS5, CFG, model_for, random_routers

LAYERS = 4


def left_padded(batch: int, prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :min(row, prompt - 1)] = 0
    return ids, mask


@pytest.fixture
def stopped_steps(monkeypatch):
    """Per deferred runner call: whether it stopped before the end (a runner spy)."""
    calls: list[bool] = []
    original = SkipRunner.__call__

    def spy(self, *args):
        out = original(self, *args)
        if self.strategy == "deferred":
            calls.append(not self.reached_end)
        return out

    monkeypatch.setattr(SkipRunner, "__call__", spy)
    return calls


@settings(max_examples=1)
@given(batch=st.integers(1, 3), prompt=st.integers(1, 9), new=st.integers(2, 9),
       threshold=st.floats(0.2, 0.8), pending=st.integers(1, 4), seed=st.integers(0, 1000))
@pytest.mark.parametrize("arch", ARCHS5)
def test_generate_equals_reference(arch, batch, prompt, new, threshold, pending, seed):
    """Tokens and exit counts equal the deferred reference's (left-padded batches, rows
    exiting independently), and every decode step ran the deferred strategy."""
    torch._dynamo.reset()
    model = model_for(arch, LAYERS)
    routers = random_routers(model, seed)
    ids, mask = left_padded(batch, prompt, seed)
    fast = tide_compile.optimize(model, routers, inductor=False, kv="deferred",
                                 max_pending=pending, exit_threshold=threshold)
    got = fast.generate(ids, max_new_tokens=new, attention_mask=mask, eos_token_id=-1,
                        pad_token_id=0)
    ref = R.generate(model, routers, ids, new, attention_mask=mask, exit_threshold=threshold,
                     eos_token_id=-1, pad_token_id=0, kv="deferred")
    assert torch.equal(got, ref.sequences)
    stats = fast.tide_stats
    assert stats.total_tokens == ref.stats.total_tokens
    assert stats.exits_per_layer == ref.stats.exits_per_layer
    decode_steps = new - 1 if prompt >= 2 else new
    assert stats.steps_by_strategy.get("deferred", 0) == decode_steps


@pytest.mark.parametrize("batch,pending", [(1, 1), (1, 3), (3, 2)])
def test_forced_exits_stop_early_and_the_cache_ends_exact(batch, pending, stopped_steps):
    """Every token exits after layer 1 of 4: a decode step stops there (2 layers) until
    ``max_pending`` tokens wait, then one step runs all 4 layers for them (forced deep).
    The tokens are the reference's and every cache position the loop completed holds the
    plain model's own K/V (nothing propagated)."""
    torch._dynamo.reset()
    model = model_for("llama", LAYERS)
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    prompt, new = 5, 11
    ids, mask = left_padded(batch, prompt, 0)
    mask[:] = 1
    fast = tide_compile.optimize(model, routers, inductor=False, kv="deferred",
                                 max_pending=pending)
    fast.generate(ids, max_new_tokens=new, eos_token_id=-1, pad_token_id=0)  # compiles
    stopped_steps.clear()  # (a width's first call is compiled, run and thrown away once)
    fast.tide_stats.reset()
    got = fast.generate(ids, max_new_tokens=new, eos_token_id=-1, pad_token_id=0)
    ref = R.generate(model, routers, ids, new, eos_token_id=-1, pad_token_id=0, kv="deferred")
    assert torch.equal(got, ref.sequences)
    steps = new - 1
    want = [(j % (pending + 1)) != pending for j in range(steps)]
    assert stopped_steps == want
    stats = fast.tide_stats
    deep = steps - sum(want)
    assert stats.layers_executed == batch * (prompt * LAYERS + 2 * sum(want) + LAYERS * deep)
    assert stats.layers_executed < LAYERS * stats.total_tokens  # layers were really skipped
    assert stats.exit_rate == 1.0
    (bucket,) = fast._buckets.values()
    complete = bucket.complete
    assert complete == prompt + steps - (steps % (pending + 1))  # up to the last deep step
    plain = StaticCache(config=model.config, max_cache_len=complete)
    with torch.no_grad():
        model(got[:, :complete], past_key_values=plain, use_cache=True)
    for mine, theirs in zip(bucket.cache.layers, plain.layers):
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            torch.testing.assert_close(a[:batch, :, :complete], b[:, :, :complete],
                                       rtol=1e-5, atol=1e-5)


def test_optimize_defaults_to_deferred(stopped_steps):
    """optimize() without ``kv`` runs exact K/V (its generate defers, as kv="deferred"
    does: the deferred reference's tokens, decode steps that stop early), while the
    backend's own option default stays "propagate"."""
    from tide_compile.options import parse_options

    torch._dynamo.reset()
    model = model_for("llama", LAYERS)
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    ids, _ = left_padded(1, 5, 0)
    fast = tide_compile.optimize(model, routers, inductor=False, max_pending=2)
    assert fast.options.kv == "deferred"
    got = fast.generate(ids, max_new_tokens=7, eos_token_id=-1, pad_token_id=0)
    ref = R.generate(model, routers, ids, 7, eos_token_id=-1, pad_token_id=0, kv="deferred")
    assert torch.equal(got, ref.sequences)
    assert fast.tide_stats.steps_by_strategy.get("deferred", 0) == 6
    assert any(stopped_steps)  # steps really stopped at the exit
    assert fast.tide_stats.layers_executed < LAYERS * fast.tide_stats.total_tokens
    assert parse_options({"routers": routers}).kv == "propagate"
    assert tide_compile.optimize(model, routers, inductor=False,
                                 kv="propagate").options.kv == "propagate"


def regret_case():
    """A batch-1 case whose exited tokens' top-1 sometimes differs from the full model's."""
    model = model_for("llama", LAYERS)
    for seed in range(40):
        routers = random_routers(model, seed)
        ids, _ = left_padded(1, 6, seed)
        ref = R.generate(model, routers, ids, 14, exit_threshold=0.5, eos_token_id=-1,
                         kv="deferred")
        seq = ref.sequences
        forced = R.forward(model, routers, seq[:, :-1], exit_threshold=0.5, kv="deferred")
        full = model(seq[:, :-1]).logits
        exited = forced.exit_layers[0] >= 0
        differ = forced.logits[0].argmax(-1) != full[0].argmax(-1)
        regret = (exited & differ)[6:].nonzero()
        # ... and a token after it that goes deep (its step runs the regretted one's layers)
        if len(regret) and bool((~exited)[6 + int(regret[0]) + 1:].any()):
            return model, routers, ids, exited, differ
    pytest.fail("no seed gives an exit whose top-1 differs from the full model's")


def test_regret_counts_equal_the_teacher_forced_truth():
    """Exit regret counted by the deep steps (their full-depth logits of the pending
    tokens) equals, token by token, the teacher-forced comparison of each exited token's
    exit head with the full model, over every decode position the loop completed."""
    torch._dynamo.reset()
    model, routers, ids, exited, differ = regret_case()
    fast = tide_compile.optimize(model, routers, inductor=False, kv="deferred", max_pending=16,
                                 exit_threshold=0.5)
    fast.generate(ids, max_new_tokens=14, eos_token_id=-1)
    (bucket,) = fast._buckets.values()
    decode = slice(6, bucket.complete)  # positions whose tokens a decode step ran
    stats = fast.tide_stats
    assert stats.regret_checked == int(exited[decode].sum()) > 0
    assert stats.regrets == int((exited & differ)[decode].sum()) > 0
    assert stats.regret_rate == stats.regrets / stats.regret_checked
    assert "Exit regret:" in stats.summary()


def test_set_threshold_equals_compiling_at_that_threshold():
    """The runner's set_threshold (router biases shifted in place) gives what the
    reference gives at the new threshold, with no new compile. A one-token prompt: every
    step runs through the decode runner."""
    torch._dynamo.reset()
    model = model_for("llama", LAYERS)
    routers = random_routers(model, 5)
    ids, _ = left_padded(1, 1, 5)
    fast = tide_compile.optimize(model, routers, inductor=False, kv="deferred", exit_threshold=0.2)
    fast.generate(ids, max_new_tokens=2, eos_token_id=-1)
    (bucket,) = fast._buckets.values()
    at_low = R.generate(model, routers, ids, 12, exit_threshold=0.2, eos_token_id=-1,
                        kv="deferred")
    at_high = R.generate(model, routers, ids, 12, exit_threshold=0.7, eos_token_id=-1,
                         kv="deferred")
    assert at_low.stats.exits_per_layer != at_high.stats.exits_per_layer  # the change shows
    fast.set_threshold(0.7)
    fast.tide_stats.reset()
    assert torch.equal(fast.generate(ids, max_new_tokens=12, eos_token_id=-1), at_high.sequences)
    assert fast.tide_stats.exits_per_layer == at_high.stats.exits_per_layer
    with pytest.raises(ValueError, match="inside"):
        fast.set_threshold(1.0)
    with pytest.raises(ValueError, match="inside"):
        bucket.runner.set_threshold(1.0)


def test_regret_controller_raises_the_threshold():
    """Off by default; with target_agreement it raises the threshold while the measured
    regret exceeds 1 - target, and never lowers it."""
    c = RegretController(0.9, window=4)
    assert c.update(torch.tensor(2), 4, 0.5) is not None and c.threshold > 0.5
    first = c.threshold
    assert c.update(0, 4, first) is None and c.threshold == first
    assert c.update(1, 2, first) is None  # half a window: no decision yet
    torch._dynamo.reset()
    model, routers, ids, _, _ = regret_case()
    assert tide_compile.optimize(model, routers, inductor=False, kv="deferred").controller is None
    fast = tide_compile.optimize(model, routers, inductor=False, kv="deferred", max_pending=16,
                                 exit_threshold=0.5, target_agreement=0.999)
    fast.controller.window = 1
    fast.generate(ids, max_new_tokens=14, eos_token_id=-1)
    (bucket,) = fast._buckets.values()
    assert fast.controller.raised, "a regret above 0.1% should raise the threshold"
    assert fast.decode_threshold == fast.controller.threshold > 0.5
    # The runners that ran after the raise exit at the raised threshold.
    assert max(w.runner.threshold for w in bucket.widths.values()) == fast.controller.threshold


def test_user_loop_runs_every_layer_with_exact_kv():
    """torch.compile(..., backend="tide", options={"kv": "deferred"}) in the user's own
    loop: a one-token step cannot defer (nothing feeds pending tokens back), so it runs
    every layer, warns once, and equals the deferred reference teacher-forced."""
    torch._dynamo.reset()
    model = model_for("llama", LAYERS)
    routers = random_routers(model, 3)
    stats = ExitStats(LAYERS)
    fn = torch.compile(model, backend="tide", fullgraph=True,
                       options={"routers": routers, "kv": "deferred", "inductor": False,
                                "exit_threshold": 0.4, "stats": stats})
    ids, _ = left_padded(1, 9, 3)
    cache = StaticCache(config=model.config, max_cache_len=16)
    logits = []
    with torch.no_grad(), pytest.warns(UserWarning, match="runs every\\s+layer"):
        out = fn(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        for t in range(5, 9):
            logits.append(fn(input_ids=ids[:, t:t + 1], past_key_values=cache,
                             use_cache=True).logits)
    want = R.forward(model, routers, ids, exit_threshold=0.4, kv="deferred")
    torch.testing.assert_close(torch.cat(logits, 1), want.logits, rtol=1e-5, atol=1e-5)
    assert stats.layers_executed == LAYERS * 9 and stats.exited_tokens > 0


def test_bad_input():
    model = model_for("llama", LAYERS)
    routers = random_routers(model, 1)
    with pytest.raises(ValueError, match="kv must be one of"):
        tide_compile.optimize(model, routers, kv="exact")
    for bad in (0, 65, True, 2.0):
        with pytest.raises(ValueError, match="max_pending"):
            tide_compile.optimize(model, routers, kv="deferred", max_pending=bad)
    with pytest.raises(ValueError, match="target_agreement needs kv='deferred'"):
        tide_compile.optimize(model, routers, kv="propagate", target_agreement=0.99)
    for propagate_only in ({"strategy": "compact"}, {"compaction_threshold": 0.5},
                           {"compact_min_length": 0}):
        with pytest.raises(ValueError, match="applies to kv='propagate' only"):
            tide_compile.optimize(model, routers, **propagate_only)  # the default: deferred
        tide_compile.optimize(model, routers, kv="propagate", **propagate_only)
    with pytest.raises(ValueError, match="target_agreement must be in"):
        tide_compile.optimize(model, routers, kv="deferred", target_agreement=1.0)
    with pytest.raises(ValueError, match="drop dynamic=True"):
        tide_compile.optimize(model, routers, kv="deferred", dynamic=True)
    fast = tide_compile.optimize(model, routers, kv="deferred", inductor=False, max_pending=4)
    with pytest.raises(ValueError, match="max_pending 4"):
        fast.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=8, max_cache_len=14)


class _RecordingController(RegretController):
    """A RegretController that keeps every update it was given (regrets read at once)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calls: list[tuple[int, int, float]] = []

    def update(self, regrets, checked, threshold):
        self.calls.append((int(regrets), checked, threshold))
        return super().update(regrets, checked, threshold)


@pytest.mark.parametrize("after_eos", ["stopped", "deep"])
def test_batch1_eos_read_one_step_late(after_eos, stopped_steps):
    """At batch 1 the EOS flag is read one step late: the row that ended runs one more
    step, here a stopped step or a forced deep step (which would check the pending tokens'
    regret, feed the controller and complete their positions). Nothing of it is kept:
    the tokens, tide_stats (exits, layers, steps per strategy, regret counts), the
    controller's updates and decisions and ``bucket.complete`` equal those of a run that
    ends at the same token without an EOS (``max_new_tokens``), and the tokens and exits
    the reference's. Every token exits after layer 1 of 4, ``max_pending=3``: decode step
    ``j`` (which emits new token ``j + 1``) runs deep when ``j % 4 == 3``; with new token
    ``i`` the EOS, the extra step is decode step ``i``."""
    torch._dynamo.reset()
    model = model_for("llama", LAYERS)
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    pending, prompt = 3, 5
    stop = {"stopped": 5, "deep": 7}[after_eos]  # the EOS is new token `stop`
    for seed in range(20):  # a prompt whose new token `stop` is not among the ones before
        ids = torch.randint(3, 97, (1, prompt), generator=torch.Generator().manual_seed(seed))
        free = R.generate(model, routers, ids, stop + 1, eos_token_id=-1,
                          kv="deferred").sequences[0, prompt:].tolist()
        if free[stop] not in free[:stop]:
            break
    else:
        pytest.fail("no seed gives a new token that did not appear before")
    eos, new = free[stop], stop + 1  # the row ends with `new` new tokens

    def run(eos_token_id, max_new_tokens):
        fast = tide_compile.optimize(model, routers, inductor=False, kv="deferred",
                                     max_pending=pending, target_agreement=0.5)
        fast.controller = _RecordingController(0.5, window=1)
        got = fast.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        (bucket,) = fast._buckets.values()
        return got, fast, bucket.complete

    got, fast, complete = run(eos, new + 4)
    calls = list(stopped_steps)
    stopped_steps.clear()
    want, plain, plain_complete = run(-1, new)  # no EOS: no step after the last token
    # The EOS run made one runner call more: the step after the EOS, stopped or deep.
    assert calls[:-1] == stopped_steps and calls[-1] == (after_eos == "stopped")
    ref = R.generate(model, routers, ids, new + 4, eos_token_id=eos, kv="deferred")
    assert torch.equal(got, want) and torch.equal(got, ref.sequences)
    assert got.shape[1] == prompt + new
    stats, base = fast.tide_stats, plain.tide_stats
    assert stats.total_tokens == base.total_tokens == ref.stats.total_tokens == prompt + stop
    assert stats.exits_per_layer == base.exits_per_layer == ref.stats.exits_per_layer
    deep = stop // (pending + 1)  # counted decode steps that ran every layer
    assert stats.layers_executed == base.layers_executed == (
        prompt * LAYERS + 2 * (stop - deep) + LAYERS * deep)
    assert stats.layers_executed < LAYERS * stats.total_tokens  # layers were really skipped
    assert stats.steps_by_strategy == base.steps_by_strategy
    assert stats.steps_by_strategy["deferred"] == stop
    assert stats.regret_checked == base.regret_checked == pending * deep > 0
    assert stats.regrets == base.regrets and stats.regret_rate == base.regret_rate
    assert fast.controller.calls == plain.controller.calls and len(fast.controller.calls) == deep
    assert fast.controller.raised == plain.controller.raised
    assert fast.decode_threshold == plain.decode_threshold
    assert complete == plain_complete == prompt + deep * (pending + 1)
