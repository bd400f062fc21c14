#!/usr/bin/env python3
"""Train the small demo model shipped as package data in ``tide_compile/demo_model/``.

Deterministic (seeded) end-to-end recipe:

1. train a byte-level BPE tokenizer (vocab 4096, specials ``<s>``, ``</s>``, ``<pad>``)
   on ``data/shakespeare/train/`` and wrap it as a ``PreTrainedTokenizerFast``
   (adds ``<s>`` in front of every encoded text);
2. build an 8-layer Llama-style ``LlamaConfig`` (hidden 192, GQA 4/2 heads, tied embeddings);
3. train with AdamW + warmup/cosine schedule on random 256-token windows, each preceded
   by ``<s>`` (bf16 autocast on CUDA, fp32 on CPU); the last 5% of every training play is
   kept apart as a validation split, and the checkpoint with the best validation loss is kept;
4. save the weights in float16 plus the tokenizer, reload them in float32 and measure the
   perplexity on the held-out plays (``data/shakespeare/heldout/``) over non-overlapping
   256-token windows, each scored after a leading ``<s>``;
5. write ``training.json`` (hyper-parameters, losses, perplexities, versions, timing) and
   ``heldout.txt`` (a ~60 KB excerpt of the held-out plays) next to the model.

The defaults (1500 steps, batch 64, peak lr 1.5e-3, dropout 0.2, seed 1234) are the shipped
model's recipe. They were picked on the validation loss (never on the held-out plays) from
a sweep of 12 runs on one H200 (steps 600-4000, lr 1e-3..3e-3, dropout 0-0.3): without
dropout the model memorizes the 0.78M training tokens after ~500 steps (~10 epochs).
Training itself takes about a minute on an H200.

Usage::

    python scripts/train_demo.py                      # defaults = the shipped model's recipe
    python scripts/train_demo.py --device cpu --steps 20 --out /tmp/demo_try

Needs only torch, transformers and tokenizers (no ``datasets``); runs on
torch 2.11+/transformers 5.17+.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "shakespeare"
DEFAULT_OUT = REPO / "tide_compile" / "demo_model"

VOCAB_SIZE = 4096
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
SEQ_LEN = 256  # text tokens per window; the model sees SEQ_LEN + 1 with the leading <s>
VAL_FRACTION = 0.05
HELDOUT_SAMPLE_CHARS_PER_PLAY = 20_000
HELDOUT_SAMPLE_TOKENS = 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: min(200, steps//10))")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.2,
                   help="training-only dropout on attention probs, embeddings and residual branches "
                        "(hooks, removed before saving; default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval (default: ~steps/25)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: tide_compile/demo_model)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/ and heldout/")
    p.add_argument("--time-limit", type=float, default=None,
                   help="safety: stop training after this many seconds (recorded in training.json)")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def read_split(folder: Path) -> list[tuple[str, str]]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files in {folder}")
    return [(f.stem, f.read_text(encoding="utf-8")) for f in files]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the training plays, wrapped for transformers (adds <s> in front)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    assert hf.convert_tokens_to_ids(SPECIALS) == [0, 1, 2], hf.convert_tokens_to_ids(SPECIALS)
    return hf


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` without <s> (through the backend: no max-length warning)."""
    return list(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)


