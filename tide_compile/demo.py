"""The small trained demo model shipped with tide_compile (package data, works offline).

``tide_compile/demo_model/`` holds an 8-layer Llama-style causal LM (~4M parameters, float16
weights) with its own 4096-token byte-level BPE tokenizer, trained on Shakespeare plays by
``scripts/train_demo.py`` (recipe and results in ``demo_model/training.json``), plus
``heldout.txt``: an excerpt of plays never seen in training, for calibration and quality checks.

Example::

    from tide_compile import demo
    model, tok = demo.load()
    ids = tok("ROMEO.\\nWhat light", return_tensors="pt").input_ids
    print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEMO_DIR", "load", "heldout_text", "training_record", "perplexity"]

DEMO_DIR: Path = Path(__file__).resolve().parent / "demo_model"
"""Folder of the shipped demo model (config, float16 safetensors, tokenizer, training.json, heldout.txt)."""


def load(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the demo model and its tokenizer from the package data, without network access.

    Args:
        dtype: dtype of the loaded weights (stored as float16; float32 by default).
        device: device to move the model to.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer prepends ``<s>``
        to every encoded text, as in training.
    """
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)
    return model, tokenizer


def heldout_text() -> str:
    """About 60 KB of Shakespeare (Macbeth, A Midsummer Night's Dream, The Tempest) the
    demo model never saw in training."""
    return (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8")


def training_record() -> dict[str, Any]:
    """The ``training.json`` written by ``scripts/train_demo.py`` (hyper-parameters,
    ``heldout_ppl``, ``heldout_sample_ppl``, versions, timing)."""
    return json.loads((DEMO_DIR / "training.json").read_text(encoding="utf-8"))


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 16,
) -> float:
    """Perplexity of ``model`` on ``text``, measured as ``scripts/train_demo.py`` does.

    The text is tokenized without special tokens, optionally cut to ``max_tokens`` tokens,
    split into non-overlapping windows of ``window`` tokens, and each window is scored after
    a leading ``<s>`` (every token is predicted exactly once).
    ``heldout_text()`` with ``max_tokens=4096`` reproduces ``heldout_sample_ppl`` of
    ``training.json``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # avoids the max-length warning on long texts
        ids = list(backend.encode(text, add_special_tokens=False).ids)
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise ValueError("empty text")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("tokenizer has no bos token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        group = chunks[i : i + batch_size]
        for length in sorted({len(c) for c in group}):
            x = torch.tensor([[bos] + c for c in group if len(c) == length], device=device)
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)
