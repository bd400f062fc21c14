"""mode="lossless" against the compiled plain model: tokens/s, acceptance, fallback (issue 19).

Greedy, batch 1, EOS off (every row decodes ``--new`` tokens), one process. Each
measurement is ``generate(new)`` and ``generate(1)``, between CUDA syncs (process CPU
time on a CPU): ``ms_per_token`` is their difference over ``new - 1`` (decode only),
``tokens_per_s`` its inverse, ``e2e_tokens_per_s`` is ``new / generate(new)``. A row is the
median over its prompts and ``--repeats`` measurements, after a warm-up (compiles, CUDA
graph captures, and the adaptive controller's first estimates: its state is kept per cache
bucket across generates, so timed runs show its steady state). ``x_plain`` is the plain
row's ms/token over the row's.

Rows (``--rows``, comma list):

* ``models``: the demo model and SmolLM2-135M (``--models``; real weights, shipped
  routers at their calibrated threshold), the same prompts (``--prompts`` paragraphs of
  held-out text, ``--prompt-tokens`` each) for every row:

  - ``plain``: the model under ``torch.compile`` (Inductor, ``reduce-overhead`` on CUDA;
    Dynamo's eager backend with ``--no-inductor``), a greedy loop on a StaticCache
    (compiled prompt step, then one-token steps): the baseline;
  - ``lossless``: ``optimize(model, routers, mode="lossless")`` (adaptive);
  - ``lossless_fixed``: the same with ``adaptive=False`` (always drafts: what the
    fallback saves);
  - ``plain_unguarded`` (not by default): ``plain`` whose decode steps after the first
    skip Dynamo's full guard evaluation, as lossless's runs of fallback steps do
    (``tide_compile.runtime.lossless.unguarded``): the tightest compiled plain loop. On
    the H200 guard evaluation measured about 190 us per step of the demo model
    (``diag_fallback.py``, tenth session), so lossless against ``plain`` alone would
    credit tide with what any caller of ``torch.compile`` can also skip;

  The rows of a model are built and compiled first, then timed **interleaved** in one
  process (per round, per prompt, every row in turn; the order rotates per round): a
  tiny model's step is launch-bound and its speed drifts with the GPU's clocks and the
  host's load by up to 2x between calls (ninth device session), so rows timed one after
  another are not comparable. ``x_plain`` is the ratio of the medians,
  ``x_plain_paired`` the median of the per-measurement ratios (same prompt, same round)
  and ``x_plain_paired_range`` their range; lossless rows also get ``x_unguarded_paired``
  (and its range), the same against ``plain_unguarded`` when that row runs. (The separate-verify ``mode="speculative"``
  had a row here until it was removed: it measured 0.49-0.71x plain on these models.)

  Lossless rows report ``acceptance``, ``mean_draft_depth``, ``fallbacks`` (rounds of the
  adaptive fallback), ``probes``, ``plain_step_fraction``, ``tokens_per_deep_step``, and
  ``first_mismatch`` against the plain row's tokens (None: identical; bf16 kernels may
  differ in near-ties).

* ``ceiling``: the Llama-3.1-8B shape with random weights (``bench_decode.build_model``;
  ``--tiny``: its tiny Llama), bf16 on CUDA:

  - ``plain``: as above;
  - ``lossless_never_exit``: routers that never exit, adaptive: the worst case, where
    the fallback must keep plain speed (target >= 0.97x);
  - ``lossless_never_exit_fixed``: the same with ``adaptive=False``: every step is a
    ``W``-wide deep step with nothing pending (``t_deep``);
  - ``lossless_ceiling@d`` (``--depths``, 8,16,24): the layers after ``d`` zeroed in
    place (output projections: their residual contribution is exactly 0, so the exit
    head after ``d`` layers reads out the full model's logits and every draft is
    accepted) and forced routers exiting every token after ``d`` layers: the best this
    design does at 100% acceptance (target at d=16: >= 1.5x). Depths run deepest first
    (the zeroing only grows); the plain row runs before any zeroing (weights do not
    change its cost).

  Then a **projection** per depth (labelled ``projection``, not a measurement): with
  ``t_deep`` from the never-exit fixed row and ``t_stop`` from the ceiling row
  (``W * ms_ceiling = max_pending * t_stop + t_deep``), a round of ``P`` drafts at
  per-draft acceptance ``a`` yields ``sum_{i=0..P} a^i`` tokens for ``P * t_stop +
  t_deep``; reported at ``a`` = 0.6 / 0.8 / 0.9 for ``P = max_pending`` and for the best
  ``P <= max_pending``, with and without the fallback's floor (plain speed).

Output: ``--out`` JSON (written after every row) and a table.

Usage: python benchmarks/bench_lossless.py [--rows models,ceiling] [--out lossless.json]
       python benchmarks/bench_lossless.py --rows ceiling --depths 16   # one 600 s call
       python benchmarks/bench_lossless.py --tiny --no-inductor         # CPU smoke, < 60 s
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tide_compile  # noqa: E402
from tide_compile import RouterSet, TIDEConfig  # noqa: E402
from tide_compile.runtime.model import cache_bucket  # noqa: E402


def _load_bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode_for_lossless",
                                                  os.path.join(HERE, "bench_decode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_decode = _load_bench_decode()

ACCEPTANCES = (0.6, 0.8, 0.9)
CEILING_ROWS = {"plain", "never", "never_fixed", "ceiling"}


def clock(device: str) -> float:
    """Seconds: wall time after a CUDA sync, or this process's CPU time on a CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def zero_layers_after(model, depth: int) -> None:
    """In place: layers ``depth ..`` of a Llama add nothing to the residual stream (their
    attention and MLP output projections are zero)."""
    with torch.no_grad():
        for block in model.model.layers[depth:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


class PlainLoop(bench_decode.BucketedLoop):
    """The compiled plain model's greedy batch-1 generate on one cache length
    (``bench_decode.BucketedLoop``: the prompt step, its length dynamic, then one-token
    steps, the two after the prompt guarded in full when ``unguarded``); returns the
    sequence."""

    def __init__(self, model, inductor: bool, device: str, cache_len: int,
                 unguarded: bool = False) -> None:
        if inductor:
            fn = torch.compile(model.forward, fullgraph=True, dynamic=False,
                               mode="reduce-overhead" if device == "cuda" else None)
        else:
            fn = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
        super().__init__(model, fn, device, device == "cuda" and inductor,
                         max_cache_len=cache_len, unguarded=unguarded)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        return torch.cat([ids] + self.tokens(ids, max_new_tokens), dim=-1)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke: the tiny Llama for the ceiling rows, no model rows "
                         "(defaults: --rows ceiling --depths 4,2 --interval 2 --new 12 "
                         "--prompts 1 --prompt-tokens 8 --repeats 1)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="no Inductor (plain: Dynamo's eager backend; tide: inductor=False)")
    ap.add_argument("--rows", default=None, help="comma list of: models, ceiling")
    ap.add_argument("--models", default="demo,smollm2", help="model rows: demo, smollm2")
    ap.add_argument("--model-rows", default="plain,lossless,lossless_fixed",
                    help="which rows per model (plain, lossless, lossless_fixed, "
                         "plain_unguarded), timed "
                         "interleaved in one process")
    ap.add_argument("--depths", default=None, help="ceiling exit depths (8,16,24)")
    ap.add_argument("--ceiling-rows", default="plain,never,never_fixed,ceiling",
                    help="which ceiling rows: plain, never (lossless_never_exit), never_fixed, "
                         "ceiling (lossless_ceiling@d for every --depths)")
    ap.add_argument("--gate", default=None,
                    help="DIR:N: one of N processes on one GPU that compile in parallel and "
                         "time one at a time (bench_decode.TimingGate); give each process one "
                         "ceiling row (--rows ceiling --ceiling-rows R, one depth), then "
                         "--merge their files")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="JSON files of gated processes: one result (x_plain and the "
                         "projections computed across them), written to --out, and its table")
    ap.add_argument("--interval", type=int, default=None,
                    help="ceiling checkpoint_interval (8)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per generate (128)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per model (4)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per prompt (3)")
    ap.add_argument("--max-pending", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="CPU only: torch threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    full = {"rows": "models,ceiling", "depths": "8,16,24", "interval": 8, "new": 128,
            "prompts": 4, "prompt_tokens": 64, "repeats": 3}
    tiny = {"rows": "ceiling", "depths": "4,2", "interval": 2, "new": 12, "prompts": 1,
            "prompt_tokens": 8, "repeats": 1}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = set(args.rows.split(","))
    args.ceiling_rows = set(args.ceiling_rows.split(","))
    if not args.ceiling_rows <= CEILING_ROWS:
        ap.error(f"--ceiling-rows: unknown {sorted(args.ceiling_rows - CEILING_ROWS)}")
    if not args.rows <= {"models", "ceiling"}:
        ap.error(f"--rows: unknown {sorted(args.rows - {'models', 'ceiling'})}")
    args.depths = sorted(parse_ints(args.depths), reverse=True)
    args.models = [m for m in args.models.split(",") if m]
    args.model_rows = [r for r in args.model_rows.split(",") if r]
    if args.new < 2:
        ap.error("--new must be >= 2 (decode time is generate(new) - generate(1))")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = build_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            return _run(args, device, not args.no_inductor)
    finally:
        torch.set_num_threads(threads)


def lossless_stats(fast) -> dict:
    s = fast.lossless_stats
    steps = s.plain_steps + s.deep_steps + s.drafted
    return {"acceptance": round(s.acceptance_rate, 4), "drafted": s.drafted,
            "accepted": s.accepted, "mean_draft_depth": round(s.mean_draft_depth, 3),
            "draft_depths": dict(sorted(s.draft_depths.items())),
            "tokens_per_deep_step": round(s.tokens_per_deep_step, 3),
            "fallbacks": s.fallbacks, "probes": s.probes,
            "plain_step_fraction": round(s.plain_steps / steps, 3) if steps else None}


def project(t_plain: float, t_deep: float, t_stop: float, pending: int) -> dict:
    """Projected speedups over plain at the acceptances of :data:`ACCEPTANCES`."""
    out = {}
    for a in ACCEPTANCES:
        def speed(p: int) -> float:
            tokens = sum(a ** i for i in range(p + 1))
            return t_plain * tokens / (p * t_stop + t_deep)

        best = max(range(1, pending + 1), key=speed)
        out[str(a)] = {"speedup": round(speed(pending), 3),
                       "best_pending": best, "best_speedup": round(speed(best), 3),
                       "with_fallback": round(max(1.0, speed(best)), 3)}
    return out


def projection_row(depth: int, t_plain: float, t_deep: float, ms_ceiling: float,
                   pending: int) -> dict:
    """The projection at exit depth ``depth`` (not a measurement): ``t_stop`` from the
    ceiling row's ms/token (``W * ms_ceiling = pending * t_stop + t_deep``)."""
    t_stop = max(0.0, ((pending + 1) * ms_ceiling - t_deep) / pending)
    return {"name": f"projection@{depth}", "depth": depth,
            "kind": "projection, not a measurement", "t_plain_ms": t_plain, "t_deep_ms": t_deep,
            "t_stop_ms": round(t_stop, 4), "max_pending": pending,
            "at_acceptance": project(t_plain, t_deep, t_stop, pending)}


def merge(paths: list[str], out: str | None) -> dict:
    """One result from gated processes' files: rows in file order, ``x_plain`` from the
    same model's plain row (timed in the same call while no other process ran), model
    rows' ``first_mismatch`` from their recorded ``tokens`` and the same model's plain
    row's (the prompts are the same in every process), and the ceiling's projections from
    the never-exit fixed row and each ceiling row."""
    parts, result = bench_decode.merge_parts(paths, ("rows",))
    result["projection"] = []
    ms = {r["name"]: r["ms_per_token"] for r in result["rows"] if "ms_per_token" in r}
    plain = {r.get("model"): r["ms_per_token"] for r in result["rows"]
             if "ms_per_token" in r and r["name"] in ("plain", f"{r.get('model')}:plain")}
    plain_tokens = {r.get("model"): r["tokens"] for r in result["rows"]
                    if "tokens" in r and r["name"] == f"{r.get('model')}:plain"}
    for r in result["rows"]:  # x_plain (and first_mismatch) against the same model's plain row
        if "ms_per_token" in r and r.get("model") in plain:
            r["x_plain"] = round(plain[r["model"]] / r["ms_per_token"], 3)
        if ("tokens" in r and r.get("model") in plain_tokens
                and not r["name"].endswith(":plain")):
            r["first_mismatch"] = first_mismatch(r["tokens"], plain_tokens[r["model"]])
    pending = {part["env"].get("max_pending") for part in parts}
    if "plain" in ms and "lossless_never_exit_fixed" in ms and len(pending) == 1:
        for r in result["rows"]:
            if r["name"].startswith("lossless_ceiling@"):
                result["projection"].append(projection_row(
                    r["depth"], ms["plain"], ms["lossless_never_exit_fixed"],
                    r["ms_per_token"], next(iter(pending))))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    return result


def _run(args: argparse.Namespace, device: str, inductor: bool) -> dict:
    start = time.time()
    gate = bench_decode.TimingGate(args.gate)
    env = {"torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "clock": "wall, CUDA-synced" if device == "cuda" else "process CPU time",
           "new": args.new, "max_pending": args.max_pending, "inductor": inductor,
           "rows": sorted(args.rows), "tiny": args.tiny, "repeats": args.repeats,
           "threads": torch.get_num_threads() if device == "cpu" else None,
           "gate": args.gate}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    print(json.dumps(env), flush=True)
    result: dict = {"env": env, "rows": [], "projection": []}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    def row(r: dict) -> dict:
        result["rows"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
        save()
        return r

    def timed(generate: Callable, ids: torch.Tensor, n: int, cache_len: int):
        """One ``generate(ids, n)``: (milliseconds, output)."""
        t0 = clock(device)
        out = generate(ids, max_new_tokens=n, eos_token_id=-1, max_cache_len=cache_len)
        return (clock(device) - t0) * 1e3, out

    def summary(decode: list[float], e2e: list[float]) -> dict:
        ms = statistics.median(decode)
        return {"ms_per_token": round(ms, 4), "tokens_per_s": round(1e3 / ms, 1),
                "ms_range": [round(min(decode), 4), round(max(decode), 4)],
                "e2e_tokens_per_s": round(args.new * 1e3 / statistics.median(e2e), 1)}

    def measure_interleaved(generates: dict[str, Callable], prompts: list[torch.Tensor],
                            cache_len: int, then: Callable[[], None] | None = None) -> dict:
        """Several rows of one model timed side by side: each warmed up, then ``repeats``
        rounds, each over the prompts, each prompt through every row (generate(1), then
        generate(new); the rows' order rotates from round to round), so a drift of the
        machine (clocks, other load) reaches every row alike. Per row its medians and its
        per-measurement decode milliseconds (``decode_ms``, in a shared order: sample ``i``
        of two rows is the same prompt and round)."""
        warm = {}
        for kind, generate in generates.items():
            t0 = time.time()
            for ids in prompts:
                for n in (args.new, 1, args.new):
                    timed(generate, ids, n, cache_len)
            warm[kind] = round(time.time() - t0, 2)
        kinds = list(generates)
        decode = {k: [] for k in kinds}
        e2e = {k: [] for k in kinds}
        outs = {k: [] for k in kinds}
        gate.arrive()
        with gate.exclusive():
            for rnd in range(args.repeats):
                order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
                for ids in prompts:
                    for kind in order:
                        one, _ = timed(generates[kind], ids, 1, cache_len)
                        full, out = timed(generates[kind], ids, args.new, cache_len)
                        decode[kind].append((full - one) / (args.new - 1))
                        e2e[kind].append(full)
                        if rnd == 0:
                            outs[kind].append(out)
            if then is not None:
                then()
        return {k: {**summary(decode[k], e2e[k]), "warmup_s": warm[k], "outs": outs[k],
                    "decode_ms": [round(x, 4) for x in decode[k]]} for k in kinds}

    if "models" in args.rows:
        for name in args.models:
            model_rows(name, args, device, inductor, measure_interleaved, row)
    if "ceiling" in args.rows:
        ceiling_rows(args, device, inductor, measure_interleaved, row, result, gate)
    env["total_s"] = round(time.time() - start, 1)
    env["gate_waited_s"] = gate.waited_s
    save()
    print_table(result)
    return result


def first_mismatch(tokens: list[list[int]], ref: list[list[int]]) -> list[int | None]:
    """Per prompt, the index of the first new token that differs from ``ref``'s (None:
    identical)."""
    found: list[int | None] = []
    for out, want in zip(tokens, ref):
        diff = [i for i, (a, b) in enumerate(zip(out, want)) if a != b]
        found.append(diff[0] if diff else (None if len(out) == len(want)
                                           else min(len(out), len(want))))
    return found


def model_prompts(tok, texts: list[str], count: int, tokens: int) -> list[torch.Tensor]:
    """The model rows' prompts: ``count`` paragraphs (over 200 characters) spread over the
    model's held-out texts, each cut to its first ``tokens`` tokens ([1, <= tokens])."""
    paras = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 200]
    step = max(1, len(paras) // count)
    return [tok(p, return_tensors="pt").input_ids[:, :tokens] for p in paras[::step][:count]]


def paired(base: dict, m: dict, key: str) -> dict:
    """``key``: the median of the per-measurement ratios base / m (the same prompt, the
    same round; above 1: m is faster), and ``key + "_range"`` their range."""
    ratios = [b / t for b, t in zip(base["decode_ms"], m["decode_ms"])]
    return {key: round(statistics.median(ratios), 3),
            key + "_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def model_rows(name, args, device, inductor, measure_interleaved, row) -> None:
    """The model's rows (``--model-rows``), built and compiled first, then timed
    interleaved in this process (``measure_interleaved``): ``x_plain`` is the ratio of
    medians, ``x_plain_paired`` the median (and range) of the per-measurement ratios to
    the plain row (the same prompt, the same round)."""
    from tide_compile import cli_demo, demo

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model, tok = demo.load(name, dtype=dtype, device=device)
        routers = RouterSet.load(str(demo.SHIPPED_ROUTERS[name]), model=model)
        texts = cli_demo.heldout_texts(name)
    except Exception as e:  # a missing package or file: reported, the rest goes on
        row({"name": f"{name}:skipped", "model": name, "error": f"{type(e).__name__}: {e}"})
        return
    prompts = [p.to(device) for p in model_prompts(tok, texts, args.prompts, args.prompt_tokens)]
    cache_len = cache_bucket(max(p.shape[1] for p in prompts) + args.new + args.max_pending)
    where = {"model": name, "num_layers": model.config.num_hidden_layers,
             "checkpoints": routers.checkpoint_layers,
             "exit_threshold": routers.config.exit_threshold,
             "prompt_tokens": [p.shape[1] for p in prompts]}
    torch._dynamo.reset()
    built: dict[str, Any] = {}
    generates: dict[str, Callable] = {}
    for kind in args.model_rows:
        if kind in ("plain", "plain_unguarded"):
            built[kind] = PlainLoop(model, inductor, device, cache_len,
                                    unguarded=kind == "plain_unguarded")
        else:
            built[kind] = tide_compile.optimize(model, routers, mode="lossless",
                                                inductor=inductor, max_pending=args.max_pending,
                                                adaptive=kind == "lossless")
        generates[kind] = built[kind].generate

    def stats_pass() -> None:  # lossless stats over exactly one (warm) run per prompt
        for kind, fast in built.items():
            if not kind.startswith("plain"):
                fast.lossless_stats.reset()
                for ids in prompts:
                    fast.generate(ids, max_new_tokens=args.new, eos_token_id=-1,
                                  max_cache_len=cache_len)

    measured = measure_interleaved(generates, prompts, cache_len, then=stats_pass)
    ref = None
    if "plain" in measured:
        ref = [out[0, ids.shape[1]:].tolist() for out, ids in zip(measured["plain"]["outs"],
                                                                  prompts)]
    for kind in args.model_rows:
        m = measured[kind]
        tokens = [out[0, ids.shape[1]:].tolist() for out, ids in zip(m.pop("outs"), prompts)]
        extra: dict = {}
        if kind != "plain":
            extra = lossless_stats(built[kind]) if kind != "plain_unguarded" else {}
            if ref is not None:
                extra.update(paired(measured["plain"], m, "x_plain_paired"))
                extra["first_mismatch"] = first_mismatch(tokens, ref)
            if kind.startswith("lossless") and "plain_unguarded" in measured:
                extra.update(paired(measured["plain_unguarded"], m, "x_unguarded_paired"))
        x = (round(measured["plain"]["ms_per_token"] / m["ms_per_token"], 3)
             if "plain" in measured else None)
        row({"name": f"{name}:{kind}", **where, **m, "x_plain": x, **extra, "tokens": tokens})
    del built, generates
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    del model


def ceiling_rows(args, device, inductor, measure_interleaved, row, result, gate) -> None:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with gate.exclusive():
        model = bench_decode.build_model(args.tiny, device, dtype)
    num_layers = model.config.num_hidden_layers
    cfg = TIDEConfig(checkpoint_interval=args.interval)
    checkpoints = cfg.checkpoint_layers(num_layers)
    for d in args.depths:
        if d - 1 not in checkpoints:
            raise SystemExit(f"--depths: {d} is not a checkpoint depth "
                             f"({[c + 1 for c in checkpoints]})")
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens),
                             generator=g).to(device) for _ in range(args.prompts)]
    cache_len = cache_bucket(args.prompt_tokens + args.new + args.max_pending)
    where = {"model": "8B-shape" if not args.tiny else "tiny", "num_layers": num_layers,
             "checkpoints": checkpoints, "prompt_tokens": args.prompt_tokens}
    ms: dict[str, float] = {}

    def tide(name: str, exit_at: int | None, adaptive: bool, depth: int) -> dict:
        torch._dynamo.reset()
        routers = RouterSet.forced(model, exit_at=exit_at, config=cfg)
        fast = tide_compile.optimize(model, routers, mode="lossless", inductor=inductor,
                                     max_pending=args.max_pending, adaptive=adaptive)
        def stats_pass() -> None:  # stats over exactly one (warm) run per prompt
            fast.lossless_stats.reset()
            for ids in prompts:
                fast.generate(ids, max_new_tokens=args.new, eos_token_id=-1,
                              max_cache_len=cache_len)

        m = measure_interleaved({name: fast.generate}, prompts, cache_len, then=stats_pass)[name]
        m.pop("outs")
        ms[name] = m["ms_per_token"]
        r = row({"name": name, **where, "depth": depth, **m,
                 "x_plain": round(ms["plain"] / m["ms_per_token"], 3) if "plain" in ms else None,
                 **lossless_stats(fast)})
        del fast
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return r

    which = args.ceiling_rows
    if "plain" in which:
        torch._dynamo.reset()
        plain = PlainLoop(model, inductor, device, cache_len)
        m = measure_interleaved({"plain": plain.generate}, prompts, cache_len)["plain"]
        m.pop("outs")
        ms["plain"] = m["ms_per_token"]
        row({"name": "plain", **where, "depth": num_layers, **m, "x_plain": 1.0})
        del plain
    if "never" in which:
        tide("lossless_never_exit", None, True, num_layers)
    if "never_fixed" in which:
        tide("lossless_never_exit_fixed", None, False, num_layers)
    for d in args.depths if "ceiling" in which else []:  # deepest first: zeroing only grows
        zero_layers_after(model, d)
        r = tide(f"lossless_ceiling@{d}", d - 1, True, d)
        if "plain" in ms and "lossless_never_exit_fixed" in ms:
            p = projection_row(d, ms["plain"], ms["lossless_never_exit_fixed"],
                               r["ms_per_token"], args.max_pending)
            result["projection"].append(p)
            print(json.dumps(p), flush=True)