# ----------------------------------------------------------------------------- model
def build_config(tok: PreTrainedTokenizerFast, dropout: float) -> LlamaConfig:
    kw: dict[str, Any] = dict(
        hidden_size=192,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=dropout,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:  # older transformers
        kw["rope_theta"] = 10000.0
    return LlamaConfig(**kw)


@torch.no_grad()
def windows_nll(model: torch.nn.Module, ids: list[int], bos_id: int, device: torch.device,
                batch: int = 32, window: int = SEQ_LEN, autocast: bool = False) -> tuple[float, int]:
    """Sum of next-token NLL and token count over non-overlapping windows of ``ids``.

    Each window of ``window`` tokens is scored after a leading ``<s>`` (so every token of
    ``ids`` is predicted exactly once, the first of a window from ``<s>`` alone).
    """
    model.eval()
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        group = chunks[i:i + batch]
        for length in sorted({len(c) for c in group}):  # full windows together, a short tail alone
            rows = [c for c in group if len(c) == length]
            x = torch.tensor([[bos_id] + c for c in rows], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   x[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
    return total, count


def perplexity(model: torch.nn.Module, ids: list[int], bos_id: int, device: torch.device,
               autocast: bool = False) -> float:
    nll, n = windows_nll(model, ids, bos_id, device, autocast=autocast)
    return math.exp(nll / n)


def heldout_sample(plays: list[tuple[str, str]]) -> str:
    """~20 KB of whole paragraphs from a third of the way into each held-out play."""
    parts = []
    for name, text in plays:
        paras = text.split("\n\n")
        start = len(paras) // 3
        taken: list[str] = []
        size = 0
        for para in paras[start:]:
            if size >= HELDOUT_SAMPLE_CHARS_PER_PLAY:
                break
            taken.append(para)
            size += len(para) + 2
        parts.append("\n\n".join(taken).strip("\n"))
    return "\n\n".join(parts) + "\n"


def add_dropout_hooks(model: LlamaForCausalLM, p: float) -> list[Any]:
    """GPT-2-style dropout (embeddings, attention output, MLP output) as forward hooks.

    Llama has no hidden dropout; the hooks regularize training on this small corpus and are
    removed before saving, so the shipped model is a plain ``LlamaForCausalLM``.
    """
    if p <= 0:
        return []

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=p, training=module.training)

    mods: list[torch.nn.Module] = [model.model.embed_tokens]
    for layer in model.model.layers:
        mods += [layer.self_attn.o_proj, layer.mlp.down_proj]
    return [m.register_forward_hook(hook) for m in mods]


def lr_lambda_factory(steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def main(argv: list[str] | None = None) -> None:
    t_start = time.time()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_amp = device.type == "cuda"
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    train_plays = read_split(args.data / "train")
    heldout_plays = read_split(args.data / "heldout")
    overlap = {n for n, _ in train_plays} & {n for n, _ in heldout_plays}
    assert not overlap, f"held-out plays also in train: {overlap}"
    data_hash = hashlib.sha256()
    for name, text in train_plays + heldout_plays:
        data_hash.update(name.encode() + b"\0" + text.encode() + b"\0")

    # 1. tokenizer
    t0 = time.time()
    tok = train_tokenizer([t for _, t in train_plays])
    print(f"tokenizer: vocab {len(tok)} trained in {time.time() - t0:.1f}s", flush=True)

    # token streams: plays joined by </s>; last VAL_FRACTION of each play -> validation
    train_ids: list[int] = []
    val_ids: list[int] = []
    for _, text in train_plays:
        ids = encode(tok, text)
        cut = int(len(ids) * (1 - VAL_FRACTION))
        train_ids += ids[:cut] + [tok.eos_token_id]
        val_ids += ids[cut:] + [tok.eos_token_id]
    heldout_ids = [encode(tok, text) for _, text in heldout_plays]
    n_train_chars = sum(len(t) for _, t in train_plays)
    print(f"tokens: train {len(train_ids)} ({n_train_chars / len(train_ids):.2f} chars/token), "
          f"val {len(val_ids)}, heldout {sum(map(len, heldout_ids))}", flush=True)

    # 2. model
    config = build_config(tok, args.dropout)
    seed_everything(args.seed)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    dropout_hooks = add_dropout_hooks(model, args.dropout)
    print(f"model: {config.num_hidden_layers} layers, {n_params / 1e6:.2f}M params, device {device}", flush=True)

    # 3. training
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt_kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **opt_kw,
    )
    warmup = args.warmup if args.warmup is not None else min(200, max(1, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(args.steps, warmup, args.min_lr_ratio))
    eval_every = args.eval_every or max(10, args.steps // 25)

    train_t = torch.tensor(train_ids, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    arange = torch.arange(SEQ_LEN, device=device)
    bos_col = torch.full((args.batch_size, 1), tok.bos_token_id, dtype=torch.long, device=device)
    max_start = len(train_ids) - SEQ_LEN

    best_val, best_step, best_state = float("inf"), -1, None
    recent: list[float] = []
    history: list[dict[str, float]] = []
    t_train = time.time()
    steps_done = 0
    stopped_early = False
    for step in range(args.steps):
        model.train()
        starts = torch.randint(0, max_start, (args.batch_size,), generator=gen).to(device)
        x = torch.cat([bos_col, train_t[starts[:, None] + arange]], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps_done = step + 1
        recent.append(loss.detach())
        if len(recent) > 50:
            recent.pop(0)
        last = steps_done == args.steps
        over_time = args.time_limit is not None and time.time() - t_train > args.time_limit
        if steps_done % eval_every == 0 or last or over_time:
            train_loss = float(torch.stack(recent).mean())
            vnll, vn = windows_nll(model, val_ids, tok.bos_token_id, device, autocast=use_amp)
            val_loss = vnll / vn
            el = time.time() - t_train
            history.append({"step": steps_done, "train_loss": round(train_loss, 4),
                            "val_loss": round(val_loss, 4), "lr": sched.get_last_lr()[0], "time_s": round(el, 1)})
            mark = ""
            if val_loss < best_val:
                best_val, best_step = val_loss, steps_done
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                mark = " *"
            print(f"step {steps_done:6d}/{args.steps}  train {train_loss:.4f}  val {val_loss:.4f} "
                  f"(ppl {math.exp(val_loss):.2f})  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{steps_done / el:.1f} steps/s{mark}", flush=True)
        if over_time:
            stopped_early = True
            print(f"time limit {args.time_limit}s reached at step {steps_done}", flush=True)
            break
    train_time = time.time() - t_train
    final_train_loss = float(torch.stack(recent).mean())
    if best_state is not None and best_step != steps_done:
        print(f"restoring best validation checkpoint from step {best_step}", flush=True)
        model.load_state_dict(best_state)

    # 5. save (float16 weights) + reload as shipped, in float32, for the held-out evaluation
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for h in dropout_hooks:
        h.remove()
    model.config.attention_dropout = 0.0
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    save_kw: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kw["safe_serialization"] = True
    model.save_pretrained(out, **save_kw)
    tok.save_pretrained(out)
    # portable tokenizer_config: the generic fast class, and <s> added explicitly
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n", encoding="utf-8")
    sample = heldout_sample(heldout_plays)
    (out / "heldout.txt").write_text(sample, encoding="utf-8")
    del model, best_state

    if device.type == "cuda":  # evaluate in true fp32, as on CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).to(device)
    shipped.eval()
    stok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert stok("Hello")["input_ids"][0] == stok.bos_token_id, "saved tokenizer does not add <s>"
    # 4. held-out perplexity (whole held-out plays, each split into 256-token windows)
    nll, n = 0.0, 0
    per_play = {}
    for name, text in heldout_plays:
        ids = encode(stok, text)
        a, b = windows_nll(shipped, ids, stok.bos_token_id, device)
        per_play[name] = round(math.exp(a / b), 3)
        nll, n = nll + a, n + b
    heldout_ppl = math.exp(nll / n)
    sample_ids = encode(stok, sample)[:HELDOUT_SAMPLE_TOKENS]
    sample_ppl = perplexity(shipped, sample_ids, stok.bos_token_id, device)
    print(f"held-out perplexity: {heldout_ppl:.3f} over {n} tokens {per_play}", flush=True)
    print(f"heldout.txt perplexity (first {len(sample_ids)} tokens): {sample_ppl:.3f}", flush=True)

    prompt = "ROMEO.\nWhat light"
    enc = stok(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        g = shipped.generate(**enc, max_new_tokens=60, do_sample=False)
    print("sample:", repr(stok.decode(g[0], skip_special_tokens=True)), flush=True)

    record = {
        "steps": args.steps,
        "steps_done": steps_done,
        "stopped_early_by_time_limit": stopped_early,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_per_step": args.batch_size * SEQ_LEN,
        "lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio,
        "warmup": warmup,
        "weight_decay": args.weight_decay,
        "dropout": args.dropout,
        "seed": args.seed,
        "final_train_loss": round(final_train_loss, 4),
        "best_val_loss": round(best_val, 4),
        "best_val_step": best_step,
        "heldout_ppl": round(heldout_ppl, 4),
        "heldout_tokens": n,
        "heldout_ppl_per_play": per_play,
        "heldout_sample_ppl": round(sample_ppl, 4),
        "heldout_sample_tokens": len(sample_ids),
        "eval": "non-overlapping 256-token windows, each scored after a leading <s>; "
                "float16 weights reloaded in float32",
        "train_plays": [nm for nm, _ in train_plays],
        "heldout_plays": [nm for nm, _ in heldout_plays],
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "data_sha256": data_hash.hexdigest(),
        "n_params": n_params,
        "saved_dtype": "float16",
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "precision": "bf16 autocast" if use_amp else "fp32",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({size / 1e6:.2f} MB): {sorted(f.name for f in out.iterdir())}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
