"""GPU tests (marked gpu; skipped without CUDA): Inductor-compiled segments captured into
CUDA graphs, against the reference, on tiny models."""

import pytest
import torch
from transformers import StaticCache

import tide_compile
from tide_compile import ExitStats, RouterSet, TIDEConfig
from tide_compile import reference as R
from tide_compile.runtime.cudagraphs import GraphedSkipRunner
from tide_testing import (assert_caches_equal, dynamic_ids, random_routers, record_instances,
                          splitting_threshold)
from tiny_models import make_model

pytestmark = pytest.mark.gpu
CFG = TIDEConfig(checkpoint_interval=2, router_bottleneck_dim=8)
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


def _routers(model, seed):
    return random_routers(model, seed, config=CFG).to("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["forced", "never", "random"])
def test_graphed_skip_equals_reference(dtype, kind):
    if kind == "random" and dtype != torch.float32:
        pytest.skip("bf16 rounding can flip a score across the threshold: exits would differ")
    torch._dynamo.reset()
    model = make_model("llama", num_layers=6, dtype=dtype).cuda()
    if kind == "random":
        routers = _routers(model, 3)
    else:
        routers = RouterSet.forced(model, exit_at=1 if kind == "forced" else None, config=CFG)
    stats = ExitStats(6)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "exit_threshold": 0.5, "stats": stats})
    c_fast = StaticCache(config=model.config, max_cache_len=32)
    c_ref = StaticCache(config=model.config, max_cache_len=32)
    ids = torch.randint(2, 97, (1, 5), device="cuda")
    # Prefill eagerly through the reference semantics on both caches' paths.
    R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=0.5)
    out0 = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    tol = TOL[dtype]
    for step in range(8):
        nid = torch.randint(2, 97, (1, 1), device="cuda")
        out = fn(input_ids=nid, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, nid, CFG, past_key_values=c_ref, exit_threshold=0.5)
        torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=tol, atol=tol)
    del out0
    torch.testing.assert_close(c_fast.layers[5].keys.float(), c_ref.layers[5].keys.float(),
                               rtol=tol, atol=tol)
    if kind == "forced":
        assert stats.exits_per_layer.get(1, 0) >= 8


ARCHS7 = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3")


@pytest.mark.parametrize("arch", ARCHS7)
@pytest.mark.parametrize("strategy", ["auto", "frozen"])
def test_every_architecture_decodes_on_cuda(arch, strategy):
    """The seven architectures of the backend's CPU suite on CUDA with the defaults
    (Inductor, CUDA graphs, hand kernels, stacked KV-fill): a static prefill, then
    captured one-token steps, equal to the reference in float32; random routers at a
    threshold where tokens exit."""
    torch._dynamo.reset()
    model = make_model(arch, num_layers=6).cuda()
    routers = _routers(model, 11)
    stats = ExitStats(6)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "exit_threshold": 0.5, "stats": stats,
                                "strategy": strategy})
    c_fast = StaticCache(config=model.config, max_cache_len=32)
    c_ref = StaticCache(config=model.config, max_cache_len=32)
    ids = torch.randint(2, 97, (1, 5), device="cuda")
    out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=0.5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=2e-3, atol=2e-3)
    for _ in range(8):
        nid = ref.logits[:, -1:].argmax(-1)
        out = fn(input_ids=nid, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, nid, CFG, past_key_values=c_ref, exit_threshold=0.5)
        torch.testing.assert_close(out.logits, ref.logits, rtol=2e-3, atol=2e-3)
    for a, b in zip(c_fast.layers, c_ref.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=2e-3, atol=2e-3)
    assert stats.total_tokens == 5 + 8


def test_frozen_decode_is_one_captured_graph(monkeypatch):
    """strategy="frozen" on CUDA: one-token steps replay the whole inserted graph as one
    CUDA graph (no host read); equal to the reference, every layer counted."""
    torch._dynamo.reset()
    model = make_model("llama", num_layers=6).cuda()
    routers = _routers(model, 3)
    stats = ExitStats(6)
    runners = record_instances(monkeypatch, GraphedSkipRunner)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "exit_threshold": 0.5, "stats": stats,
                                "strategy": "frozen"})
    c_fast = StaticCache(config=model.config, max_cache_len=32)
    c_ref = StaticCache(config=model.config, max_cache_len=32)
    ids = torch.randint(2, 97, (2, 5), device="cuda")
    fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
    R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=0.5)
    for _ in range(8):
        nid = torch.randint(2, 97, (2, 1), device="cuda")
        out = fn(input_ids=nid, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, nid, CFG, past_key_values=c_ref, exit_threshold=0.5)
        torch.testing.assert_close(out.logits, ref.logits, rtol=2e-3, atol=2e-3)
    (runner,) = runners
    assert runner.captured and runner.strategy == "frozen" and len(runner.graphs) == 1
    assert stats.mean_layers_executed == 6.0


