#!/usr/bin/env python3
"""Early-exit QUALITY on a real pretrained model (SmolLM2-135M), held-out code and prose.

What it measures (issue 15, Build item 5 and "Targets"; issue 17, "Measure", quality):

* Router sets: ``exit_strategy`` identity and projection x ``checkpoint_interval`` 1, 2,
  4, each calibrated once with ``tide_compile.calibrate`` on the calibration text
  (``data/code/calibration`` Python stdlib source and ``data/shakespeare/train`` plays,
  read here as a list of strings, chunked and interleaved so that both kinds are in the
  packed samples). The routers never see the held-out text.
* Held-out text, reported per domain: ``code`` = ``data/code/heldout``, ``prose`` =
  ``data/shakespeare/heldout``. Each domain's files are joined into one token stream;
  ``--windows`` windows of ``--window`` tokens are taken at evenly spaced offsets (the
  tokenizer's special tokens first, as in calibration samples). Nothing is tuned.
* For each router set and ``t = threshold_for(target)``, target 0.99 / 0.95 / 0.90
  (plus ``--extra-thresholds`` as raw thresholds), teacher-forced over whole windows,
  under ``kv="propagate"`` (today's runtime, ``reference.forward``) and ``kv="deferred"``
  (exact K/V; ``reference.forward`` or, with ``--deferred-from states``, the same
  semantics computed from the plain model's hidden states: each token's own exit head,
  all K/V exact):

  - exit rate; mean depth (layers a token's output came from: ``c + 1`` for an exit at
    checkpoint ``c``, else ``L``);
  - layers executed per token. propagate: what the skip runtime runs in full for a
    token at batch-1 decode = its depth (an exited token stops at its checkpoint); the
    KV-fill of its skipped layers (input norm + K/V projections only) is counted apart
    (``kv_fill_layers``). deferred: ``L`` (every layer runs for every token; an exited
    token's remaining layers run later, batched with the next deep step), while its
    output waits only for its depth (the critical path);
  - top-1 agreement with the full model over ALL tokens, and among the exiting tokens
    (its complement is the regret rate), and perplexity change vs the plain model on
    the same tokens (every window position that has a next token is predicted once);
  - next to them the PREDICTED all-token agreement (the quality table's
    ``token_agreement`` at ``t``), whether the delivered one is within 1 point of it,
    and whether the exiting tokens agree at ``>= target - 0.01`` (issue 15 "Targets").
* Free-running greedy: ``--prompts`` prompts of ``--prompt-len`` tokens per domain from
  the held-out stream (between the windows), ``--new-tokens`` greedy tokens
  (``reference.generate``, EOS ignored) under each kv mode against the plain model's
  greedy continuation (the same loop with a threshold that never exits): the share of
  identical continuations and the mean identical-prefix length.
* Ceilings: the top-1 agreement of each exit head on its own (identity at every layer;
  projection at each projection router set's checkpoints) and the oracle mean depth
  (each token exits at the first checkpoint whose head agrees with the full model).

Writes ``bench_quality.json`` (after every router set, so a cut run keeps what it has),
``bench_quality.md`` and ``bench_quality.png`` (all-token agreement against mean depth,
per domain, one series per router set x kv mode; needs matplotlib) under ``--out``, the
calibrated router files under ``--out/routers`` (``--reuse-routers`` loads them instead
of calibrating again), and prints the markdown table.

Needs torch and transformers only (no ``datasets``: the text goes to ``calibrate`` as a
list of strings); works on torch 2.11 / transformers 5.17 and later.

    python benchmarks/bench_quality.py --out benchmarks/results/quality          # GPU: everything
    python benchmarks/bench_quality.py --device cpu --strategies identity --intervals 2,4 \\
        --samples 300 --windows 8 --deferred-from states --out /tmp/q             # a 2-core CPU
    python benchmarks/bench_quality.py --tiny --out /tmp/q                       # smoke test
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
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DATA = REPO / "data"
#: Held-out text per domain: the routers never see it.
HELDOUT = {"code": DATA / "code" / "heldout", "prose": DATA / "shakespeare" / "heldout"}
#: Calibration text per domain.
CALIBRATION = {"code": DATA / "code" / "calibration", "prose": DATA / "shakespeare" / "train"}
KV_MODES = ("propagate", "deferred")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- utils
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def _bar(iterable: Any, desc: str, enabled: bool, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------- text
def calibration_rows(seed: int, chunk_chars: int = 2000) -> tuple[list[str], dict[str, Any]]:
    """Calibration text as a list of strings (no ``datasets``):
    ``tide_compile.cli_demo.calibration_texts("smollm2")`` (each domain's files cut into
    ~``chunk_chars`` pieces, shuffled (seeded) within the domain, then interleaved code,
    prose, code, ...: ``calibrate`` packs rows in order and keeps the first ``4 * samples``
    candidates, so without interleaving a small run would see one domain), and what each
    domain contributed."""
    from tide_compile.cli_demo import calibration_texts, text_chunks

    info: dict[str, Any] = {}
    for name, folder in CALIBRATION.items():
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no calibration text in {folder} (a source checkout's data/)")
        chunks = [c for f in files for c in text_chunks(f.read_text(encoding="utf-8"), chunk_chars)]
        info[name] = {"folder": str(folder.relative_to(REPO)), "files": len(files), "chunks": len(chunks),
                      "chars": sum(len(c) for c in chunks)}
    return calibration_texts("smollm2", seed=seed, chunk_chars=chunk_chars), info


def _encode(tokenizer: Any, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # no max-length warning on long texts
        return list(backend.encode(text, add_special_tokens=False).ids)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def heldout_inputs(tokenizer: Any, folder: Path, windows: int, window: int, prompts: int,
                   prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``[windows, window]`` teacher-forcing windows and ``[prompts, prompt_len]`` greedy
    prompts from the domain's held-out stream (files joined by a blank line), at evenly
    spaced offsets; every row starts with the tokenizer's special tokens (as calibration
    samples do), then consecutive text tokens. Prompts sit between windows."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no held-out text in {folder} (a source checkout's data/)")
    stream = _encode(tokenizer, "\n\n".join(f.read_text(encoding="utf-8") for f in files))
    prefix = [int(i) for i in tokenizer("", add_special_tokens=True)["input_ids"]]
    body = window - len(prefix)
    pbody = prompt_len - len(prefix)
    if body < 2 or pbody < 1:
        raise ValueError(f"window {window} / prompt length {prompt_len} too short for the special tokens {prefix}")
    span = len(stream) - max(body, pbody)
    if span < windows:
        raise ValueError(f"{folder}: {len(stream)} tokens, too few for {windows} windows of {window}")
    stride = span // windows
    starts = [i * stride for i in range(windows)]
    rows = [prefix + stream[s : s + body] for s in starts]
    pstarts = [min(span, (i * span) // max(1, prompts) + stride // 2) for i in range(prompts)]
    prows = [prefix + stream[s : s + pbody] for s in pstarts]
    info = {"folder": str(folder.relative_to(REPO)), "files": [f.name for f in files],
            "stream_tokens": len(stream), "window_starts": starts, "prompt_starts": pstarts,
            "special_prefix": prefix}
    return torch.tensor(rows), torch.tensor(prows, dtype=torch.long).reshape(prompts, prompt_len), info


# ----------------------------------------------------------------------------- heads
def _next_targets(ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` next-token ids, -1 at the last position (no target)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)


def _top1_and_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 ``[n]`` and next-token NLL ``[n]`` (0 where target < 0), in float32."""
    logits = logits.float()
    top1 = logits.argmax(-1)
    lse = torch.logsumexp(logits, -1)
    safe = targets.clamp(min=0)
    nll = lse - logits.gather(-1, safe[:, None]).squeeze(-1)
    return top1, torch.where(targets >= 0, nll, torch.zeros_like(nll))


