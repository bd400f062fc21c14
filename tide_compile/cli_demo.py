"""``tide-compile demo`` and ``tide-compile generate``: early exit on a prompt, with stats.

``demo`` runs on the small model shipped with the package (:mod:`tide_compile.demo`),
offline: routers (shipped in ``demo_model/routers.tide``, or calibrated now with
``--calibrate``), ``optimize(model, routers)`` with the ``tide`` backend, a greedy
generation from a prompt, the exit stats, and tokens/s of tide against plain
``model.generate`` on the same prompt and length, measured in the same run.

``generate`` does the generation part for any local model and router file.

The shipped router files are written by::

    python -m tide_compile demo --calibrate --save-routers tide_compile/demo_model/routers.tide --force
    python -m tide_compile demo --model smollm2 --calibrate --save-routers tide_compile/smollm2/routers.tide --force
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DEMO_ROUTERS", "CALIBRATION_RECIPES", "demo_calibration_texts",
           "calibration_texts", "text_chunks", "heldout_texts", "calibrate_demo_routers", "check_model_arg",
           "cpu_threads", "load_any", "model_input_files", "routers_for", "run_demo", "run_generate"]

_PACKAGE = Path(__file__).resolve().parent
DEMO_ROUTERS: Path = _PACKAGE / "demo_model" / "routers.tide"
"""Routers shipped with the demo model (see the module docstring for how they are made)."""
#: Text folders of a source checkout (not in the installed package).
_DATA = _PACKAGE.parent / "data"
#: Where a source checkout keeps the plays the demo model never saw in training.
_HELDOUT_PLAYS = _DATA / "shakespeare" / "heldout"
#: How each named model's shipped routers were calibrated (README, "Calibration").
#: SmolLM2: checkpoints every 2 layers, identity heads, 1000 samples of 128 tokens of
#: Python source and plays (``calibration_texts("smollm2")``), exit_threshold =
#: threshold_for(0.98) = 0.999 (0.99 has too few exiting held-out tokens behind it). The
#: shipped file was calibrated on the H200 (41.9 s; benchmarks/gpu_smollm2.sh), with
#: target 0.99 in that run and the threshold then set to threshold_for(0.98) from the
#: file's own quality table, as this recipe now does in one step.
CALIBRATION_RECIPES: dict[str, dict[str, Any]] = {
    "demo": dict(checkpoint_interval=2, samples=400, max_length=128, max_tokens=60_000,
                 target=0.95, seed=0),
    "smollm2": dict(checkpoint_interval=2, samples=1000, max_length=128, max_tokens=100_000,
                    target=0.98, seed=0),
}


def demo_calibration_texts() -> list[str]:
    """Paragraphs of the held-out plays (``data/shakespeare/heldout`` of a source checkout)
    that are not in ``demo.heldout_text()``: text the model never saw, disjoint from the
    text ``tune`` measures on by default."""
    from . import demo

    if not _HELDOUT_PLAYS.is_dir():
        raise FileNotFoundError(
            f"demo calibration text not found at {_HELDOUT_PLAYS} (it is in a source checkout "
            "of tide-compile, not in the installed package): pass --data FILE... with text the "
            "demo model has not seen, or use the shipped routers (drop --calibrate)"
        )
    taken = set(demo.heldout_text().split("\n\n"))
    return [
        para
        for path in sorted(_HELDOUT_PLAYS.glob("*.txt"))
        for para in path.read_text(encoding="utf-8").split("\n\n")
        if para not in taken
    ]


def text_chunks(text: str, chars: int = 2000) -> list[str]:
    """``text`` cut between lines into pieces of about ``chars`` characters (blank-only
    pieces dropped)."""
    out: list[str] = []
    group: list[str] = []
    size = 0
    for line in text.split("\n"):
        group.append(line)
        size += len(line) + 1
        if size >= chars:
            out.append("\n".join(group).strip("\n"))
            group, size = [], 0
    out.append("\n".join(group).strip("\n"))
    return [piece for piece in out if piece.strip()]


def calibration_texts(name: str, seed: int = 0, chunk_chars: int = 2000) -> list[str]:
    """The text a named model's shipped routers were calibrated on (a source checkout's
    ``data/``), as a list of strings (no ``datasets`` needed).

    ``demo``: :func:`demo_calibration_texts`. ``smollm2``: ``data/code/calibration``
    (Python standard-library modules) and ``data/shakespeare/train`` (plays), each domain
    cut into ~``chunk_chars`` pieces, shuffled (seeded) within the domain, then
    interleaved code, prose, code, ...: ``calibrate`` packs rows in order and draws its
    samples from the first ones, so without interleaving a small run would see one
    domain. The held-out halves, ``data/code/heldout`` and ``data/shakespeare/heldout``,
    are what quality is measured on (:func:`heldout_texts`).
    """
    import random

    if name == "demo":
        return demo_calibration_texts()
    folders = [_DATA / "code" / "calibration", _DATA / "shakespeare" / "train"]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"calibration text not found at {missing[0]} (it is in a source checkout of "
            "tide-compile, not in the installed package): pass --data FILE..., or use the "
            "shipped routers (drop --calibrate)"
        )
    domains = []
    for folder in folders:
        chunks = [c for path in sorted(folder.glob("*.txt"))
                  for c in text_chunks(path.read_text(encoding="utf-8"), chunk_chars)]
        random.Random(seed).shuffle(chunks)
        domains.append(chunks)
    return [d[i] for i in range(max(map(len, domains))) for d in domains if i < len(d)]


def heldout_texts(name: str) -> list[str]:
    """Text a named model's shipped routers never saw: ``demo.heldout_text()`` for the
    demo model; ``data/code/heldout`` and ``data/shakespeare/heldout`` of a source
    checkout for SmolLM2."""
    from . import demo

    if name == "demo":
        return [demo.heldout_text()]
    folders = [_DATA / "code" / "heldout", _HELDOUT_PLAYS]
    if not all(f.is_dir() for f in folders):
        raise FileNotFoundError(
            f"held-out text not found under {_DATA} (it is in a source checkout of "
            "tide-compile): pass --data FILE... with text the routers were not calibrated on")
    return [path.read_text(encoding="utf-8") for folder in folders for path in sorted(folder.glob("*.txt"))]


def calibrate_demo_routers(model: Any, tokenizer: Any, texts: Any = None, *, samples: int | None = None,
                           progress: bool = False, name: str = "demo") -> Any:
    """Routers for a named model, calibrated as the shipped ones are
    (:data:`CALIBRATION_RECIPES`; ``exit_threshold`` = ``threshold_for(target)``)."""
    from .calibration import calibrate
    from .config import TIDEConfig

    c = CALIBRATION_RECIPES[name]
    config = TIDEConfig(checkpoint_interval=c["checkpoint_interval"],
                        calibration_samples=samples or c["samples"])
    return calibrate(
        model, tokenizer, texts if texts is not None else calibration_texts(name), config,
        max_length=c["max_length"], max_tokens_per_checkpoint=c["max_tokens"],
        target_agreement=c["target"], seed=c["seed"], progress=progress,
    )


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None: leave as is), then restore."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a.tolist(), b.tolist()):
        if x != y:
            break
        n += 1
    return n


def _describe_routers(routers: Any, source: str) -> str:
    cal = routers.calibration or {}
    line = f"routers: {source} (checkpoints {routers.checkpoint_layers}"
    if cal.get("kind") == "calibrated":
        line += f"; calibrated on {cal.get('samples')} samples, {cal.get('source')}"
        if cal.get("target_agreement") is not None:
            line += f"; saved exit_threshold {routers.config.exit_threshold:g} = held-out agreement >= {cal['target_agreement']}"
    return line + ")"


# ---------------------------------------------------------------------------- demo
def run_demo(args: argparse.Namespace) -> int:
    with cpu_threads(args.threads):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import demo
    from .routers import RouterSet
    from .runtime.model import optimize
    from .tune import time_plain_generate, time_tide_generate

    t_start = time.perf_counter()
    device = args.device or "cpu"
    name = args.model
    if args.routers and args.calibrate:
        raise ValueError("pass either --routers FILE or --calibrate, not both")
    if args.save_routers:  # before any work
        from .outputs import check_output_file

        check_output_file(args.save_routers, overwrite=args.force, inputs=model_input_files(name),
                          what="--save-routers", force_hint="--force")
    model, tokenizer = demo.load(name, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    where = (f"shipped with tide_compile, {demo.DEMO_DIR}" if name == "demo"
             else f"SmolLM2-135M-Instruct, {demo.smollm2_gguf()}")
    print(f"tide-compile demo: the {model.config.num_hidden_layers}-layer Llama {where} "
          f"({n_params / 1e6:.1f}M parameters), on {device}, float32, "
          f"{torch.get_num_threads()} thread(s)")
    shipped = demo.SHIPPED_ROUTERS[name]
    prompt = args.prompt if args.prompt is not None else demo.DEFAULT_PROMPTS[name]

    if args.routers:
        routers = RouterSet.load(args.routers, model=model)
        source = args.routers
    elif args.calibrate or not shipped.is_file():
        if not args.calibrate:
            print(f"no shipped routers at {shipped}: calibrating now")
        texts = None
        if args.data:
            from .calibration.data import find_text_files

            texts = [Path(p) for path in args.data for p in find_text_files(path)]
        t0 = time.perf_counter()
        routers = calibrate_demo_routers(model, tokenizer, texts, samples=args.calibration_samples,
                                         progress=not args.quiet, name=name)
        source = f"calibrated now in {time.perf_counter() - t0:.1f} s"
    else:
        routers = RouterSet.load(shipped, model=model)
        source = f"shipped, {shipped.relative_to(_PACKAGE)}"
    if args.save_routers:
        routers.save(args.save_routers, overwrite=args.force)
        print(f"wrote {args.save_routers}")
    print(_describe_routers(routers, source))
    threshold = routers.config.exit_threshold if args.threshold is None else args.threshold

    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(device)
    n = args.max_new_tokens
    # A CLI process compiles once; in-process callers (tests) may have compiled this
    # model class before, and Dynamo's per-function recompile limit would send this
    # compilation to eager.
    torch._dynamo.reset()
    kv = {"kv": args.kv, "max_pending": args.max_pending}
    fast = optimize(model, routers, exit_threshold=threshold, inductor=args.inductor, **kv)
    how = ("a prompt of 2048+ tokens compacts, a shorter one runs frozen, decode steps skip"
           if args.kv == "propagate" else
           f"kv deferred: exact K/V, decode steps {args.max_pending + 1} tokens wide")
    print(f'compiling with backend="tide" (exit_threshold {threshold:g}, strategy auto: {how}; '
          f"Inductor {'on' if args.inductor else 'off'}) ...", flush=True)
    tide_rate, compile_s, out = time_tide_generate(fast, ids, n, repeats=args.repeats)
    print(f"compiled in {compile_s:.1f} s (two warm-up generations: prefill and decode graphs)")
    plain_rate, plain_out = time_plain_generate(model, ids, n, repeats=args.repeats)
    never_rate = None
    if args.compare_never_exit:
        torch._dynamo.reset()
        never = optimize(model, routers, exit_threshold=1.0, inductor=args.inductor, **kv)
        never_rate, _, _ = time_tide_generate(never, ids, n, repeats=args.repeats)

    prompt_len = ids.shape[1]
    print()
    print(f"--- tide output (greedy, {n} new tokens) ---")
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    print("---")
    print()
    print(f"Exit stats (one generation; every token that ran through the model: {prompt_len} "
          f"prompt tokens and {n - 1} generated tokens fed back):")
    print(fast.tide_stats.summary())
    same = _common_prefix(out[0, prompt_len:], plain_out[0, prompt_len:])
    print()
    print(f"Speed ({n} new tokens, greedy, same prompt, median of {args.repeats} runs after warm-up):")
    lines = [("plain model.generate (eager)", plain_rate)]
    if never_rate is not None:
        lines.append(("tide, threshold 1.00 (never exits)", never_rate))
    lines.append((f"tide, threshold {threshold:g} (Inductor {'on' if args.inductor else 'off'})", tide_rate))
    width = max(len(label) for label, _ in lines)
    for label, rate in lines:
        print(f"  {label:<{width}}  {rate:8.1f} tokens/s")
    print(f"  tide / plain: {tide_rate / plain_rate:.2f}x")
    print(f"Text: tide's first {same} of {n} new tokens equal the plain model's greedy tokens"
          + ("." if same == n else
             " (exits change the logits of exiting tokens and, through the K/V they propagate, "
             "of later ones; greedy texts part at the first different token)." if args.kv == "propagate"
             else " (exits change the logits of exiting tokens; greedy texts part at the first "
             "different token)."))
    if device == "cpu" and name == "demo":
        print("Note: with a 4M-parameter model on a CPU, per-step Python and dispatch overhead is a "
              "large part of each step, in both loops (tide's static-cache loop vs HF generate); "
              "exits save little here. GPU results on an 8B-shaped model: benchmarks/RESULTS.md.")
    print(f"Total time: {time.perf_counter() - t_start:.1f} s")
    return 0


# ---------------------------------------------------------------------------- generate
def load_any(model: str, device: str | None, dtype: str) -> tuple[Any, Any]:
    """A named model (``demo``, ``smollm2``) or a local HuggingFace folder -> (model, tokenizer).

    Named models load in float32 unless ``dtype`` says otherwise; ``demo`` defaults to the
    CPU, the others to CUDA where there is one."""
    import torch

    from . import demo

    if model in demo.MODELS:
        from .cli import DTYPES

        name = DTYPES[dtype] or "float32"
        if device is None:
            device = "cuda" if model != "demo" and torch.cuda.is_available() else "cpu"
        return demo.load(model, dtype=getattr(torch, name), device=device)
    from .cli import load_model

    return load_model(model, device, dtype)


# Files that show a folder holds a model's weights / its tokenizer (any one of them).
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json",
                    "*.pt", "*.pth", "*.h5", "*.msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt", "tiktoken.model")


def check_model_arg(model: str) -> None:
    """Fail before any work unless ``model`` is a named model or a model folder: a folder
    with ``config.json``, weights and tokenizer files (each error names what is missing).

    Raises:
        ModelLoadError: one line naming the fix (a ``TIDEError`` for named models' errors too).
    """
    from . import demo

    if model in demo.MODELS:
        return
    path = Path(model).expanduser()
    names = f"pass a local HuggingFace model folder, or one of: {', '.join(demo.MODELS)}"
    if not path.exists():
        raise demo.ModelLoadError(f"no model folder at {model!r} ({names})")
    if not path.is_dir():
        raise demo.ModelLoadError(f"{model!r} is a file, not a model folder ({names})")
    if not (path / "config.json").is_file():
        raise demo.ModelLoadError(f"no config.json in {model}: it is not a HuggingFace model folder "
                                  f"({names}; save one with model.save_pretrained(folder))")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise demo.ModelLoadError(f"no weights in {model} (model.safetensors or pytorch_model.bin): "
                                  "save them with model.save_pretrained(folder)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise demo.ModelLoadError(f"no tokenizer files in {model} (tokenizer.json, tokenizer_config.json "
                                  "or tokenizer.model): save them with tokenizer.save_pretrained(folder)")


def model_input_files(model: str | None) -> list[Path]:
    """The files a run reads for ``--model`` (a folder's files, the demo model's, SmolLM2's
    GGUF): no output may be written over one of them."""
    from . import demo
    from .outputs import model_input_files as folder_files

    if model is None:
        return []
    if model == "demo":
        return folder_files(demo.DEMO_DIR)
    if model == "smollm2":
        try:
            return [demo.smollm2_gguf()]
        except demo.ModelLoadError:
            return []
    return folder_files(model)


def routers_for(model: Any, model_arg: str, routers_arg: str | None) -> Any:
    """``--routers FILE``, else the routers shipped for a named model."""
    from . import demo
    from .routers import RouterSet

    if routers_arg:
        return RouterSet.load(routers_arg, model=model)
    shipped = demo.SHIPPED_ROUTERS.get(model_arg)
    if shipped is not None and shipped.is_file():
        return RouterSet.load(shipped, model=model)
    raise ValueError("--routers FILE is required (make one with `tide-compile calibrate`)")


def run_generate(args: argparse.Namespace) -> int:
    with cpu_threads(args.threads):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .runtime.model import optimize

    from .validation import TIDEError

    if not args.prompt:
        raise TIDEError("--prompt is empty: pass the text to continue")
    lossless = args.mode == "lossless"
    if lossless and args.kv != "deferred":
        raise TIDEError("--mode lossless runs on exact K/V: drop --kv propagate")
    if lossless and args.strategy != "auto":
        raise TIDEError("--strategy is a --kv propagate setting; --mode lossless plans its "
                        "own graphs: drop --strategy")
    check_model_arg(args.model)
    model, tokenizer = load_any(args.model, args.device, args.dtype)
    routers = routers_for(model, args.model, args.routers)
    device = next(model.parameters()).device
    inductor = args.inductor if args.inductor is not None else device.type == "cuda"
    options: dict[str, Any] = {"inductor": inductor, "strategy": args.strategy, "kv": args.kv,
                               "max_pending": args.max_pending}
    if args.threshold is not None:
        options["exit_threshold"] = args.threshold
    if args.compaction_threshold is not None:
        options["compaction_threshold"] = args.compaction_threshold
    if args.compact_min_length is not None:
        options["compact_min_length"] = args.compact_min_length
    threshold = routers.config.exit_threshold if args.threshold is None else args.threshold
    enc = tokenizer(args.prompt, return_tensors="pt")
    ids = enc["input_ids"].to(device)
    mask = enc.get("attention_mask")
    torch._dynamo.reset()  # see run_demo
    fast = optimize(model, routers, mode=args.mode, **options)
    generator = None
    if args.do_sample:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = fast.generate(ids, max_new_tokens=args.max_new_tokens,
                        attention_mask=None if mask is None else mask.to(device),
                        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, generator=generator)
    elapsed = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    print()
    print(fast.tide_stats.summary())
    if lossless:
        print(fast.lossless_stats.summary())
    print(f"{new} new tokens in {elapsed:.1f} s, compilation included (exit_threshold "
          f"{threshold:g}, Inductor {'on' if inductor else 'off'}, {device}; steady-state "
          "tokens/s: `tide-compile tune` or `tide-compile demo`)")
    return 0
