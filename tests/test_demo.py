"""The shipped demo model loads offline, generates, and is the trained one."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tide_compile import demo  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return demo.load()


def test_files_and_size() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "training.json", "heldout.txt"):
        assert (demo.DEMO_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in demo.DEMO_DIR.iterdir() if f.is_file())
    assert total <= 10 * 1024 * 1024, total


def test_architecture(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    record = demo.training_record()
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 8
    assert len(model.model.layers) == model.config.num_hidden_layers
    assert sum(p.numel() for p in model.parameters()) == record["n_params"]
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert len(tok) == model.config.vocab_size == 4096
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id)
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id


def test_greedy_generate(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    enc = tok("ROMEO.\nWhat light", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 20)
    assert torch.equal(out[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("ROMEO.\nWhat light")
    assert len(text) > len("ROMEO.\nWhat light") + 20  # 20 real tokens, several chars each


def test_heldout_text() -> None:
    text = demo.heldout_text()
    assert 40_000 < len(text) < 100_000
    # excerpts of the held-out plays (Macbeth, Midsummer Night's Dream, Tempest)
    assert "MACBETH." in text and "PUCK" in text and "CALIBAN." in text


def test_heldout_perplexity_matches_training_record(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    record = demo.training_record()
    ppl = demo.perplexity(model, tok, demo.heldout_text(), max_tokens=record["heldout_sample_tokens"])
    recorded = record["heldout_sample_ppl"]
    # same weights and procedure as recorded (only CPU vs GPU fp32 arithmetic differs):
    # random or untrained weights give a perplexity in the hundreds or thousands
    assert abs(ppl / recorded - 1) < 0.05, (ppl, recorded)
    assert ppl < 100
