"""Traffic: many prompt lengths, new-token counts and batch sizes in one process.

Every token exits after layer 1 of 4 (forced routers). For every call: the tokens equal
the reference's, the decode steps ran 2 layers per token (the skip strategy; the prompt
step runs all 4), and the compiles stay within the documented bound. Inductor is off
(FX graphs compile in about a second; the shape logic is the same).
"""

import itertools
import math

import pytest
import torch
from transformers import StaticCache

import tide_compile
from tide_compile import ExitStats, RouterSet
from tide_compile import backend as B
from tide_compile import reference as R
from tide_compile.runtime.model import MIN_CACHE_BUCKET
from tide_compile.sampling import position_ids_from_mask
from tide_testing import CFG, model_for

PROMPTS = (2, 3, 5, 8, 13, 21)
NEW_TOKENS = (2, 5)
BATCHES = (1, 2, 3)
LAYERS = 4
EXIT_DEPTH = 2  # forced exit after layer 1


def requests():
    """Every (prompt, new, batch), with left-padded ids: row i has i padding tokens."""
    g = torch.Generator().manual_seed(0)
    for prompt, new, batch in itertools.product(PROMPTS, NEW_TOKENS, BATCHES):
        ids = torch.randint(3, 97, (batch, prompt), generator=g)
        mask = torch.ones_like(ids)
        for row in range(batch):
            mask[row, :min(row, prompt - 1)] = 0
        yield prompt, new, ids, mask


@pytest.fixture(scope="module")
def setup():
    model = model_for("llama", LAYERS)
    return model, RouterSet.forced(model, exit_at=1, config=CFG)


@pytest.mark.parametrize("dynamic", [None, False])
def test_generate_keeps_skipping_for_every_shape(setup, dynamic):
    """optimize(...).generate: two graphs per bucket (batch 1, 2 -> 2, 3 -> 4; cache 256),
    decode steps skip at every shape, tokens and exits equal to the reference."""
    model, routers = setup
    torch._dynamo.reset()
    compiles = sum(B.COMPILE_COUNTS.values())
    fast = tide_compile.optimize(model, routers, kv="propagate", inductor=False, dynamic=dynamic)
    stats = fast.tide_stats
    for prompt, new, ids, mask in requests():
        before = ExitStats(LAYERS)
        before.merge(stats)
        steps_before = dict(stats.steps_by_strategy)
        # No end token (-1): every request decodes all its tokens, whatever the weights.
        got = fast.generate(ids, max_new_tokens=new, attention_mask=mask, pad_token_id=0,
                            eos_token_id=-1)
        ref = R.generate(model, routers, ids, new, attention_mask=mask, pad_token_id=0,
                         cache="static", eos_token_id=-1)
        where = f"prompt {prompt}, new {new}, batch {ids.shape[0]}"
        assert torch.equal(got, ref.sequences), where
        tokens = stats.total_tokens - before.total_tokens
        assert tokens == ref.stats.total_tokens, where
        assert {c: n - before.exits_per_layer.get(c, 0) for c, n in stats.exits_per_layer.items()
                if n != before.exits_per_layer.get(c, 0)} == ref.stats.exits_per_layer, where
        prompt_tokens = int(mask.sum())
        executed = stats.layers_executed - before.layers_executed
        assert executed == LAYERS * prompt_tokens + EXIT_DEPTH * (tokens - prompt_tokens), where
        assert executed < LAYERS * tokens, where  # fewer layers than the model has
        steps = {k: v - steps_before.get(k, 0) for k, v in stats.steps_by_strategy.items()}
        decode_steps = got.shape[1] - prompt - 1
        assert steps.get("skip", 0) == decode_steps and steps.get("frozen", 0) == 1, where
    assert set(fast.cache_memory()) == {(1, MIN_CACHE_BUCKET, "cpu"), (2, MIN_CACHE_BUCKET, "cpu"),
                                        (4, MIN_CACHE_BUCKET, "cpu")}
    # Every bucket's one-token steps came to call the runner without Dynamo.
    assert all(b.direct is not None for b in fast._buckets.values())
    # The documented bound: two graphs per bucket (prompt step, one-token step).
    assert sum(B.COMPILE_COUNTS.values()) - compiles <= 2 * len(fast.cache_memory())
    assert "Steps by strategy: frozen 36, skip" in stats.summary()