def test_optimize_generate_cuda_matches_reference():
    torch._dynamo.reset()
    model = make_model("llama", num_layers=6).cuda()
    routers = _routers(model, 5)
    fast = tide_compile.optimize(model, routers, exit_threshold=0.5, kv="propagate")
    ids = torch.randint(2, 97, (1, 6), device="cuda")
    for _ in range(2):  # the second call reuses the cache and the captured graphs
        got = fast.generate(ids, max_new_tokens=10, pad_token_id=0)
    ref = R.generate(model, routers, ids, 10, pad_token_id=0, exit_threshold=0.5, cache="static")
    assert torch.equal(got, ref.sequences)


def test_generate_traffic_on_cuda():
    """optimize(...).generate with the CUDA defaults (Inductor, CUDA graphs, hand kernels,
    stacked KV-fill) over prompt lengths, new-token counts and batch sizes (left padded):
    tokens equal the reference, every decode step skips (forced exit after 2 of 6 layers),
    at most two graphs per bucket. The prompt step is marked dynamic: the shape the
    ConstraintViolationError of issue 16 came from."""
    from tide_compile import backend as B

    torch._dynamo.reset()
    model = make_model("llama", num_layers=6).cuda()
    routers = RouterSet.forced(model, exit_at=1, config=CFG)
    fast = tide_compile.optimize(model, routers, kv="propagate")
    compiles = sum(B.COMPILE_COUNTS.values())
    g = torch.Generator().manual_seed(0)
    for prompt in (3, 6, 11):
        for new in (3, 6):
            for batch in (1, 3):
                ids = torch.randint(3, 97, (batch, prompt), generator=g).cuda()
                mask = torch.ones_like(ids)
                mask[-1, :1] = 0
                steps = dict(fast.tide_stats.steps_by_strategy)
                got = fast.generate(ids, max_new_tokens=new, attention_mask=mask,
                                    pad_token_id=0, eos_token_id=-1)
                ref = R.generate(model, routers, ids, new, attention_mask=mask, pad_token_id=0,
                                 eos_token_id=-1, cache="static")
                assert torch.equal(got, ref.sequences), (prompt, new, batch)
                skipped = fast.tide_stats.steps_by_strategy.get("skip", 0) - steps.get("skip", 0)
                assert skipped == new - 1
    assert sum(B.COMPILE_COUNTS.values()) - compiles <= 2 * len(fast.cache_memory())
    assert all(b.direct is not None for b in fast._buckets.values())