@torch.no_grad()
def head_pass(p: Any, states: torch.Tensor, targets: torch.Tensor, exit_state: Any = None,
              chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_head(final_norm(E(h)))`` over stored states, chunked: (top1, nll) on the CPU."""
    top1 = torch.empty(states.shape[0], dtype=torch.long)
    nll = torch.empty(states.shape[0], dtype=torch.float32)
    for i in range(0, states.shape[0], chunk):
        h = states[i : i + chunk]
        if exit_state is not None:
            h = exit_state(h).to(h.dtype)
        t, n = _top1_and_nll(p.head(h), targets[i : i + chunk].to(h.device))
        top1[i : i + chunk] = t.cpu()
        nll[i : i + chunk] = n.cpu()
    return top1, nll


class Domain:
    """One domain's held-out windows, the plain model's outputs and per-layer states."""

    def __init__(self, name: str, windows: torch.Tensor, prompts: torch.Tensor, info: dict[str, Any]):
        self.name = name
        self.windows = windows
        self.prompts = prompts
        self.info = info
        self.targets = _next_targets(windows).reshape(-1)
        self.has_target = self.targets >= 0
        self.states: dict[int, torch.Tensor] = {}
        self.plain_top1 = torch.empty(0)
        self.plain_nll = torch.empty(0)
        self.heads: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.greedy_plain: torch.Tensor | None = None

    @property
    def plain_ppl(self) -> float:
        return math.exp(float(self.plain_nll[self.has_target].double().mean()))


@torch.no_grad()
def plain_pass(model: Any, p: Any, dom: Domain, batch: int, progress: bool) -> None:
    """The plain model over the windows: its top-1 and NLL, and ``h_l`` of every layer
    ``l < L-1`` for every token (kept on the model's device, in its dtype)."""
    device = next(model.parameters()).device
    L = p.num_layers
    parts: dict[int, list[torch.Tensor]] = {l: [] for l in range(L - 1)}

    def hook_for(l: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            parts[l].append(h.reshape(-1, h.shape[-1]).detach().clone())
        return hook

    handles = [p.layers[l].register_forward_hook(hook_for(l)) for l in range(L - 1)]
    top1, nll = [], []
    try:
        for i in _bar(range(0, len(dom.windows), batch), f"plain {dom.name}", progress):
            x = dom.windows[i : i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            t, n = _top1_and_nll(logits.reshape(-1, logits.shape[-1]), _next_targets(x).reshape(-1))
            top1.append(t.cpu())
            nll.append(n.cpu())
    finally:
        for h in handles:
            h.remove()
    dom.plain_top1 = torch.cat(top1)
    dom.plain_nll = torch.cat(nll)
    dom.states = {l: torch.cat(v) for l, v in parts.items()}


def identity_heads(p: Any, dom: Domain, progress: bool) -> None:
    for l in _bar(sorted(dom.states), f"identity heads {dom.name}", progress):
        dom.heads[("identity", l)] = head_pass(p, dom.states[l], dom.targets)


# ----------------------------------------------------------------------------- metrics
def metrics(dom: Domain, top1: torch.Tensor, nll: torch.Tensor, exit_layers: torch.Tensor,
            num_layers: int, kv: str) -> dict[str, Any]:
    """Quality and depth of one run over the domain's tokens (flat tensors, CPU)."""
    exit_layers = exit_layers.reshape(-1).cpu()
    exited = exit_layers >= 0
    depth = torch.where(exited, exit_layers + 1, torch.full_like(exit_layers, num_layers)).double()
    agree = top1.reshape(-1).cpu() == dom.plain_top1
    k = int(exited.sum())
    n = exited.numel()
    ppl = math.exp(float(nll.reshape(-1)[dom.has_target].double().mean()))
    exits = torch.bincount(exit_layers[exited], minlength=num_layers).tolist() if k else []
    return {
        "tokens": n,
        "exit_rate": _r(k / n),
        "mean_depth": _r(float(depth.mean()), 4),
        "layers_executed": _r(float(depth.mean()) if kv == "propagate" else float(num_layers), 4),
        "kv_fill_layers": _r(float((num_layers - depth).mean()), 4) if kv == "propagate" else 0.0,
        "agreement_all": _r(float(agree.double().mean())),
        "agreement_exiting": _r(float(agree[exited].double().mean())) if k else None,
        "regret_rate": _r(1.0 - float(agree[exited].double().mean())) if k else None,
        "ppl": _r(ppl, 4),
        "ppl_change": _r(ppl / dom.plain_ppl - 1.0),
        "exits_per_layer": {str(c): int(m) for c, m in enumerate(exits) if m},
    }


def oracle_depth(dom: Domain, head_top1: dict[int, torch.Tensor], num_layers: int) -> float:
    """Mean depth when each token exits at the first of these heads that agrees."""
    depth = torch.full((dom.plain_top1.numel(),), float(num_layers), dtype=torch.float64)
    done = torch.zeros(dom.plain_top1.numel(), dtype=torch.bool)
    for c in sorted(head_top1):
        hit = (head_top1[c] == dom.plain_top1) & ~done
        depth[hit] = c + 1
        done |= hit
    return round(float(depth.mean()), 4)


# ----------------------------------------------------------------------------- router sets
def _active(routers: Any) -> list[int]:
    return [c for c in routers.checkpoint_layers if c + 1 >= routers.config.min_layers]


@torch.no_grad()
def deferred_from_states(routers: Any, dom: Domain, kind: str, threshold: float,
                         scores: dict[int, torch.Tensor], num_layers: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kv="deferred" teacher-forced = each token's own exit head with all K/V exact:
    (top1, nll, exit_layers) from the plain model's states."""
    n = dom.plain_top1.numel()
    exit_layer = torch.full((n,), -1, dtype=torch.long)
    top1 = dom.plain_top1.clone()
    nll = dom.plain_nll.clone()
    for c in _active(routers):
        new = (exit_layer < 0) & (scores[c] > threshold)
        if bool(new.any()):
            t, l = dom.heads[(kind, c)]
            exit_layer[new] = c
            top1[new] = t[new]
            nll[new] = l[new]
    return top1, nll, exit_layer


@torch.no_grad()
def reference_run(model: Any, routers: Any, dom: Domain, threshold: float, kv: str, batch: int,
                  progress: bool, max_batches: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.forward`` over the windows (teacher-forced): (top1, nll, exit_layers)."""
    from tide_compile import reference

    device = next(model.parameters()).device
    top1, nll, exits = [], [], []
    starts = list(range(0, len(dom.windows), batch))[:max_batches]
    for i in _bar(starts, f"{kv} t={threshold:.3f} {dom.name}", progress):
        x = dom.windows[i : i + batch].to(device)
        out = reference.forward(model, routers, x, exit_threshold=threshold, kv=kv)
        t, n = _top1_and_nll(out.logits.reshape(-1, out.logits.shape[-1]), _next_targets(x).reshape(-1))
        top1.append(t.cpu())
        nll.append(n.cpu())
        exits.append(out.exit_layers.reshape(-1).cpu())
    return torch.cat(top1), torch.cat(nll), torch.cat(exits)


@torch.no_grad()
def greedy(model: Any, routers: Any, prompts: torch.Tensor, new_tokens: int, threshold: float,
           kv: str, threads: int | None = None) -> tuple[torch.Tensor, Any]:
    """Greedy continuations (EOS ignored) under ``reference.generate``.

    ``threads``: torch CPU threads for the decode loop. Its steps are many small ops; on
    a shared CPU every parallel region of a multi-threaded op can wait for a descheduled
    thread (seen: about 2 s per SmolLM2 step with 2 threads on 2 busy cores)."""
    from tide_compile import reference

    device = next(model.parameters()).device
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        out = reference.generate(model, routers, prompts.to(device), new_tokens, exit_threshold=threshold,
                                 kv=kv, eos_token_id=[])
    finally:
        torch.set_num_threads(before)
    return out.sequences[:, prompts.shape[1]:].cpu(), out.stats


def continuation_match(got: torch.Tensor, plain: torch.Tensor) -> dict[str, Any]:
    same = got == plain
    prefix = torch.where(same.all(1), torch.full((same.shape[0],), same.shape[1]),
                         (~same).to(torch.int8).argmax(1))
    return {"identical_share": _r(float(same.all(1).double().mean()), 4),
            "mean_identical_prefix": _r(float(prefix.double().mean()), 3),
            "prefixes": prefix.tolist()}


def predicted_row(routers: Any, threshold: float) -> dict[str, Any] | None:
    """The quality table's first-exit row at ``threshold`` (never-exit for 1.0)."""
    for r in routers.quality_table:
        if r.get("view") == "first_exit" and abs(r["threshold"] - threshold) < 1e-9:
            return {k: r.get(k) for k in ("threshold", "agreement", "token_agreement", "exit_rate",
                                          "mean_depth", "tokens")}
    if threshold >= 1.0:
        return {"threshold": threshold, "agreement": None, "token_agreement": 1.0, "exit_rate": 0.0,
                "mean_depth": float(routers.num_layers), "tokens": None}
    return None


def judge(row: dict[str, Any], predicted: dict[str, Any] | None, target: float | None) -> dict[str, Any]:
    pred = None if predicted is None else predicted.get("token_agreement")
    out: dict[str, Any] = {"predicted_agreement_all": pred}
    if pred is not None and row["agreement_all"] is not None:
        out["delivered_minus_predicted"] = _r(row["agreement_all"] - pred)
        out["within_1pt"] = abs(row["agreement_all"] - pred) <= 0.01 + 1e-12
    else:
        out["delivered_minus_predicted"] = None
        out["within_1pt"] = None
    ex = row["agreement_exiting"]
    out["exiting_meets_target"] = None if ex is None or target is None else ex >= target - 0.01 - 1e-12
    return out


def router_set_name(strategy: str, interval: int, features: str) -> str:
    """``identity_k2``, or ``identity_k2_conf`` for routers that read confidence features."""
    return f"{strategy}_k{interval}" + ("_conf" if features == "rms+conf" else "")


def make_routers(model: Any, tokenizer: Any, strategy: str, interval: int, args: argparse.Namespace,
                 rows: list[str], out_dir: Path, features: str = "rms") -> tuple[Any, dict[str, Any]]:
    from tide_compile import TIDEConfig, calibrate
    from tide_compile.routers import RouterSet

    name = router_set_name(strategy, interval, features)
    path = out_dir / "routers" / f"{name}.tide"
    if args.reuse_routers and path.is_file():
        log(f"{name}: loading {path}")
        return RouterSet.load(path, model=model), {"loaded_from": str(path), "seconds": 0.0}
    config = TIDEConfig(checkpoint_interval=interval, exit_strategy=strategy,
                        calibration_samples=args.samples)
    kwargs: dict[str, Any] = dict(max_length=args.window, batch_size=args.batch, seed=args.seed,
                                  progress=args.progress)
    if args.max_tokens_per_checkpoint:
        kwargs["max_tokens_per_checkpoint"] = args.max_tokens_per_checkpoint
    if features != "rms":
        kwargs.update(router_features=features, confidence_k=args.confidence_k)
    log(f"{name}: calibrating ({args.samples} samples of <= {args.window} tokens)")
    t0 = time.perf_counter()
    routers = calibrate(model, tokenizer, rows, config, **kwargs)
    seconds = time.perf_counter() - t0
    log(f"{name}: calibrated in {seconds:.1f} s, checkpoints {routers.checkpoint_layers}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        routers.save(path, overwrite=True)
    except TypeError:  # an older RouterSet.save without overwrite=
        if path.exists():
            path.unlink()
        routers.save(path)
    return routers, {"seconds": round(seconds, 1), "saved_to": str(path)}


@torch.no_grad()
def _score(routers: Any, p: Any, c: int, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Router scores of plain-model states at checkpoint ``c`` (with the confidence features
    of the exit head over the successor candidates, for routers that read them)."""
    if getattr(routers, "successor", None) is None:
        return routers.score(c, states).float().cpu()
    dev = next(p.model.parameters()).device
    states, ids = states.to(dev), ids.to(dev)
    return routers.score(c, states, routers.confidence(c, states, ids, p)).float().cpu()


def evaluate_router_set(model: Any, p: Any, routers: Any, name: str, domains: list[Domain],
                        args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    L = p.num_layers
    strategy = routers.calibration.get("exit_strategy", "identity")
    kind = "identity" if strategy == "identity" else name
    cal = routers.calibration
    entry: dict[str, Any] = {
        "name": name, "exit_strategy": strategy,
        "router_features": list(getattr(routers, "features", ("rms",))),
        "checkpoint_interval": routers.config.checkpoint_interval,
        "checkpoints": routers.checkpoint_layers,
        "calibration": {k: cal.get(k) for k in ("source", "samples", "max_length", "tokens_seen",
                                                "tokens_kept", "split_tokens", "seconds", "exit_agreement")},
        "thresholds": [], "ceilings": {}, "timing": {},
    }
    t0 = time.perf_counter()
    scores: dict[str, dict[int, torch.Tensor]] = {}
    for dom in domains:
        if kind != "identity":
            for c in _bar(routers.checkpoint_layers, f"{name} heads {dom.name}", args.progress):
                proj = routers.exit_projection(c)
                dom.heads[(kind, c)] = head_pass(p, dom.states[c], dom.targets, proj)
        scores[dom.name] = {}
        ids = dom.windows.reshape(-1)
        for c in routers.checkpoint_layers:
            s = torch.cat([_score(routers, p, c, dom.states[c][i : i + 4096], ids[i : i + 4096])
                           for i in range(0, dom.states[c].shape[0], 4096)])
            scores[dom.name][c] = s
        heads = {c: dom.heads[(kind, c)][0] for c in routers.checkpoint_layers}
        entry["ceilings"][dom.name] = {
            "head_agreement": {str(c): _r(float((t == dom.plain_top1).double().mean()), 4)
                               for c, t in heads.items()},
            "oracle_mean_depth": oracle_depth(dom, heads, L),
        }
    entry["timing"]["heads_s"] = round(time.perf_counter() - t0, 1)

    thresholds: list[tuple[float | None, float, str | None]] = []
    for target in args.targets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = float(routers.threshold_for(target))
        # threshold_for returns 1.0 (never exit), with a warning saying why, when no
        # calibrated threshold supports the target.
        why = "; ".join(str(w.message) for w in caught) or "threshold_for returned 1.0"
        thresholds.append((target, t, why if t >= 1.0 else None))
    for t in args.extra_thresholds:
        thresholds.append((None, float(t), None))

    t_tf = t_gen = 0.0
    done: dict[float, dict[str, Any]] = {}  # threshold -> its domain rows (targets may share one)
    for target, t, unreachable in thresholds:
        pred = predicted_row(routers, t)
        trow: dict[str, Any] = {"target": target, "threshold": t, "target_unreachable": unreachable is not None,
                                "unreachable_why": unreachable, "predicted": pred, "domains": {}}
        if t in done:  # same routers and threshold: the same runs; only the target's verdict differs
            for dname, drow in done[t].items():
                trow["domains"][dname] = {kv: {**row, **judge(row, pred, target)} for kv, row in drow.items()}
            entry["thresholds"].append(trow)
            continue
        for dom in domains:
            drow: dict[str, Any] = {}
            t1 = time.perf_counter()
            st = deferred_from_states(routers, dom, kind, t, scores[dom.name], L)
            for kv in KV_MODES:
                if kv == "deferred" and args.deferred_from == "states":
                    top1, nll, ex = st
                    source = "states"
                else:
                    top1, nll, ex = reference_run(model, routers, dom, t, kv, args.batch, args.progress)
                    source = "reference"
                row = metrics(dom, top1, nll, ex, L, kv)
                row["source"] = source
                row.update(judge(row, pred, target))
                if kv == "deferred" and source == "reference":
                    row["check_vs_states"] = {
                        "exit_layer_mismatches": int((ex != st[2]).sum()),
                        "top1_mismatches": int((top1 != st[0]).sum()),
                        "max_nll_diff": _r(float((nll - st[1]).abs().max()), 6),
                    }
                drow[kv] = row
            if args.deferred_from == "states" and args.check_batches > 0 and target == args.targets[-1]:
                top1, nll, ex = reference_run(model, routers, dom, t, "deferred", args.batch, args.progress,
                                              max_batches=args.check_batches)
                m = ex.numel()
                drow["deferred"]["check_vs_reference"] = {
                    "tokens": m,
                    "exit_layer_mismatches": int((ex != st[2][:m]).sum()),
                    "top1_mismatches": int((top1 != st[0][:m]).sum()),
                    "max_nll_diff": _r(float((nll - st[1][:m]).abs().max()), 6),
                }
            t_tf += time.perf_counter() - t1
            if args.prompts > 0 and args.new_tokens > 0:
                t1 = time.perf_counter()
                if dom.greedy_plain is None:
                    dom.greedy_plain, _ = greedy(model, routers, dom.prompts, args.new_tokens, 1.0, "propagate",
                                                 args.decode_threads)
                for kv in KV_MODES:
                    seq, stats = greedy(model, routers, dom.prompts, args.new_tokens, t, kv, args.decode_threads)
                    g = continuation_match(seq, dom.greedy_plain)
                    g["exit_rate"] = _r(stats.exit_rate, 4)
                    g["mean_depth"] = _r(stats.mean_depth, 3)
                    drow[kv]["greedy"] = g
                t_gen += time.perf_counter() - t1
            trow["domains"][dom.name] = drow
            log(f"{name} t={t:.3f} ({'target ' + str(target) if target is not None else 'raw'}) {dom.name}: "
                + "; ".join(f"{kv} exit {drow[kv]['exit_rate']:.3f} agree {drow[kv]['agreement_all']:.4f} "
                            f"(pred {pred['token_agreement'] if pred else None}) "
                            f"ppl {100 * drow[kv]['ppl_change']:+.1f}%"
                            for kv in KV_MODES))
        done[t] = trow["domains"]
        entry["thresholds"].append(trow)
    entry["timing"]["teacher_forced_s"] = round(t_tf, 1)
    entry["timing"]["greedy_s"] = round(t_gen, 1)
    return entry


# ----------------------------------------------------------------------------- outputs
def _pct(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{nd}f}%"


def _yn(x: Any) -> str:
    return "-" if x is None else ("yes" if x else "**no**")


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    L = meta["num_layers"]
    lines = [
        f"# bench_quality: {meta['model_name']} ({L} layers), {meta['device']}, {meta['dtype']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}; wall time {meta.get('wall_s', '?')} s"
        + ("" if result.get("complete") else " (**incomplete run**)"),
        "",
        f"Held-out text per domain: {meta['windows']} windows of {meta['window']} tokens, teacher-forced; "
        f"plain perplexity " + ", ".join(f"{d}: {v['plain_ppl']:.3f}" for d, v in result["domains"].items()) + ".",
        "Calibration: " + f"{meta['samples']} samples of <= {meta['window']} tokens of "
        + ", ".join(f"{k} ({v['folder']})" for k, v in result["calibration_text"].items())
        + " (interleaved); the routers never see the held-out text.",
        "",
        "Columns: `t` = threshold_for(target); exit = exit rate; depth = mean depth (oracle: each token "
        "exits at the first checkpoint whose head agrees); run = layers executed per token (propagate: "
        "the depth, KV-fill of skipped layers not counted; deferred: all L layers run, the skipped ones "
        "later, batched); all-token = top-1 agreement with the full model over all tokens, predicted "
        "(quality table) / delivered, ok = within 1 point; exiting = agreement of exiting tokens, ok = "
        ">= target - 0.01; ppl = perplexity change vs plain; greedy = share of "
        f"{meta['new_tokens']}-token greedy continuations identical to plain / mean identical prefix "
        f"({meta['prompts']} prompts of {meta['prompt_len']} tokens).",
        "",
    ]
    for dname in result["domains"]:
        lines += [f"## {dname}", "",
                  "| routers | target | t | kv | exit | depth (oracle) | run | all-token pred / delivered | ok | "
                  "exiting | ok | ppl | greedy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for rs in result["router_sets"]:
            oracle = rs["ceilings"].get(dname, {}).get("oracle_mean_depth")
            for tr in rs["thresholds"]:
                d = tr["domains"].get(dname)
                if d is None:
                    continue
                for kv in KV_MODES:
                    r = d[kv]
                    g = r.get("greedy")
                    gtxt = ("-" if g is None
                            else f"{_pct(g['identical_share'], 0)} / {g['mean_identical_prefix']:.1f}")
                    flag = " (none qualifies: t = 1)" if tr["target_unreachable"] else ""
                    tgt = "-" if tr["target"] is None else f"{tr['target']:.2f}"
                    lines.append(
                        f"| {rs['name']} | {tgt}{flag} | {tr['threshold']:.3f} | {kv} | {_pct(r['exit_rate'])} | "
                        f"{r['mean_depth']:.2f} ({oracle}) | {r['layers_executed']:.2f} | "
                        f"{_pct(r['predicted_agreement_all'])} / {_pct(r['agreement_all'])} | "
                        f"{_yn(r['within_1pt'])} | {_pct(r['agreement_exiting'])} | "
                        f"{_yn(r.get('exiting_meets_target'))} | "
                        f"{100 * r['ppl_change']:+.1f}% | {gtxt} |")
        lines.append("")
    lines += ["## Ceilings: top-1 agreement of each exit head alone, and the oracle mean depth", ""]
    for dname, dv in result["domains"].items():
        ident = dv["identity_head_agreement"]
        lines.append(f"**{dname}**, identity head by layer (every layer; oracle mean depth over all "
                     f"{L - 1} exit points {dv['identity_oracle_mean_depth']}): "
                     + ", ".join(f"{l}: {_pct(v, 0)}" for l, v in ident.items()))
        lines.append("")
        for rs in result["router_sets"]:
            if rs["exit_strategy"] != "identity":
                c = rs["ceilings"].get(dname, {})
                lines.append(f"**{dname}**, {rs['name']} projection heads: "
                             + ", ".join(f"{l}: {_pct(v, 0)}" for l, v in c.get("head_agreement", {}).items())
                             + f" (oracle mean depth {c.get('oracle_mean_depth')})")
                lines.append("")
        lines.append("Oracle mean depth per router set (its checkpoints and heads): "
                     + ", ".join(f"{rs['name']} {rs['ceilings'].get(dname, {}).get('oracle_mean_depth')}"
                                 for rs in result["router_sets"]))
        lines.append("")
    checks = []
    for rs in result["router_sets"]:
        for tr in rs["thresholds"]:
            for dname, d in tr["domains"].items():
                c = d["deferred"].get("check_vs_reference") or d["deferred"].get("check_vs_states")
                if c:
                    checks.append(f"{rs['name']} t={tr['threshold']:.3f} {dname}: "
                                  f"{c['exit_layer_mismatches']} exit / {c['top1_mismatches']} top-1 mismatches")
    if checks:
        lines += ["Deferred from states vs `reference.forward(kv='deferred')`: " + "; ".join(checks) + ".", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    names = list(result["domains"])
    L = result["meta"]["num_layers"]
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 9), squeeze=False)
    styles = {"propagate": dict(linestyle="--", marker="x"), "deferred": dict(linestyle="-", marker="o")}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, dname in enumerate(names):
        ax = axes[0][j]
        for i, rs in enumerate(result["router_sets"]):
            color = colors[i % len(colors)]
            rows = [tr for tr in rs["thresholds"] if dname in tr["domains"]]
            for kv in KV_MODES:
                pts = sorted((tr["domains"][dname][kv]["mean_depth"], tr["domains"][dname][kv]["agreement_all"])
                             for tr in rows)
                if pts:
                    ax.plot([x for x, _ in pts] + [L], [y for _, y in pts] + [1.0], color=color,
                            label=f"{rs['name']} {kv}", **styles[kv])
            pred = sorted((tr["predicted"]["mean_depth"], tr["predicted"]["token_agreement"])
                          for tr in rows if tr["predicted"] and tr["predicted"].get("mean_depth") is not None)
            if pred:
                ax.plot([x for x, _ in pred], [y for _, y in pred], color=color, linestyle="none", marker="s",
                        markerfacecolor="none", label=f"{rs['name']} predicted (table)")
        ax.axhline(0.99, color="grey", linewidth=0.6)
        ax.set_xlabel("layers per token before its output (mean depth; propagate runs only these + KV-fill)")
        ax.set_ylabel("teacher-forced top-1 agreement, all tokens")
        ax.set_title(f"held-out {dname}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][j]
        ident = result["domains"][dname]["identity_head_agreement"]
        ax.plot([int(l) + 1 for l in ident], list(ident.values()), marker=".", label="identity head, every layer")
        for rs in result["router_sets"]:
            if rs["exit_strategy"] != "identity":
                ha = rs["ceilings"].get(dname, {}).get("head_agreement", {})
                ax.plot([int(l) + 1 for l in ha], list(ha.values()), marker="o",
                        label=f"{rs['name']} projection heads")
        ax.set_xlabel("depth (layers run)")
        ax.set_ylabel("exit head top-1 agreement with the full model")
        ax.set_title(f"ceilings, held-out {dname}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"bench_quality: {result['meta']['model_name']}, {result['meta']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_table(result: dict[str, Any]) -> str:
    lines = ["| domain | routers | target | t | exit | depth | all-token pred | propagate | deferred | "
             "exiting prop / def | ppl prop / def | greedy identical prop / def |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dname in result["domains"]:
        for rs in result["router_sets"]:
            for tr in rs["thresholds"]:
                d = tr["domains"].get(dname)
                if not d:
                    continue
                pr, de = d["propagate"], d["deferred"]
                gp, gd = pr.get("greedy"), de.get("greedy")
                g = ("-" if not (gp and gd)
                     else f"{_pct(gp['identical_share'], 0)} / {_pct(gd['identical_share'], 0)}")
                tgt = "-" if tr["target"] is None else f"{tr['target']:.2f}"
                lines.append(
                    f"| {dname} | {rs['name']} | {tgt} | {tr['threshold']:.3f} | {_pct(de['exit_rate'])} | "
                    f"{de['mean_depth']:.2f} | {_pct(de['predicted_agreement_all'])} | "
                    f"{_pct(pr['agreement_all'])} {'ok' if pr['within_1pt'] else 'FAIL'} | "
                    f"{_pct(de['agreement_all'])} {'ok' if de['within_1pt'] else 'FAIL'} | "
                    f"{_pct(pr['agreement_exiting'])} / {_pct(de['agreement_exiting'])} | "
                    f"{100 * pr['ppl_change']:+.1f}% / {100 * de['ppl_change']:+.1f}% | {g} |")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["meta"]["wall_s"] = round(time.perf_counter() - _T0, 1)
    tmp = out / "bench_quality.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "bench_quality.json")
    (out / "bench_quality.md").write_text(markdown(result) + "\n")
    if result["router_sets"]:
        plot(result, out / "bench_quality.png")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "demo"), default="smollm2")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--windows", type=int, default=16, help="teacher-forcing windows per domain")
    ap.add_argument("--window", type=int, default=128, help="tokens per window (and per calibration sample)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass (and calibration batch)")
    ap.add_argument("--samples", type=int, default=600, help="calibration samples per router set")
    ap.add_argument("--max-tokens-per-checkpoint", type=int, default=None,
                    help="calibrate()'s token subset per checkpoint (default: calibrate's)")
    ap.add_argument("--intervals", type=_ints, default=[1, 2, 4])
    ap.add_argument("--strategies", type=_strs, default=["identity", "projection"])
    ap.add_argument("--targets", type=_floats, default=[0.99, 0.95, 0.90])
    ap.add_argument("--router-features", type=_strs, default=["rms"],
                    help="router inputs to calibrate and compare: rms, rms+conf (the exit head's "
                         "confidence over --confidence-k successor candidates)")
    ap.add_argument("--confidence-k", type=int, default=64,
                    help="candidates per token for --router-features rms+conf")
    ap.add_argument("--extra-thresholds", type=_floats, default=[],
                    help="raw thresholds measured as well (e.g. 1.0: never exits, must equal plain)")
    ap.add_argument("--prompts", type=int, default=8, help="greedy prompts per domain (0: no greedy)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--deferred-from", choices=("reference", "states"), default="reference",
                    help="teacher-forced kv='deferred' from reference.forward, or computed from the plain "
                         "model's states (the same semantics, much cheaper on a CPU)")
    ap.add_argument("--check-batches", type=int, default=1,
                    help="with --deferred-from states: reference.forward(kv='deferred') on this many "
                         "batches per domain at the last target, to check the two agree")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--decode-threads", type=int, default=None,
                    help="torch CPU threads for the greedy decode loops (default: 1 on a CPU device)")
    ap.add_argument("--out", type=Path, default=Path("bench_quality_out"))
    ap.add_argument("--reuse-routers", action="store_true", help="load OUT/routers/*.tide if present")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test: demo model, 2 windows of 64 tokens, 32 samples (1000 tokens kept), "
                         "interval 4, target 0.9 and raw thresholds 0.5 and 1.0, 2 prompts x 6 "
                         "tokens, on the CPU")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = "demo"
        args.device = args.device or "cpu"
        args.windows, args.window, args.batch = 2, 64, 2
        args.samples, args.max_tokens_per_checkpoint = 32, 1000
        args.intervals = [4]
        args.targets = [0.9]
        args.prompts, args.prompt_len, args.new_tokens = 2, 12, 6
        args.extra_thresholds = sorted({*args.extra_thresholds, 0.5, 1.0})
    for f in args.router_features:
        if f not in ("rms", "rms+conf"):
            ap.error(f"--router-features: unknown {f!r} (rms, rms+conf)")
    for s in args.strategies:
        if s not in ("identity", "projection"):
            ap.error(f"--strategies: unknown {s!r} (identity, projection)")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.decode_threads is None and str(args.device) == "cpu":
        args.decode_threads = 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global _T0
    _T0 = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from tide_compile import demo
    from tide_compile.model_probe import probe

    dtype = DTYPES[args.dtype]
    log(f"loading {args.model} ({args.dtype}) on {args.device}")
    model, tokenizer = demo.load(args.model, dtype=dtype, device=args.device)
    p = probe(model)
    L = p.num_layers
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (
        sys.argv[1:] if argv is None else list(argv)))
    result: dict[str, Any] = {
        "complete": False,
        "meta": {
            "model_name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)" if args.model == "smollm2"
            else "demo (4M, tide_compile/demo_model)",
            "model": args.model, "num_layers": L, "hidden_size": p.hidden_size,
            "device": str(args.device), "dtype": args.dtype,
            "gpu": torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "windows": args.windows, "window": args.window, "batch": args.batch,
            "samples": args.samples, "max_tokens_per_checkpoint": args.max_tokens_per_checkpoint,
            "intervals": args.intervals, "strategies": args.strategies, "targets": args.targets,
            "router_features": args.router_features, "confidence_k": args.confidence_k,
            "extra_thresholds": args.extra_thresholds, "prompts": args.prompts,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "deferred_from": args.deferred_from, "seed": args.seed, "decode_threads": args.decode_threads,
            "layers_executed": "propagate: mean depth (exited tokens stop at their checkpoint, as the skip "
                               "runtime does at batch-1 decode; kv_fill_layers = skipped layers whose K/V "
                               "are filled from the frozen state, not counted); deferred: num_layers "
                               "(the skipped layers run later, batched)",
        },
        "domains": {}, "calibration_text": {}, "router_sets": [],
    }
    domains: list[Domain] = []
    for name, folder in HELDOUT.items():
        w, pr, info = heldout_inputs(tokenizer, folder, args.windows, args.window, args.prompts,
                                     args.prompt_len)
        domains.append(Domain(name, w, pr, info))
    for dom in domains:
        t0 = time.perf_counter()
        plain_pass(model, p, dom, args.batch, args.progress)
        identity_heads(p, dom, args.progress)
        ident = {l: dom.heads[("identity", l)][0] for l in range(L - 1)}
        result["domains"][dom.name] = {
            **dom.info, "tokens": dom.plain_top1.numel(), "plain_ppl": round(dom.plain_ppl, 4),
            "identity_head_agreement": {str(l): _r(float((t == dom.plain_top1).double().mean()), 4)
                                        for l, t in ident.items()},
            "identity_oracle_mean_depth": oracle_depth(dom, ident, L),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log(f"plain {dom.name}: {dom.plain_top1.numel()} tokens, ppl {dom.plain_ppl:.3f}, identity oracle "
            f"depth {result['domains'][dom.name]['identity_oracle_mean_depth']}")
    rows, cal_info = calibration_rows(args.seed)
    result["calibration_text"] = cal_info
    write_outputs(result, args.out)
    for strategy, interval, features in [(s, i, f) for s in args.strategies for i in args.intervals
                                         for f in args.router_features]:
        name = router_set_name(strategy, interval, features)
        routers, how = make_routers(model, tokenizer, strategy, interval, args, rows, args.out,
                                    features)
        entry = evaluate_router_set(model, p, routers, name, domains, args, result)
        entry["routers"] = how
        result["router_sets"].append(entry)
        write_outputs(result, args.out)
        log(f"{name}: done, wrote {args.out}")
    result["complete"] = True
    write_outputs(result, args.out)
    table = summary_table(result)
    print()
    print(table)
    print()
    print(f"wall time {result['meta']['wall_s']} s; outputs in {args.out}")
    return result


if __name__ == "__main__":
    main()
