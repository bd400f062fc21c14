"""Threshold sweep: what each ``exit_threshold`` buys and costs on held-out text.

For each threshold, teacher-forced on non-overlapping windows of held-out text with
:func:`tide_compile.reference.forward` (per-token exits under the K/V semantics ``kv``,
the one ``optimize`` runs: ``"deferred"`` by default, exact K/V; logits at every
position), against the full model's logits on the same windows:

* ``exit_rate``: fraction of scored positions that exited at a checkpoint;
* ``mean_depth``: mean number of layers a position's output was computed from;
* ``agreement``: fraction of positions where tide's top-1 equals the full model's
  (over all positions; under ``kv="propagate"`` a token that did not exit can still
  differ, since it attends to K/V that exited tokens propagated from their frozen states);
* ``perplexity`` of tide's logits on the text, and its change against the full model's;

and, unless ``new_tokens=0``, decode speed: ``optimize(model, routers,
exit_threshold=t, kv=kv).generate`` on a prompt (greedy, a fixed number of new tokens, after
warm-up calls that compile), against plain ``model.generate`` on the same prompt and
length, timed right after it in the same process.

``sweep`` returns a :class:`TuneResult`; ``write_tables`` writes it as markdown, CSV
and JSON; ``plot`` draws it (matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .options import DEFAULT_OPTIMIZE_KV
from .outputs import atomic_write, check_output_dir, check_output_file
from .routers import RouterSet
from .validation import TIDEError

__all__ = [
    "TABLE_FILES",
    "TuneRow",
    "TuneResult",
    "parse_thresholds",
    "token_windows",
    "sweep",
    "time_plain_generate",
    "time_tide_generate",
    "write_tables",
    "plot",
]

#: The files :func:`write_tables` writes into its folder (:func:`plot` adds ``tune.png``).
TABLE_FILES = ("tune.md", "tune.csv", "tune.json")


@dataclass
class TuneRow:
    """One threshold's measurements (``None``: not measured)."""

    threshold: float
    exit_rate: float
    mean_depth: float
    agreement: float
    perplexity: float
    perplexity_change: float
    """``perplexity / full-model perplexity - 1``."""
    tokens_per_s: float | None = None
    plain_tokens_per_s: float | None = None
    """Plain ``model.generate`` tokens/s, measured just before this row's tide runs."""
    speedup_vs_plain: float | None = None
    """``tokens_per_s / plain_tokens_per_s``."""
    decode_layers_per_token: float | None = None
    """Layers that really ran per token in the timed generation (prompt included)."""


@dataclass
class TuneResult:
    rows: list[TuneRow]
    num_layers: int
    checkpoint_layers: list[int]
    scored_tokens: int
    window: int
    perplexity_full: float
    plain_tokens_per_s: float | None
    """Median of the rows' plain ``model.generate`` measurements."""
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d

    def markdown(self) -> str:
        """The table as markdown (percentages and 2-3 significant decimals)."""
        L = self.num_layers
        head = ("| threshold | exit rate | mean depth (of {L}) | top-1 agreement | perplexity "
                "| ppl change | tokens/s | x plain | layers run/token |").format(L=L)
        lines = [head, "|" + "---|" * 9]

        def opt(x: float | None, fmt: str) -> str:
            return "n/a" if x is None else format(x, fmt)

        lines.append(f"| full model (plain generate) | 0.0% | {L:.2f} | 100.0% | {self.perplexity_full:.2f} "
                     f"| +0.0% | {opt(self.plain_tokens_per_s, '.1f')} | "
                     f"{opt(1.0 if self.plain_tokens_per_s else None, '.2f')} | {L:.2f} |")
        for r in self.rows:
            lines.append(
                f"| {r.threshold:g} | {100 * r.exit_rate:.1f}% | {r.mean_depth:.2f} | "
                f"{100 * r.agreement:.1f}% | {r.perplexity:.2f} | {100 * r.perplexity_change:+.1f}% | "
                f"{opt(r.tokens_per_s, '.1f')} | {opt(r.speedup_vs_plain, '.2f')} | "
                f"{opt(r.decode_layers_per_token, '.2f')} |"
            )
        return "\n".join(lines)

    def smallest_threshold(self, target_agreement: float) -> float | None:
        """Smallest swept threshold whose agreement meets the target, at it and at every
        larger swept threshold; None if none does."""
        best = None
        for r in sorted(self.rows, key=lambda r: r.threshold, reverse=True):
            if r.agreement < target_agreement:
                break
            best = r.threshold
        return best