def test_failed_capture_falls_back_uncaptured(monkeypatch):
    """A capture that fails (here: every torch.cuda.graph raises) gives one warning naming
    why, restores what the warm-up wrote, and the steps run uncaptured, still equal to
    the reference and still skipping (issue 21: "if capture fails, say why and fall
    back")."""
    torch._dynamo.reset()
    model = make_model("llama", num_layers=4).cuda()
    routers = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    runners = record_instances(monkeypatch, GraphedSkipRunner)

    class Refused:
        def __init__(self, *a, **k):
            raise RuntimeError("capture refused by the test")

    monkeypatch.setattr(torch.cuda, "graph", Refused)
    fn = torch.compile(model.forward, backend="tide", options={"routers": routers})
    cfg = TIDEConfig(checkpoint_interval=2)
    cache = StaticCache(config=model.config, max_cache_len=16)
    c_ref = StaticCache(config=model.config, max_cache_len=16)
    ids = torch.tensor([[3, 4]], device="cuda")
    fn(input_ids=ids, past_key_values=cache, use_cache=True)
    R.forward(model, routers, ids, cfg, past_key_values=c_ref)
    with pytest.warns(RuntimeWarning, match="capture refused by the test"):
        for t in range(5):
            nid = torch.tensor([[5 + t]], device="cuda")
            out = fn(input_ids=nid, past_key_values=cache, use_cache=True)
            ref = R.forward(model, routers, nid, cfg, past_key_values=c_ref)
            torch.testing.assert_close(out.logits, ref.logits, rtol=2e-3, atol=2e-3)
    failed = [r for r in runners if r.capture_error]
    assert failed and not any(r.captured for r in runners)
    runner = failed[-1]  # the decode step's
    assert "capture refused" in runner.capture_error
    assert runner.runner.last_segments_run == 1  # still skipping, uncaptured
    for la, lb in zip(cache.layers, c_ref.layers):  # the warm-up's writes were undone
        torch.testing.assert_close(la.keys, lb.keys, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(la.values, lb.values, rtol=2e-3, atol=2e-3)


def test_runner_is_graphed_on_cuda(monkeypatch):
    torch._dynamo.reset()
    model = make_model("llama", num_layers=4).cuda()
    routers = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    runners = record_instances(monkeypatch, GraphedSkipRunner)
    fn = torch.compile(model.forward, backend="tide", options={"routers": routers})
    cache = StaticCache(config=model.config, max_cache_len=16)
    fn(input_ids=torch.tensor([[3, 4]], device="cuda"), past_key_values=cache, use_cache=True)
    for t in range(4):
        fn(input_ids=torch.tensor([[5 + t]], device="cuda"), past_key_values=cache,
           use_cache=True)
    assert runners and runners[0].captured
    assert runners[0].runner.last_segments_run == 1
    # stack_kv defaults on here (CUDA, Inductor, skip): the KV-fill's projections stacked.
    from tide_compile.passes._fx import target_name
    names = [target_name(n) for g in runners[0].runner.kv_fills.values()
             for n in g.gm.graph.nodes]
    assert "stacked_linear" in names


def test_compact_prefill_cuda_equals_reference():
    """Strategy compact with Inductor on CUDA (dynamic-length pieces compiled once)."""
    torch._dynamo.reset()
    model = make_model("llama", num_layers=6).cuda()
    routers = _routers(model, 5)
    ids = dynamic_ids(2, 24, 1).cuda()
    torch._dynamo.mark_dynamic(ids, 1)

    def cache():
        c = StaticCache(config=model.config, max_cache_len=40)
        model(input_ids=ids[:, :1], past_key_values=c, use_cache=True)
        c.reset()
        return c

    threshold = splitting_threshold(model, routers, ids, CFG)
    stats = ExitStats(6)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "strategy": "compact", "stats": stats,
                                "compaction_threshold": 1.0, "exit_threshold": threshold})
    c_fast, c_ref = cache(), cache()
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=c_fast, use_cache=True)
        ref = R.forward(model, routers, ids, CFG, past_key_values=c_ref, exit_threshold=threshold)
    torch.testing.assert_close(out.logits, ref.logits, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    assert_caches_equal(c_fast, c_ref)
    assert stats.layers_executed < ids.numel() * 6  # the later layers ran fewer tokens


def test_optimize_generate_compacts_on_cuda(monkeypatch):
    from tide_compile.runtime.compact import CompactRunner

    model = make_model("qwen2", num_layers=6).cuda()
    routers = _routers(model, 4)
    ids = torch.randint(2, 97, (2, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    seen = []
    original = CompactRunner._compact

    def spy(self, env, k, c, cont, b, s):
        seen.append((b, s))
        return original(self, env, k, c, cont, b, s)

    monkeypatch.setattr(CompactRunner, "_compact", spy)
    for threshold in (0.1, 0.3, 0.5, 0.7):
        torch._dynamo.reset()
        # compact_min_length 0: auto compacts this 20-token prompt too
        fast = tide_compile.optimize(model, routers, exit_threshold=threshold, kv="propagate",
                                     compaction_threshold=1.0, compact_min_length=0)
        got = fast.generate(ids, max_new_tokens=6, attention_mask=mask, pad_token_id=0)
        ref = R.generate(model, routers, ids, 6, attention_mask=mask, pad_token_id=0,
                         exit_threshold=threshold, cache="static")
        assert torch.equal(got, ref.sequences)
    assert seen, "no threshold made the padded prefill compact"


def test_stats_count_device_exits_later_and_from_copies():
    stats = ExitStats(8)
    buf = torch.tensor([1, -1, 3, 1], device="cuda")
    stats.record(buf, layers_executed=20)
    buf.fill_(5)  # a CUDA-graph buffer rewritten by the next replay
    stats.record(buf[:2], layers_executed=12)
    assert stats.total_tokens == 6 and stats.layers_executed == 32
    assert stats.exits_per_layer == {1: 2, 3: 1, 5: 2}


@pytest.mark.parametrize("kind", ["forced", "random"])
def test_deferred_generate_on_cuda(kind, monkeypatch):
    """kv="deferred" with the CUDA defaults (Inductor, CUDA graphs, hand route kernel):
    tokens equal the deferred reference over prompt lengths and batch sizes (left padded),
    the decode runner is the captured one, and with forced exits every step stops at the
    checkpoint except the one in max_pending + 1 that runs the pending tokens deep."""
    torch._dynamo.reset()
    model = make_model("llama", num_layers=6).cuda()
    routers = (RouterSet.forced(model, exit_at=1, config=CFG) if kind == "forced"
               else _routers(model, 5))
    runners = record_instances(monkeypatch, GraphedSkipRunner)
    fast = tide_compile.optimize(model, routers, exit_threshold=0.5, kv="deferred", max_pending=3)
    g = torch.Generator().manual_seed(0)
    for prompt in (1, 6, 11):
        for batch in (1, 3):
            ids = torch.randint(3, 97, (batch, prompt), generator=g).cuda()
            mask = torch.ones_like(ids)
            if prompt > 1:
                mask[-1, :1] = 0
            before = fast.tide_stats.layers_executed
            tokens = fast.tide_stats.total_tokens
            got = fast.generate(ids, max_new_tokens=9, attention_mask=mask, pad_token_id=0,
                                eos_token_id=-1)
            ref = R.generate(model, routers, ids, 9, attention_mask=mask, pad_token_id=0,
                             eos_token_id=-1, exit_threshold=0.5, kv="deferred")
            assert torch.equal(got, ref.sequences), (prompt, batch)
            if kind == "forced":
                steps = 9 if prompt == 1 else 8
                deep = steps // 4
                real = int(mask.sum()) if prompt > 1 else 0
                executed = fast.tide_stats.layers_executed - before
                assert executed == 6 * real + batch * (2 * (steps - deep) + 6 * deep)
                assert fast.tide_stats.total_tokens - tokens == real + batch * steps
    assert any(r.captured and r.strategy == "deferred" for r in runners)


def test_probe_conditional_graph_if_node(tmp_path):
    """benchmarks/probe_conditional_graph.py on a small shape: where this torch has CUDA graph
    IF nodes, the captured graph equals eager with the device predicate true and false."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "probe_conditional_graph.py")
    spec = importlib.util.spec_from_file_location("probe_conditional_graph", path)
    probe_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe_mod)
    result = probe_mod.main(["--width", "256", "--n-a", "2", "--n-b", "2", "--reps", "3",
                             "--out", str(tmp_path / "if_node.json")])
    if not result["has_if_node"]:
        pytest.skip(f"torch {torch.__version__} has no CUDAGraph.begin_capture_to_if_node")
    assert result["correct"], result["checks"]
    assert set(result["ms"]) == {"graph_A", "graph_A+B", "if_node_pred_false", "if_node_pred_true",
                                 "host_read_pred_false", "host_read_pred_true"}


def test_feature_routers_generate_on_cuda():
    """Routers with confidence features under optimize's CUDA defaults (Inductor, CUDA
    graphs, kv="deferred"): the deferred reference's tokens and exits, with skipped layers."""
    from test_confidence import random_conf_routers

    torch._dynamo.reset()
    model = make_model("llama", num_layers=4, seed=3).cuda()
    routers = random_conf_routers(model, 21, projections=True).to("cuda")
    fast = tide_compile.optimize(model, routers, exit_threshold=0.5, max_pending=2)
    ids = torch.randint(2, 97, (2, 5), device="cuda")
    for _ in range(2):  # the second call replays the captured graphs
        got = fast.generate(ids, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    ref = R.generate(model, routers, ids, 10, exit_threshold=0.5, eos_token_id=-1,
                     pad_token_id=0, kv="deferred", cache="static")
    assert torch.equal(got, ref.sequences)
    assert ref.stats.exit_rate > 0
    assert fast.tide_stats.steps_by_strategy.get("deferred", 0) > 0
