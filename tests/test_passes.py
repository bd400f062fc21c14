"""Graph passes (layers, segment, kv_fill) on real Dynamo graphs of tiny HF models.

Graphs come from a recording backend (tests/graph_capture.py), never Inductor: prefill and
two decode steps with a StaticCache and with a DynamicCache (whose second decode step is
the dynamic-shape recompile). Every check runs the graphs on the real inputs of each call.

References, built independently of the passes under test:
- segments: the original graph itself;
- KV-fill: the original graph with each skipped layer's input replaced by ``h`` (every op
  still there, no dead-code removal), itself checked against the eager model with
  forward pre-hooks that feed ``h`` into those layers;
- head: the eager model's ``lm_head(final_norm(h))`` (model_probe).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph_capture import capture, tensors_equal
from tiny_models import make_model
from tide_compile.model_probe import probe
from tide_compile.passes import KV_FILL, LAYERS, SEGMENT, PassContext, PassError, run_passes
from tide_compile.passes import _fx
from tide_compile.passes.kv_fill import kv_fill_graph
from tide_compile.passes.layers import META_KEY, LayerInfo, _layer_entries, rank
from tide_compile.passes.segment import split

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3")
CACHES = ("static", "dynamic")
NUM_LAYERS = 4

# Matmuls a KV-fill layer keeps: K and V projections, or the fused QKV projection.
KV_MATMULS = {
    "gpt2": ["attn.c_attn"],
    "gpt_neox": ["attention.query_key_value"],
    "phi3": ["self_attn.qkv_proj"],
}
DEFAULT_KV_MATMULS = ["self_attn.k_proj", "self_attn.v_proj"]


@functools.lru_cache(maxsize=None)
def captured(arch: str, cache: str, prompt_len: int = 5, batch: int = 1):
    model = make_model(arch, NUM_LAYERS)
    return model, probe(model), capture(model, cache, prompt_len=prompt_len, batch=batch)


def context(pr, cuts) -> PassContext:
    return PassContext.from_probe(pr, cuts)


#: The analysis passes on a graph without exits inserted.
ANALYSIS_PASSES = (LAYERS, SEGMENT, KV_FILL)


def layer_info(gm, pr) -> LayerInfo:
    return run_passes(gm, context(pr, [0]), [LAYERS]).layer_info


# ---------------------------------------------------------------------------- references


def replaced_graph(gm: fx.GraphModule, info: LayerInfo, layers) -> fx.GraphModule:
    """``gm`` with every read of layer l's input by a node of layer l (l in ``layers``)
    reading a new last input ``h`` instead; nothing removed."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    src = list(gm.graph.nodes)
    for n in src:
        if n.op == "placeholder":
            env[n] = g.node_copy(n, env.__getitem__)
    h = g.placeholder("h_replacement")
    targets = {info.layer_inputs[l]: l for l in layers}
    for n in src:
        if n.op == "placeholder":
            continue
        tag = n.meta.get(META_KEY)

        def arg(a, tag=tag):
            return h if targets.get(a, -1) == tag else env[a]

        env[n] = g.node_copy(n, arg)
    return fx.GraphModule(gm, g)


def eager_logits_with_inputs(model, pr, call, layers, h) -> torch.Tensor:
    """The eager model's logits when layers in ``layers`` receive ``h`` as their input."""

    def hook(_mod, args, kwargs):
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handles = [pr.layers[l].register_forward_pre_hook(hook, with_kwargs=True) for l in layers]
    try:
        with torch.no_grad():
            return model(**call.fresh_model_kwargs()).logits
    finally:
        for hd in handles:
            hd.remove()


def state_shape(call, pr) -> tuple[int, ...]:
    ids = call.model_kwargs["input_ids"]
    return (*ids.shape, pr.hidden_size)


def all_equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(tensors_equal(x, y) for x, y in zip(xs, ys))


def graphs_and_calls(arch, cache, **kw):
    model, pr, caps = captured(arch, cache, **kw)
    for cap in caps:
        for call in cap.calls:
            yield model, pr, cap, call


