import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tide_compile import ExitProjection, RouterSet, TIDEConfig, TokenRouter
from tide_compile.routers import FORMAT_VERSION
from tiny_models import make_model


def _random_routerset(model, config, seed=0, with_projection=False):
    torch.manual_seed(seed)
    info = RouterSet.describe(model)
    layers = config.checkpoint_layers(info["num_layers"])
    routers = {c: TokenRouter(info["hidden_size"], config.router_bottleneck_dim) for c in layers}
    proj = {layers[0]: ExitProjection(info["hidden_size"], 4)} if with_projection else None
    if proj:
        torch.nn.init.normal_(proj[layers[0]].up.weight, std=0.1)
    return RouterSet(routers, model_info=info, config=config, exit_projections=proj,
                     calibration={"samples": 3}, quality_table=[{"layer": layers[0], "threshold": 0.5}])


def test_router_score_shape_and_range():
    r = TokenRouter(16, 8)
    h = torch.randn(3, 5, 16) * 100
    s = r(h)
    assert s.shape == (3, 5)
    assert ((s >= 0) & (s <= 1)).all()
    # the input transform is scale-invariant (parameter-free RMS normalization)
    torch.testing.assert_close(r(h * 7.0), s, rtol=1e-5, atol=1e-6)
    # computed in the router's dtype whatever the input dtype
    assert r(h.to(torch.bfloat16)).dtype == torch.float32


def test_exit_projection_starts_as_identity():
    e = ExitProjection(16, 4)
    h = torch.randn(2, 16)
    torch.testing.assert_close(e(h), h)


@pytest.mark.parametrize("with_projection", [False, True])
def test_roundtrip(tmp_path, with_projection):
    model = make_model("llama", num_layers=6)
    cfg = TIDEConfig(checkpoint_interval=2, router_bottleneck_dim=8, exit_threshold=0.7)
    rs = _random_routerset(model, cfg, with_projection=with_projection)
    path = tmp_path / "r.tide"
    rs.save(path)
    loaded = RouterSet.load(path, model=model)
    assert loaded.checkpoint_layers == rs.checkpoint_layers == [1, 3]
    assert loaded.config == cfg
    assert loaded.calibration == {"samples": 3}
    assert loaded.quality_table == rs.quality_table
    h = torch.randn(4, 32)
    for c in rs.checkpoint_layers:
        torch.testing.assert_close(loaded.score(c, h), rs.score(c, h), rtol=0, atol=0)
        torch.testing.assert_close(loaded.exit_state(c, h), rs.exit_state(c, h), rtol=0, atol=0)
    assert (loaded.exit_projection(1) is not None) == with_projection
    # the file is safetensors + JSON metadata, no pickle
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tide_compile"])
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model"]["model_class"] == "LlamaForCausalLM"
    assert meta["model"]["num_layers"] == 6 and meta["model"]["hidden_size"] == 32
    assert meta["model"]["norm_kind"] == "rms"
    assert meta["checkpoint_layers"] == [1, 3]
    assert meta["router"]["input_transform"] == "rms"


@pytest.mark.parametrize(
    "other_arch, other_layers, what",
    [("qwen2", 6, "model_class"), ("llama", 8, "num_layers")],
)
def test_load_for_other_model_is_a_clear_error(tmp_path, other_arch, other_layers, what):
    model = make_model("llama", num_layers=6)
    rs = _random_routerset(model, TIDEConfig(checkpoint_interval=2, router_bottleneck_dim=8))
    rs.save(tmp_path / "r.tide")
    with pytest.raises(ValueError, match=f"another model.*{what}"):
        RouterSet.load(tmp_path / "r.tide", model=make_model(other_arch, num_layers=other_layers))


def test_load_hidden_size_mismatch(tmp_path):
    model = make_model("llama", num_layers=4)
    rs = _random_routerset(model, TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8))
    rs.model_info["hidden_size"] = 64
    with pytest.raises(ValueError, match="hidden_size"):
        rs.check_model(model)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no router file"):
        RouterSet.load(tmp_path / "missing.tide")
    (tmp_path / "junk.tide").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors router file"):
        RouterSet.load(tmp_path / "junk.tide")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a tide_compile router file"):
        RouterSet.load(tmp_path / "plain.safetensors")
    model = make_model("llama", num_layers=4)
    rs = _random_routerset(model, TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8))
    meta = rs.metadata()
    meta["format_version"] = FORMAT_VERSION + 1
    save_file({"x": torch.zeros(1)}, str(tmp_path / "future.tide"),
              metadata={"tide_compile": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version"):
        RouterSet.load(tmp_path / "future.tide")


def test_invalid_router_layers():
    model = make_model("llama", num_layers=4)
    info = RouterSet.describe(model)
    with pytest.raises(ValueError, match="final layer"):
        RouterSet({3: TokenRouter(32, 4)}, model_info=info, config=TIDEConfig())
    with pytest.raises(ValueError, match="at least one"):
        RouterSet({}, model_info=info, config=TIDEConfig())
    with pytest.raises(ValueError, match="no router"):
        RouterSet({1: TokenRouter(32, 4)}, model_info=info, config=TIDEConfig(),
                  exit_projections={2: ExitProjection(32, 2)})


@settings(max_examples=25, deadline=None)
@given(num_layers=st.integers(3, 9), interval=st.integers(1, 2), data=st.data())
def test_forced_routers(num_layers, interval, data):
    model = make_model("llama", num_layers=num_layers)
    cfg = TIDEConfig(checkpoint_interval=interval, router_bottleneck_dim=4)
    layers = cfg.checkpoint_layers(num_layers)
    exit_at = data.draw(st.sampled_from(layers + [None]))
    threshold = data.draw(st.floats(0.0, 0.999999))
    rs = RouterSet.forced(model, exit_at=exit_at, config=cfg)
    assert rs.checkpoint_layers == layers
    h = torch.randn(5, 32) * data.draw(st.floats(1e-3, 1e3))
    for c in layers:
        exits = rs.score(c, h) > threshold
        assert bool(exits.all()) == (c == exit_at)
        assert not bool(exits.any()) or c == exit_at
    with pytest.raises(ValueError, match="not a checkpoint"):
        RouterSet.forced(model, exit_at=num_layers - 1, config=cfg)


def test_forced_default_config_on_small_model_names_the_setting():
    model = make_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="checkpoint_interval"):
        RouterSet.forced(model, exit_at=None)