def test_user_loop_with_attached_routers_keeps_skipping(setup):
    """torch.compile(model, backend="tide") with attached routers, driven by the user's
    own loop (a new StaticCache per request, the mask growing every step): Dynamo's
    automatic dynamic shapes make the sizes symbolic after the first changes, and the
    one-token steps keep the skip strategy through all of them."""
    model, routers = setup
    torch._dynamo.reset()
    stats = ExitStats(LAYERS)
    compiles = sum(B.COMPILE_COUNTS.values())
    tide_compile.attach(model, routers, inductor=False, stats=stats)
    try:
        fn = torch.compile(model, backend="tide", fullgraph=True)
        for prompt, new, ids, mask in requests():
            batch = ids.shape[0]
            before_tokens, before_layers = stats.total_tokens, stats.layers_executed
            cache = StaticCache(config=model.config, max_cache_len=prompt + new)
            positions = position_ids_from_mask(mask)
            step, seq = ids, ids
            with torch.no_grad():
                for _ in range(new):
                    out = fn(input_ids=step, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
                    step = out.logits[:, -1:].argmax(-1)
                    seq = torch.cat([seq, step], 1)
                    mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
                    positions = positions[:, -1:] + 1
            ref = R.generate(model, routers, ids, new, attention_mask=mask[:, :prompt],
                             eos_token_id=-1, cache="static")
            where = f"prompt {prompt}, new {new}, batch {batch}"
            assert torch.equal(seq, ref.sequences), where
            # Every position of every step counts here (padding included).
            tokens = stats.total_tokens - before_tokens
            assert tokens == batch * (prompt + new - 1), where
            executed = stats.layers_executed - before_layers
            assert executed == LAYERS * batch * prompt + EXIT_DEPTH * batch * (new - 1), where
    finally:
        tide_compile.detach(model)
    # The documented bound for a loop without buckets: Dynamo's automatic dynamic shapes
    # (a graph recompiles once per size that first changes, then holds it symbolic).
    assert sum(B.COMPILE_COUNTS.values()) - compiles <= 8


def test_bench_decode_smoke(tmp_path, monkeypatch):
    """benchmarks/bench_decode.py runs on CPU in its tiny modes: interleaved Inductor/tide
    pairs, and mixed traffic (FX graphs: a smoke run of the loops, not a measurement)."""
    import importlib.util
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench_decode", os.path.join(root, "benchmarks", "bench_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = ["bench_decode.py", "--tiny", "--no-inductor", "--interval", "2"]
    pairs, traffic = tmp_path / "pairs.json", tmp_path / "traffic.json"
    monkeypatch.setattr(sys, "argv", common + [
        "--steps", "4", "--warmup", "1", "--prompt", "8", "--pairs", "2",
        "--rows", "inductor,exits", "--depths", "4", "--out", str(pairs)])
    bench.main()
    monkeypatch.setattr(sys, "argv", common + [
        "--traffic", "--exit-depth", "4", "--requests", "3", "--prompt-range", "4,20",
        "--new-range", "3,6", "--out", str(traffic)])
    bench.main()
    gen = tmp_path / "generate.json"
    monkeypatch.setattr(sys, "argv", common + [
        "--steps", "4", "--prompt", "8", "--pairs", "1", "--loop", "generate",
        "--rows", "inductor,exits", "--depths", "4", "--out", str(gen)])
    bench.main()
    (paired,) = [r for r in json.loads(pairs.read_text())["rows"] if r["name"] == "tide_exit@4"]
    assert paired["pairs"] == 2 and paired["mean_layers_executed"] == 4.0
    lo, hi = paired["ratio_range"]
    assert lo <= paired["ratio_median"] <= hi
    (generated,) = [r for r in json.loads(gen.read_text())["rows"] if r["name"] == "tide_exit@4"]
    # through generate: the prompt step runs every layer, the 4 x 2 decode steps 4 each.
    # (ms_per_token is a difference of two timed generates: on a loaded 2-core machine,
    # with 4 steps, its sign is noise; only that it was measured is checked.)
    assert math.isfinite(generated["ms_per_token"]) and generated["mean_layers_executed"] < 8.0
    rows = {r["name"]: r for r in json.loads(traffic.read_text())["rows"]}
    assert set(rows) == {"inductor", "tide_never_exit", "tide_exit@4"}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["tide_exit@4"]["steps_by_strategy"]["skip"] > 0
    assert rows["tide_never_exit"]["mean_layers_executed"] == 8.0
    assert all(r["graphs_compiled_in_timed_pass"] == 0 for r in rows.values())


def test_finished_and_padding_rows_mirror_a_live_row(setup):
    """A row that stops at EOS, and the row that fills batch 3 up to its bucket of 4,
    compute exactly what a live row computes from then on (their cache rows end equal to
    it), so they never keep a step from skipping; the output equals the reference's."""
    model, routers = setup
    torch._dynamo.reset()
    for seed in range(20):  # a case where row 1 stops early and rows 0 and 2 never do
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 97, (3, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[2, :2] = 0
        free = R.generate(model, routers, ids, 6, attention_mask=mask, eos_token_id=-1,
                          pad_token_id=0, cache="static")
        new = free.sequences[:, 6:].tolist()
        eos = new[1][1]  # row 1 stops at its second new token
        if eos not in new[0] + new[2] + new[1][:1]:
            break
    else:
        pytest.fail("no seed gives a row that stops alone")
    fast = tide_compile.optimize(model, routers, kv="propagate", inductor=False)
    got = fast.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=eos,
                        pad_token_id=0)
    ref = R.generate(model, routers, ids, 6, attention_mask=mask, eos_token_id=eos,
                     pad_token_id=0, cache="static")
    assert torch.equal(got, ref.sequences)
    assert fast.tide_stats.exits_per_layer == ref.stats.exits_per_layer
    assert fast.tide_stats.steps_by_strategy == {"frozen": 1, "skip": 5}
    (bucket,) = fast._buckets.values()
    for layer in bucket.cache.layers:  # rows 1 and 3 mirror row 0, the first live row
        for t in (layer.keys, layer.values):
            # Same inputs, same batch; a CPU matmul may still round one row's product
            # differently in the last bit (seen: 1.5e-8 to 4.5e-8 on row 3).
            torch.testing.assert_close(t[1], t[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(t[3], t[0], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(t[2], t[0], atol=1e-3)


def test_batch1_eos_read_one_step_late(setup):
    """At batch 1 generate reads the EOS flag one step late (the host never waits for the
    GPU between steps): the row that ended runs one more step, whose token is dropped and
    not counted. Tokens and counts equal the reference's; the decode steps skipped."""
    model, routers = setup
    torch._dynamo.reset()
    for seed in range(20):  # a prompt whose first three new tokens differ
        ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(seed))
        free = R.generate(model, routers, ids, 8, eos_token_id=-1, pad_token_id=0,
                          cache="static").sequences[0, 5:].tolist()
        if len(set(free[:3])) == 3:
            break
    else:
        pytest.fail("no seed gives three distinct first tokens")
    eos, stop = free[2], 3  # the row stops at its third new token
    fast = tide_compile.optimize(model, routers, kv="propagate", inductor=False)
    got = fast.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    ref = R.generate(model, routers, ids, 8, eos_token_id=eos, pad_token_id=0,
                     cache="static")
    assert torch.equal(got, ref.sequences) and got.shape[1] == 5 + stop
    stats = fast.tide_stats
    assert stats.exits_per_layer == ref.stats.exits_per_layer
    assert stats.total_tokens == ref.stats.total_tokens == 5 + stop - 1
    assert stats.steps_by_strategy == {"frozen": 1, "skip": stop - 1}
    # the decode tokens ran EXIT_DEPTH layers, the prompt all of them
    assert stats.layers_executed == 5 * LAYERS + (stop - 1) * EXIT_DEPTH


def test_batch2_row_ends_first(setup):
    """At batch 2 (no padding row) a row that stops at EOS mirrors the other one: the
    source row is a view of the cache tensor it is copied into (index_copy_ refused that
    overlap until the source was cloned). Tokens equal the reference's; decode steps skip."""
    model, routers = setup
    torch._dynamo.reset()
    for seed in range(30):  # row 1 stops at its second new token, row 0 never does
        ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(seed))
        new = R.generate(model, routers, ids, 6, eos_token_id=-1, pad_token_id=0,
                         cache="static").sequences[:, 6:].tolist()
        eos = new[1][1]
        if eos not in new[0] + new[1][:1]:
            break
    else:
        pytest.fail("no seed gives a row that stops alone")
    fast = tide_compile.optimize(model, routers, kv="propagate", inductor=False)
    got = fast.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    ref = R.generate(model, routers, ids, 6, eos_token_id=eos, pad_token_id=0,
                     cache="static")
    assert torch.equal(got, ref.sequences)
    assert fast.tide_stats.exits_per_layer == ref.stats.exits_per_layer
    assert fast.tide_stats.steps_by_strategy == {"frozen": 1, "skip": 5}


def test_bench_decode_loop_unguarded():
    """``bench_decode.decode_loop(..., unguarded=True)`` (``bench_tp --unguarded``): the
    first decode step is guarded in full, the rest run with Dynamo checking only the
    guards that tell its cache entries apart; the stance is restored after the loop and
    the steps compute what guarded ones do."""
    import importlib.util
    import os

    from torch._dynamo import eval_frame

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench_decode", os.path.join(root, "benchmarks", "bench_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch._dynamo.reset()
    model = model_for("llama", 4)
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    seen, tokens = [], []

    def fn(**kwargs):
        seen.append(eval_frame._stance.skip_guard_eval_unsafe)
        out = compiled(**kwargs)
        tokens.append(out.logits[:, -1].argmax(-1).item())
        return out

    prompt = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        bench.decode_loop(fn, model, prompt, 5, cache, "cpu", False)
        guarded = tokens[:]
        seen.clear(), tokens.clear()
        bench.decode_loop(fn, model, prompt, 5, cache, "cpu", False, unguarded=True)
    assert seen == [False, True, True, True, True]
    assert tokens == guarded
    assert not eval_frame._stance.skip_guard_eval_unsafe