# ------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_layers_are_contiguous_and_complete(arch, cache):
    model, pr, caps = captured(arch, cache)
    assert len(caps) >= 2  # prefill + decode (+ the dynamic recompile)
    for cap in caps:
        info = layer_info(cap.gm, pr)
        assert info.num_layers == NUM_LAYERS
        assert info.layer_class == type(pr.layers[0]).__name__
        ranks = [rank(n.meta[META_KEY], NUM_LAYERS) for n in cap.gm.graph.nodes
                 if n.op not in ("placeholder", "output")]
        assert ranks == sorted(ranks), "tags must follow node order"
        assert set(ranks) >= set(range(NUM_LAYERS))
        for l, x in enumerate(info.layer_inputs):
            assert x.meta[META_KEY] == ("pre" if l == 0 else l - 1)
            ev = _fx.example_value(x)
            assert ev.shape[-1] == pr.hidden_size and ev.is_floating_point()
        assert info.last_output.meta[META_KEY] == NUM_LAYERS - 1


def test_layer_paths_of_other_versions_match():
    def node_with(path):
        g = fx.Graph()
        n = g.placeholder("x")
        n.meta["nn_module_stack"] = {"k": (path, type("LlamaDecoderLayer", (), {}))}
        return n

    for path in ("L['self'].model.layers.3", "L['args'][0].model.layers.3",
                 "L['self']._modules['model']._modules['layers']._modules['3']",
                 "L['self'].model.layers[3]", "transformer.h.3", "blocks.3"):
        assert _layer_entries(node_with(path)) == [(3, "LlamaDecoderLayer")], path
    for path in ("L['self'].model.layers.3.mlp", "model.hh.3", "model.layers"):
        assert _layer_entries(node_with(path)) == [], path


def test_layers_refuses_a_partial_graph():
    model, pr, caps = captured("llama", "static")
    ctx = PassContext.from_probe(pr, [0])
    ctx.num_layers = NUM_LAYERS + 1
    with pytest.raises(PassError, match="fullgraph=True"):
        run_passes(caps[0].gm, ctx, [LAYERS])


# ----------------------------------------------------------------------------- segment


def check_split(pr, cap, call, cuts):
    info = layer_info(cap.gm, pr)
    sg = split(cap.gm, info, cuts)
    assert len(sg.segments) == len(cuts) + 1
    for seg, c in zip(sg.segments, cuts):
        assert seg.state_name == info.layer_inputs[c + 1].name
        assert seg.state_name in seg.output_names
    a_ref, a_seg = call.fresh_args(), call.fresh_args()
    out_ref = cap.gm(*a_ref)
    out_seg = sg.run(*a_seg)
    assert all_equal(out_ref, out_seg), "segment outputs differ from the graph's"
    assert all_equal(a_ref, a_seg), "in-place cache writes differ from the graph's"


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_segments_reproduce_the_graph(arch, cache):
    for _model, pr, cap, call in graphs_and_calls(arch, cache):
        for cuts in ([0, 2], [1]):
            check_split(pr, cap, call, cuts)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(("llama", "gpt2", "qwen3")), cache=st.sampled_from(CACHES),
       cuts=st.sets(st.integers(0, NUM_LAYERS - 2), min_size=1))
def test_segments_reproduce_the_graph_for_any_checkpoints(arch, cache, cuts):
    for _model, pr, cap, call in graphs_and_calls(arch, cache):
        check_split(pr, cap, call, sorted(cuts))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt_len=st.integers(1, 9), batch=st.integers(1, 3), cache=st.sampled_from(CACHES))
def test_segments_for_any_prompt_shape(prompt_len, batch, cache):
    for _model, pr, cap, call in graphs_and_calls("llama", cache, prompt_len=prompt_len,
                                                  batch=batch):
        check_split(pr, cap, call, [1])


@pytest.mark.parametrize("arch", ARCHS)
def test_head_is_final_norm_and_lm_head(arch):
    model, pr, caps = captured(arch, "static")
    for cap in caps:
        call = cap.calls[0]
        info = layer_info(cap.gm, pr)
        head = split(cap.gm, info, [1]).head
        h = torch.randn(state_shape(call, pr), generator=torch.Generator().manual_seed(1))
        env = dict(zip([p.name for p in cap.gm.graph.nodes if p.op == "placeholder"],
                       call.fresh_args()))
        env["h"] = h
        (logits,) = head.gm(*[env[n] for n in head.input_names])
        with torch.no_grad():
            assert torch.allclose(logits, pr.head(h), atol=1e-5, rtol=1e-4)


