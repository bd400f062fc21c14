#!/usr/bin/env python3
"""Which router features pay? Issue 20's measurement, on real weights, under exact K/V.

Every number here is for **independent exits** (``kv="deferred"`` teacher-forced): each
token's own exit decision and exit head, every K/V the full model's. A token's hidden
state at checkpoint ``c`` is then exactly the plain model's ``h_c``, so the whole study
runs on the plain model's states (collected once with
``tide_compile.calibration.collect.collect_states``); ``--check-batches`` confirms the
semantics against ``tide_compile.reference.forward(..., kv="deferred")`` with the shipped
routers.

Per token ``t`` and checkpoint ``c`` (every ``--interval`` layers), with the exit head of
``--heads``: ``identity`` (``lm_head(final_norm(h_c))``) or ``projection`` (the rank-64
exit projection ``E_c`` that ``calibrate(..., exit_strategy="projection")`` trains,
trained here by ``calibration.train.train_projection`` on the calibration train split and
read out the way the runtime reads it, ``lm_head(final_norm(E_c(h_c)))``):

* the full model's top-1, the exit head's top-1 at ``c`` (full vocabulary);
* labels: ``agree`` (exit head top-1 == full top-1 at ``c``) and ``stable`` (agrees at
  ``c`` and at every later checkpoint);
* features:

  - ``rms``: ``rms(h_c)`` (what the current routers read: ``TokenRouter``);
  - ``conf:<source><k>``: the exit head's confidence over a candidate set of ``k`` tokens,
    from logits ``lm_head[S] @ final_norm(E_c(h_c))`` (a gather-matmul over k rows of
    ``lm_head``, O(k*H); computed here by gathering the full logits, which is the same
    number, see :func:`candidate_logits`): max prob, margin p1 - p2, entropy / log k,
    top logit z1, logit margin z1 - z2, whether the candidate top-1 equals the previous
    checkpoint's candidate top-1, and for how many consecutive checkpoints it has (a
    counter per token). Sources:

    * ``prev``: top-k of the previous token's full-depth logits (the brief's source);
    * ``succ``: a static successor table from the calibration text: for each input
      token id, the k tokens the full model most often predicts after it (filled up with
      the globally most frequent predictions); ``vocab x k`` ints, a lookup at decode time;
    * ``mix``: k/2 from ``succ`` and k/2 from ``prev`` (duplicates masked);
  - ``conf:full``: the same confidences over the whole vocabulary (the expensive upper
    reference: a full ``lm_head`` read per checkpoint).

* routers (one per checkpoint, one per label): ``rms`` (the current recipe,
  ``calibration.train.train_router``), ``conf:*`` alone (a 2-layer MLP, 32 hidden, on the
  standardized features), ``rms+conf:*`` (a 2-layer MLP, ``router_bottleneck_dim`` hidden,
  on ``[rms(h_c), standardized features]``), and the shipped SmolLM2 routers; all trained
  the way ``train_router`` trains (class-balanced BCE, AdamW, by-sample splits, early
  stopping on validation loss). The first token of every sample is labelled "do not exit"
  (``calibrate``'s ``protect_first_token``) and never exits in the evaluation.

On held-out code and prose (``data/code/heldout``, ``data/shakespeare/heldout``; the
windows of ``benchmarks/bench_quality.py``): each token exits at the first checkpoint
whose router logit is > t; the threshold is swept and the smallest mean depth with
all-token top-1 agreement >= 99% / 95% is reported (the frontier: threshold chosen on the
held-out text itself), next to the delivered numbers when t is chosen on the calibration
run's own held-out split ("calibrated t"), the oracle (first agreeing checkpoint, 100%
agreement) and never exiting. Also the candidate sets' recall (full top-1 in the set).

    python benchmarks/router_features.py --out benchmarks/results/router_features      # SmolLM2, CPU
    python benchmarks/router_features.py --heads projection --interval 4 --samples 160 \
        --projection-tokens 3072 --out benchmarks/results/router_features_projection    # exit projections
    python benchmarks/router_features.py --tiny --out /tmp/rf                          # smoke test

``--per-checkpoint-thresholds`` also fits one threshold per checkpoint
(:func:`fit_checkpoint_thresholds`: min mean depth s.t. agreement >= 99% / 95%) on the
calibration held-out split for the ``--pct-routers``, delivers it on the held-out text
under :func:`at_thresholds` (the same first-exit rule with a threshold per checkpoint),
and writes ``per_checkpoint_thresholds.json`` / ``.md`` and the scores (``pct_scores.pt``;
``--pct-refit`` refits from them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

DATA = REPO / "data"
HELDOUT = {"code": DATA / "code" / "heldout", "prose": DATA / "shakespeare" / "heldout"}
#: Feature columns of every confidence set.
CONF_COLUMNS = ("max_prob", "margin", "entropy_norm", "top_logit", "logit_margin", "agrees_prev_ckpt",
                "agree_run")
SOURCES = ("prev", "succ", "mix")
LABELS = ("agree", "stable")

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------- text
def _encode(tokenizer: Any, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # build_samples tokenizes with truncation=True, which a fast tokenizer keeps as
        # state: without this a later long text is cut to max_length.
        backend.no_truncation()
        return list(backend.encode(text, add_special_tokens=False).ids)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def heldout_windows(tokenizer: Any, text: str, windows: int, window: int) -> list[list[int]]:
    """``windows`` rows of ``window`` tokens at evenly spaced offsets of ``text``'s token
    stream, each starting with the tokenizer's special tokens: the windows of
    ``bench_quality.heldout_inputs`` (same offsets: its prompts are shorter than a window)."""
    stream = _encode(tokenizer, text)
    prefix = [int(i) for i in tokenizer("", add_special_tokens=True)["input_ids"]]
    body = window - len(prefix)
    span = len(stream) - body
    if body < 2 or span < windows:
        raise ValueError(f"{len(stream)} tokens: too few for {windows} windows of {window}")
    stride = span // windows
    return [prefix + stream[i * stride : i * stride + body] for i in range(windows)]


def heldout_domains(name: str) -> dict[str, str]:
    """Held-out text per domain (never seen by calibration)."""
    if name == "demo":
        from tide_compile import demo

        return {"prose": demo.heldout_text()}
    out = {}
    for dname, folder in HELDOUT.items():
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no held-out text in {folder} (a source checkout's data/)")
        out[dname] = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return out


# ----------------------------------------------------------------------------- features
def candidate_logits(lm_weight: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The runtime op: logits of ``k`` candidate tokens per row, ``[n, k]``, reading only
    ``k`` rows of ``lm_head``: ``(lm_weight[idx] * x[:, None]).sum(-1)``, ``x`` = the
    final-normed exit state ``[n, H]`` (:func:`head_input`), ``idx`` ``[n, k]``. O(k*H) per
    token instead of O(V*H). (The study gathers the same numbers from the full logits it
    needs anyway; :func:`check_candidate_logits` compares the two.)"""
    return torch.einsum("nkh,nh->nk", lm_weight[idx].float(), x.float())


def exit_logits(p: Any, h: torch.Tensor, proj: nn.Module | None) -> torch.Tensor:
    """Full-vocabulary logits of the exit head at a checkpoint: ``head(h_c)`` (identity)
    or ``head(E_c(h_c))`` (exit projection), as ``RouterSet.exit_state`` feeds the final
    norm at run time."""
    return p.head(h if proj is None else proj(h))


def head_input(p: Any, h: torch.Tensor, proj: nn.Module | None) -> torch.Tensor:
    """What ``lm_head`` reads in :func:`exit_logits`: ``final_norm(E_c(h_c))`` (then
    ``project_out`` where the model has one), the ``x`` of :func:`candidate_logits`."""
    x = p.final_norm(h if proj is None else proj(h))
    return x if p.project_out is None else p.project_out(x)


