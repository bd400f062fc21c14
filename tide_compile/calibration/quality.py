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

__all__ = [
    "THRESHOLD_GRID",
    "quality_table",
    "threshold_for",
    "QualityReport",
    "report",
    "plot",
]

#: Thresholds of the quality table: 0.01, 0.02, ..., 0.99, 0.995, 0.999.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(1, 100)) + (0.995, 0.999)
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
        raise ValueError(
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


def threshold_for(
    table: Sequence[Mapping[str, Any]], target_agreement: float, confidence: float = 0.9
) -> float:
    """The smallest table threshold whose held-out first-exit agreement meets the target.

    Agreement = the fraction of exiting tokens whose exit-head top-1 equals the full
    model's. Held-out agreement is an estimate from a finite sample, and picking the
    smallest passing threshold favours thresholds whose estimate came out high; so a
    threshold qualifies when the one-sided Wilson lower bound of its agreement at
    ``confidence`` meets ``target_agreement`` (``confidence=0.5`` uses the estimate
    itself), and the answer is the smallest ``t`` such that *every* table threshold
    ``>= t`` qualifies (agreement is not monotone in the threshold on finite data; a
    threshold where no token exits qualifies). If even the largest fails, returns 1.0
    (never exit) with a warning.
    """
    if not (isinstance(target_agreement, (int, float)) and 0.0 <= target_agreement <= 1.0):
        raise ValueError(f"target_agreement must be in [0, 1], got {target_agreement!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 <= confidence < 1.0):
        raise ValueError(f"confidence must be in [0, 1), got {confidence!r}")
    best = 1.0
    for row in reversed(_first_exit_rows(table)):
        exited = sum(row["exits"].values()) if "exits" in row else None
        agreement = row["agreement"]
        if agreement is None:
            ok = True
        elif exited is None:  # a hand-made table without counts: the estimate itself
            ok = agreement >= target_agreement
        else:
            ok = agreement_lower_bound(round(agreement * exited), exited, confidence) >= target_agreement
        if not ok:
            break
        best = float(row["threshold"])
    if best == 1.0:
        warnings.warn(
            f"no calibrated threshold reaches held-out agreement {target_agreement}: returning 1.0 "
            "(no token exits). Lower the target, calibrate on more data, or use exit_strategy='projection'.",
            stacklevel=3,
        )
    return best


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
            "First exit, one threshold at every checkpoint:",
            f"{'threshold':>9}  {'agreement':>9}  {'all-token':>9}  {'exit rate':>9}  {'mean depth':>10}  exits per checkpoint",
        ]
        for r in first:
            exits = " ".join(f"{c}:{k}" for c, k in r["exits"].items())
            lines.append(
                f"{r['threshold']:>9.2f}  {_fmt(r['agreement']):>9}  {_fmt(r['token_agreement']):>9}  "
                f"{_fmt(r['exit_rate']):>9}  {_fmt(r['mean_depth'], pct=False):>10}  {exits}"
            )
        agreement = cal.get("exit_agreement")
        if agreement:
            lines += ["", "Held-out top-1 agreement of each exit head with the full model (no router):"]
            for c, v in agreement.items():
                extra = f", with projection {_fmt(v['projection'])}" if v.get("projection") is not None else ""
                lines.append(f"  layer {c}: identity {_fmt(v['identity'])}{extra}")
        lines += ["", "Per checkpoint alone (precision / exit rate / recall):"]
        per = [r for r in self.rows if r.get("view") == "checkpoint"]
        header = f"{'threshold':>9}  " + "  ".join(f"{'layer ' + str(c):>20}" for c in self.checkpoint_layers)
        lines.append(header)
        by_t: dict[float, dict[int, Mapping[str, Any]]] = {}
        for r in self._shown(per):
            by_t.setdefault(r["threshold"], {})[r["layer"]] = r
        for t in sorted(by_t):
            cells = []
            for c in self.checkpoint_layers:
                r = by_t[t].get(c)
                cell = "-" if r is None else f"{_fmt(r['precision'])}/{_fmt(r['exit_rate'])}/{_fmt(r['recall'])}"
                cells.append(f"{cell:>20}")
            lines.append(f"{t:>9.2f}  " + "  ".join(cells))
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


def plot(routers: Any, path: str) -> None:
    """Draw the quality table to ``path`` (any format matplotlib writes, e.g. ``.png``)."""
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
    fig.savefig(path)
    plt.close(fig)