def test_split_refuses_a_crossing_value_that_a_later_segment_mutates():
    def f(x, cache):
        view = cache[0]  # pre: a view of the cache, read after the cut
        h0 = x + 1  # layer 0
        h1 = h0 * view  # layer 1 reads the view...
        cache.add_(1)  # ...and mutates the cache it aliases
        h2 = h1 + 1  # layer 2
        return (h2 * 2,)  # post: the "head"

    gm = fx.symbolic_trace(f)
    nodes = {n.name: n for n in gm.graph.nodes}
    tags = {"x": 0, "cache": "pre", "getitem": "pre", "add": 0, "mul": 1, "add_": 1,
            "add_1": 2, "mul_1": "post", "output": "post"}
    for name, tag in tags.items():
        nodes[name].meta[META_KEY] = tag
    view = nodes["getitem"]
    info = LayerInfo(3, "X", [view, nodes["add"], nodes["mul"]], nodes["add_1"],
                     [nodes["add"], nodes["mul"], nodes["add_1"]],
                     [nodes["add"], nodes["add_"], nodes["add_1"]])
    with pytest.raises(PassError, match="getitem.*mutates in place"):
        split(gm, info, [0])
    split(gm, info, [1])  # the mutation stays in segment 1 with its reader: fine


# ----------------------------------------------------------------------------- kv_fill


def run_exit(sg, kv, k, call, h):
    """Skip path: segments 0..k, then KV-fill of the rest from h. Returns (outs, args)."""
    args = call.fresh_args()
    env = sg.env(*args)
    for seg in sg.segments[: k + 1]:
        seg(env)
    env["h_frozen"] = h
    return kv(env), args


def check_kv_fill(model, pr, cap, call, c, eager: bool):
    info = layer_info(cap.gm, pr)
    sg = split(cap.gm, info, [c])
    kv = kv_fill_graph(cap.gm, info, c + 1, NUM_LAYERS - 1)
    h = torch.randn(state_shape(call, pr), generator=torch.Generator().manual_seed(c))
    skipped = range(c + 1, NUM_LAYERS)

    ref_gm = replaced_graph(cap.gm, info, skipped)
    a_ref = call.fresh_args()
    out_ref = ref_gm(*a_ref, h)
    out_kv, a_kv = run_exit(sg, kv, 0, call, h)

    assert all_equal(a_ref, a_kv), "StaticCache contents differ from layers fed h"
    assert all_equal([out_ref[i] for i in kv.output_positions], out_kv)
    # Every cache the graph returns for the skipped layers comes from the KV-fill.
    cache_positions = [i for i, o in enumerate(_outputs(cap.gm))
                       if isinstance(o.meta.get(META_KEY), int) and o.meta[META_KEY] > c]
    assert list(kv.output_positions) == cache_positions

    if eager:  # the reference itself: layers fed h in the eager model
        (pos,) = sg.head.output_positions
        logits = eager_logits_with_inputs(model, pr, call, skipped, h)
        assert torch.allclose(out_ref[pos], logits, atol=1e-5, rtol=1e-4)


def _outputs(gm):
    return [o for o in next(n for n in gm.graph.nodes if n.op == "output").args[0]]


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_fill_writes_what_layers_fed_h_write(arch, cache):
    for model, pr, cap, call in graphs_and_calls(arch, cache):
        for c in (0, 2):
            check_kv_fill(model, pr, cap, call, c, eager=True)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(ARCHS), cache=st.sampled_from(CACHES),
       c=st.integers(0, NUM_LAYERS - 2))