def confidence(z: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence features over the finite entries of ``z`` ``[n, k]`` (-inf = not a
    candidate) -> (``[n, 5]`` max prob, margin, entropy / log(#candidates), top logit,
    logit margin; ``[n]`` token id of the top candidate, -1 where there is none). The
    across-checkpoint columns (``agrees_prev_ckpt``, ``agree_run``) are filled by
    :func:`compute_features`."""
    z = z.float()
    if idx is None:  # the full vocabulary: every entry finite; fewer full-size temporaries
        top = z.topk(2, -1)
        z1, z2 = top.values[:, 0], top.values[:, 1]
        # clamped: exp of the far tail would be denormal floats, ~8x slower on a CPU, and
        # adds < 1e-30 to the sum
        e = (z - z1[:, None]).clamp_(min=-80.0).exp_()
        total = e.sum(-1)
        lse = z1 + torch.log(total)
        p1, p2 = torch.exp(z1 - lse), torch.exp(z2 - lse)
        ent = lse - torch.linalg.vecdot(e, z) / total
        feats = torch.stack([p1, p1 - p2, ent / math.log(z.shape[-1]), z1, z1 - z2], -1)
        return feats, top.indices[:, 0]
    finite = torch.isfinite(z)
    count = finite.sum(-1)
    has = count > 0
    zs = torch.where(finite, z, torch.full_like(z, -1e30))
    lse = torch.logsumexp(zs, -1, keepdim=True)
    p = torch.exp(zs - lse) * finite
    top = zs.topk(min(2, z.shape[-1]), -1)
    z1 = top.values[:, 0]
    z2 = top.values[:, 1] if z.shape[-1] > 1 else z1
    two = count > 1
    p1 = torch.exp(z1 - lse[:, 0])
    p2 = torch.where(two, torch.exp(z2 - lse[:, 0]), torch.zeros_like(p1))
    ent = -(p * torch.where(finite, zs - lse, torch.zeros_like(zs))).sum(-1)
    ent_n = ent / torch.log(count.clamp(min=2).float())
    feats = torch.stack([p1, p1 - p2, ent_n, z1, torch.where(two, z1 - z2, torch.zeros_like(z1))], -1)
    feats = torch.where(has[:, None], feats, torch.zeros_like(feats))
    arg = top.indices[:, 0]
    tok = arg if idx is None else idx.gather(1, arg[:, None]).squeeze(1)
    return feats, torch.where(has, tok, torch.full_like(tok, -1))


def successor_table(ids: torch.Tensor, final_top1: torch.Tensor, vocab: int, k: int) -> torch.Tensor:
    """``[vocab, k]``: for each input token id, the ``k`` full-model top-1 tokens most often
    seen after it (here: predicted at its position) in the given tokens, then the globally
    most frequent ones (no duplicates within a row)."""
    overall = [t for t, _ in Counter(final_top1.tolist()).most_common()]
    overall += [t for t in range(vocab) if t not in set(overall)][: max(0, k - len(overall))]
    table = torch.tensor(overall[:k], dtype=torch.long).repeat(vocab, 1)
    per: dict[int, Counter] = {}
    for x, y in zip(ids.tolist(), final_top1.tolist()):
        per.setdefault(x, Counter())[y] += 1
    for x, cnt in per.items():
        row = [t for t, _ in cnt.most_common(k)]
        seen = set(row)
        row += [t for t in overall if t not in seen][: k - len(row)]
        table[x] = torch.tensor(row[:k], dtype=torch.long)
    return table


@dataclass
class TokenSet:
    """One text set's tokens (calibration or a held-out domain), all positions of every
    sample, in (sample, position) order."""

    name: str
    ids: torch.Tensor                      # [n] input token ids
    sample: torch.Tensor                   # [n]
    position: torch.Tensor                 # [n]
    states: dict[int, torch.Tensor]        # c -> [n, H]
    final_top1: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    final_topk: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    head_top1: torch.Tensor = field(default_factory=lambda: torch.empty(0))     # [C, n]
    feats: dict[str, torch.Tensor] = field(default_factory=dict)                 # set -> [C, n, F]
    final_states: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [n, H] final layer
    cands: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    @property
    def prev(self) -> torch.Tensor:
        """Index of the previous token of the same sample (itself at position 0)."""
        ar = torch.arange(self.n)
        return torch.where(self.position > 0, ar - 1, ar)


@torch.no_grad()
def collect(model: Any, p: Any, rows: list[list[int]], layers: list[int], name: str, pad: int,
            batch: int, progress: bool) -> TokenSet:
    """``collect_states`` keeping every token (so that each token's predecessor is there)."""
    from tide_compile.calibration.collect import collect_states
    from tide_compile.calibration.data import TokenSamples

    samples = TokenSamples(input_ids=rows, pad_token_id=pad, source=name)
    col = collect_states(model, p, samples, layers, max_tokens=samples.num_tokens, batch_size=batch,
                         progress=False)
    if progress:
        log(f"  {name}: collected {samples.num_tokens} tokens")
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    order = torch.tensor([i for i, r in enumerate(rows) for _ in r])
    assert torch.equal(col.sample_index, order), "collect_states kept tokens out of (sample, position) order"
    ts = TokenSet(name, flat, col.sample_index, col.position, col.states, final_states=col.final)
    ts.final_top1, ts.final_topk = _final(p, col.final)
    return ts


@torch.no_grad()
def _final(p: Any, final: torch.Tensor, kmax: int = 64, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    top1, topk = [], []
    for i in range(0, final.shape[0], chunk):
        z = p.head(final[i : i + chunk]).float()
        t = z.topk(min(kmax, z.shape[-1]), -1).indices
        top1.append(t[:, 0])
        topk.append(t)
    return torch.cat(top1), torch.cat(topk)


def candidate_sets(ts: TokenSet, table: torch.Tensor, ks: list[int], sources: list[str]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (idx ``[n, k]``, valid ``[n, k]``) per source and k. ``prev`` at a sample's
    first token has no candidates (all invalid)."""
    out = {}
    has_prev = (ts.position > 0)[:, None]
    for k in ks:
        prev = ts.final_topk[ts.prev, :k]
        succ = table[ts.ids, :k]
        for src in sources:
            if src == "prev":
                idx, valid = prev, has_prev.expand(-1, k)
            elif src == "succ":
                idx, valid = succ, torch.ones_like(succ, dtype=torch.bool)
            elif src == "mix":
                h = max(1, k // 2)
                idx = torch.cat([succ[:, :h], prev[:, : k - h]], 1)
                valid = torch.cat([torch.ones(ts.n, h, dtype=torch.bool), has_prev.expand(-1, k - h)], 1)
                # duplicates of an earlier entry (prev entries already in succ) are masked
                dup = (idx[:, :, None] == idx[:, None, :]).tril(-1).any(-1)
                valid = valid & ~dup
            else:
                raise ValueError(f"unknown candidate source {src!r}")
            out[f"{src}{k}"] = (idx, valid)
    return out


@torch.no_grad()
def compute_features(p: Any, ts: TokenSet, layers: list[int], chunk: int, progress: bool,
                     projections: dict[int, nn.Module] | None = None) -> None:
    """Exit-head top-1 at every checkpoint and the confidence sets (``full`` and every
    candidate set of ``ts.cands``), chunked over tokens; the exit head at ``c`` reads
    ``projections[c](h_c)`` where given (:func:`exit_logits`)."""
    projections = projections or {}
    C, n = len(layers), ts.n
    names = ["full", *ts.cands]
    ts.head_top1 = torch.empty(C, n, dtype=torch.long)
    feats = {s: torch.zeros(C, n, len(CONF_COLUMNS)) for s in names}
    ctop = {s: torch.empty(C, n, dtype=torch.long) for s in names}
    for ci, c in enumerate(layers):
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            z = exit_logits(p, ts.states[c][sl], projections.get(c)).float()
            f, t = confidence(z, None)
            ts.head_top1[ci, sl] = t
            feats["full"][ci, sl, :5], ctop["full"][ci, sl] = f, t
            for s, (idx, valid) in ts.cands.items():
                zc = z.gather(1, idx[sl])
                zc = torch.where(valid[sl], zc, torch.full_like(zc, -math.inf))
                f, t = confidence(zc, idx[sl])
                feats[s][ci, sl, :5], ctop[s][ci, sl] = f, t
        if progress:
            log(f"  {ts.name}: features at checkpoint {c} done")
    for s in names:
        same = ((ctop[s][1:] == ctop[s][:-1]) & (ctop[s][1:] >= 0)).float()
        feats[s][1:, :, 5] = same
        run = torch.zeros(n)
        for ci in range(1, C):  # consecutive checkpoints, ending here, with the same top-1
            run = (run + 1) * same[ci - 1]
            feats[s][ci, :, 6] = run
    ts.feats = feats


def labels(ts: TokenSet, head_top1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``[C, n]`` bool: agree, and stable (agrees here and at every later checkpoint), for
    ``ts.head_top1`` or the given ``[C, n]`` exit-head top-1."""
    agree = (ts.head_top1 if head_top1 is None else head_top1) == ts.final_top1[None]
    stable = agree.flip(0).to(torch.int64).cummin(0).values.flip(0).bool()
    return {"agree": agree, "stable": stable}


def subset(idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded random ``n`` of the token indices ``idx`` (all of them when ``n`` <= 0 or
    ``n`` >= their number), in ascending order."""
    if n <= 0 or n >= idx.numel():
        return idx
    gen = torch.Generator().manual_seed(seed)
    return idx[torch.randperm(idx.numel(), generator=gen)[:n]].sort().values


def train_exit_projections(p: Any, cal: TokenSet, split: Any, layers: list[int], *, rank: int, loss: str,
                           seed: int, train_tokens: int, val_tokens: int, progress: bool,
                           device: str = "cpu") -> tuple[dict[int, nn.Module], dict[str, Any]]:
    """One exit projection per checkpoint, ``calibrate(..., exit_strategy="projection")``'s
    way: ``calibration.train.train_projection`` (its defaults, seed ``seed + 100 * c``) on
    the calibration train split, early-stopped on the validation split; the held-out split
    is never seen. ``train_tokens`` / ``val_tokens`` (> 0): a seeded subset of those splits,
    the size a slow machine can afford (the KL over the whole vocabulary dominates).
    ``device``: where they train (the probe's model must be there); they are returned on
    the CPU."""
    from tide_compile.calibration.train import Split, train_projection

    sub = Split(subset(split.train, train_tokens, seed + 11), subset(split.val, val_tokens, seed + 12),
                split.heldout)
    projections, info = {}, {"split_tokens": sub.sizes()}
    for c in layers:
        t0 = time.perf_counter()
        proj, inf = train_projection(p, cal.states[c], cal.final_states, cal.final_top1, sub, rank=rank,
                                     device=device, seed=seed + 100 * c, loss=loss)
        projections[c] = proj.cpu()
        info[str(c)] = {**inf, "seconds": round(time.perf_counter() - t0, 1)}
        if progress:
            log(f"  exit projection at {c}: {info[str(c)]}")
    return projections, info


@torch.no_grad()
def check_candidate_logits(p: Any, ts: TokenSet, layers: list[int], projections: dict[int, nn.Module],
                           tokens: int = 256) -> float:
    """Largest ``|candidate_logits - gathered full exit logits|`` over the first ``tokens``
    tokens, every checkpoint and every candidate set of ``ts``: the runtime op over ``k``
    rows of ``lm_head`` gives the numbers the study gathers."""
    worst = 0.0
    n = min(tokens, ts.n)
    for c in layers:
        h = ts.states[c][:n]
        z = exit_logits(p, h, projections.get(c)).float()
        x = head_input(p, h, projections.get(c))
        for idx, _ in ts.cands.values():
            got = candidate_logits(p.lm_head.weight, x, idx[:n])
            worst = max(worst, float((got - z.gather(1, idx[:n])).abs().max()))
    return worst


def recall(ts: TokenSet, agree: torch.Tensor, only: torch.Tensor | None = None) -> dict[str, dict[str, float | None]]:
    """Share of tokens (after a sample's first; ``only``: of these token indices) whose
    full top-1 is in the candidate set: over all of them and over those the oracle exits
    (their head agrees somewhere)."""
    m = ts.position > 0
    if only is not None:
        keep = torch.zeros_like(m)
        keep[only] = True
        m = m & keep
    exitable = agree.any(0) & m
    out = {}
    for s, (idx, valid) in ts.cands.items():
        hit = ((idx == ts.final_top1[:, None]) & valid).any(1)
        out[s] = {"all": _r(float(hit[m].float().mean()), 4),
                  "oracle_exitable": _r(float(hit[exitable].float().mean()), 4) if bool(exitable.any()) else None}
    return out


# ----------------------------------------------------------------------------- routers
class FeatureRouter(nn.Module):
    """``W2 silu(W1 [rms(h)?, (f - mu) / sd])``: a router on confidence features, with or
    without the current router's input ``rms(h_c)``. Outputs the pre-sigmoid logit."""

    def __init__(self, n_feats: int, hidden_size: int, width: int, use_rms: bool,
                 mu: torch.Tensor, sd: torch.Tensor) -> None:
        super().__init__()
        self.use_rms = use_rms
        self.register_buffer("mu", mu.float())
        self.register_buffer("sd", sd.float())
        self.down = nn.Linear(n_feats + (hidden_size if use_rms else 0), width)
        self.up = nn.Linear(width, 1)

    def inputs(self, h: torch.Tensor | None, f: torch.Tensor) -> torch.Tensor:
        x = (f.float() - self.mu) / self.sd
        if self.use_rms:
            hf = h.float()
            x = torch.cat([hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6), x], -1)
        return x

    def forward_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.silu(self.down(x))).squeeze(-1)

    def forward(self, h: torch.Tensor | None, f: torch.Tensor) -> torch.Tensor:
        return self.forward_inputs(self.inputs(h, f))


def train_feature_router(x_all: torch.Tensor, y: torch.Tensor, split: Any, router: FeatureRouter, *,
                         seed: int, batch_size: int = 512, max_epochs: int = 40, patience: int = 4,
                         lr: float = 2e-3, weight_decay: float = 1e-2) -> dict[str, Any]:
    """``calibration.train.train_router``'s recipe (:func:`~tide_compile.calibration.train.fit_router`:
    class-balanced BCE, AdamW, best validation epoch, seeded batches) for a
    :class:`FeatureRouter` on prepared inputs."""
    from tide_compile.calibration.train import constant_router, fit_router

    y = y.float()
    yt = y[split.train]
    n_train, n_pos = int(yt.numel()), float(yt.sum())
    info: dict[str, Any] = {"train_positive_rate": _r(n_pos / n_train if n_train else None, 4)}
    if constant_router(router, n_train, n_pos):
        info.update(epochs=0, constant=True)
        return info
    xt, xv = x_all[split.train], x_all[split.val] if split.val.numel() else x_all[split.train]
    yv = y[split.val] if split.val.numel() else yt
    fit = fit_router(router, router.forward_inputs, xt, yt, xv, yv, seed=seed,
                     batch_size=batch_size, max_epochs=max_epochs, patience=patience, lr=lr,
                     weight_decay=weight_decay)
    info.update(epochs=fit["epochs"], best_epoch=fit["best_epoch"], val_loss=_r(fit["val_loss"], 5),
                constant=False)
    return info


@dataclass
class Variant:
    name: str            # e.g. "rms", "conf:succ64", "rms+conf:succ64", "rms (shipped)"
    label: str           # "agree" / "stable" / "shipped"
    routers: dict[int, Any]
    conf: str | None     # confidence set name or None
    use_rms: bool
    train_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def variant_scores(v: Variant, ts: TokenSet, layers: list[int], idx: torch.Tensor | None = None,
                   chunk: int = 4096) -> torch.Tensor:
    """``[C, n]`` router logits (a sample's first token: -inf, never exits)."""
    sel = torch.arange(ts.n) if idx is None else idx
    out = torch.empty(len(layers), sel.numel())
    for ci, c in enumerate(layers):
        r = v.routers[c]
        for i in range(0, sel.numel(), chunk):
            j = sel[i : i + chunk]
            if v.conf is None:
                out[ci, i : i + chunk] = r.logits(ts.states[c][j]).float()
            else:
                out[ci, i : i + chunk] = r(ts.states[c][j] if v.use_rms else None, ts.feats[v.conf][ci, j])
    out[:, ts.position[sel] == 0] = -math.inf
    return out


def train_variant(name: str, label: str, conf: str | None, use_rms: bool, cal: TokenSet, lab: torch.Tensor,
                  split: Any, layers: list[int], bottleneck: int, seed: int) -> Variant:
    from tide_compile.calibration.train import train_router

    t0 = time.perf_counter()
    routers, info = {}, {}
    target_all = lab & (cal.position > 0)[None]   # protect_first_token
    for ci, c in enumerate(layers):
        target = target_all[ci]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 100 * c)
            if conf is None:
                r, inf = train_router(cal.states[c], target, split, bottleneck_dim=bottleneck, device="cpu",
                                      seed=seed + 100 * c)
                inf = {k: inf.get(k) for k in ("epochs", "best_epoch", "val_loss", "constant", "train_positive_rate")}
            else:
                f = cal.feats[conf][ci]
                ft = f[split.train]
                mu, sd = ft.mean(0), ft.std(0).clamp(min=1e-4)
                r = FeatureRouter(f.shape[1], cal.states[c].shape[1], bottleneck if use_rms else 32, use_rms, mu, sd)
                x = r.inputs(cal.states[c] if use_rms else None, f)
                inf = train_feature_router(x, target, split, r, seed=seed + 100 * c)
        routers[c] = r.eval()
        info[str(c)] = inf
    return Variant(name, label, routers, conf, use_rms, round(time.perf_counter() - t0, 1), info)


# ----------------------------------------------------------------------------- evaluation
def sweep(scores: torch.Tensor, agree: torch.Tensor, layers: list[int], L: int, max_points: int = 2000,
          group: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """First-exit rule at thresholds spanning every exit rate: token exits at the first
    checkpoint whose score > t. Returns thresholds ``[T]`` (descending: +inf first, never
    exit), all-token agreement, mean depth (layers), exit rate; with ``group`` (``[n]``
    window ids 0..W-1) also per-window sums ``group_ok`` / ``group_depth`` ``[T, W]`` and
    ``group_tokens`` ``[W]`` (for :func:`bootstrap`)."""
    C, n = scores.shape
    m = scores.max(0).values
    vals = torch.unique(m[torch.isfinite(m)])
    if vals.numel() > max_points:
        vals = vals[torch.linspace(0, vals.numel() - 1, max_points).round().long().unique()]
    # each value v as threshold just below v: tokens with max >= v exit.
    th = torch.cat([torch.tensor([math.inf]), torch.nextafter(vals.flip(0), torch.tensor(-math.inf))])
    depth_c = torch.tensor([c + 1 for c in layers], dtype=torch.float64)
    agr, dep, ext, g_ok, g_dep = [], [], [], [], []
    W = int(group.max()) + 1 if group is not None else 0
    for i in range(0, th.numel(), 128):
        t = th[i : i + 128]
        over = scores[None] > t[:, None, None]             # [T, C, n]
        exited = over.any(1)
        first = over.to(torch.int8).argmax(1)               # [T, n]
        ok = torch.where(exited, agree[first, torch.arange(n)[None]], torch.ones_like(exited)).double()
        depth = torch.where(exited, depth_c[first], torch.full_like(depth_c[first], float(L)))
        agr.append(ok.mean(1))
        dep.append(depth.mean(1))
        ext.append(exited.double().mean(1))
        if group is not None:
            g_ok.append(torch.zeros(t.numel(), W, dtype=torch.float64).index_add_(1, group, ok))
            g_dep.append(torch.zeros(t.numel(), W, dtype=torch.float64).index_add_(1, group, depth))
    out = {"threshold": th, "agreement": torch.cat(agr), "depth": torch.cat(dep), "exit_rate": torch.cat(ext)}
    if group is not None:
        out.update(group_ok=torch.cat(g_ok), group_depth=torch.cat(g_dep),
                   group_tokens=torch.bincount(group, minlength=W).double())
    return out


def bootstrap_weights(windows: int, draws: int, seed: int) -> torch.Tensor:
    """``[draws, windows]`` multiplicities of windows resampled with replacement (seeded;
    the same draws for every router, so differences between routers are paired)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, windows, (draws, windows), generator=gen)
    return torch.zeros(draws, windows, dtype=torch.float64).scatter_add_(1, pick, torch.ones(draws, windows,
                                                                                             dtype=torch.float64))


def bootstrap(sw: dict[str, torch.Tensor], weights: torch.Tensor, target: float) -> torch.Tensor:
    """Frontier depth at ``target`` on each resample of windows: ``[draws]``."""
    tok = weights @ sw["group_tokens"]                                   # [B]
    agree = (weights @ sw["group_ok"].T) / tok[:, None]                  # [B, T]
    depth = (weights @ sw["group_depth"].T) / tok[:, None]
    depth = torch.where(agree >= target - 1e-12, depth, torch.full_like(depth, math.inf))
    return depth.min(1).values


def exit_at_precision(scores: torch.Tensor, agree: torch.Tensor, precision: float = 0.99) -> list[float]:
    """Per checkpoint on its own: the largest share of tokens that a threshold there lets
    exit with exit-head agreement >= ``precision`` among them."""
    out = []
    for s, a in zip(scores, agree):
        fin = torch.isfinite(s)
        order = s[fin].argsort(descending=True)
        hits = a[fin][order].double().cumsum(0)
        k = torch.arange(1, hits.numel() + 1, dtype=torch.float64)
        ok = torch.nonzero(hits / k >= precision)
        out.append(float(ok.max() + 1) / s.numel() if ok.numel() else 0.0)
    return out


def at_target(sw: dict[str, torch.Tensor], target: float) -> int:
    """Index of the smallest-depth sweep point with agreement >= target (the never-exit
    point, index 0, always qualifies)."""
    ok = sw["agreement"] >= target - 1e-12
    d = torch.where(ok, sw["depth"], torch.full_like(sw["depth"], math.inf))
    return int(d.argmin())


def at_threshold(scores: torch.Tensor, agree: torch.Tensor, layers: list[int], L: int, t: float) -> dict[str, float]:
    over = scores > t
    exited = over.any(0)
    first = over.to(torch.int8).argmax(0)
    ok = agree[first, torch.arange(scores.shape[1])]
    depth_c = torch.tensor([c + 1 for c in layers], dtype=torch.float64)
    depth = torch.where(exited, depth_c[first], torch.full_like(depth_c[first], float(L)))
    return {"agreement": float(torch.where(exited, ok, torch.ones_like(ok)).double().mean()),
            "depth": float(depth.mean()), "exit_rate": float(exited.double().mean())}


# ----------------------------------------------------------------------------- per-checkpoint thresholds
def at_thresholds(scores: torch.Tensor, agree: torch.Tensor, layers: list[int], L: int,
                  th: torch.Tensor) -> dict[str, float]:
    """The first-exit rule with one threshold per checkpoint, ``th`` ``[C]``: a token exits
    at the first checkpoint ``c`` whose score > ``th[c]`` and reads that checkpoint's exit
    head; otherwise it runs all ``L`` layers (agreement 1). Written as a walk over the
    checkpoints (as the runtime decides), not through :func:`sweep`'s argmax, so the test
    can compare the two at equal thresholds."""
    C, n = scores.shape
    th = torch.as_tensor(th, dtype=scores.dtype).reshape(C)
    depth = torch.full((n,), float(L), dtype=torch.float64)
    ok = torch.ones(n, dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.bool)
    for ci, c in enumerate(layers):
        new = ~done & (scores[ci] > th[ci])
        depth[new] = float(c + 1)
        ok[new] = agree[ci][new].double()
        done |= new
    return {"agreement": float(ok.mean()), "depth": float(depth.mean()), "exit_rate": float(done.double().mean())}


def _coordinate_curve(scores: torch.Tensor, agree: torch.Tensor, depth_c: torch.Tensor, L: int,
                      th: torch.Tensor, ci: int, order: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every distinct outcome of moving ``th[ci]`` with the other thresholds fixed:
    (thresholds ``[m]``, total depth ``[m]``, total agreeing tokens ``[m]``), the first entry
    +inf (nobody exits at ``ci``). Exact: the tokens that reach ``ci`` and pass it take its
    head, the others keep what the other checkpoints give them. ``order``: the tokens by
    descending ``scores[ci]`` (precomputed by the caller; it does not change)."""
    C, n = scores.shape
    over = scores > th[:, None]
    before = over[:ci].any(0)
    first_b = over[:ci].to(torch.int8).argmax(0) if ci > 0 else torch.zeros(n, dtype=torch.long)
    later = over[ci + 1:]
    has_l = later.any(0)
    first_l = ci + 1 + later.to(torch.int8).argmax(0) if ci + 1 < C else torch.full((n,), C - 1)
    ar = torch.arange(n)
    d_no = torch.where(before, depth_c[first_b], torch.where(has_l, depth_c[first_l], torch.tensor(float(L),
                                                                                                  dtype=torch.float64)))
    ok_no = torch.where(before, agree[first_b, ar], torch.where(has_l, agree[first_l, ar], torch.ones_like(has_l)))
    ok_no = ok_no.double()
    if order is None:
        order = scores[ci].argsort(descending=True)
    s = scores[ci][order]
    cand = (~before)[order] & torch.isfinite(s)
    dd = torch.where(cand, depth_c[ci] - d_no[order], 0.0).cumsum(0)
    dok = torch.where(cand, agree[ci][order].double() - ok_no[order], 0.0).cumsum(0)
    # cut only after a candidate and between distinct scores: prefix j exits the j highest
    keep = cand.clone()
    if s.numel() > 1:
        keep[:-1] &= s[:-1] > s[1:]
    s, dd, dok = s[keep], dd[keep], dok[keep]
    zero = torch.zeros(1, dtype=torch.float64)
    ths = torch.cat([torch.tensor([math.inf], dtype=scores.dtype), torch.nextafter(s, torch.tensor(-math.inf,
                                                                                                  dtype=s.dtype))])
    return ths, d_no.sum() + torch.cat([zero, dd]), ok_no.sum() + torch.cat([zero, dok])


def fit_checkpoint_thresholds(scores: torch.Tensor, agree: torch.Tensor, layers: list[int], L: int,
                              target: float, *, start: torch.Tensor | None = None, lambdas: int = 48,
                              max_passes: int = 30, polish_top: int = 6, near: int = 4,
                              coarse: int = 8, exchange_passes: int = 8) -> dict[str, Any]:
    """One threshold per checkpoint that minimises mean depth subject to all-token
    agreement >= ``target`` on (``scores``, ``agree``), under :func:`at_thresholds`' rule.

    1. Lagrangian coordinate descent: for each ``lam`` of a log grid (layers of depth per
       disagreeing token), minimise ``depth + lam * disagreements`` over one checkpoint's
       threshold at a time, exactly (:func:`_coordinate_curve`), until no threshold moves.
       A coordinate step may raise one threshold and lower another, so the depth budget
       is moved between checkpoints (what a single global threshold cannot do).
    2. The ``polish_top`` shallowest feasible solutions of the grid, and ``start`` (the global threshold chosen on
       the same data, so the fit is never worse than it there), is then polished by
       constrained coordinate descent (each threshold to its lowest-depth value that keeps
       the constraint). The best one is improved by pairwise moves: for checkpoints
       ``a != b`` and a few values of ``th[a]`` (its ``near`` neighbouring cut points and
       ``coarse`` spread over all of them), the best feasible ``th[b]`` exactly; the first
       strict improvement for each ``a`` is kept and polished, until a pass over every
       ``a`` finds none (at most ``exchange_passes`` passes). A heuristic (the
       problem is not convex): on small brute-forced cases it finds the optimum or comes
       close (see the docs); it is always feasible on the data it is fitted on, and never
       deeper there than ``start``."""
    C, n = scores.shape
    depth_c = torch.tensor([c + 1 for c in layers], dtype=torch.float64)
    need = target * n - 1e-9
    orders = [scores[ci].argsort(descending=True) for ci in range(C)]

    def total(th: torch.Tensor) -> tuple[float, float]:
        r = at_thresholds(scores, agree, layers, L, th)
        return r["depth"] * n, r["agreement"] * n

    def lagrange(lam: float, th: torch.Tensor) -> torch.Tensor:
        th = th.clone()
        for _ in range(max_passes):
            moved = False
            for ci in range(C):
                ths, dep, okc = _coordinate_curve(scores, agree, depth_c, L, th, ci, orders[ci])
                obj = dep + lam * (n - okc)
                j = int(obj.argmin())
                if ths[j] != th[ci]:
                    # move only on a strict improvement over the current threshold
                    now = total(th)
                    if float(obj[j]) < now[0] + lam * (n - now[1]) - 1e-9:
                        th[ci] = ths[j]
                        moved = True
            if not moved:
                break
        return th

    def polish(th: torch.Tensor) -> torch.Tensor:
        th = th.clone()
        for _ in range(max_passes):
            moved = False
            for ci in range(C):
                ths, dep, okc = _coordinate_curve(scores, agree, depth_c, L, th, ci, orders[ci])
                dep = torch.where(okc >= need, dep, torch.full_like(dep, math.inf))
                j = int(dep.argmin())
                now = total(th)
                if float(dep[j]) < now[0] - 1e-9:
                    th[ci] = ths[j]
                    moved = True
            if not moved:
                break
        return th

    never = torch.full((C,), math.inf, dtype=scores.dtype)
    sols = [never]
    if start is not None:
        sols.append(torch.as_tensor(start, dtype=scores.dtype).reshape(C).clone())
    th = never
    for lam in torch.logspace(-1, 5, lambdas, dtype=torch.float64).tolist():   # warm-started, small to large
        th = lagrange(lam, th)
        sols.append(th.clone())
    def exchange(th: torch.Tensor) -> torch.Tensor:
        # pairwise moves: for each ordered pair (a, b) and each of a few values of th[a]
        # (its ``near`` neighbouring distinct cut points and a coarse grid of all of them),
        # the best feasible th[b] exactly; keep the best strict improvement, until none
        best_d = total(th)[0]
        for _ in range(exchange_passes):
            improved = False
            for a in range(C):
                ths_a, _, _ = _coordinate_curve(scores, agree, depth_c, L, th, a, orders[a])
                m = ths_a.numel()
                cur = int(torch.argmin((ths_a - th[a]).abs().nan_to_num(0.0)))
                grid = torch.cat([torch.arange(cur - near, cur + near + 1), torch.linspace(0, m - 1, coarse).round().long()])
                grid = grid[(grid >= 0) & (grid < m)].unique()
                for b in range(C):
                    if b == a:
                        continue
                    for x in ths_a[grid]:
                        if x == th[a]:
                            continue
                        trial = th.clone()
                        trial[a] = x
                        ths_b, dep, okc = _coordinate_curve(scores, agree, depth_c, L, trial, b, orders[b])
                        dep = torch.where(okc >= need, dep, torch.full_like(dep, math.inf))
                        j = int(dep.argmin())
                        if float(dep[j]) < best_d - 1e-9:
                            trial[b] = ths_b[j]
                            th, improved = polish(trial), True
                            best_d = total(th)[0]
                            break
                    if improved:   # th moved: next a (its cut points are recomputed)
                        break
            if not improved:
                break
        return th

    feas = sorted((total(s)[0], i) for i, s in enumerate(sols) if total(s)[1] >= need)
    pick = {i for _, i in feas[:polish_top]} | ({1} if start is not None else set())
    best, best_d = never, float(L) * n
    for i in sorted(pick):
        s = polish(sols[i])
        d, a = total(s)
        if a >= need and d < best_d - 1e-9:
            best, best_d = s, d
    if near > 0 or coarse > 0:
        best = exchange(best)
    r = at_thresholds(scores, agree, layers, L, best)
    return {"thresholds": best, **r}


def _per_token(scores: torch.Tensor, agree: torch.Tensor, layers: list[int], L: int,
               th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (agreement 0/1, depth) under :func:`at_thresholds`' rule."""
    C, n = scores.shape
    over = scores > torch.as_tensor(th, dtype=scores.dtype).reshape(C)[:, None]
    exited = over.any(0)
    first = over.to(torch.int8).argmax(0)
    depth_c = torch.tensor([c + 1 for c in layers], dtype=torch.float64)
    ok = torch.where(exited, agree[first, torch.arange(n)], torch.ones_like(exited)).double()
    return ok, torch.where(exited, depth_c[first], torch.full_like(depth_c[first], float(L)))


def pct_domain(sc: torch.Tensor, agree: torch.Tensor, layers: list[int], L: int, cal_t: dict[float, float],
               pct_fit: dict[float, dict[str, Any]], frontier: dict[str, Any], group: torch.Tensor,
               weights: torch.Tensor) -> dict[str, Any]:
    """Held-out text, per target: (a) the global threshold chosen on the calibration
    held-out split, delivered; (b) the per-checkpoint thresholds fitted there, delivered
    (with the bootstrap spread over resampled windows, and the paired 90% interval of (b)
    minus (a) in depth); (c) the global frontier (threshold chosen on this text); (d) the
    per-checkpoint thresholds fitted on this text itself (in-sample, the best they can do)."""
    C = len(layers)
    W = int(group.max()) + 1
    tok = weights @ torch.bincount(group, minlength=W).double()
    out: dict[str, Any] = {}
    for t, th in cal_t.items():
        runs = {}
        for key, thv in (("global", torch.full((C,), th, dtype=sc.dtype)), ("per_checkpoint", pct_fit[t]["thresholds"])):
            ok, dep = _per_token(sc, agree, layers, L, thv)
            g_ok = torch.zeros(W, dtype=torch.float64).index_add_(0, group, ok)
            g_dep = torch.zeros(W, dtype=torch.float64).index_add_(0, group, dep)
            runs[key] = ((weights @ g_ok) / tok, (weights @ g_dep) / tok / L)
            r = at_thresholds(sc, agree, layers, L, thv)
            out.setdefault(str(t), {})[key] = {**{k: _r(x) for k, x in r.items()}, "depth_frac": _r(r["depth"] / L),
                                               "bootstrap_std_agreement": _r(float(runs[key][0].std())),
                                               "bootstrap_std_depth_frac": _r(float(runs[key][1].std())),
                                               "p_agreement_below_target": _r(float((runs[key][0] < t - 1e-12)
                                                                                    .double().mean()))}
        diff = runs["per_checkpoint"][1] - runs["global"][1]
        out[str(t)]["per_checkpoint"]["minus_global_depth_90"] = [
            _r(float(x)) for x in diff.quantile(torch.tensor([0.05, 0.95], dtype=torch.float64))]
        f = frontier[str(t)]
        out[str(t)]["frontier_global"] = {"depth_frac": f["depth_frac"], "agreement": f["agreement"]}
        # the global threshold's frontier on this text at the agreement (b) delivers: (b)
        # shallower than this = per-checkpoint thresholds beat any single threshold here
        sw = frontier["_sweep"]
        b_agr = out[str(t)]["per_checkpoint"]["agreement"]
        j = at_target(sw, at_thresholds(sc, agree, layers, L, pct_fit[t]["thresholds"])["agreement"])
        out[str(t)]["global_at_b_agreement"] = {"depth_frac": _r(float(sw["depth"][j]) / L),
                                                "agreement": _r(float(sw["agreement"][j])), "b_agreement": b_agr}
        ins = fit_checkpoint_thresholds(sc, agree, layers, L, t,
                                        start=torch.full((C,), f["threshold"], dtype=sc.dtype))
        out[str(t)]["frontier_per_checkpoint"] = {"depth_frac": _r(ins["depth"] / L), "agreement": _r(ins["agreement"]),
                                                  "thresholds": [float(x) for x in ins["thresholds"]]}
    return out


def pct_study(dump: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any],
              timing: dict[str, Any]) -> dict[str, Any]:
    """Per-checkpoint thresholds for the routers in ``dump`` (their scores on the calibration
    held-out split and the held-out text): fit on the calibration split for 99% and 95%,
    deliver on the held-out text (:func:`pct_domain`); writes
    ``OUT/per_checkpoint_thresholds.json`` / ``.md``."""
    t0 = time.perf_counter()
    layers, L = dump["layers"], dump["L"]
    C = len(layers)
    cal_agree = dump["calibration"]["agree"]
    doms = dump.get("domains") or [k for k in dump if k not in ("layers", "L", "names", "calibration")]
    routers = []
    weights = {d: bootstrap_weights(int(dump[d]["sample"].max()) + 1, args.bootstrap, args.seed + 7) for d in doms}
    for i, (name, label) in enumerate(dump["names"]):
        if name not in args.pct_routers:
            continue
        cs = dump["calibration"]["scores"][i]
        sw_cal = sweep(cs, cal_agree, layers, L)
        cal_t = {t: float(sw_cal["threshold"][at_target(sw_cal, t)]) for t in (0.99, 0.95)}
        fits = {t: fit_checkpoint_thresholds(cs, cal_agree, layers, L, t, start=torch.full((C,), th, dtype=cs.dtype))
                for t, th in cal_t.items()}
        entry = {"name": name, "label": label, "calibration_split": {
            str(t): {"global_threshold": th,
                     "global": {k: _r(x) for k, x in at_thresholds(cs, cal_agree, layers, L,
                                                                   torch.full((C,), th)).items()},
                     "per_checkpoint": {"thresholds": [float(x) for x in fits[t]["thresholds"]],
                                        **{k: _r(fits[t][k]) for k in ("agreement", "depth", "exit_rate")}}}
            for t, th in cal_t.items()}, "domains": {}}
        for d in doms:
            sc, ag = dump[d]["scores"][i], dump[d]["agree"]
            sw = sweep(sc, ag, layers, L)
            fr: dict[str, Any] = {"_sweep": sw}
            for t in (0.99, 0.95):
                j = at_target(sw, t)
                fr[str(t)] = {"depth_frac": _r(float(sw["depth"][j]) / L), "agreement": _r(float(sw["agreement"][j])),
                              "threshold": float(sw["threshold"][j])}
            entry["domains"][d] = pct_domain(sc, ag, layers, L, cal_t, fits, fr, dump[d]["sample"], weights[d])
        routers.append(entry)
        log(f"per-checkpoint thresholds: {name} ({label})")
    timing = {**timing, "per_checkpoint_thresholds_s": round(time.perf_counter() - t0, 1)}
    depth_c = torch.tensor([c + 1 for c in layers], dtype=torch.float64)

    def oracle_depth(ag: torch.Tensor) -> float:
        return float(torch.where(ag.any(0), depth_c[ag.to(torch.int8).argmax(0)], torch.tensor(float(L),
                                                                                             dtype=torch.float64)).mean())

    pres = {"meta": {k: meta.get(k) for k in ("model_name", "num_layers", "checkpoints", "heads", "samples",
                                                 "calibration_tokens", "split_tokens", "windows", "window", "seed",
                                                 "command", "date", "wall_s")},
            "timing": timing,
            "fit": "fit_checkpoint_thresholds: Lagrangian coordinate descent, polish, pairwise exchange",
            "domains": {d: {"tokens": int(dump[d]["agree"].shape[1]),
                            "oracle_depth": {"agree": _r(oracle_depth(dump[d]["agree"]))}} for d in doms},
            "routers": routers}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "per_checkpoint_thresholds.json").write_text(json.dumps(pres, indent=1))
    (args.out / "per_checkpoint_thresholds.md").write_text(pct_markdown(pres) + "\n")
    return pres


def pct_markdown(res: dict[str, Any]) -> str:
    meta = res["meta"]
    L = meta["num_layers"]
    doms = list(res["domains"])
    lines = [f"# Per-checkpoint thresholds: {meta['model_name']}, {meta['heads']} heads, checkpoints "
             f"{meta['checkpoints']}, {meta['date']}", "",
             "Mean depth (fraction of the " + str(L) + " layers) / all-token agreement on the held-out text, "
             "independent exits. (a) *global, cal.*: one threshold chosen on the calibration held-out split "
             f"({meta['split_tokens']['heldout']} tokens); (b) *per-ckpt, cal.*: one threshold per checkpoint "
             "fitted there (min depth s.t. agreement >= target); (c) *global frontier*: one threshold chosen on "
             "the held-out text itself; (d) *per-ckpt frontier*: per-checkpoint thresholds fitted on the held-out "
             "text itself (in-sample). *(b)-(a)*: paired bootstrap 90% interval of the depth difference, points; "
             "*P(<t)*: share of bootstrap resamples of the held-out windows whose delivered agreement is below the "
             "target, for (a) and (b). (e): the smallest depth a single threshold reaches on the held-out text at "
             "the agreement (b) delivers there ((b) shallower than (e): per-checkpoint thresholds beat every "
             "global threshold out of sample).", ""]
    for t in ("0.99", "0.95"):
        lines += [f"## target {float(t):.0%}", "",
                  "| router | label | domain | (a) global, cal. | (b) per-ckpt, cal. | (b)-(a) | P(<t) (a) / (b) | "
                  "(e) global at (b)'s agreement | (c) global frontier | (d) per-ckpt frontier | "
                  "fit on cal. split: global / per-ckpt |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["routers"]:
            cs = r["calibration_split"][t]
            fit = (f"{_pct(cs['global']['depth'] / L)} @ {_pct(cs['global']['agreement'])} / "
                   f"{_pct(cs['per_checkpoint']['depth'] / L)} @ {_pct(cs['per_checkpoint']['agreement'])}")
            for d in doms:
                x = r["domains"][d][t]
                a, b = x["global"], x["per_checkpoint"]
                ci = b["minus_global_depth_90"]
                lines.append(
                    f"| {r['name']} | {r['label']} | {d} | {_pct(a['depth_frac'])} / {_pct(a['agreement'])} | "
                    f"{_pct(b['depth_frac'])} / {_pct(b['agreement'])} | [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | "
                    f"{_pct(a['p_agreement_below_target'], 0)} / {_pct(b['p_agreement_below_target'], 0)} | "
                    f"{_pct(x['global_at_b_agreement']['depth_frac']) if 'global_at_b_agreement' in x else '-'} | "
                    f"{_pct(x['frontier_global']['depth_frac'])} / {_pct(x['frontier_global']['agreement'])} | "
                    f"{_pct(x['frontier_per_checkpoint']['depth_frac'])} / "
                    f"{_pct(x['frontier_per_checkpoint']['agreement'])} | {fit} |")
        lines.append("")
    lines.append("Oracle (first agreeing checkpoint): " + ", ".join(
        f"{d} {_pct(res['domains'][d]['oracle_depth']['agree'] / L)}" for d in doms) + ".")
    lines.append("")
    lines.append("Per-checkpoint thresholds fitted on the calibration split (99%), per router: " + "; ".join(
        f"{r['name']} ({r['label']}): " + ", ".join("inf" if x is None or x == math.inf else f"{x:.2f}"
                                                   for x in r["calibration_split"]["0.99"]["per_checkpoint"]["thresholds"])
        for r in res["routers"]) + ".")
    return "\n".join(lines)


def oracle(agree: torch.Tensor, stable: torch.Tensor, layers: list[int], L: int) -> dict[str, float]:
    depth_c = torch.tensor([c + 1 for c in layers], dtype=torch.float64)
    out = {}
    for name, lab in (("agree", agree), ("stable", stable)):
        hit = lab.any(0)
        first = lab.to(torch.int8).argmax(0)
        out[name] = float(torch.where(hit, depth_c[first], torch.full_like(depth_c[first], float(L))).mean())
    return out


def auc(scores: torch.Tensor, y: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged)."""
    s, y = scores.double(), y.bool()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv = torch.unique(s, return_inverse=True)
    mean_rank = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks) / torch.bincount(inv).double()
    ranks = mean_rank[inv]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ----------------------------------------------------------------------------- check
@torch.no_grad()
def check_against_reference(model: Any, routers: Any, ts: TokenSet, rows: list[list[int]], layers: list[int],
                            batches: int, batch: int) -> dict[str, Any]:
    """``reference.forward(kv="deferred")`` on the first windows vs this study's rule on
    the plain model's states (shipped routers; a threshold that makes ~30% exit)."""
    from tide_compile import reference

    n_rows = min(len(rows), batches * batch)
    x = torch.tensor(rows[:n_rows])
    n_tok = x.numel()
    sc = torch.stack([routers.score(c, ts.states[c][:n_tok]).float() for c in routers.checkpoint_layers])
    t = float(torch.quantile(sc.max(0).values, 0.7))
    exit_layer = torch.full((n_tok,), -1, dtype=torch.long)
    top1 = ts.final_top1[:n_tok].clone()
    ci_of = {c: i for i, c in enumerate(layers)}
    for j, c in enumerate(routers.checkpoint_layers):
        if c + 1 < routers.config.min_layers:
            continue
        new = (exit_layer < 0) & (sc[j] > t)
        exit_layer[new] = c
        top1[new] = ts.head_top1[ci_of[c], :n_tok][new]
    ref_exit, ref_top1 = [], []
    for i in range(0, n_rows, batch):
        out = reference.forward(model, routers, x[i : i + batch], exit_threshold=t, kv="deferred")
        ref_exit.append(out.exit_layers.reshape(-1).cpu())
        ref_top1.append(out.logits.float().argmax(-1).reshape(-1).cpu())
    ref_exit, ref_top1 = torch.cat(ref_exit), torch.cat(ref_top1)
    return {"tokens": n_tok, "threshold": round(t, 6), "exit_rate": _r(float((exit_layer >= 0).float().mean())),
            "exit_layer_mismatches": int((ref_exit != exit_layer).sum()),
            "top1_mismatches": int((ref_top1 != top1).sum())}


# ----------------------------------------------------------------------------- report
def _pct(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{nd}f}%"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    L = meta["num_layers"]
    doms = list(result["domains"])
    lines = [f"# router_features: {meta['model_name']}, {meta['date']}", "",
             f"Calibration: {meta['calibration_tokens']} tokens ({meta['samples']} samples of <= "
             f"{meta['max_length']}); held-out: " + ", ".join(f"{d} {result['domains'][d]['tokens']} tokens"
                                                            for d in doms)
             + f"; checkpoints {meta['checkpoints']} ({meta.get('heads', 'identity')} heads); "
             f"{meta['threads']} thread(s); "
             f"wall {meta.get('wall_s')} s.", "",
             "Mean depth (fraction of the " + str(L) + " layers) at >= 99% / >= 95% all-token top-1 agreement "
             "with the full model, independent exits (exact K/V). *frontier*: best threshold on the held-out "
             "text itself; *cal. t*: threshold chosen on the calibration held-out split for the target, then "
             "delivered here (agreement / depth).", ""]
    head = "| router | label | " + " | ".join(f"{d} 99% | {d} 99% minus rms | {d} 95% | {d} cal. t 99%"
                                             for d in doms) + " |"
    lines += [head, "|" + "---|" * (2 + 4 * len(doms))]
    o = {d: result["domains"][d] for d in doms}
    lines.append("| never exit | - | " + " | ".join("100.0% | - | 100.0% | -" for _ in doms) + " |")
    lines.append("| oracle (first agreeing checkpoint) | - | "
                 + " | ".join(f"{_pct(o[d]['oracle_depth']['agree'] / L)} | - | "
                              f"{_pct(o[d]['oracle_depth']['agree'] / L)} | -" for d in doms) + " |")

    def pts(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.1f}"

    for v in result["variants"]:
        cells = []
        for d in doms:
            r = v["domains"][d]
            f99, f95 = r["frontier"]["0.99"], r["frontier"]["0.95"]
            c99 = r["calibrated"].get("0.99")
            cal = "-" if c99 is None else f"{_pct(c99['agreement'])} / {_pct(c99['depth'] / L)}"
            ci = f99.get("minus_rms_bootstrap_90")
            delta = "-" if ci is None or (v["name"], v["label"]) == ("rms", "agree") else f"[{pts(ci[0])}, {pts(ci[1])}]"
            std = f99.get("bootstrap_std")
            cells.append(f"{_pct(f99['depth_frac'])}" + ("" if std is None else f" ±{100 * std:.1f}")
                         + f" | {delta} | {_pct(f95['depth_frac'])} | {cal}")
        lines.append(f"| {v['name']} | {v['label']} | " + " | ".join(cells) + " |")
    lines += ["", "±: bootstrap standard deviation over resampled held-out windows; *minus rms*: 90% interval "
              "of this router's 99% frontier depth minus the `rms` (agree) router's, in points, paired "
              "bootstrap over the same resampled windows."]
    lines += ["", "Oracle with the stable label (first checkpoint from which every later one agrees): "
              + ", ".join(f"{d} {_pct(o[d]['oracle_depth']['stable'] / L)}" for d in doms) + ".", ""]
    pr = meta.get("projection")
    if pr:
        ep = [pr[str(c)]["best_epoch"] for c in meta["checkpoints"]]
        lines += [f"Exit projections: rank {pr['rank']}, loss {pr['loss']}, {pr['trainer']}, on "
                  f"{pr['split_tokens']['train']} train / {pr['split_tokens']['val']} validation tokens of the "
                  f"calibration split; best epochs {ep}; validation loss vs identity per checkpoint: "
                  + ", ".join(f"{c}: {pr[str(c)]['val_loss']:.3g} vs {pr[str(c)]['identity_val_loss']:.3g}"
                              for c in meta["checkpoints"]) + ".", ""]
    if all("identity_heads" in o[d] for d in doms):
        lines += ["Identity heads at the same checkpoints, for reference: oracle "
                  + ", ".join(f"{d} {_pct(o[d]['identity_heads']['oracle_depth']['agree'] / L)} (stable label "
                              f"{_pct(o[d]['identity_heads']['oracle_depth']['stable'] / L)})" for d in doms)
                  + "; head agreement " + "; ".join(
                      f"{d}: " + ", ".join(f"{c}: {_pct(a, 0)}" for c, a in o[d]["identity_heads"]["head_agreement"].items())
                      for d in doms) + ".", ""]
    lines += ["Candidate-set recall (full-model top-1 in the set; tokens after a window's first; "
              "in brackets: among tokens the oracle exits):", "",
              "| set | " + " | ".join(doms) + " | calibration held-out split |", "|---|" + "---|" * (len(doms) + 1)]
    for s in result["calibration"]["recall"]:
        cells = [f"{_pct(o[d]['recall'][s]['all'])} ({_pct(o[d]['recall'][s]['oracle_exitable'])})" for d in doms]
        cr = result["calibration"]["recall"][s]
        cells.append(f"{_pct(cr['all'])} ({_pct(cr['oracle_exitable'])})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Mean AUC over checkpoints (calibration held-out split, agree label) per router: "
              + ", ".join(f"{v['name']} ({v['label']}) {v['mean_auc_agree']}" for v in result["variants"]
                          if v.get("mean_auc_agree") is not None) + ".", ""]
    lines += ["Share of held-out tokens a single checkpoint can let exit at >= 99% exit-head agreement "
              "(threshold at that checkpoint alone), for the `rms` and best confidence routers (agree label):", ""]
    show = [v for v in result["variants"] if v["label"] == "agree"
            and v["name"] in ("rms", "conf:full", "conf:succ8", "conf:prev64", "rms+conf:mix64", "rms+conf:full")]
    if show:
        cks = list(show[0]["domains"][doms[0]]["exit_at_99_precision"])
        lines += ["| router | domain | " + " | ".join(cks) + " |", "|---|---|" + "---|" * len(cks)]
        for v in show:
            for d in doms:
                e = v["domains"][d]["exit_at_99_precision"]
                lines.append(f"| {v['name']} | {d} | " + " | ".join(_pct(e[c], 1) for c in cks) + " |")
        lines.append("")
        lines.append(f"Exit-head agreement per checkpoint ({meta.get('heads', 'identity')} heads): " + "; ".join(
            f"{d}: " + ", ".join(f"{c}: {_pct(a, 0)}" for c, a in o[d]["head_agreement"].items()) for d in doms) + ".")
        lines.append("")
    chk = result.get("reference_check") or {}
    if chk:
        lines.append("Check, `reference.forward(kv='deferred')` vs this study's rule on states "
                     f"({result.get('reference_check_routers', 'shipped routers')}): "
                     + "; ".join(f"{d}: {c['tokens']} tokens, exit rate {_pct(c['exit_rate'])}, "
                                 f"{c['exit_layer_mismatches']} exit / {c['top1_mismatches']} top-1 mismatches"
                                 for d, c in chk.items()) + ".")
    diffs = {d: o[d]["candidate_logits_max_abs_diff"] for d in doms if "candidate_logits_max_abs_diff" in o[d]}
    if diffs:
        lines += ["", "`candidate_logits` (k rows of `lm_head`) vs the gathered full exit logits, largest absolute "
                  "difference: " + ", ".join(f"{d} {x:.2g}" for d, x in diffs.items()) + "."]
    return "\n".join(lines)


#: Routers drawn in the plot (name, label): the baselines and the best of each kind.
PLOTTED = (("rms (shipped", "agree"), ("rms", "agree"), ("rms", "stable"), ("conf:full", "agree"),
           ("conf:succ8", "agree"), ("conf:prev64", "agree"), ("rms+conf:succ8", "agree"),
           ("rms+conf:mix64", "agree"), ("rms+conf:full", "agree"))


def plot(result: dict[str, Any], path: Path) -> None:
    """All-token agreement against mean depth (the sweep curves stored in the JSON) per
    domain, for the routers of :data:`PLOTTED`, and the oracle."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    doms = list(result["domains"])
    L = result["meta"]["num_layers"]
    shown = [v for v in result["variants"]
             if any(v["name"].startswith(n) if n.endswith("(shipped") else v["name"] == n and v["label"] == lab
                    for n, lab in PLOTTED)]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(doms), figsize=(7 * len(doms), 5.5), squeeze=False)
    for j, d in enumerate(doms):
        ax = axes[0][j]
        for i, v in enumerate(shown):
            cv = v["domains"][d]["curve"]
            ax.plot([x / L for x in cv["depth"]], cv["agreement"], color=colors[i % len(colors)],
                    linestyle="--" if v["name"].startswith("conf:") else "-", linewidth=1.2,
                    label=f"{v['name']} ({v['label']})")
        od = result["domains"][d]["oracle_depth"]
        ax.plot([od["agree"] / L], [1.0], "k*", markersize=10, label="oracle (first agreeing checkpoint)")
        ax.plot([od["stable"] / L], [1.0], "k^", markersize=7, label="oracle, stable label")
        ax.axhline(0.99, color="grey", linewidth=0.6)
        ax.axhline(0.95, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlim(min(0.75, od["agree"] / L - 0.03), 1.005)
        ax.set_ylim(0.88, 1.002)
        ax.set_xlabel("mean depth (fraction of layers)")
        ax.set_ylabel("all-token top-1 agreement (independent exits)")
        ax.set_title(f"held-out {d}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"router_features: {result['meta']['model_name']}, checkpoints every "
                 f"{result['meta']['interval']} layers, {result['meta'].get('heads', 'identity')} heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "demo"), default="smollm2")
    ap.add_argument("--samples", type=int, default=256, help="calibration samples")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per calibration sample")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows per domain")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--interval", type=int, default=2, help="checkpoint every this many layers")
    ap.add_argument("--heads", choices=("identity", "projection"), default="identity",
                    help="exit head at each checkpoint: lm_head(final_norm(h_c)), or through the exit "
                         "projection E_c trained here (train_projection) on the calibration train split")
    ap.add_argument("--projection-rank", type=int, default=64, help="rank of each exit projection")
    ap.add_argument("--projection-loss", choices=("kl", "ce"), default="kl")
    ap.add_argument("--projection-tokens", type=int, default=0,
                    help="train the exit projections on a seeded subset of this many train-split tokens "
                         "(0: all of them)")
    ap.add_argument("--projection-val-tokens", type=int, default=0,
                    help="early-stop them on this many validation-split tokens (0: all of them)")
    ap.add_argument("--projection-device", default="cpu",
                    help="train the exit projections here (e.g. cuda: the model moves there for the "
                         "training and back; everything else stays on the CPU)")
    ap.add_argument("--ks", type=_ints, default=[8, 32, 64])
    ap.add_argument("--sources", type=_strs, default=list(SOURCES))
    ap.add_argument("--combo-sets", type=_strs, default=["prev64", "succ64", "mix64", "succ8", "full"],
                    help="confidence sets also trained together with rms(h_c) (rms+conf routers)")
    ap.add_argument("--labels", type=_strs, default=list(LABELS))
    ap.add_argument("--five-column-combos", action="store_true",
                    help="also train each --combo-sets router on the five per-checkpoint columns "
                         "only (rms+conf:<set>/5, what the runtime computes): the two columns "
                         "that carry state across checkpoints measured by difference")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per full-vocabulary head pass")
    ap.add_argument("--check-batches", type=int, default=1,
                    help="reference.forward(kv='deferred') batches per domain to check the rule (0: none)")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples of the held-out windows for the frontier's spread (paired across routers)")
    ap.add_argument("--per-checkpoint-thresholds", action="store_true",
                    help="also fit one exit threshold per checkpoint (min mean depth s.t. agreement >= 99%% / "
                         "95%%) on the calibration held-out split, for the routers of --pct-routers, and deliver "
                         "them on the held-out text (writes per_checkpoint_thresholds.json / .md)")
    ap.add_argument("--pct-routers", type=_strs, default=["rms", "rms+conf:succ8", "rms+conf:succ64",
                                                          "rms+conf:mix64", "rms+conf:full", "conf:full"],
                    help="router names (every label) that get per-checkpoint thresholds")
    ap.add_argument("--pct-refit", action="store_true",
                    help="only refit the per-checkpoint thresholds from OUT/pct_scores.pt (the routers' scores a "
                         "--per-checkpoint-thresholds run saved) and rewrite OUT/per_checkpoint_thresholds.*")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("router_features_out"))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw OUT/router_features.png and .md from OUT/router_features.json")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test: demo model, 24 samples of 64 tokens, 4 windows of 64, k 4,8, one "
                         "rms+conf set, one label")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = "demo"
        args.samples, args.max_length, args.windows, args.window = 24, 64, 4, 64
        args.bootstrap = 50
        args.ks, args.combo_sets, args.labels = [4, 8], ["succ8"], ["agree"]
        args.batch = 4
        args.pct_routers = ["rms", "rms+conf:succ8", "conf:full"]
    for s in args.sources:
        if s not in SOURCES:
            ap.error(f"--sources: unknown {s!r} ({', '.join(SOURCES)})")
    for s in args.labels:
        if s not in LABELS:
            ap.error(f"--labels: unknown {s!r} ({', '.join(LABELS)})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global _T0
    _T0 = time.perf_counter()
    args = parse_args(argv)
    if args.replot:
        result = json.loads((args.out / "router_features.json").read_text())
        (args.out / "router_features.md").write_text(markdown(result) + "\n")
        plot(result, args.out / "router_features.png")
        return result
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.pct_refit:
        old = json.loads((args.out / "per_checkpoint_thresholds.json").read_text())
        dump = torch.load(args.out / "pct_scores.pt")
        pres = pct_study(dump, args, old["meta"], old["timing"])
        print(pct_markdown(pres))
        return pres
    import transformers

    from tide_compile import demo
    from tide_compile.calibration.data import build_samples
    from tide_compile.calibration.labels import head_top1
    from tide_compile.calibration.train import split_by_sample
    from tide_compile.cli_demo import calibration_texts
    from tide_compile.config import TIDEConfig, checkpoint_layers
    from tide_compile.model_probe import probe
    from tide_compile.routers import RouterSet

    timing: dict[str, float] = {}
    log(f"loading {args.model} (float32, cpu, {args.threads} thread(s))")
    model, tok = demo.load(args.model, dtype=torch.float32, device="cpu")
    p = probe(model)
    L, V = p.num_layers, p.vocab_size
    layers = checkpoint_layers(L, args.interval, 1)
    bottleneck = TIDEConfig().router_bottleneck_dim
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # held-out windows first: build_samples leaves the fast tokenizer truncating
    held_rows = {d: heldout_windows(tok, text, args.windows, args.window)
                 for d, text in heldout_domains(args.model).items()}
    t0 = time.perf_counter()
    texts = calibration_texts(args.model, seed=args.seed)
    samples = build_samples(tok, texts, num_samples=args.samples, max_length=args.max_length, seed=args.seed,
                            source=f"calibration_texts({args.model!r})")
    log(f"calibration: {len(samples.input_ids)} samples, {samples.num_tokens} tokens; checkpoints {layers}")
    cal = collect(model, p, samples.input_ids, layers, "calibration", pad, args.batch, args.progress)
    helds = {d: collect(model, p, rows, layers, d, pad, args.batch, args.progress) for d, rows in held_rows.items()}
    timing["collect_s"] = round(time.perf_counter() - t0, 1)
    log(f"collected states ({timing['collect_s']} s)")

    split = split_by_sample(cal.sample, len(samples.input_ids), seed=args.seed)
    projections: dict[int, nn.Module] = {}
    projection_info: dict[str, Any] | None = None
    if args.heads == "projection":
        t0 = time.perf_counter()
        model.to(args.projection_device)
        projections, projection_info = train_exit_projections(
            p, cal, split, layers, rank=args.projection_rank, loss=args.projection_loss, seed=args.seed,
            train_tokens=args.projection_tokens, val_tokens=args.projection_val_tokens, progress=args.progress,
            device=args.projection_device)
        model.to("cpu")
        projection_info["device"] = args.projection_device
        timing["projection_s"] = round(time.perf_counter() - t0, 1)
        log(f"trained {len(projections)} exit projections ({timing['projection_s']} s)")
    table = successor_table(cal.ids[split.train], cal.final_top1[split.train], V, max(args.ks))
    t0 = time.perf_counter()
    for ts in [cal, *helds.values()]:
        ts.cands = candidate_sets(ts, table, args.ks, args.sources)
        compute_features(p, ts, layers, args.chunk, args.progress, projections)
        log(f"features {ts.name}: {ts.n} tokens")
    timing["features_s"] = round(time.perf_counter() - t0, 1)
    if args.five_column_combos:
        # The runtime's router features: the five per-checkpoint columns only, without the
        # two that carry state across checkpoints (agrees_prev_ckpt, agree_run).
        for ts in [cal, *helds.values()]:
            for c5 in args.combo_sets:
                ts.feats[f"{c5}/5"] = ts.feats[c5][..., :5]
    lab_cal = labels(cal)
    lab_held = {d: labels(ts) for d, ts in helds.items()}

    # ---- routers
    t0 = time.perf_counter()
    conf_sets = ["full", *cal.cands]
    plan: list[tuple[str, str | None, bool]] = [("rms", None, False)]
    plan += [(f"conf:{s}", s, False) for s in conf_sets]
    plan += [(f"rms+conf:{s}", s, True) for s in args.combo_sets if s in conf_sets]
    if args.five_column_combos:
        plan += [(f"rms+conf:{s}/5", f"{s}/5", True) for s in args.combo_sets if s in conf_sets]
    variants: list[Variant] = []
    for label in args.labels:
        for name, conf, use_rms in plan:
            v = train_variant(name, label, conf, use_rms, cal, lab_cal[label], split, layers, bottleneck, args.seed)
            variants.append(v)
            log(f"trained {name} ({label}) in {v.train_s} s")
    shipped_path = demo.SHIPPED_ROUTERS.get(args.model)
    shipped = None
    if shipped_path is not None and shipped_path.is_file():
        shipped = RouterSet.load(shipped_path, model=model)
        if shipped.checkpoint_layers == layers and not shipped.exit_projections:
            ncal = (shipped.calibration or {}).get("samples")
            variants.insert(0, Variant(f"rms (shipped, {ncal} samples)", "agree",
                                       {c: shipped.router(c) for c in layers}, None, False))
    timing["train_s"] = round(time.perf_counter() - t0, 1)

    # ---- evaluation
    t0 = time.perf_counter()
    meta = {
        "model_name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)" if args.model == "smollm2"
        else "demo (4M, tide_compile/demo_model)",
        "model": args.model, "num_layers": L, "hidden_size": p.hidden_size, "vocab_size": V,
        "checkpoints": layers, "interval": args.interval, "samples": len(samples.input_ids),
        "max_length": args.max_length, "calibration_tokens": cal.n, "split_tokens": split.sizes(),
        "windows": args.windows, "window": args.window, "ks": args.ks, "sources": args.sources,
        "combo_sets": args.combo_sets, "labels": args.labels, "router_bottleneck_dim": bottleneck,
        "conf_columns": list(CONF_COLUMNS), "seed": args.seed, "threads": torch.get_num_threads(),
        "device": "cpu", "dtype": "float32", "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": f"{platform.node()} {platform.machine()}",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (
            sys.argv[1:] if argv is None else list(argv))),
        "successor_table": f"[{V}, {max(args.ks)}] from the calibration train split's {int(split.train.numel())} tokens",
        "heads": args.heads,
    }
    if projection_info is not None:
        meta["projection"] = {"rank": args.projection_rank, "loss": args.projection_loss,
                              "trainer": "tide_compile.calibration.train.train_projection (its defaults)",
                              **projection_info}
    result: dict[str, Any] = {"complete": False, "meta": meta, "timing": timing, "domains": {}, "calibration": {},
                              "variants": []}
    # the successor table was built on the train split: recall on the held-out split
    result["calibration"]["recall"] = recall(cal, lab_cal["agree"], split.heldout)
    result["calibration"]["oracle_depth"] = oracle(lab_cal["agree"], lab_cal["stable"], layers, L)
    for d, ts in helds.items():
        lh = lab_held[d]
        result["domains"][d] = {
            "tokens": ts.n, "oracle_depth": oracle(lh["agree"], lh["stable"], layers, L),
            "head_agreement": {str(c): _r(float(lh["agree"][i].float().mean())) for i, c in enumerate(layers)},
            "recall": recall(ts, lh["agree"]),
        }
        if projections:  # the same checkpoints' identity heads, for reference
            ident = torch.stack([head_top1(p, ts.states[c]) for c in layers])
            li = labels(ts, ident)
            result["domains"][d]["identity_heads"] = {
                "oracle_depth": oracle(li["agree"], li["stable"], layers, L),
                "head_agreement": {str(c): _r(float(li["agree"][i].float().mean())) for i, c in enumerate(layers)}}
        result["domains"][d]["candidate_logits_max_abs_diff"] = check_candidate_logits(p, ts, layers, projections)
    held_idx = split.heldout
    agree_calheld = lab_cal["agree"][:, held_idx]
    boot_w = {d: bootstrap_weights(args.windows, args.bootstrap, args.seed + 7) for d in helds}
    boot_depth: dict[tuple[str, str, str, float], torch.Tensor] = {}
    dumped: dict[str, Any] = {"names": [], "calibration": [], **{d: [] for d in helds}}
    for v in variants:
        entry: dict[str, Any] = {"name": v.name, "label": v.label, "train_s": v.train_s, "training": v.info,
                                 "domains": {}}
        cs = variant_scores(v, cal, layers, held_idx)
        aucs = [auc(cs[i][torch.isfinite(cs[i])], agree_calheld[i][torch.isfinite(cs[i])]) for i in range(len(layers))]
        entry["auc_agree"] = {str(c): _r(a) for c, a in zip(layers, aucs)}
        good = [a for a in aucs if a is not None]
        entry["mean_auc_agree"] = _r(sum(good) / len(good)) if good else None
        sw_cal = sweep(cs, agree_calheld, layers, L)
        cal_t = {}
        for tgt in (0.99, 0.95):
            i = at_target(sw_cal, tgt)
            cal_t[tgt] = float(sw_cal["threshold"][i])
        entry["calibration_split"] = {str(t): {"threshold": _r(th, 6),
                                               **{k: _r(x) for k, x in at_threshold(cs, agree_calheld, layers, L, th).items()}}
                                      for t, th in cal_t.items()}
        dump_this = args.per_checkpoint_thresholds and v.name in args.pct_routers
        if dump_this:
            dumped["names"].append((v.name, v.label))
            dumped["calibration"].append(cs)
        for d, ts in helds.items():
            sc = variant_scores(v, ts, layers)
            sw = sweep(sc, lab_held[d]["agree"], layers, L, group=ts.sample)
            fr = {}
            for tgt in (0.99, 0.95):
                i = at_target(sw, tgt)
                boot = bootstrap(sw, boot_w[d], tgt) / L
                fr[str(tgt)] = {"depth": _r(float(sw["depth"][i])), "depth_frac": _r(float(sw["depth"][i]) / L),
                                "agreement": _r(float(sw["agreement"][i])),
                                "exit_rate": _r(float(sw["exit_rate"][i])), "threshold": _r(float(sw["threshold"][i]), 6),
                                "bootstrap_std": _r(float(boot.std())),
                                "bootstrap_90": [_r(float(x)) for x in boot.quantile(torch.tensor([0.05, 0.95],
                                                                                                  dtype=torch.float64))]}
                boot_depth[(v.name, v.label, d, tgt)] = boot
            delivered = {str(t): {k: _r(x) for k, x in at_threshold(sc, lab_held[d]["agree"], layers, L, th).items()}
                         for t, th in cal_t.items()}
            if dump_this:
                dumped[d].append(sc)
            pick = torch.linspace(0, sw["depth"].numel() - 1, min(200, sw["depth"].numel())).round().long().unique()
            entry["domains"][d] = {"frontier": fr, "calibrated": delivered,
                                   "exit_at_99_precision": {str(c): _r(x) for c, x in
                                                            zip(layers, exit_at_precision(sc, lab_held[d]["agree"]))},
                                   "curve": {"depth": [_r(float(x)) for x in sw["depth"][pick]],
                                             "agreement": [_r(float(x), 5) for x in sw["agreement"][pick]]}}
        result["variants"].append(entry)
    # paired bootstrap: each router's frontier depth minus the rms router's (same label
    # "agree", trained here), on the same resampled windows
    for entry in result["variants"]:
        for d in helds:
            for tgt in (0.99, 0.95):
                base = boot_depth.get(("rms", "agree", d, tgt))
                mine = boot_depth[(entry["name"], entry["label"], d, tgt)]
                if base is not None:
                    diff = mine - base
                    entry["domains"][d]["frontier"][str(tgt)]["minus_rms_bootstrap_90"] = [
                        _r(float(x)) for x in diff.quantile(torch.tensor([0.05, 0.95], dtype=torch.float64))]
    timing["eval_s"] = round(time.perf_counter() - t0, 1)
    # the shipped routers where they fit these checkpoints and heads; else this study's rms
    # routers (with its exit projections: the runtime's read-out of E_c is checked too)
    checked = shipped if shipped is not None and shipped.checkpoint_layers == layers and not projections else None
    rms = next((v for v in variants if (v.name, v.label) == ("rms", "agree")), None)
    if checked is None and rms is not None:
        checked = RouterSet(rms.routers, model_info=RouterSet.describe(p),
                            config=TIDEConfig(checkpoint_interval=args.interval, exit_strategy=args.heads),
                            exit_projections=projections or None)
        result["reference_check_routers"] = "this study's rms routers" + (
            " with its exit projections" if projections else "")
    if checked is not None and args.check_batches > 0:
        t0 = time.perf_counter()
        result["reference_check"] = {d: check_against_reference(model, checked, ts, held_rows[d], layers,
                                                                args.check_batches, args.batch)
                                     for d, ts in helds.items()}
        timing["check_s"] = round(time.perf_counter() - t0, 1)
    meta["wall_s"] = round(time.perf_counter() - _T0, 1)
    result["complete"] = True
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_features.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "router_features.md").write_text(md + "\n")
    plot(result, args.out / "router_features.png")
    if args.per_checkpoint_thresholds:
        dump = {"layers": layers, "L": L, "names": dumped["names"], "domains": list(helds),
                "calibration": {"scores": dumped["calibration"], "agree": agree_calheld},
                **{d: {"scores": dumped[d], "agree": lab_held[d]["agree"], "sample": helds[d].sample}
                   for d in helds}}
        # raw router scores and labels, to refit without retraining (--pct-refit; not for the repo)
        torch.save(dump, args.out / "pct_scores.pt")
        pres = pct_study(dump, args, meta, timing)
        print()
        print(pct_markdown(pres))
    print()
    print(md)
    print()
    print(f"wall time {meta['wall_s']} s; outputs in {args.out}")
    return result


if __name__ == "__main__":
    main()
