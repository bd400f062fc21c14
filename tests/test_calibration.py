"""Calibration: data sources, hidden-state collection, labels, routers, quality table, CLI."""

from __future__ import annotations

import builtins
import json
import string
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tide_compile
from tide_compile import RouterSet, TIDEConfig
from tide_compile.calibration import quality
from tide_compile.calibration.collect import collect_states
from tide_compile.calibration.data import CalibrationDataError, build_samples, load_rows
from tide_compile.model_probe import probe

from tiny_models import make_config, make_model

REPO = Path(__file__).resolve().parents[1]
TRAIN_DIR = REPO / "data" / "shakespeare" / "train"
HELDOUT_DIR = REPO / "data" / "shakespeare" / "heldout"
DEMO_WEIGHTS = REPO / "tide_compile" / "demo_model" / "model.safetensors"

_CHARS = [" ", "\n"] + list(string.ascii_letters + string.digits + ".,;:!?'-")


def char_tokenizer():
    """A character-level HF tokenizer (75 ids, fits the tiny models' vocab of 97)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in _CHARS:
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def lines():
    return (HELDOUT_DIR / "macbeth.txt").read_text().splitlines()


def small_config(**kw):
    base = dict(calibration_samples=24, checkpoint_interval=1, router_bottleneck_dim=16)
    base.update(kw)
    return TIDEConfig(**base)


FAST = dict(max_length=48, progress=False)


# ----------------------------------------------------------------------------- data
def test_samples_leave_the_tokenizer_untruncated(tok):
    """build_samples tokenizes with truncation; a fast tokenizer keeps that as state on its
    backend (transformers 5.x). Afterwards a long text encodes whole again through the
    backend (as bench_quality, tune and demo.perplexity encode held-out text)."""
    text = "the quick brown fox. " * 40
    whole = len(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    build_samples(tok, [text, text[:50]], max_length=16, num_samples=4)
    assert tok.backend_tokenizer.truncation is None
    assert len(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids) == whole


def test_rows_from_list_without_datasets(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    rows, desc = load_rows(["first text", "second text"])
    assert rows == ["first text", "second text"] and "list" in desc
    with pytest.raises(CalibrationDataError, match="datasets"):
        load_rows(str(HELDOUT_DIR / "macbeth.txt"))


def test_rows_from_file_folder_paths_and_dataset(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("alpha one\nalpha two\n\nalpha three\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    rows, _ = load_rows(str(tmp_path / "a.txt"))
    assert rows[0].count("alpha") == 3 and "two\n\nalpha" in rows[0] and len(rows) == 1
    rows, _ = load_rows(str(tmp_path))
    assert any("beta" in r for r in rows) and any("alpha" in r for r in rows)
    rows, _ = load_rows([tmp_path / "sub" / "b.txt", tmp_path / "a.txt"])
    assert rows[0].strip() == "beta"
    ds = datasets.Dataset.from_dict({"id": [1, 2], "text": ["x y", "z"]})
    assert load_rows(ds)[0] == ["x y", "z"]
    ds2 = datasets.Dataset.from_dict({"body": ["only string column"], "n": [3]})
    assert load_rows(ds2)[0] == ["only string column"]
    assert load_rows(ds2, text_field="body")[0] == ["only string column"]


@pytest.mark.parametrize(
    "source, match",
    [
        ("/no/such/file.txt", "does not exist"),
        ([], "empty"),
        (["  ", "\n"], "holds no text"),
        ([1, 2], "strings"),
        (None, "no calibration data"),
        (42, "unsupported"),
        ("wikitext", "local"),  # the hub is offline in tests (HF_HUB_OFFLINE=1)
        ("someone/some-dataset", "local"),
    ],
)
def test_bad_sources(source, match):
    with pytest.raises(CalibrationDataError, match=match):
        load_rows(source)


def test_offline_hub_error_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError) as err:
        load_rows("wikitext", dataset_config="wikitext-2-raw-v1")
    assert "offline" in str(err.value) and "local text files" in str(err.value)


def test_empty_folder_and_empty_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="no text files"):
        load_rows(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(CalibrationDataError, match="no text"):
        load_rows(str(tmp_path / "blank.txt"))


def test_dataset_column_errors():
    import datasets

    two = datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]})
    with pytest.raises(CalibrationDataError, match="text_field"):
        load_rows(two)
    with pytest.raises(CalibrationDataError, match="no column"):
        load_rows(two, text_field="c")
    with pytest.raises(CalibrationDataError, match="splits"):
        load_rows(datasets.DatasetDict({"train": two}))


def test_packing_and_truncation(tok, lines):
    samples = build_samples(tok, lines, num_samples=10, max_length=40, seed=0)
    assert len(samples.input_ids) == 10
    assert all(len(x) <= 40 for x in samples.input_ids)
    assert sum(len(x) >= 30 for x in samples.input_ids) >= 9  # short lines are packed
    assert all(x[0] == tok.bos_token_id for x in samples.input_ids)
    again = build_samples(tok, lines, num_samples=10, max_length=40, seed=0)
    other = build_samples(tok, lines, num_samples=10, max_length=40, seed=1)
    assert samples.input_ids == again.input_ids and samples.input_ids != other.input_ids
    few = build_samples(tok, ["one short text"], num_samples=10, max_length=40)
    assert len(few.input_ids) == 1
    # A long document is cut between lines, keeping its blank lines, and nothing is lost.
    doc = "\n".join(lines[:200])
    whole = build_samples(tok, [doc], num_samples=1000, max_length=40)
    assert sum(len(x) - 1 for x in whole.input_ids) >= 0.97 * len(tok(doc, add_special_tokens=False)["input_ids"])
    newline = tok.convert_tokens_to_ids("\n")
    assert any([newline, newline] == x[i : i + 2] for x in whole.input_ids for i in range(len(x)))
    with pytest.raises(CalibrationDataError, match="max_length"):
        build_samples(tok, lines, num_samples=2, max_length=1)


# ----------------------------------------------------------------------------- collection
@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_collected_states_match_model(arch, tok, lines):
    model = make_model(arch, 4)
    p = probe(model)
    samples = build_samples(tok, lines[:40], num_samples=5, max_length=30, seed=0)
    samples.input_ids[1] = samples.input_ids[1][:11]  # ragged batch: padding must not leak
    got = collect_states(model, p, samples, [0, 2], max_tokens=10_000, batch_size=3, progress=False)
    assert got.num_kept == samples.num_tokens == got.total_tokens
    with torch.no_grad():
        for i, ids in enumerate(samples.input_ids):
            out = model(torch.tensor([ids]), output_hidden_states=arch != "falcon")
            sel = got.sample_index == i
            pos = got.position[sel]
            torch.testing.assert_close(p.head(got.final[sel]), out.logits[0, pos], rtol=1e-4, atol=1e-4)
            if arch != "falcon":  # Falcon breaks with output_hidden_states in this transformers
                for c in (0, 2):
                    torch.testing.assert_close(got.states[c][sel], out.hidden_states[c + 1][0, pos])


def test_token_cap_holds_and_is_seeded(tok, lines):
    model = make_model("llama", 3)
    p = probe(model)
    samples = build_samples(tok, lines, num_samples=12, max_length=40, seed=0)
    a = collect_states(model, p, samples, [0, 1], max_tokens=100, seed=3, progress=False)
    b = collect_states(model, p, samples, [0, 1], max_tokens=100, seed=3, progress=False)
    c = collect_states(model, p, samples, [0, 1], max_tokens=100, seed=4, progress=False)
    assert a.total_tokens > 100 and a.num_kept == 100
    assert all(s.shape == (100, 32) for s in a.states.values()) and a.final.shape == (100, 32)
    assert torch.equal(a.position, b.position) and torch.equal(a.states[1], b.states[1])
    assert not torch.equal(a.position, c.position)
    with pytest.raises(ValueError, match="max_tokens"):
        collect_states(model, p, samples, [0], max_tokens=0, progress=False)


# ----------------------------------------------------------------------------- calibrate
def test_calibrate_is_reproducible_and_saves(tok, lines, tmp_path):
    model = make_model("llama", 4)
    cfg = small_config()
    path = tmp_path / "r.tide"
    a = tide_compile.calibrate(model, tok, lines, cfg, save_path=path, seed=7, **FAST)
    b = tide_compile.calibrate(model, tok, lines, cfg, seed=7, **FAST)
    assert a.checkpoint_layers == [0, 1, 2]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.quality_table == b.quality_table
    loaded = RouterSet.load(path, model)
    assert loaded.quality_table == a.quality_table
    assert loaded.threshold_for(0.9) == a.threshold_for(0.9)
    assert loaded.calibration["tokens_kept"] == a.calibration["tokens_kept"]
    for key, value in a.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    c = tide_compile.calibrate(model, tok, lines, cfg, seed=8, **FAST)
    assert c.quality_table != a.quality_table


def test_quality_table_shapes_and_report(tok, lines):
    model = make_model("gpt2", 4)
    r = tide_compile.calibrate(model, tok, lines, small_config(checkpoint_interval=2), target_agreement=0.9, **FAST)
    first = [row for row in r.quality_table if row["view"] == "first_exit"]
    per = [row for row in r.quality_table if row["view"] == "checkpoint"]
    assert [row["threshold"] for row in first] == list(quality.THRESHOLD_GRID)
    assert {row["layer"] for row in per} == {1}
    rates = [row["exit_rate"] for row in first]
    assert all(x >= y for x, y in zip(rates, rates[1:]))  # higher threshold, fewer exits
    for row in first:
        assert sum(row["exits"].values()) == round(row["exit_rate"] * row["tokens"])
        if row["agreement"] is not None:
            assert row["token_agreement"] >= row["agreement"] - 1e-9
    t = r.threshold_for(0.9)
    assert r.config.exit_threshold == t
    # Every counted row (enough exiting tokens) at or above the answer meets the target.
    assert all(row["agreement"] >= 0.9 for row in first
               if row["threshold"] >= t and quality.row_exits(row) >= quality.MIN_EXITS)
    text = str(r.report())
    assert "First exit" in text and "layer 1" in text and "identity" in text
    # report() shows how many exiting tokens back each first-exit row.
    row_09 = next(row for row in first if row["threshold"] == 0.9)
    n = quality.row_exits(row_09)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("0.9 "))
    assert f" {n}{'*' if n < quality.MIN_EXITS else ' '} " in line + " "
    json.dumps(r.quality_table)
    with pytest.raises(ValueError, match="target_agreement"):
        r.threshold_for(1.5)


def counted(t, agreed, exited):
    """A first-exit row with ``exited`` held-out tokens exiting, ``agreed`` of them agreeing."""
    return {"view": "first_exit", "threshold": t, "agreement": agreed / exited if exited else None,
            "exits": {"1": exited}}


def test_threshold_for_rules():
    table = [counted(0.1, 800, 1000), counted(0.5, 970, 1000), counted(0.6, 940, 1000),
             counted(0.7, 990, 1000), counted(0.9, 0, 0)]
    assert quality.threshold_for(table, 0.95) == 0.7  # not 0.5: 0.6 fails above it
    assert quality.threshold_for(table, 0.5) == 0.1
    with pytest.warns(UserWarning, match="no calibrated threshold"):
        assert quality.threshold_for([counted(0.5, 500, 1000), counted(0.9, 600, 1000)], 0.99) == 1.0

    # 200/200 agreeing exits are enough evidence for 0.95 at 90% confidence.
    many = [counted(0.5, 190, 200), counted(0.9, 200, 200)]
    assert quality.threshold_for(many, 0.95) == 0.9
    assert quality.threshold_for(many, 0.9) == 0.5
    assert quality.agreement_lower_bound(5, 10, 0.5) == 0.5
    assert 0.3 < quality.agreement_lower_bound(5, 10, 0.9) < 0.5
    with pytest.raises(ValueError, match="confidence"):
        quality.threshold_for(many, 0.9, confidence=1.0)


@pytest.mark.parametrize(
    "table, target, expected, warns",
    [
        # The case: one exiting token at 1.00 (Wilson bound ~0.4) vetoed every target.
        ([counted(0.95, 377, 434), counted(0.99, 39, 40), counted(1.0, 0, 1)], 0.8, 0.95, None),
        # Rows under MIN_EXITS neither pass nor veto: 0.9 (20/20) cannot be the answer...
        ([counted(0.5, 950, 1000), counted(0.9, 20, 20)], 0.9, 0.5, None),
        # ... and 0.9 (3/20) does not veto 0.5.
        ([counted(0.5, 950, 1000), counted(0.9, 3, 20)], 0.9, 0.5, None),
        # A threshold where no token exits is no evidence either.
        ([counted(0.5, 960, 1000), counted(0.99, 0, 0)], 0.9, 0.5, None),
        # The other case: 11 held-out tokens, none exiting at 0.64: too small.
        ([counted(0.3, 5, 11), counted(0.64, 0, 0)], 0.95, 1.0, "too small to support"),
        # Enough exits in all, but fewer than the Wilson bound needs for 0.99.
        ([counted(0.5, 60, 60), counted(0.9, 55, 55)], 0.99, 1.0, "too small to support"),
        # Rows without counts (a hand-made table) are no evidence.
        ([{"view": "first_exit", "threshold": 0.5, "agreement": 1.0}], 0.5, 1.0, "too small"),
    ],
)
def test_threshold_for_needs_evidence(table, target, expected, warns):
    if warns is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert quality.threshold_for(table, target) == expected
    else:
        with pytest.warns(UserWarning, match=warns):
            assert quality.threshold_for(table, target) == expected


def test_threshold_for_min_exits_is_a_setting():
    table = [counted(0.5, 500, 1000), counted(0.9, 20, 20)]
    assert quality.threshold_for(table, 0.8, min_exits=10) == 0.9
    with pytest.warns(UserWarning, match="no calibrated threshold"):
        assert quality.threshold_for(table, 0.8) == 1.0  # 20 exits do not count by default
    with pytest.raises(ValueError, match="min_exits"):
        quality.threshold_for(table, 0.8, min_exits=0)


def test_forced_routers_have_no_table():
    model = make_model("llama", 4)
    r = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    with pytest.raises(ValueError, match="calibrate"):
        r.threshold_for(0.9)
    with pytest.raises(ValueError, match="calibrate"):
        r.report()


def test_projection_strategy(tok, lines, tmp_path):
    model = make_model("llama", 4)
    cfg = small_config(exit_strategy="projection", checkpoint_interval=2)
    r = tide_compile.calibrate(model, tok, lines, cfg, projection_rank=8, **FAST)
    assert r.checkpoint_layers == [1] and r.exit_projection(1) is not None
    agreement = r.calibration["exit_agreement"]["1"]
    assert agreement["projection"] is not None
    assert agreement["projection"] >= agreement["identity"] - 0.05
    assert "with projection" in str(r.report())
    r.save(tmp_path / "p.tide")
    loaded = RouterSet.load(tmp_path / "p.tide", model)
    h = torch.randn(5, 32)
    torch.testing.assert_close(loaded.exit_state(1, h), r.exit_state(1, h))
    assert loaded.config.exit_strategy == "projection"


def test_cosine_labels_and_bf16(tok, lines):
    model = make_model("qwen2", 4, dtype=torch.bfloat16)
    r = tide_compile.calibrate(model, tok, lines, small_config(convergence_threshold=0.5), labels="cosine", **FAST)
    assert r.calibration["labels"] == "cosine" and r.calibration["convergence_threshold"] == 0.5
    assert next(r.parameters()).dtype == torch.float32  # routers stay fp32 for a bf16 model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels="entropy"), "label kind"),
        (dict(max_length=0), "max_length"),
        (dict(max_tokens_per_checkpoint=0), "max_tokens_per_checkpoint"),
        (dict(projection_loss="mse"), "projection_loss"),
        (dict(target_agreement=2.0), "target_agreement"),
        (dict(dataset=None), "no calibration data"),
        (dict(dataset="/missing/dir/"), "does not exist"),
        (dict(config=TIDEConfig(min_layers=9)), "min_layers"),
    ],
)
def test_calibrate_errors(kwargs, match, tok, lines):
    model = make_model("llama", 4)
    args = dict(dataset=lines, config=small_config(), progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tide_compile.calibrate(model, tok, **args)


def test_config_dataset_is_the_default_source(tok):
    model = make_model("llama", 4)
    cfg = small_config(calibration_dataset=str(HELDOUT_DIR / "tempest.txt"), calibration_samples=8)
    r = tide_compile.calibrate(model, tok, config=cfg, **FAST)
    assert "tempest" in r.calibration["source"]


def test_plot(tok, lines, tmp_path, monkeypatch):
    model = make_model("llama", 4)
    r = tide_compile.calibrate(model, tok, lines, small_config(checkpoint_interval=2), **FAST)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="matplotlib"):
            r.plot(tmp_path / "q.png")
    else:
        r.plot(tmp_path / "q.png")
        assert (tmp_path / "q.png").stat().st_size > 0
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
        with pytest.raises(ImportError, match="matplotlib"):
            r.plot(tmp_path / "q2.png")


# ----------------------------------------------------------------------------- CLI
def test_cli_calibrate(tmp_path, capsys):
    from tide_compile.cli import main

    import transformers as T

    model_dir = tmp_path / "model"
    T.AutoModelForCausalLM.from_config(make_config("llama", 4)).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "r.tide"
    rc = main([
        "calibrate", "--model", str(model_dir), "--data", str(HELDOUT_DIR / "tempest.txt"),
        "--out", str(out), "--samples", "16", "--max-length", "40", "--checkpoint-interval", "2",
        "--threshold-target", "0.8", "--device", "cpu", "--dtype", "fp32", "--quiet",
    ])
    assert rc == 0 and out.exists()
    routers = RouterSet.load(out)
    assert routers.checkpoint_layers == [1] and routers.calibration["samples"] == 16
    assert routers.config.exit_threshold == routers.threshold_for(0.8)
    assert "wrote" in capsys.readouterr().out
    rc = main(["calibrate", "--model", str(model_dir), "--data", str(tmp_path / "nope.txt"),
               "--out", str(tmp_path / "x.tide"), "--device", "cpu", "--quiet", "--checkpoint-interval", "2"])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(model_dir), "--data", "f.txt", "--out", "x", "--threshold-target", "2"])
    conf = tmp_path / "conf.tide"
    rc = main([
        "calibrate", "--model", str(model_dir), "--data", str(HELDOUT_DIR / "tempest.txt"),
        "--out", str(conf), "--samples", "16", "--max-length", "40", "--checkpoint-interval", "2",
        "--router-features", "rms+conf", "--confidence-k", "8", "--device", "cpu", "--quiet",
    ])
    assert rc == 0
    loaded = RouterSet.load(conf)
    assert loaded.features == ("rms", "conf") and loaded.confidence_k == 8


# ----------------------------------------------------------------------------- demo model
def _demo():
    if not DEMO_WEIGHTS.exists():
        pytest.skip("the demo model has not landed yet (tide_compile/demo_model/model.safetensors)")
    from tide_compile import demo

    return demo


@torch.no_grad()
def first_exit_agreement(model, tokenizer, routers, text, threshold, *, window=128, max_windows=40):
    """Teacher-forced agreement of first exits on ``text``, measured apart from calibration.

    Runs the full model on windows of the text with forward hooks at the checkpoints,
    exits each token at the first checkpoint whose router score exceeds ``threshold``,
    and compares the exit head's top-1 (``lm_head(final_norm(E_c(h_c)))``) with the full
    model's logits. Returns (agreement among exits, exit rate, exits per checkpoint).
    """
    p = probe(model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    states: dict[int, torch.Tensor] = {}
    hooks = [
        p.layers[c].register_forward_hook(
            lambda m, a, out, c=c: states.__setitem__(c, out[0] if isinstance(out, tuple) else out)
        )
        for c in routers.checkpoint_layers
    ]
    exited = agreed = total = 0
    per_layer = {c: 0 for c in routers.checkpoint_layers}
    n = min(max_windows, len(ids) // window)
    try:
        for w0 in range(0, n, 32):  # 32 windows a forward: the same numbers, batched
            x = torch.tensor([[bos] + ids[w * window : (w + 1) * window]
                              for w in range(w0, min(n, w0 + 32))])
            with torch.no_grad():
                full = model(x).logits.argmax(-1)
            done = torch.zeros_like(full, dtype=torch.bool)
            for c in routers.checkpoint_layers:
                h = states[c]
                with torch.no_grad():
                    leave = (routers.score(c, h) > threshold) & ~done
                with torch.no_grad():
                    top1 = p.head(routers.exit_state(c, h)).argmax(-1)
                agreed += int((top1 == full)[leave].sum())
                exited += int(leave.sum())
                per_layer[c] += int(leave.sum())
                done |= leave
            total += full.numel()
    finally:
        for h in hooks:
            h.remove()
    return agreed / max(exited, 1), exited / total, per_layer


def heldout_plays_without_excerpt(excerpt: str) -> list[str]:
    """Paragraphs of the held-out plays that are not in ``demo.heldout_text()``.

    Calibration text the model never saw (its training plays are memorized: routers
    calibrated on them promise more agreement than unseen text gives), disjoint from
    the text the test measures on.
    """
    taken = set(excerpt.split("\n\n"))
    return [
        para
        for path in sorted(HELDOUT_DIR.glob("*.txt"))
        for para in path.read_text(encoding="utf-8").split("\n\n")
        if para not in taken
    ]


@pytest.fixture(scope="module")
def demo_setup():
    demo = _demo()
    model, tokenizer = demo.load()
    cfg = TIDEConfig(checkpoint_interval=2, calibration_samples=400)
    text = heldout_plays_without_excerpt(demo.heldout_text())
    routers = tide_compile.calibrate(
        model, tokenizer, text, cfg, max_length=128, max_tokens_per_checkpoint=60_000, progress=False
    )
    return demo, model, tokenizer, routers


def test_demo_routers_meet_target_on_heldout(demo_setup):
    demo, model, tokenizer, routers = demo_setup
    assert routers.checkpoint_layers == [1, 3, 5]
    t = routers.threshold_for(0.95)
    assert t < 1.0
    agreement, exit_rate, per_layer = first_exit_agreement(
        model, tokenizer, routers, demo.heldout_text(), t, max_windows=1000
    )
    assert agreement >= 0.95, (t, agreement, exit_rate, per_layer)
    assert exit_rate > 0.02 and per_layer[1] + per_layer[3] > 0, per_layer  # exits before the last checkpoint


def test_shipped_demo_routers_never_exit_the_first_token():
    """protect_first_token: the routers learned that the first token (<s>, the attention
    sink every later token reads) stays; other tokens still exit."""
    from tide_compile import demo
    from tide_compile import reference as R

    model, tok = demo.load()
    routers = RouterSet.load(demo.DEMO_DIR / "routers.tide", model=model)
    assert routers.calibration.get("protect_first_token") is True
    ids = tok(demo.heldout_text()[:20000], return_tensors="pt").input_ids[0]
    windows = torch.stack([torch.cat([torch.tensor([tok.bos_token_id]), ids[i:i + 63]])
                           for i in range(1, 1 + 16 * 63, 63)])
    out = R.forward(model, routers, windows, exit_threshold=routers.config.exit_threshold)
    assert not (out.exit_layers[:, 0] >= 0).any()
    assert out.stats.exit_rate > 0.02