def test_kv_fill_for_any_checkpoint(arch, cache, c):
    for model, pr, cap, call in graphs_and_calls(arch, cache):
        check_kv_fill(model, pr, cap, call, c, eager=False)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_fill_keeps_only_the_kv_path(arch, cache):
    model, pr, caps = captured(arch, cache)
    for cap in caps:
        ctx = run_passes(cap.gm, context(pr, [0, 2]), ANALYSIS_PASSES)
        kv = ctx.kv_fills[0]
        assert kv.layers == (1, NUM_LAYERS - 1)
        for l in range(1, NUM_LAYERS):
            assert sorted(kv.matmuls[l]) == KV_MATMULS.get(arch, DEFAULT_KV_MATMULS)
        names = {_fx.target_name(n) for n in kv.gm.graph.nodes}
        assert "scaled_dot_product_attention" not in names
        suffixes = {n.meta["nn_module_stack"] and list(n.meta["nn_module_stack"].values())[-1][0]
                    for n in kv.gm.graph.nodes if n.meta.get("nn_module_stack")}
        assert not any(".mlp" in s or "o_proj" in s or "dense" in s for s in suffixes)
        if arch == "qwen3":  # k-norm stays, q-norm goes
            assert any(s.endswith("k_norm") for s in suffixes)
            assert not any(s.endswith("q_norm") for s in suffixes)
        if cache == "static":
            # 2 cache writes + the write counter's add_, per layer
            assert all(kv.cache_writes[l] == 3 for l in range(1, NUM_LAYERS))
        # the live residual state and Q/O/MLP weights are no inputs
        assert "h_frozen" in kv.input_names
        assert ctx.layer_info.layer_inputs[1].name not in kv.input_names
        assert not any("mlp" in n or "o_proj" in n for n in kv.input_names)


def test_plain_dead_code_elimination_would_drop_cache_writes():
    model, pr, caps = captured("llama", "static")
    decode = caps[-1]
    call = decode.calls[0]
    info = layer_info(decode.gm, pr)
    ours = kv_fill_graph(decode.gm, info, 1, NUM_LAYERS - 1)
    plain = kv_fill_graph(decode.gm, info, 1, NUM_LAYERS - 1, dce=False)
    plain.gm.graph.eliminate_dead_code()
    plain.gm.recompile()

    def count(gm, name):
        return sum(_fx.target_name(n) == name for n in gm.graph.nodes)

    assert count(ours.gm, "index_copy_") == 2 * (NUM_LAYERS - 1)
    assert count(ours.gm, "add_") == NUM_LAYERS - 1
    assert count(plain.gm, "index_copy_") == 0, "torch now keeps in-place writes: revisit _fx"

    # And it matters: the plain graph leaves the cache untouched.
    sg = split(decode.gm, info, [0])
    h = torch.randn(state_shape(call, pr))
    _, args_ours = run_exit(sg, ours, 0, call, h)
    _, args_plain = run_exit(sg, plain, 0, call, h)
    assert not all_equal(args_ours, args_plain)


def test_dead_code_elimination_keeps_writes_through_aliases():
    def f(x, cache, counter):
        c = counter.to("cpu")  # an alias of the input
        pos = torch.arange(1) + c
        c.add_(1)
        k = x * 2
        cache.index_copy_(0, pos, k)
        tmp = torch.zeros(3)
        tmp.add_(1)  # a write to a dead temporary: removed
        unused = x * 3  # noqa: F841
        return ()

    gm = fx.symbolic_trace(f)
    _fx.eliminate_dead_code(gm.graph)
    gm.recompile()
    names = [_fx.target_name(n) for n in gm.graph.nodes if n.op != "placeholder"]
    assert names.count("add_") == 1 and names.count("index_copy_") == 1
    assert "zeros" not in names and names.count("mul") == 1
    cache, counter = torch.zeros(4, 2), torch.tensor([2])
    gm(torch.ones(1, 2), cache, counter)
    assert counter.item() == 3 and cache[2].tolist() == [2.0, 2.0]


def test_pipeline_runs_in_order_and_fills_the_context():
    model, pr, caps = captured("qwen2", "dynamic")
    ctx = run_passes(caps[-1].gm, context(pr, [0, 2]), ANALYSIS_PASSES)
    assert ctx.layer_info.num_layers == NUM_LAYERS
    assert [s.layers for s in ctx.split.segments] == [(0, 0), (1, 2), (3, 3)]
    assert set(ctx.kv_fills) == {0, 2}
    assert ctx.log == ["layers", "segment", "kv_fill"]
    assert ctx.kv_fills[2].layers == (3, 3)
    with pytest.raises(PassError, match="strictly increasing"):
        split(caps[-1].gm, ctx.layer_info, [2, 1])
    with pytest.raises(PassError, match="never a checkpoint"):
        split(caps[-1].gm, ctx.layer_info, [NUM_LAYERS - 1])
