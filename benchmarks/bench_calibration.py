#!/usr/bin/env python3
"""Calibration throughput on a Llama-3.1-8B-shaped model with random weights (GPU).

Builds ``LlamaForCausalLM`` from a config (32 layers, hidden 4096, intermediate 14336,
32 heads, 8 KV heads, vocab 128256) in bf16 directly on the device, feeds it text
through a byte-level tokenizer (Shakespeare from ``data/shakespeare/train`` when present,
else seeded random words) and runs ``tide_compile.calibrate`` end to end: packing,
hidden-state collection, labels, router (and optional projection) training, quality table.

Prints samples/s, the collection and total time, and one JSON line with everything.
Needs torch and transformers only (no ``datasets``); runs on torch 2.11+/transformers 5.17+.

    python benchmarks/bench_calibration.py                       # 2000 x 256 tokens, cuda, bf16
    python benchmarks/bench_calibration.py --exit-strategy projection
    python benchmarks/bench_calibration.py --tiny                # tiny shape on CPU: checks it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tide_compile  # noqa: E402
from tide_compile import TIDEConfig  # noqa: E402

LLAMA_8B = dict(
    num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)
TINY = dict(
    num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
)


class ByteTokenizer:
    """Bytes -> ids ``3 + byte`` after a BOS (1); pad 0. Any vocab of at least 259 fits."""

    pad_token_id = 0
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [3 + b for b in text.encode("utf-8")]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids}


def calibration_text(min_chars: int, seed: int) -> list[str]:
    """Lines of text, at least ``min_chars`` characters in all."""
    lines: list[str] = []
    train = REPO / "data" / "shakespeare" / "train"
    if train.is_dir():
        for path in sorted(train.glob("*.txt")):
            lines.extend(path.read_text(encoding="utf-8").splitlines())
    rng = random.Random(seed)
    words = ["the", "king", "doth", "speak", "and", "thou", "art", "fair", "night", "sword", "love", "hence"]
    while sum(map(len, lines)) < min_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (a quick check that it runs)")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default 2000; tiny 32)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per forward (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=100_000, help="tokens kept per checkpoint")
    ap.add_argument("--checkpoint-interval", type=int, default=4)
    ap.add_argument("--exit-strategy", choices=("identity", "projection"), default="identity")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 (float32 with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result JSON here")
    args = ap.parse_args(argv)

    shape = TINY if args.tiny else LLAMA_8B
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    samples = args.samples or (32 if args.tiny else 2000)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f}B params, {shape['num_hidden_layers']} layers, {dtype}, {device} "
          f"(built in {build_s:.1f}s)", flush=True)

    text = calibration_text(samples * args.max_length * 6, args.seed)
    cfg = TIDEConfig(calibration_samples=samples, checkpoint_interval=args.checkpoint_interval,
                     exit_strategy=args.exit_strategy)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    routers = tide_compile.calibrate(
        model, ByteTokenizer(), text, cfg, max_length=args.max_length, batch_size=args.batch_size,
        max_tokens_per_checkpoint=args.max_tokens, seed=args.seed, progress=True,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - t1
    cal = routers.calibration
    result = {
        "bench": "calibration",
        "shape": "tiny" if args.tiny else "llama-3.1-8b",
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "samples": cal["samples"],
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "tokens": cal["tokens_seen"],
        "tokens_kept": cal["tokens_kept"],
        "checkpoints": routers.checkpoint_layers,
        "exit_strategy": args.exit_strategy,
        "collect_s": cal["collect_seconds"],
        "total_s": round(total_s, 2),
        "total_min": round(total_s / 60, 3),
        "samples_per_s": round(cal["samples"] / total_s, 2),
        "collect_samples_per_s": round(cal["samples"] / max(cal["collect_seconds"], 1e-9), 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(f"{result['samples']} samples x <= {args.max_length} tokens ({result['tokens']} tokens): "
          f"{result['samples_per_s']} samples/s, {result['total_min']} min total "
          f"(collection {result['collect_s']} s, {result['collect_samples_per_s']} samples/s)")
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
