"""Routers that read the exit head's confidence (issue 20): the ops, calibration, the router
file, the reference's exit rule, the compiled path (features computed in the graph: skip,
frozen, deferred generate, lossless) against the reference, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tide_compile
from tide_compile import RouterSet, TIDEError
from tide_compile import reference as R
from tide_compile.confidence import COLUMNS, candidate_logits, confidence_features, successor_table
from tide_compile.model_probe import probe
from tide_compile.routers import RouterFileError, TokenRouter

from test_calibration import FAST, lines, small_config, tok  # noqa: F401 (fixtures)
from tiny_models import make_model


@pytest.fixture(scope="module")
def calibrated(tok, lines):
    """A 4-layer Llama with rms+conf routers over exit projections, every layer a checkpoint."""
    model = make_model("llama", 4)
    cfg = small_config(exit_strategy="projection")
    routers = tide_compile.calibrate(model, tok, lines, cfg, projection_rank=8, seed=3,
                                     router_features="rms+conf", confidence_k=8, **FAST)
    return model, routers


def test_successor_table_rows():
    ids = torch.tensor([5, 5, 5, 5, 2, 2, 7])
    top1 = torch.tensor([3, 3, 4, 9, 4, 1, 3])
    t = successor_table(ids, top1, vocab=10, k=3)
    assert t.shape == (10, 3) and t.dtype == torch.int64
    # Overall order: 3 (3x), 4 (2x), then 1 and 9 (1x each, by id).
    assert t[5].tolist() == [3, 4, 9]        # its own counts, ties by id
    assert t[2].tolist() == [1, 4, 3]        # 1 and 4 once each, then the most predicted overall
    assert t[7].tolist() == [3, 4, 1]
    assert t[0].tolist() == [3, 4, 1]        # unseen input id: the overall order
    for row in t.tolist():
        assert len(set(row)) == 3
    # Fewer distinct predictions than k: filled with the lowest unused ids.
    assert successor_table(torch.tensor([0]), torch.tensor([6]), vocab=8, k=4)[0].tolist() == [6, 0, 1, 2]
    with pytest.raises(ValueError, match="k must be"):
        successor_table(ids, top1, vocab=10, k=11)


def test_candidate_logits_and_features_match_full_logits():
    torch.manual_seed(0)
    weight, bias = torch.randn(50, 16), torch.randn(50)
    x = torch.randn(3, 4, 16)
    idx = torch.randint(0, 50, (3, 4, 6))
    full = x @ weight.T + bias
    z = candidate_logits(weight, x, idx, bias)
    torch.testing.assert_close(z, full.gather(-1, idx), rtol=1e-5, atol=1e-5)
    f = confidence_features(z)
    assert f.shape == (3, 4, len(COLUMNS))
    p = torch.softmax(z, -1)
    top = p.sort(-1, descending=True).values
    zs = z.sort(-1, descending=True).values
    torch.testing.assert_close(f[..., 0], top[..., 0])
    torch.testing.assert_close(f[..., 1], top[..., 0] - top[..., 1])
    torch.testing.assert_close(f[..., 2], -(p * p.log()).sum(-1) / math.log(6))
    torch.testing.assert_close(f[..., 3], zs[..., 0])
    torch.testing.assert_close(f[..., 4], zs[..., 0] - zs[..., 1])


def test_calibrated_routers_read_features_and_round_trip(calibrated, tmp_path):
    model, routers = calibrated
    assert routers.features == ("rms", "conf") and routers.confidence_k == 8
    assert routers.calibration["router_features"] == "rms+conf"
    assert routers.successor.shape == (97, 8)
    p = probe(model)
    c = routers.checkpoint_layers[0]
    h = torch.randn(2, 5, 32)
    ids = torch.randint(0, 97, (2, 5))
    f = routers.confidence(c, h, ids, p)
    assert f.shape == (2, 5, len(COLUMNS))
    score = routers.score(c, h, f)
    # The features really enter the score: zero the feature weights and it changes.
    saved = routers.router(c).feat.weight.detach().clone()
    with torch.no_grad():
        routers.router(c).feat.weight.zero_()
    assert not torch.allclose(routers.score(c, h, f), score)
    with torch.no_grad():
        routers.router(c).feat.weight.copy_(saved)
    with pytest.raises(TIDEError, match="reads confidence features"):
        routers.score(c, h)

    path = tmp_path / "conf.tide"
    routers.save(path)
    loaded = RouterSet.load(path, model)
    assert loaded.features == ("rms", "conf") and torch.equal(loaded.successor, routers.successor)
    assert loaded.successor.dtype == torch.int64
    assert _read(path)[1]["candidates.successor"].dtype == torch.int32  # half the bytes on disk
    for key, value in routers.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded.score(c, h, loaded.confidence(c, h, ids, p)), score)


def test_reference_exits_where_the_features_say(calibrated):
    """Under kv="deferred" every h_c is the plain model's, so each token's exit is the first
    checkpoint whose score, computed by hand from the plain states, passes the threshold."""
    model, routers = calibrated
    p = probe(model)
    torch.manual_seed(1)
    ids = torch.randint(2, 97, (3, 12))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        scores = torch.stack([routers.score(c, hidden[c + 1],
                                            routers.confidence(c, hidden[c + 1], ids, p))
                              for c in routers.checkpoint_layers])
    threshold = float(scores.flatten().quantile(0.6))
    out = R.forward(model, routers, ids, exit_threshold=threshold, kv="deferred")
    passed = scores > threshold
    first = torch.where(passed.any(0), passed.float().argmax(0), -1)
    want = torch.where(first >= 0, torch.tensor(routers.checkpoint_layers)[first.clamp_min(0)], -1)
    assert torch.equal(out.exit_layers, want)
    assert 0 < int((want >= 0).sum()) < want.numel()  # some tokens exit, some do not
    with torch.no_grad():
        for b, s in zip(*torch.nonzero(want >= 0, as_tuple=True)):
            c = int(want[b, s])
            expect = p.head(routers.exit_state(c, hidden[c + 1][b, s]))
            torch.testing.assert_close(out.logits[b, s], expect, rtol=1e-4, atol=1e-4)


def test_compact_strategy_refuses_feature_routers(calibrated):
    """Compaction does not gather the features' inputs for its continuing rows: an explicit
    strategy="compact" is an error, and auto never compacts with these routers."""
    from tide_compile.options import parse_options

    model, routers = calibrated
    with pytest.raises(TIDEError, match="never compact"):
        tide_compile.optimize(model, routers, inductor=False, kv="propagate", strategy="compact")
    with pytest.raises(TIDEError, match="never compact"):
        tide_compile.optimize(model, routers, inductor=False, kv="propagate", compaction_threshold=0.5)
    assert parse_options({"routers": routers}).compaction == 0.0


def test_files_without_features_still_load(tmp_path):
    # The shipped routers were written before router features existed.
    from tide_compile.demo import SHIPPED_ROUTERS

    for name, path in SHIPPED_ROUTERS.items():
        assert RouterSet.load(path).features == ("rms",), name
    model = make_model("llama", 4)
    path = tmp_path / "old.tide"
    RouterSet.forced(model, 1, small_config(checkpoint_interval=2)).save(path)
    meta, tensors = _read(path)
    del meta["router"]["features"]  # as a file from before router features
    _write(path, meta, tensors)
    loaded = RouterSet.load(path, model)
    assert loaded.features == ("rms",) and loaded.successor is None


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["tide_compile"]), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"tide_compile": json.dumps(meta)})


def test_bad_feature_files_and_arguments(calibrated, tok, lines, tmp_path):
    model, routers = calibrated
    path = tmp_path / "bad.tide"
    routers.save(path)
    meta, tensors = _read(path)
    bad = dict(tensors)
    bad["candidates.successor"] = bad["candidates.successor"].clone()
    bad["candidates.successor"][0, 0] = 500
    meta.pop("tensors_sha256", None)
    _write(path, meta, bad)
    with pytest.raises(RouterFileError, match="outside the vocabulary"):
        RouterSet.load(path)
    # The twelfth session's files stored the table as int64: they still load.
    _write(path, meta, {**tensors, "candidates.successor": tensors["candidates.successor"].long()})
    assert torch.equal(RouterSet.load(path).successor, routers.successor)
    _write(path, meta, {**tensors, "candidates.successor": tensors["candidates.successor"].float()})
    with pytest.raises(RouterFileError, match="token ids"):
        RouterSet.load(path)
    _write(path, meta, {**tensors, "routers.1.up.bias": torch.ones(1, dtype=torch.int32)})
    with pytest.raises(RouterFileError, match="router weights are floats"):
        RouterSet.load(path)
    meta["router"]["features"] = ["rms", "entropy"]
    _write(path, meta, tensors)
    with pytest.raises(RouterFileError, match="router.features"):
        RouterSet.load(path)

    info = RouterSet.describe(model)
    plain = {1: TokenRouter(32, 4)}
    with pytest.raises(TIDEError, match="successor table is given exactly"):
        RouterSet(plain, model_info=info, config=small_config(), successor=routers.successor)
    with pytest.raises(TIDEError, match="successor table is given exactly"):
        RouterSet({1: TokenRouter(32, 4, feature_dim=len(COLUMNS))}, model_info=info,
                  config=small_config())
    with pytest.raises(TIDEError, match="reads no features"):
        plain[1](torch.randn(2, 32), torch.randn(2, len(COLUMNS)))
    with pytest.raises(ValueError, match="router_features"):
        tide_compile.calibrate(model, tok, lines, small_config(), router_features="conf", **FAST)
    with pytest.raises(ValueError, match="confidence_k"):
        tide_compile.calibrate(model, tok, lines, small_config(), router_features="rms+conf",
                               confidence_k=500, **FAST)


# ---------------------------------------------------------------------------- compiled path
def random_conf_routers(model, seed: int, k: int = 6, scale: float = 4.0, projections: bool = False):
    """Random routers that read confidence features, over a random successor table."""
    from tide_testing import CFG

    from tide_compile.routers import ExitProjection

    g = torch.Generator().manual_seed(seed)
    info = RouterSet.describe(model)
    routers, projs = {}, {}
    for c in CFG.checkpoint_layers(info["num_layers"]):
        r = TokenRouter(info["hidden_size"], CFG.router_bottleneck_dim, feature_dim=len(COLUMNS))
        with torch.no_grad():
            for prm in r.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * scale / prm.shape[-1] ** 0.5)
        routers[c] = r
        if projections:
            e = ExitProjection(info["hidden_size"], 4)
            with torch.no_grad():
                for prm in e.parameters():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
            projs[c] = e
    successor = torch.randint(0, info["vocab_size"], (info["vocab_size"], k), generator=g)
    return RouterSet(routers, model_info=info, config=CFG, successor=successor,
                     exit_projections=projs or None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["skip", "frozen"])
@pytest.mark.parametrize("projections", [False, True])
def test_compiled_equals_reference_with_features(arch, strategy, projections):
    """The backend computes the features in the graph (the final norm copied onto each
    checkpoint's state, k rows of lm_head): outputs and exits equal the reference, and the
    skip strategy really stops early."""
    from tide_compile import ExitStats
    from tide_testing import compiled, model_for, run_both, skip_layers_executed

    model = model_for(arch)
    routers = random_conf_routers(model, 11, projections=projections)
    fn, stats = compiled(model, routers, exit_threshold=0.5, strategy=strategy)
    steps = run_both(model, routers, fn, "static", 2, 3, 3, 0.5, 5)
    ref = ExitStats(4)
    ref.record(torch.cat(steps, 1))
    assert stats.exits_per_layer == ref.exits_per_layer and ref.exit_rate > 0
    expected = sum(e.numel() * 4 if strategy == "frozen" else skip_layers_executed(e, 4) for e in steps)
    assert stats.layers_executed == expected
    if strategy == "skip":
        assert stats.layers_executed < 4 * stats.total_tokens  # some steps skipped layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_optimize_generate_with_features_equals_reference(arch):
    """optimize's default (kv="deferred") generate: the deferred reference's tokens and
    exits, left-padded batch of 2, decode steps that skip."""
    from tide_testing import model_for

    torch._dynamo.reset()
    model = model_for(arch)
    routers = random_conf_routers(model, 21, projections=arch == "llama")
    ids = torch.tensor([[0, 0, 5, 9, 13], [7, 3, 8, 2, 11]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    fast = tide_compile.optimize(model, routers, inductor=False, exit_threshold=0.5, max_pending=2)
    got = fast.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=-1, pad_token_id=0)
    ref = R.generate(model, routers, ids, 8, attention_mask=mask, exit_threshold=0.5,
                     eos_token_id=-1, pad_token_id=0, kv="deferred")
    assert torch.equal(got, ref.sequences)
    stats = fast.tide_stats
    assert stats.exits_per_layer == ref.stats.exits_per_layer and ref.stats.exit_rate > 0
    assert stats.steps_by_strategy.get("deferred", 0) == 7


def test_lossless_with_features_equals_plain_greedy():
    """mode="lossless": feature routers draft, the deep layers verify: HF greedy's tokens."""
    from tiny_models import make_model

    torch._dynamo.reset()
    model = make_model("llama", num_layers=4, seed=11)
    routers = random_conf_routers(model, 31)
    fast = tide_compile.optimize(model, routers, inductor=False, mode="lossless",
                                 exit_threshold=0.3, adaptive=False)
    for prompt in (6, 2):
        ids = torch.arange(3, 3 + prompt)[None]
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(ids, max_new_tokens=12, pad_token_id=0), want)
    assert fast.lossless_stats.drafted > 0, fast.lossless_stats.summary()


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_compile_serves_many_shapes_with_features(arch, kernels):
    """One compiled forward with feature routers (default strategy), fed prompts of several
    lengths and batch sizes in one process: every step equals the reference, and the
    decode steps skipped layers. ``kernels="triton"``: the graph routes through
    ``tide::route_conf_fused`` (its reference body on the CPU)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tide_compile import ExitStats
    from tide_testing import compiled, model_for, run_both

    model = model_for(arch)
    routers = random_conf_routers(model, 41)
    fn, stats = compiled(model, routers, exit_threshold=0.5, kernels=kernels)
    seen = ExitStats(4)
    shapes = set()

    @settings(max_examples=4, database=None, derandomize=True, deadline=None)
    @given(batch=st.integers(1, 3), prompt=st.integers(1, 6), seed=st.integers(0, 1000))
    def prop(batch, prompt, seed):
        shapes.add((batch, prompt))
        for e in run_both(model, routers, fn, "static", batch, prompt, 2, 0.5, seed):
            seen.record(e)

    prop()
    assert len({b for b, _ in shapes}) >= 2 and len({p for _, p in shapes}) >= 2, shapes
    assert stats.exits_per_layer == seen.exits_per_layer and seen.exit_rate > 0
    assert stats.layers_executed < 4 * stats.total_tokens  # layers were really skipped


@pytest.mark.parametrize("exit_at", [None, 1])
def test_forced_routers_with_features_compute_them_and_keep_the_forced_exits(exit_at, monkeypatch):
    """``RouterSet.forced(..., confidence_k=k)`` (the benchmarks' feature-cost rows): the
    compiled graph computes the features at every checkpoint of every step (a spy on the
    feature route), and the exits are the forced ones, equal to the reference."""
    from tide_compile.passes import insert
    from tide_testing import CFG, compiled, model_for, run_both

    calls = []
    real = insert.route_features_reference

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(insert, "route_features_reference", spy)
    model = model_for("llama")
    routers = RouterSet.forced(model, exit_at, CFG, confidence_k=5)
    assert routers.features == ("rms", "conf") and routers.confidence_k == 5
    assert torch.equal(routers.successor[3], torch.tensor([4, 5, 6, 7, 8]))
    fn, stats = compiled(model, routers, exit_threshold=0.5, strategy="skip")
    steps = run_both(model, routers, fn, "static", 2, 3, 2, 0.5, 3)
    depth = 4 if exit_at is None else exit_at + 1
    assert stats.layers_executed == depth * stats.total_tokens and stats.total_tokens == 2 * 5
    if exit_at is not None:
        assert all(bool((e == exit_at).all()) for e in steps)
    checkpoints = len(CFG.checkpoint_layers(4))
    # prefill + 2 decode steps; a forced exit at layer 1 leaves no checkpoint after it to score
    per_step = checkpoints if exit_at is None else CFG.checkpoint_layers(4).index(exit_at) + 1
    assert len(calls) == 3 * per_step


def test_forced_confidence_k_is_checked():
    from tide_testing import CFG, model_for

    with pytest.raises(TIDEError, match="confidence_k"):
        RouterSet.forced(model_for("llama"), None, CFG, confidence_k=1)


def test_feature_top_two_equal_topk_with_ties():
    """The features take the top two by masked maxima (one fused reduction on CUDA), equal
    bit for bit to ``topk(2)``, also where logits tie."""
    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 64):
        z = torch.cat([torch.randn(40, k, generator=g) * 5,
                       torch.randint(-2, 2, (40, k), generator=g).float(),  # many ties
                       torch.full((1, k), 3.0)])
        f = confidence_features(z)
        logp = torch.log_softmax(z, -1)
        top_p, top_z = logp.exp().topk(2, -1).values, z.topk(2, -1).values
        assert torch.equal(f[:, 0], top_p[:, 0]) and torch.equal(f[:, 1], top_p[:, 0] - top_p[:, 1])
        assert torch.equal(f[:, 3], top_z[:, 0]) and torch.equal(f[:, 4], top_z[:, 0] - top_z[:, 1])
        assert (f[-1, [1, 4]] == 0).all()  # all tied: no margin


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_triton_kernels_route_features_through_the_fused_op(arch, monkeypatch):
    """``kernels="triton"``: the graph hands the candidate logits to ``tide::route_conf_fused``
    (one launch on CUDA, the features in registers; here its CPU body, spied), and the
    outputs and exits equal the reference."""
    from tide_compile import ExitStats
    from tide_compile.kernels import route_triton as RT
    from tide_testing import compiled, model_for, run_both, skip_layers_executed

    calls = []
    real = RT.route_conf_reference

    def spy(h, zc, *rest):
        calls.append(zc.shape[-1])
        return real(h, zc, *rest)

    monkeypatch.setattr(RT, "route_conf_reference", spy)
    model = model_for(arch)
    routers = random_conf_routers(model, 11)
    fn, stats = compiled(model, routers, exit_threshold=0.5, strategy="skip", kernels="triton")
    steps = run_both(model, routers, fn, "static", 2, 3, 3, 0.5, 5)
    ref = ExitStats(4)
    ref.record(torch.cat(steps, 1))
    assert stats.exits_per_layer == ref.exits_per_layer and ref.exit_rate > 0
    assert stats.layers_executed == sum(skip_layers_executed(e, 4) for e in steps)
    assert calls and set(calls) == {routers.confidence_k}


def test_more_candidates_than_the_kernel_holds_take_the_composite(monkeypatch):
    """Past ``MAX_CONF_CANDIDATES`` the insert pass emits the composite feature route even
    with ``kernels="triton"`` (here the limit is lowered below the routers' k = 6)."""
    from tide_compile.kernels import route_triton as RT
    from tide_compile.passes import insert
    from tide_testing import compiled, model_for, run_both

    fused, composite = [], []
    real_fused, real_composite = RT.route_conf_reference, insert.route_features_reference
    monkeypatch.setattr(RT, "route_conf_reference",
                        lambda *a: fused.append(1) or real_fused(*a))
    monkeypatch.setattr(insert, "route_features_reference",
                        lambda *a: composite.append(1) or real_composite(*a))
    monkeypatch.setattr(insert, "MAX_CONF_CANDIDATES", 4)
    model = model_for("llama")
    routers = random_conf_routers(model, 11)
    fn, _ = compiled(model, routers, exit_threshold=0.5, strategy="skip", kernels="triton")
    run_both(model, routers, fn, "static", 1, 3, 1, 0.5, 5)
    assert composite and not fused
