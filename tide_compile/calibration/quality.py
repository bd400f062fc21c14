"""The quality table: what a threshold buys, measured on held-out tokens.

Two views, both over a grid of thresholds and both with "agreement" meaning *the exit
head's top-1 token equals the full model's* (whatever labels the routers were trained on):

- ``view="checkpoint"``: each checkpoint on its own. ``precision`` = agreement among the
  tokens whose score exceeds the threshold there, ``exit_rate`` = their fraction,
  ``recall`` = the fraction of agreeing tokens that they catch.
- ``view="first_exit"``: the threshold applied at every checkpoint, each token leaving at
  the first checkpoint whose score exceeds it (what inference does). ``agreement`` =
  agreement among exiting tokens, ``token_agreement`` = agreement over all tokens (a
  token that does not exit agrees by definition), ``exit_rate``, ``mean_depth`` (layers a
  token's output was computed from) and ``exits`` per checkpoint.

Rows are plain JSON-able dicts (saved in the router file's metadata). Undefined ratios
(no token exits) are ``None``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..validation import TIDEError

__all__ = [
    "THRESHOLD_GRID",
    "MIN_EXITS",
    "row_exits",
    "quality_table",
    "threshold_for",
    "QualityReport",
    "report",
    "plot",
]

#: Thresholds of the quality table: 0.01, 0.02, ..., 0.99, 0.995, 0.999.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(1, 100)) + (0.995, 0.999)
#: Fewest held-out tokens that must exit at a threshold for ``threshold_for`` to count
#: it. Below this a row's agreement says little (one exiting token gives 0% or 100%),
#: and a Wilson bound over a handful of tokens vetoes every target.
MIN_EXITS = 50
# Thresholds shown by report() (the file keeps the whole grid).
_REPORT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def quality_table(
    scores: Mapping[int, torch.Tensor],
    agree: Mapping[int, torch.Tensor],
    num_layers: int,
    thresholds: Sequence[float] = THRESHOLD_GRID,
) -> list[dict[str, Any]]:
    """Rows of both views from held-out ``scores`` and top-1 ``agree`` flags per checkpoint.

    Args:
        scores: checkpoint -> ``[n]`` router scores of the held-out tokens (same tokens
            at every checkpoint, in the same order).
        agree: checkpoint -> ``[n]`` bool, exit head top-1 == full model top-1.
        num_layers: decoder layers of the model (depth of a token that never exits).
    """
    layers = sorted(scores)
    s = torch.stack([scores[c].float().cpu() for c in layers])  # [C, n]
    a = torch.stack([agree[c].bool().cpu() for c in layers])  # [C, n]
    n = s.shape[1]
    depth = torch.tensor([c + 1 for c in layers], dtype=torch.float64)
    rows: list[dict[str, Any]] = []
    for ci, c in enumerate(layers):
        n_agree = int(a[ci].sum())
        for t in thresholds:
            ex = s[ci] > t
            k = int(ex.sum())
            hit = int((ex & a[ci]).sum())
            rows.append(
                {
                    "view": "checkpoint",
                    "layer": c,
                    "threshold": t,
                    "precision": _ratio(hit, k),
                    "exit_rate": _ratio(k, n),
                    "recall": _ratio(hit, n_agree),
                    "tokens": n,
                }
            )
    for t in thresholds:
        over = s > t  # [C, n]
        exited = over.any(0)
        first = over.to(torch.int8).argmax(0)  # first checkpoint over t (0 where none)
        k = int(exited.sum())
        hit = int(a[first, torch.arange(n)][exited].sum()) if n else 0
        tok_depth = torch.where(exited, depth[first], torch.tensor(float(num_layers), dtype=torch.float64))
        counts = torch.bincount(first[exited].long(), minlength=len(layers)).tolist() if n else [0] * len(layers)
        rows.append(
            {
                "view": "first_exit",
                "threshold": t,
                "agreement": _ratio(hit, k),
                "token_agreement": _ratio(n - k + hit, n),
                "exit_rate": _ratio(k, n),
                "mean_depth": round(float(tok_depth.mean()), 4) if n else None,
                "exits": {str(c): int(m) for c, m in zip(layers, counts)},
                "tokens": n,
            }
        )
    return rows


def _first_exit_rows(table: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = sorted((r for r in table if r.get("view") == "first_exit"), key=lambda r: r["threshold"])
    if not rows:
        raise TIDEError(
            "these routers have no quality table (they were not calibrated, e.g. RouterSet.forced); "
            "calibrate them with tide_compile.calibrate(model, tokenizer, dataset=...)"
        )
    return rows


def _normal_quantile(p: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))


def agreement_lower_bound(agreed: int, exited: int, confidence: float) -> float:
    """One-sided Wilson lower confidence bound of ``agreed / exited`` (1.0 when nothing exits)."""
    if exited == 0:
        return 1.0
    if confidence <= 0.5:
        return agreed / exited
    z = _normal_quantile(confidence)
    p = agreed / exited
    denom = 1.0 + z * z / exited
    centre = p + z * z / (2 * exited)
    margin = z * math.sqrt(p * (1 - p) / exited + z * z / (4 * exited * exited))
    return (centre - margin) / denom


def row_exits(row: Mapping[str, Any]) -> int | None:
    """How many held-out tokens exit in a first-exit row (None: a table without counts)."""
    exits = row.get("exits")
    if not isinstance(exits, Mapping):
        return None
    return int(sum(exits.values()))


def threshold_for(
    table: Sequence[Mapping[str, Any]],
    target_agreement: float,
    confidence: float = 0.9,
    *,
    min_exits: int = MIN_EXITS,
) -> float:
    """The smallest table threshold whose held-out first-exit agreement meets the target.

    Agreement = the fraction of exiting tokens whose exit-head top-1 equals the full
    model's. Evidence rules:

    - A row counts only if at least ``min_exits`` held-out tokens exit at its threshold
      (rows without counts, and rows where no token exits, have no evidence). Rows with
      fewer exits neither pass nor veto: they are skipped.
    - A counted row passes when the one-sided Wilson lower bound of its agreement, over
      its exiting tokens, at ``confidence`` meets ``target_agreement`` (``confidence=0.5``:
      the estimate itself). Held-out agreement is an estimate, and picking the smallest
      passing threshold favours thresholds whose estimate came out high.
    - The answer is the smallest counted threshold ``t`` such that every counted row
      ``>= t`` passes (agreement is not monotone in the threshold on finite data).

    If no counted row passes, returns 1.0 (never exit) with a warning that says why: a
    calibration too small to support the target (too few exits anywhere for its Wilson
    bound to reach it) asks for more text; otherwise the target is out of reach.
    """
    if not (isinstance(target_agreement, (int, float)) and 0.0 <= target_agreement <= 1.0):
        raise TIDEError(f"target_agreement must be in [0, 1], got {target_agreement!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 <= confidence < 1.0):
        raise TIDEError(f"confidence must be in [0, 1), got {confidence!r}")
    if isinstance(min_exits, bool) or not isinstance(min_exits, int) or min_exits < 1:
        raise TIDEError(f"min_exits must be an integer >= 1, got {min_exits!r}")
    best = 1.0
    most = 0
    for row in reversed(_first_exit_rows(table)):
        exited = row_exits(row)
        agreement = row.get("agreement")
        if exited is None or agreement is None:
            continue
        most = max(most, exited)
        if exited < min_exits:
            continue  # too little evidence: neither passes nor vetoes
        if agreement_lower_bound(round(agreement * exited), exited, confidence) < target_agreement:
            break
        best = float(row["threshold"])
    if best == 1.0:
        needed = _exits_needed(target_agreement, confidence, min_exits)
        if most < needed < 1 << 24:
            why = (f"the calibration is too small to support held-out agreement {target_agreement}: "
                   f"that needs at least {needed} exiting held-out tokens at a threshold, and the "
                   f"most at any threshold is {most}. Calibrate on more text "
                   "(calibration_samples, --samples) or lower the target")
        else:
            why = (f"no calibrated threshold reaches held-out agreement {target_agreement} "
                   f"(Wilson bound at confidence {confidence}, rows with at least {min_exits} "
                   "exiting tokens). Lower the target, calibrate on more data, or use "
                   "exit_strategy='projection'")
        warnings.warn(f"{why}: returning 1.0 (no token exits).", stacklevel=3)
    return best


def _exits_needed(target: float, confidence: float, min_exits: int) -> int:
    """Fewest exits whose Wilson bound can reach ``target`` (all of them agreeing), and at
    least ``min_exits``."""
    n = min_exits
    while n < 1 << 24 and agreement_lower_bound(n, n, confidence) < target:
        n *= 2
    lo, hi = max(min_exits, n // 2), n
    while lo < hi:  # smallest n in [lo, hi] that reaches it
        mid = (lo + hi) // 2
        if agreement_lower_bound(mid, mid, confidence) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


class QualityReport:
    """The quality table as text (``str``/``repr``) with the rows at hand (``.rows``)."""

    def __init__(
        self,
        table: Sequence[Mapping[str, Any]],
        *,
        num_layers: int,
        checkpoint_layers: Sequence[int],
        calibration: Mapping[str, Any] | None = None,
        thresholds: Sequence[float] = _REPORT_THRESHOLDS,
    ) -> None:
        self.rows = [dict(r) for r in table]
        self.num_layers = num_layers
        self.checkpoint_layers = list(checkpoint_layers)
        self.calibration = dict(calibration or {})
        self.thresholds = tuple(thresholds)

    def _shown(self, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [r for r in rows if any(abs(r["threshold"] - t) < 1e-9 for t in self.thresholds)]

    def text(self) -> str:
        first = self._shown(_first_exit_rows(self.rows))
        n = first[0]["tokens"] if first else 0
        cal = self.calibration
        lines = [
            f"TIDE router quality on {n} held-out tokens ({self.num_layers} layers, "
            f"checkpoints {self.checkpoint_layers}; labels: {cal.get('labels', '?')}, "
            f"exit strategy: {cal.get('exit_strategy', 'identity')})",
            "",
            "First exit, one threshold at every checkpoint (exiting: the held-out tokens that "
            f"exit, the evidence behind the agreement; * fewer than {MIN_EXITS}, not counted "
            "by threshold_for):",
            f"{'threshold':>9}  {'agreement':>9}  {'exiting':>8}  {'all-token':>9}  {'exit rate':>9}  "
            f"{'mean depth':>10}  exits per checkpoint",
        ]
        for r in first:
            exits = " ".join(f"{c}:{k}" for c, k in r["exits"].items())
            n_exit = row_exits(r)
            count = "-" if n_exit is None else f"{n_exit}{'*' if n_exit < MIN_EXITS else ' '}"
            lines.append(
                f"{r['threshold']:>9g}  {_fmt(r['agreement']):>9}  {count:>8}  {_fmt(r['token_agreement']):>9}  "
                f"{_fmt(r['exit_rate']):>9}  {_fmt(r['mean_depth'], pct=False):>10}  {exits}"
            )
        agreement = cal.get("exit_agreement")
        if agreement:
            lines += ["", "Held-out top-1 agreement of each exit head with the full model (no router):"]
            for c, v in agreement.items():
                extra = f", with projection {_fmt(v['projection'])}" if v.get("projection") is not None else ""
                lines.append(f"  layer {c}: identity {_fmt(v['identity'])}{extra}")
        lines += ["", "Per checkpoint alone (precision / exit rate / recall (exiting tokens)):"]
        per = [r for r in self.rows if r.get("view") == "checkpoint"]
        header = f"{'threshold':>9}  " + "  ".join(f"{'layer ' + str(c):>28}" for c in self.checkpoint_layers)
        lines.append(header)
        by_t: dict[float, dict[int, Mapping[str, Any]]] = {}
        for r in self._shown(per):
            by_t.setdefault(r["threshold"], {})[r["layer"]] = r
        for t in sorted(by_t):
            cells = []
            for c in self.checkpoint_layers:
                r = by_t[t].get(c)
                if r is None:
                    cell = "-"
                else:
                    n_exit = round((r["exit_rate"] or 0.0) * r.get("tokens", 0))
                    cell = f"{_fmt(r['precision'])}/{_fmt(r['exit_rate'])}/{_fmt(r['recall'])} ({n_exit})"
                cells.append(f"{cell:>28}")
            lines.append(f"{t:>9g}  " + "  ".join(cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    __repr__ = __str__


def report(routers: Any) -> QualityReport:
    """The quality report of a calibrated RouterSet."""
    _first_exit_rows(routers.quality_table)
    return QualityReport(
        routers.quality_table,
        num_layers=routers.num_layers,
        checkpoint_layers=routers.checkpoint_layers,
        calibration=routers.calibration,
    )


def plot(routers: Any, path: str, *, overwrite: bool = False) -> None:
    """Draw the quality table to ``path`` (any format matplotlib writes, e.g. ``.png``);
    written atomically, an existing file replaced only with ``overwrite=True``."""
    from ..outputs import atomic_write, check_output_file

    target = check_output_file(path, overwrite=overwrite, what="plot file")
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "RouterSet.plot needs matplotlib: pip install 'tide-compile[bench]' (or pip install matplotlib)"
        ) from exc
    first = _first_exit_rows(routers.quality_table)
    ts = [r["threshold"] for r in first]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(ts, [r["agreement"] for r in first], label="agreement of exiting tokens")
    ax1.plot(ts, [r["exit_rate"] for r in first], label="exit rate")
    ax1.plot(ts, [r["mean_depth"] / routers.num_layers for r in first], label="mean depth / layers")
    ax1.set_xlabel("exit threshold")
    ax1.set_title("first exit, all checkpoints")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for c in routers.checkpoint_layers:
        rows = [r for r in routers.quality_table if r.get("view") == "checkpoint" and r["layer"] == c]
        rows.sort(key=lambda r: r["threshold"])
        ax2.plot([r["exit_rate"] for r in rows], [r["precision"] for r in rows], label=f"layer {c}")
    ax2.set_xlabel("exit rate at this checkpoint alone")
    ax2.set_ylabel("precision (agreement of exiting tokens)")
    ax2.set_title("per checkpoint")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fmt = target.suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(target, lambda tmp: fig.savefig(tmp, format=fmt))
    finally:
        plt.close(fig)
