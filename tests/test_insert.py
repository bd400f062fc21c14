"""tide::route / tide::exit_select against plain torch, and the insert pass's graph surgery."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tide_compile import RouterSet, TIDEConfig
from tide_compile.kernels import ops
from tide_compile.passes import PassContext
from tide_compile.passes import insert, layers
from tiny_models import make_model


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), seq=st.integers(1, 5), hidden=st.integers(1, 33),
       bottleneck=st.integers(1, 9), threshold=st.floats(0.0, 1.0), layer=st.integers(0, 30),
       seed=st.integers(0, 1000), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_route_matches_plain_torch(batch, seq, hidden, bottleneck, threshold, layer, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, seq, hidden, generator=g) * 3).to(dtype)
    exited = torch.rand(batch, seq, generator=g) < 0.3
    frozen = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    exit_layer = torch.where(exited, torch.tensor(99), torch.tensor(-1))
    w1 = torch.randn(bottleneck, hidden, generator=g) / hidden ** 0.5
    b1 = torch.randn(bottleneck, generator=g)
    w2 = torch.randn(1, bottleneck, generator=g)
    b2 = torch.randn(1, generator=g)
    new_exited, new_frozen, new_layer = torch.ops.tide.route(
        h, exited, frozen, exit_layer, w1, b1, w2, b2, threshold, layer, 1e-6)
    # Independent float64 computation.
    x = h.double()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    z = x @ w1.double().T + b1.double()
    score = torch.sigmoid((z * torch.sigmoid(z)) @ w2.double().T + b2.double())[..., 0]
    clear = (score - threshold).abs() > 1e-4  # skip scores rounding could put either side
    want_new = (score > threshold) & ~exited
    assert torch.equal((new_exited & ~exited)[clear], want_new[clear])
    assert torch.equal(new_exited[exited], exited[exited])  # exits are never undone
    newly = new_exited & ~exited
    assert torch.equal(new_frozen[newly], h[newly])
    assert torch.equal(new_frozen[~newly], frozen[~newly])
    assert (new_layer[newly] == layer).all()
    assert torch.equal(new_layer[~newly], exit_layer[~newly])


def test_exit_select():
    exited = torch.tensor([[True, False, True]])
    frozen = torch.full((1, 3, 4), 7.0)
    h = torch.zeros(1, 3, 4)
    out = torch.ops.tide.exit_select(exited, frozen, h)
    assert out[0, 0].eq(7).all() and out[0, 1].eq(0).all() and out[0, 2].eq(7).all()


def _graph(model):
    got = {}

    def rec(gm, example_inputs, **kw):
        got["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend=rec, fullgraph=True)
    fn(torch.randint(2, 97, (1, 3)))
    return copy.deepcopy(got["gm"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_insert_places_routes_and_selects(arch):
    model = make_model(arch, num_layers=6)
    cfg = TIDEConfig(checkpoint_interval=2, router_bottleneck_dim=4)
    routers = RouterSet.forced(model, exit_at=3, config=cfg)
    gm = _graph(model)
    n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    n_in = len([n for n in gm.graph.nodes if n.op == "placeholder"])
    ctx = PassContext(num_layers=6, checkpoint_layers=(1, 3), hidden_size=32)
    info = layers.run(gm, ctx)
    insert.insert_exits(gm, info, routers, [1, 3], 0.5)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.tide.route.default) == 2
    # every layer after the first checkpoint reads its input through exit_select
    assert targets.count(torch.ops.tide.exit_select.default) == 6 - 2
    assert len(next(n for n in gm.graph.nodes if n.op == "output").args[0]) == n_out + 1
    assert gm.meta[insert.EXIT_LAYER_OUTPUT] == n_out
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == n_in + 8
    assert len(gm.meta[insert.EXTRA_INPUTS]) == 8
    assert set(gm.meta[insert.STATE_NAMES]) == {1, 3}
    for n in gm.graph.nodes:
        if n.target is torch.ops.tide.exit_select.default:
            assert isinstance(n.meta[layers.META_KEY], int) and n.meta[layers.META_KEY] >= 2


def test_insert_refuses_bad_checkpoints():
    model = make_model("llama", num_layers=4)
    routers = RouterSet.forced(model, exit_at=None, config=TIDEConfig(checkpoint_interval=1))
    gm = _graph(model)
    info = layers.run(gm, PassContext(num_layers=4, checkpoint_layers=(1,), hidden_size=32))
    with pytest.raises(ValueError, match="not exit layers"):
        insert.insert_exits(gm, info, routers, [3], 0.5)