def print_table(result: dict) -> None:
    unit = "CPU ms" if result["env"]["clock"] == "process CPU time" else "ms"
    print(f"\n| row | {unit}/token | tokens/s | x plain | x plain, paired [range] | "
          "x plain_unguarded, paired | acceptance | draft depth | fallbacks | first mismatch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "ms_per_token" not in r:
            print(f"| {r['name']} | {r.get('error', '')} | | | | | | | | |")
            continue
        pairs = []
        for key in ("x_plain_paired", "x_unguarded_paired"):
            lo_hi = r.get(key + "_range")
            pairs.append(f"{r[key]} [{lo_hi[0]}-{lo_hi[1]}]" if lo_hi else "")
        print(f"| {r['name']} | {r['ms_per_token']:.3f} | {r['tokens_per_s']} | "
              f"{r.get('x_plain')} | {' | '.join(pairs)} | {r.get('acceptance', '')} | "
              f"{r.get('mean_draft_depth', '')} | {r.get('fallbacks', '')} | "
              f"{r.get('first_mismatch', '')} |")
    for p in result["projection"]:
        parts = ", ".join(f"a={a}: {v['speedup']}x (best P={v['best_pending']}: "
                          f"{v['best_speedup']}x)" for a, v in p["at_acceptance"].items())
        print(f"PROJECTION (not measured) exit after {p['depth']}: {parts}")


if __name__ == "__main__":
    main()