def parse_thresholds(text: str) -> list[float]:
    """``"0.5,0.6,0.9"`` -> ``[0.5, 0.6, 0.9]`` (sorted, unique, each in [0, 1])."""
    values = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise TIDEError(f"thresholds: {part!r} is not a number (write e.g. 0.5,0.7,0.9)") from None
        if not 0.0 <= value <= 1.0:
            raise TIDEError(f"thresholds: {value} is outside [0, 1]")
        values.append(value)
    if not values:
        raise TIDEError("thresholds: none given (write e.g. 0.5,0.7,0.9)")
    return sorted(set(values))


def _encode(tokenizer: Any, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # no max-length warning on long texts
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(tokenizer: Any, texts: Sequence[str], window: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping ``window``-token windows of ``texts`` (at most ``max_tokens`` tokens
    in all), each after a leading BOS when the tokenizer has one: ``[n, window + 1]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    rows: list[list[int]] = []
    budget = max_tokens
    for text in texts:
        ids = _encode(tokenizer, text)
        for i in range(0, len(ids) - window + 1, window):
            if budget < window:
                break
            chunk = ids[i : i + window]
            rows.append(([bos] if bos is not None else [chunk[0]]) + chunk)
            budget -= window
    if not rows:
        raise TIDEError(
            f"the text has fewer than window={window} tokens: pass more text or a smaller --window"
        )
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _quality(model: nn.Module, routers: RouterSet, windows: torch.Tensor,
             thresholds: Sequence[float], batch_size: int,
             progress: Callable[[str], None] | None,
             kv: str) -> tuple[list[dict[str, float]], float, int]:
    from . import reference
    from .model_probe import probe

    p = probe(model)
    device = next(model.parameters()).device
    acc = [{"exited": 0, "depth": 0, "agree": 0, "nll": 0.0} for _ in thresholds]
    nll_full = 0.0
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        x = windows[start : start + batch_size].to(device)
        target = x[:, 1:]
        full = model(input_ids=x).logits[:, :-1].float()
        nll_full += float(torch.nn.functional.cross_entropy(
            full.reshape(-1, full.shape[-1]), target.reshape(-1), reduction="sum"))
        full_top1 = full.argmax(-1)
        count += target.numel()
        for i, t in enumerate(thresholds):
            out = reference.forward(model, routers, x, exit_threshold=t, kv=kv, _probe=p)
            logits = out.logits[:, :-1].float()
            exits = out.exit_layers[:, :-1]
            depth = torch.where(exits >= 0, exits + 1, torch.full_like(exits, p.num_layers))
            a = acc[i]
            a["exited"] += int((exits >= 0).sum())
            a["depth"] += int(depth.sum())
            a["agree"] += int((logits.argmax(-1) == full_top1).sum())
            a["nll"] += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        if progress:
            progress(f"  quality: {min(start + batch_size, windows.shape[0])}/{windows.shape[0]} windows")
    ppl_full = math.exp(nll_full / count)
    rows = []
    for a in acc:
        ppl = math.exp(a["nll"] / count)
        rows.append({
            "exit_rate": a["exited"] / count,
            "mean_depth": a["depth"] / count,
            "agreement": a["agree"] / count,
            "perplexity": ppl,
            "perplexity_change": ppl / ppl_full - 1.0,
        })
    return rows, ppl_full, count


@torch.no_grad()
def time_plain_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                        repeats: int = 3) -> tuple[float, torch.Tensor]:
    """Median tokens/s of plain greedy ``model.generate`` producing exactly ``new_tokens``
    (one untimed warm-up call first), and the generated sequence."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(input_ids))
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(gen_cfg, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
    if pad is not None:
        kwargs["pad_token_id"] = pad
    model.generate(input_ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    rates = []
    out = input_ids
    for _ in range(max(1, repeats)):
        _sync(input_ids.device)
        t0 = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        _sync(input_ids.device)
        rates.append((out.shape[1] - input_ids.shape[1]) / (time.perf_counter() - t0))
    return statistics.median(rates), out


@torch.no_grad()
def time_tide_generate(fast: Any, input_ids: torch.Tensor, new_tokens: int,
                       repeats: int = 3) -> tuple[float, float, torch.Tensor]:
    """Median tokens/s of greedy ``fast.generate`` producing exactly ``new_tokens`` (EOS
    ignored, so both runs have the same length), after two untimed warm-up calls of the
    same shape: the first compiles prefill and decode, the second recompiles prefill
    (Dynamo guards on the StaticCache's ``is_initialized``, which ``reset()`` leaves True).

    Returns (tokens/s, compile seconds = the warm-up calls, sequence). ``fast.tide_stats``
    holds the exits of the last timed call only.
    """
    t0 = time.perf_counter()
    for _ in range(2):
        fast.generate(input_ids, max_new_tokens=new_tokens, eos_token_id=[])
    _sync(input_ids.device)
    compile_s = time.perf_counter() - t0
    rates = []
    out = input_ids
    for _ in range(max(1, repeats)):
        fast.tide_stats.reset()
        _sync(input_ids.device)
        t0 = time.perf_counter()
        out = fast.generate(input_ids, max_new_tokens=new_tokens, eos_token_id=[])
        _sync(input_ids.device)
        rates.append((out.shape[1] - input_ids.shape[1]) / (time.perf_counter() - t0))
    return statistics.median(rates), compile_s, out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep(
    model: nn.Module,
    tokenizer: Any,
    routers: RouterSet,
    texts: Sequence[str],
    thresholds: Sequence[float],
    *,
    window: int = 128,
    max_tokens: int = 4096,
    batch_size: int = 8,
    prompt_tokens: int = 16,
    new_tokens: int = 32,
    repeats: int = 3,
    inductor: bool = False,
    kv: str = DEFAULT_OPTIMIZE_KV,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure each threshold on ``texts`` (see the module docstring).

    Args:
        model, tokenizer, routers: the model, its tokenizer, routers made for it.
        texts: held-out text (not the calibration text).
        thresholds: exit thresholds to try, each in [0, 1].
        window, max_tokens: teacher-forced windows of ``window`` tokens, at most
            ``max_tokens`` scored tokens in all.
        batch_size: windows per forward.
        prompt_tokens, new_tokens: the speed prompt is the first ``prompt_tokens`` tokens
            of the text; each run generates exactly ``new_tokens``. ``new_tokens=0``
            skips the speed measurement.
        repeats: timed runs per threshold (the median is reported).
        inductor: compile tide's graphs with Inductor (slow to compile on CPU).
        kv: the K/V semantics of both the quality rows and the speed runs
            (``optimize``'s default, ``"deferred"``, or ``"propagate"``).
        progress: called with a line of progress text.

    Speed runs call ``torch._dynamo.reset()`` before each threshold: every
    ``optimize`` compiles ``model.forward`` again, and Dynamo's per-function recompile
    limit would otherwise send later thresholds to eager execution.
    """
    from .reference import check_kv
    from .runtime.model import optimize

    check_kv(kv)
    thresholds = [float(t) for t in thresholds]
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise TIDEError(f"threshold {t} is outside [0, 1]")
    routers.check_model(model)
    windows = token_windows(tokenizer, texts, window, max_tokens)
    say = progress or (lambda _line: None)
    say(f"quality: {windows.shape[0]} windows of {window} tokens, {len(thresholds)} thresholds")
    quality_rows, ppl_full, count = _quality(model, routers, windows, thresholds, batch_size,
                                             progress, kv)

    rows = [TuneRow(threshold=t, **q) for t, q in zip(thresholds, quality_rows)]
    plain = None
    if new_tokens > 0:
        device = next(model.parameters()).device
        prompt = windows[:1, : prompt_tokens + 1].to(device)
        plains = []
        for row in rows:
            torch._dynamo.reset()
            fast = optimize(model, routers, exit_threshold=row.threshold, inductor=inductor, kv=kv)
            rate, compile_s, _ = time_tide_generate(fast, prompt, new_tokens, repeats)
            # The plain baseline is timed beside each row: on a shared machine the
            # speed drifts over a sweep, and a ratio of neighbours drifts less.
            plain_rate, _ = time_plain_generate(model, prompt, new_tokens, repeats)
            plains.append(plain_rate)
            row.tokens_per_s = rate
            row.plain_tokens_per_s = plain_rate
            row.speedup_vs_plain = rate / plain_rate
            row.decode_layers_per_token = fast.tide_stats.mean_layers_executed
            say(f"speed: threshold {row.threshold:g}: {rate:.1f} tokens/s, plain model.generate "
                f"{plain_rate:.1f} (compiled in {compile_s:.1f} s)")
        plain = statistics.median(plains)
        torch._dynamo.reset()
    return TuneResult(
        rows=rows,
        num_layers=routers.num_layers,
        checkpoint_layers=routers.checkpoint_layers,
        scored_tokens=count,
        window=window,
        perplexity_full=ppl_full,
        plain_tokens_per_s=plain,
        settings={
            "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens if new_tokens else None,
            "new_tokens": new_tokens,
            "repeats": repeats if new_tokens else None,
            "inductor": inductor,
            "kv": kv,
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    )


def write_tables(result: TuneResult, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Write ``tune.md``, ``tune.csv`` and ``tune.json`` into ``out_dir``; returns the paths.

    ``out_dir`` is created if missing (its parent must exist). Each file is written
    atomically; existing ones are replaced only with ``overwrite=True`` (checked for all
    three before any is written).
    """
    out = check_output_dir(out_dir, TABLE_FILES, overwrite=overwrite, what="tune output folder")
    out.mkdir(exist_ok=True)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(result.rows[0])))
            writer.writeheader()
            for r in result.rows:
                writer.writerow(asdict(r))

    md, csv_path, js = (out / name for name in TABLE_FILES)
    atomic_write(md, lambda tmp: Path(tmp).write_text(result.markdown() + "\n", encoding="utf-8"))
    atomic_write(csv_path, write_csv)
    atomic_write(js, lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=1) + "\n",
                                                      encoding="utf-8"))
    return [md, csv_path, js]


def plot(result: TuneResult, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Draw the sweep to ``path`` (needs matplotlib: ``pip install 'tide-compile[bench]'``);
    written atomically, an existing file replaced only with ``overwrite=True``."""
    target = check_output_file(path, overwrite=overwrite, what="tune plot")
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "the tune plot needs matplotlib: pip install 'tide-compile[bench]' "
            "(or pip install matplotlib), or pass --no-plot"
        ) from exc
    ts = [r.threshold for r in result.rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(ts, [r.exit_rate for r in result.rows], "o-", label="exit rate")
    ax1.plot(ts, [r.mean_depth / result.num_layers for r in result.rows], "o-",
             label=f"mean depth / {result.num_layers} layers")
    ax1.plot(ts, [r.agreement for r in result.rows], "o-", label="top-1 agreement with full model")
    ax1.plot(ts, [r.perplexity_change for r in result.rows], "o-", label="perplexity change")
    ax1.axhline(0, color="gray", lw=0.5)
    ax1.set_xlabel("exit threshold")
    ax1.set_title(f"teacher-forced, {result.scored_tokens} held-out tokens")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    speed = [(r.threshold, r.tokens_per_s) for r in result.rows if r.tokens_per_s is not None]
    if speed:
        ax2.plot([s[0] for s in speed], [s[1] for s in speed], "o-", label="tide generate")
        ax2.plot([r.threshold for r in result.rows if r.plain_tokens_per_s is not None],
                 [r.plain_tokens_per_s for r in result.rows if r.plain_tokens_per_s is not None],
                 "s--", color="gray", label="plain model.generate (timed beside each)")
        ax2.set_ylim(bottom=0)
        ax2.set_ylabel("tokens/s")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "speed not measured", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("exit threshold")
    s = result.settings
    ax2.set_title(f"decode speed ({s.get('device')}, inductor {'on' if s.get('inductor') else 'off'})")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fmt = target.suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(target, lambda tmp: fig.savefig(tmp, format=fmt))
    finally:
        plt.close(fig)
