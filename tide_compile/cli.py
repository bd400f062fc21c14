"""``tide-compile``: the command line.

One function per subcommand: ``_add_<name>(subparsers)`` declares its arguments and sets
``func`` to ``_run_<name>(args) -> int``. Adding a subcommand = writing that pair and
listing the adder in ``_SUBCOMMANDS``.

    tide-compile calibrate --model PATH --data FILE... --out router.tide
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]

_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def load_model(path: str, device: str | None, dtype: str) -> tuple[object, object]:
    """Model and tokenizer from a local HuggingFace folder, on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, _DTYPES[dtype]) if _DTYPES[dtype] else "auto"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------- calibrate
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from .config import EXIT_STRATEGIES, TIDEConfig

    d = TIDEConfig()
    p = sub.add_parser(
        "calibrate",
        help="calibrate early-exit routers for a model on text",
        description="Calibrate early-exit routers on text and save them (safetensors + JSON metadata).",
    )
    p.add_argument("--model", required=True, help="local HuggingFace model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="FILE", help="text files or folders of .txt files")
    src.add_argument("--dataset", metavar="NAME", help="HuggingFace dataset name (needs the hub)")
    p.add_argument("--dataset-config", default=None, help="configuration of --dataset")
    p.add_argument("--split", default="train", help="split of --dataset (default: %(default)s)")
    p.add_argument("--text-field", default=None, help="column holding the text (default: 'text')")
    p.add_argument("--out", required=True, help="router file to write (e.g. router.tide)")
    p.add_argument("--samples", type=_positive_int, default=d.calibration_samples,
                   help="calibration samples (default: %(default)s)")
    p.add_argument("--max-length", type=_positive_int, default=256, help="tokens per sample (default: %(default)s)")
    p.add_argument("--max-tokens", type=_positive_int, default=100_000,
                   help="token positions kept per checkpoint (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="samples per forward (default: %(default)s)")
    p.add_argument("--threshold-target", type=_probability, default=None, metavar="AGREEMENT",
                   help="set the saved exit_threshold to the smallest one reaching this held-out agreement")
    p.add_argument("--checkpoint-interval", type=_positive_int, default=d.checkpoint_interval,
                   help="a checkpoint every N layers (default: %(default)s)")
    p.add_argument("--min-layers", type=_positive_int, default=d.min_layers,
                   help="no exit before this many layers (default: %(default)s)")
    p.add_argument("--exit-strategy", choices=EXIT_STRATEGIES, default=d.exit_strategy,
                   help="identity or low-rank exit projection (default: %(default)s)")
    p.add_argument("--labels", choices=("agree", "cosine"), default="agree",
                   help="what counts as done (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto",
                   help="model dtype (default: as saved)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the quality table (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibration import calibrate
    from .config import TIDEConfig

    config = TIDEConfig(
        calibration_samples=args.samples,
        checkpoint_interval=args.checkpoint_interval,
        min_layers=args.min_layers,
        exit_strategy=args.exit_strategy,
    )
    dataset = [Path(x) for x in args.data] if args.data else args.dataset
    if args.data:  # fail on a missing file before loading a large model
        from .calibration.data import find_text_files

        for path in args.data:
            find_text_files(path)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    routers = calibrate(
        model,
        tokenizer,
        dataset=dataset,
        config=config,
        save_path=args.out,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        labels=args.labels,
        max_length=args.max_length,
        max_tokens_per_checkpoint=args.max_tokens,
        batch_size=args.batch_size,
        target_agreement=args.threshold_target,
        seed=args.seed,
        progress=not args.quiet,
    )
    if args.plot:
        routers.plot(args.plot)
    if not args.quiet:
        print(routers.report())
        print()
    line = f"wrote {args.out} (checkpoints {routers.checkpoint_layers})"
    if args.threshold_target is not None:
        line += (f"; exit_threshold {routers.config.exit_threshold:.2f} for held-out agreement "
                 f">= {args.threshold_target}")
    print(line)
    return 0


# ---------------------------------------------------------------------------- main
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_calibrate,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tide-compile", description="Token-level early exit for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tide-compile`` and ``python -m tide_compile``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        # Bad input: say what to fix, without a traceback.
        print(f"tide-compile {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
