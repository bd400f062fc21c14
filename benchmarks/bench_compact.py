"""Prefill compaction (strategy ``compact``) and decode on a Llama-3.1-8B-shaped model
(bf16, random weights), against Inductor on the same StaticCache.

Routers: checkpoints every ``num_layers // 4`` layers (7, 15, 23 for 32 layers). The
first and last never exit (score 0); the middle one (15) has seeded random weights and
its output bias is set per row so that a chosen fraction ``f`` of the tokens exits there.
Every tide function is compiled once per strategy with ``exit_threshold=0.5`` (exit
iff the router's pre-sigmoid logit > 0) and the bias is edited in place between rows:
the backend passes the router tensors to the compiled graphs as inputs (detached
aliases of the RouterSet's parameters), so no recompilation per ``f``.

The bias for ``f`` is first placed in the gap of the eager logits of the layer-15
states that leaves exactly ``round(f * n)`` tokens above it (the ``1 - f`` quantile);
for prefill rows it is then bisected with the compiled function itself (exits counted
from its ExitStats) until that function exits exactly that many tokens: compiled and
eager bf16 states differ slightly, and a fraction on a power-of-two edge (f = 0.5)
decides whether compaction happens at all.

Prefill rows (batch 1, each prompt length, each ``f``; median of ``--iters`` calls after
``--warmup``, cache reset before each call and outside the timing; ids marked dynamic
on the sequence dim):

* ``inductor``: ``torch.compile(model.forward, fullgraph=True, dynamic=True)``, full
  depth (``--tiny``: ``eager``, the plain forward);
* ``tide frozen``: strategy frozen (all layers run, exits selected in-graph);
* ``tide compact``: strategy compact with ``compaction_threshold=1.0``;
* ``tide auto``: strategy auto with the default compaction threshold (0.5).

Decode rows (each batch size; ``--decode-prompt`` prompt prefilled eagerly, untimed;
then ``--decode-warmup`` + ``--decode-steps`` one-token steps, mean ms/token of the
timed ones (steps that skip and steps that do not differ: the median
would report one kind); the step's tokens are fixed random tokens, so the exit fraction of each
step's tokens is known from an eager pass; an argmax of the logits is still taken):
``inductor`` (``mode="reduce-overhead"``) vs ``tide frozen`` (one whole-step graph, also
``reduce-overhead``: the reference for "auto within 2% of frozen") vs ``tide auto`` (the
skip strategy with CUDA graphs: a step skips the later layers only if every row exited).

Usage: python benchmarks/bench_compact.py [--tiny] [--out results.json]
       [--phases prefill,decode] [--time-budget 420]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import tide_compile  # noqa: E402,F401  (registers the backend)
from tide_compile import ExitStats, RouterSet, TIDEConfig  # noqa: E402
from tide_compile import backend as tide_backend  # noqa: E402
from tide_compile.kernels.route_triton import route_score_reference  # noqa: E402
from tide_compile.model_probe import probe  # noqa: E402

from bench_decode import build_model, sync  # noqa: E402


def csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


# ---------------------------------------------------------------------- routers
def fractional_routers(model, cfg: TIDEConfig, seed: int) -> tuple[RouterSet, int]:
    """Routers that never exit except at the middle checkpoint, whose router is random."""
    routers = RouterSet.forced(model, None, config=cfg)
    cps = routers.checkpoint_layers
    mid = cps[len(cps) // 2]
    r = routers.router(mid)
    g = torch.Generator().manual_seed(seed)
    hsz, bn = r.hidden_size, r.bottleneck_dim
    with torch.no_grad():
        for c in cps:
            routers.router(c).up.bias.fill_(-30.0)
        r.down.weight.copy_(torch.randn(bn, hsz, generator=g) / math.sqrt(hsz))
        r.down.bias.copy_(torch.randn(bn, generator=g) * 0.1)
        r.up.weight.copy_(torch.randn(1, bn, generator=g) * (4.0 / math.sqrt(bn)))
        r.up.bias.zero_()
    return routers, mid


def set_bias(router, value: float) -> None:
    with torch.no_grad():
        router.up.bias.fill_(float(value))  # in place: the compiled graphs read this tensor


@torch.no_grad()
def mid_states(model, ids, mid: int) -> torch.Tensor:
    """The residual state after layer ``mid`` (hidden_states[mid + 1]), eager, no cache."""
    layer = probe(model).layers[mid]
    got = []

    def hook(_m, _args, out):
        got.append(out[0] if isinstance(out, tuple) else out)

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return got[0]


@torch.no_grad()
def bias_free_logits(router, h: torch.Tensor) -> torch.Tensor:
    """Pre-sigmoid router logits of ``h`` without the output bias, flat float32."""
    r = router
    w1, b1, w2 = r.down.weight.float(), r.down.bias.float(), r.up.weight.float()
    zero = torch.zeros_like(r.up.bias, dtype=torch.float32)
    hf = h.float()
    z = r.logits(hf) - r.up.bias.float()
    # Cross-check against the kernels' reference maths (score = sigmoid(logit)).
    ref = route_score_reference(hf, w1, b1, w2, zero, r.eps)
    err = float((torch.sigmoid(z) - ref).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"router logits disagree with route_score_reference ({err:.2e})")
    return z.reshape(-1).float()


def bias_for(z_sorted: torch.Tensor, k: int) -> float:
    """Output bias leaving exactly the ``k`` largest logits > 0: minus the midpoint of
    the gap at the ``1 - k/n`` quantile."""
    n = z_sorted.numel()
    if k <= 0:
        return -(float(z_sorted[-1]) + 1.0)
    if k >= n:
        return -(float(z_sorted[0]) - 1.0)
    return -0.5 * (float(z_sorted[n - k - 1]) + float(z_sorted[n - k]))


def exits_of(stats: ExitStats) -> int:
    t = stats.last_exit_layers
    return int((t >= 0).sum()) if t is not None else 0


# ---------------------------------------------------------------------- prefill
def new_cache(model, batch: int, cache_len: int, device: str):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    with torch.no_grad():
        model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
              past_key_values=cache, use_cache=True)
    cache.reset()
    return cache


def dynamic_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.clone()
    torch._dynamo.mark_dynamic(ids, 1)
    return ids


@torch.no_grad()
def prefill_call(fn, ids, cache):
    cache.reset()
    return fn(input_ids=ids, past_key_values=cache, use_cache=True)


@torch.no_grad()
def time_prefill(fn, ids, cache, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        prefill_call(fn, ids, cache)
    times = []
    for _ in range(iters):
        cache.reset()
        sync(device)
        t0 = time.perf_counter()
        fn(input_ids=ids, past_key_values=cache, use_cache=True)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tune_bias(fn, ids, cache, stats, router, b0: float, k: int, scale: float,
              max_calls: int) -> tuple[float, int, int]:
    """Bisect the output bias until ``fn`` itself exits exactly ``k`` tokens (the count
    is nondecreasing in the bias). Returns (bias, exits, calls)."""
    calls = 0

    def count(b):
        nonlocal calls
        set_bias(router, b)
        prefill_call(fn, ids, cache)
        calls += 1
        return exits_of(stats)

    c0 = count(b0)
    best = (abs(c0 - k), b0, c0)
    if c0 == k or max_calls <= 1:
        set_bias(router, b0)
        return b0, c0, calls
    lo = hi = None
    if c0 < k:
        lo = b0
    else:
        hi = b0
    step = max(scale, 1e-6)
    b = b0
    while (lo is None or hi is None) and calls < max_calls:
        b = b + step if hi is None else b - step
        step *= 2
        c = count(b)
        best = min(best, (abs(c - k), b, c))
        if c == k:
            set_bias(router, b)
            return b, c, calls
        if c < k:
            lo = b
        else:
            hi = b
    while lo is not None and hi is not None and calls < max_calls:
        b = 0.5 * (lo + hi)
        c = count(b)
        best = min(best, (abs(c - k), b, c))
        if c == k:
            break
        if c < k:
            lo = b
        else:
            hi = b
    _, b, c = best
    set_bias(router, b)
    return b, c, calls


# ---------------------------------------------------------------------- decode
@torch.no_grad()
def decode_run(fn, model, prompt, tokens, cache, device: str, mark_step: bool, warmup: int,
               stats: ExitStats | None, num_layers: int) -> dict:
    """Eager prefill of ``prompt`` on ``cache`` (reset first), then one compiled step per
    column of ``tokens``; the first ``warmup`` steps are not timed nor counted."""
    cache.reset()
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    batch, plen = prompt.shape
    steps = [tokens[:, i:i + 1].clone() for i in range(tokens.shape[1])]
    positions = [torch.full((batch, 1), plen + i, device=device, dtype=torch.long)
                 for i in range(tokens.shape[1])]
    times, skipped_steps = [], 0
    for i, (tok, pos) in enumerate(zip(steps, positions)):
        if i == warmup and stats is not None:
            stats.reset()
        sync(device)
        t0 = time.perf_counter()
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        logits = fn(input_ids=tok, position_ids=pos, past_key_values=cache,
                    use_cache=True).logits
        logits[:, -1:].argmax(-1).clone()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            if stats is not None and stats.last_layers_executed < batch * num_layers:
                skipped_steps += 1
    # The mean, not the median: with exits, step times are bimodal (steps that skip and
    # steps that do not), and ms/token is total time over tokens.
    out = {"ms": statistics.fmean(times), "median_ms": statistics.median(times)}
    if stats is not None:
        out.update(layers_per_token=stats.mean_layers_executed, exit_fraction=stats.exit_rate,
                   skipping_steps=skipped_steps / len(times))
    return out


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true",
                    help="small fp32 model on CPU, eager baseline, tide without Inductor")
    ap.add_argument("--phases", type=csv(str), default=["prefill", "decode"])
    ap.add_argument("--lengths", type=csv(int), default=None,
                    help="prefill prompt lengths (default 512,2048; --tiny 64,128)")
    ap.add_argument("--fractions", type=csv(float), default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--strategies", type=csv(str), default=["frozen", "compact", "auto"])
    ap.add_argument("--batches", type=csv(int), default=None,
                    help="decode batch sizes (default 1,4,8,16; --tiny 1,2)")
    ap.add_argument("--decode-fractions", type=csv(float), default=[0.5, 0.9])
    ap.add_argument("--decode-strategies", type=csv(str), default=["auto", "frozen"],
                    help="tide strategies of the decode rows (frozen: the 2%% check of auto)")
    ap.add_argument("--decode-prompt", type=int, default=None, help="default 128 (--tiny 32)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed steps, default 32 "
                    "(--tiny 8)")
    ap.add_argument("--decode-warmup", type=int, default=None, help="default 8 (--tiny 4)")
    ap.add_argument("--warmup", type=int, default=2, help="prefill warm-up calls per row")
    ap.add_argument("--iters", type=int, default=None, help="timed prefill calls per row "
                    "(default 10; --tiny 3)")
    ap.add_argument("--tune-calls", type=int, default=24,
                    help="max compiled calls to bisect the bias per prefill row (1: eager "
                         "quantile only)")
    ap.add_argument("--interval", type=int, default=None,
                    help="checkpoint_interval (default num_layers // 4: 8 for 32 layers)")
    ap.add_argument("--kernels", choices=("auto", "inductor", "triton"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="stop starting new rows after this many seconds")
    args = ap.parse_args()

    start = time.time()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tiny = args.tiny
    lengths = args.lengths or ([64, 128] if tiny else [512, 2048])
    batches = args.batches or ([1, 2] if tiny else [1, 4, 8, 16])
    dprompt = args.decode_prompt or (32 if tiny else 128)
    dsteps = args.decode_steps or (8 if tiny else 32)
    dwarm = args.decode_warmup if args.decode_warmup is not None else (4 if tiny else 8)
    iters = args.iters or (3 if tiny else 10)
    base_name = "eager" if tiny else "inductor"
    if device == "cpu":
        # Two threads on a small shared CPU stall for up to ~1 s per call (measured);
        # one thread gives stable smoke-test timings.
        torch.set_num_threads(1)
    tide_opts = {"inductor": False} if tiny else {"kernels": args.kernels}

    model = build_model(tiny, device, dtype)
    num_layers = probe(model).num_layers
    cfg = TIDEConfig(checkpoint_interval=args.interval or max(1, num_layers // 4))
    routers, mid = fractional_routers(model, cfg, args.seed)
    mid_router = routers.router(mid)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name()
           if device == "cuda" else "cpu", "dtype": str(dtype), "tiny": tiny,
           "checkpoints": routers.checkpoint_layers, "exit_checkpoint": mid,
           "baseline": base_name, "lengths": lengths, "fractions": args.fractions,
           "batches": batches, "decode_prompt": dprompt, "decode_steps": dsteps,
           "decode_warmup": dwarm, "prefill_iters": iters, "prefill_warmup": args.warmup,
           "exit_threshold": 0.5, "tide_options": tide_opts}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    print(json.dumps(env), flush=True)

    rows: list[dict] = []

    def emit(r: dict) -> dict:
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    def over_budget(what: str) -> bool:
        if time.time() - start > args.time_budget:
            emit({"name": what, "skipped": "time budget"})
            return True
        return False

    def fail(r: dict, e: BaseException) -> dict:
        r["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        traceback.print_exc()
        return emit(r)

    def compile_tide(strategy: str, stats: ExitStats, **extra):
        torch._dynamo.reset()
        opts = {"routers": routers, "strategy": strategy, "exit_threshold": 0.5,
                "stats": stats, **tide_opts, **extra}
        return torch.compile(model.forward, backend="tide", fullgraph=True, options=opts)

    # ------------------------------------------------------------------ prefill
    base_ms: dict[tuple[str, int], float] = {}
    if "prefill" in args.phases:
        torch.manual_seed(args.seed + 1)
        cache_len = max(lengths) + 8
        cache = new_cache(model, 1, cache_len, device)
        prompts, zs = {}, {}
        for L in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, L), device=device)
            prompts[L] = dynamic_ids(ids)
            zs[L] = bias_free_logits(mid_router, mid_states(model, ids, mid)).sort().values.cpu()
        # Baseline: full depth, compiled once for the dynamic length.
        torch._dynamo.reset()
        t0 = time.time()
        base_fn = (model.forward if tiny else
                   torch.compile(model.forward, fullgraph=True, dynamic=True))
        for L in lengths:
            r = {"phase": "prefill", "tokens": L, "batch": 1, "f": None, "name": base_name}
            if over_budget(f"prefill {base_name} L={L}"):
                continue
            try:
                ms = time_prefill(base_fn, prompts[L], cache, device, args.warmup, iters)
                base_ms[("prefill", L)] = ms
                emit({**r, "ms": round(ms, 3), "speedup_vs_baseline": 1.0,
                      "layers_per_token": num_layers, "exit_fraction": 0.0,
                      "compile_and_rows_s": round(time.time() - t0, 1)})
            except Exception as e:
                fail(r, e)
        tuned: dict[tuple[int, float], float] = {}
        for strategy in args.strategies:
            stats = ExitStats(num_layers)
            fn, broken, t0 = None, None, time.time()
            for L in lengths:
                n = L
                for f in args.fractions:
                    name = f"tide {strategy}"
                    r = {"phase": "prefill", "tokens": L, "batch": 1, "f": f, "name": name}
                    if over_budget(f"prefill {name} L={L} f={f}"):
                        continue
                    if broken is not None:
                        emit({**r, "error": f"not run: {broken}"})
                        continue
                    try:
                        k = int(round(f * n))
                        b0 = tuned.get((L, f), bias_for(zs[L], k))
                        set_bias(mid_router, b0)
                        first = fn is None
                        if first:
                            fn = compile_tide(strategy, stats, **(
                                {"compaction_threshold": 1.0} if strategy == "compact" else {}))
                            counts0 = dict(tide_backend.COMPILE_COUNTS)
                            with warnings.catch_warnings(record=True) as caught:
                                warnings.simplefilter("always")
                                prefill_call(fn, prompts[L], cache)
                            compiled_as = [s for s, v in tide_backend.COMPILE_COUNTS.items()
                                           if v > counts0.get(s, 0)]
                            notes = [str(w.message) for w in caught
                                     if "tide" in str(w.message)]
                            r["compiled_as"] = compiled_as
                            if notes:
                                r["warnings"] = notes[:3]
                            r["compile_s"] = round(time.time() - t0, 1)
                        scale = 1e-3 * float(zs[L].std()) + 1e-6
                        b, got, calls = tune_bias(fn, prompts[L], cache, stats, mid_router, b0,
                                                  k, scale, args.tune_calls)
                        tuned[(L, f)] = b
                        ms = time_prefill(fn, prompts[L], cache, device, args.warmup, iters)
                        frac = exits_of(stats) / n
                        lpt = stats.last_layers_executed / n
                        base = base_ms.get(("prefill", L))
                        emit({**r, "ms": round(ms, 3),
                              "speedup_vs_baseline": round(base / ms, 3) if base else None,
                              "layers_per_token": round(lpt, 2),
                              "exit_fraction": round(frac, 4), "target_exits": k,
                              "exit_fraction_ok": abs(frac - f) <= 0.03,
                              "tune_calls": calls, "bias": round(b, 5)})
                        if abs(frac - f) > 0.03:
                            print(f"# WARNING: {name} L={L}: exit fraction {frac:.3f} vs "
                                  f"target {f}", flush=True)
                    except Exception as e:
                        fail(r, e)
                        if first:
                            broken = r["error"]
            del fn
        del cache
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ decode
    if "decode" in args.phases:
        total = dwarm + dsteps
        for B in batches:
            torch.manual_seed(args.seed + 100 + B)
            prompt = torch.randint(0, model.config.vocab_size, (B, dprompt), device=device)
            tokens = torch.randint(0, model.config.vocab_size, (B, total), device=device)
            r0 = {"phase": "decode", "tokens": B, "batch": B, "f": None, "name": base_name}
            if over_budget(f"decode {base_name} B={B}"):
                continue
            try:
                cache = new_cache(model, B, dprompt + total + 8, device)
                # Decode states after the middle layer: an eager pass over prompt + tokens
                # (layers up to the exit checkpoint are unaffected by exits there).
                h = mid_states(model, torch.cat([prompt, tokens], 1), mid)[:, dprompt + dwarm:]
                z = bias_free_logits(mid_router, h).sort().values.cpu()
            except Exception as e:
                fail(r0, e)
                continue
            torch._dynamo.reset()
            t0 = time.time()
            try:
                if tiny:
                    base_fn = model.forward
                else:
                    base_fn = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                res = decode_run(base_fn, model, prompt, tokens, cache, device, not tiny, dwarm,
                                 None, num_layers)
                base_ms[("decode", B)] = res["ms"]
                emit({**r0, "ms": round(res["ms"], 3), "median_ms": round(res["median_ms"], 3),
                      "speedup_vs_baseline": 1.0,
                      "layers_per_token": num_layers, "exit_fraction": 0.0,
                      "compile_and_row_s": round(time.time() - t0, 1)})
            except Exception as e:
                fail(r0, e)
            del base_fn
            for strategy in args.decode_strategies:
                stats = ExitStats(num_layers)
                fn, broken, t0 = None, None, time.time()
                for f in args.decode_fractions:
                    r = {"phase": "decode", "tokens": B, "batch": B, "f": f,
                         "name": f"tide {strategy}"}
                    if over_budget(f"decode tide {strategy} B={B} f={f}"):
                        continue
                    if broken is not None:
                        emit({**r, "error": f"not run: {broken}"})
                        continue
                    first = fn is None
                    try:
                        set_bias(mid_router, bias_for(z, int(round(f * z.numel()))))
                        if first:
                            # frozen: one whole-step graph, with Inductor's CUDA graphs
                            # (as the baseline); auto: the skip runner's own graphs.
                            extra = ({"mode": "reduce-overhead"}
                                     if strategy == "frozen" and not tiny else {})
                            fn = compile_tide(strategy, stats, **extra)
                            counts0 = dict(tide_backend.COMPILE_COUNTS)
                        res = decode_run(fn, model, prompt, tokens, cache, device,
                                         strategy == "frozen" and not tiny, dwarm, stats,
                                         num_layers)
                        if first:
                            r["compiled_as"] = [s for s, v in tide_backend.COMPILE_COUNTS.items()
                                                if v > counts0.get(s, 0)]
                            r["compile_and_row_s"] = round(time.time() - t0, 1)
                        base = base_ms.get(("decode", B))
                        emit({**r, "ms": round(res["ms"], 3), "median_ms": round(res["median_ms"], 3),
                              "speedup_vs_baseline": round(base / res["ms"], 3) if base else None,
                              "layers_per_token": round(res["layers_per_token"], 2),
                              "exit_fraction": round(res["exit_fraction"], 4),
                              "skipping_steps": round(res["skipping_steps"], 3),
                              "expected_skipping_steps": round(f ** B, 3)})
                    except Exception as e:
                        fail(r, e)
                        if first:
                            broken = r["error"]
                del fn
            del cache

    # ------------------------------------------------------------------ report
    summary = summarize(rows, base_name)
    print(f"\n| phase | tokens/batch | f | row | ms | x {base_name} | layers/token | exit fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if "phase" in r), key=lambda r: row_key(r, base_name)):
        f = "" if r.get("f") is None else f"{r['f']:.1f}"
        if "ms" in r:
            sp = r.get("speedup_vs_baseline")
            print(f"| {r['phase']} | {r['tokens']} | {f} | {r['name']} | {r['ms']:.3f} | "
                  f"{'' if sp is None else f'{sp:.2f}'} | {r.get('layers_per_token', '')} | "
                  f"{r.get('exit_fraction', '')} |")
        else:
            print(f"| {r['phase']} | {r['tokens']} | {f} | {r['name']} | "
                  f"{r.get('error', 'not run')[:80].replace('|', '/')} | | | |")
    skipped = [r["name"] for r in rows if "skipped" in r]
    if skipped:
        print(f"\n{len(skipped)} row(s) skipped (time budget): " + "; ".join(skipped[:6])
              + (" ..." if len(skipped) > 6 else ""))
    print("\nms: prefill per call (median), decode per token (mean over the timed steps).")
    for line in summary["lines"]:
        print(line)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "rows": rows, "summary": summary,
                       "elapsed_s": round(time.time() - start, 1)}, fh, indent=1)


ROW_ORDER = ("tide frozen", "tide compact", "tide auto")


def row_key(r: dict, base_name: str) -> tuple:
    """Table order: prefill then decode, by length/batch, fraction, baseline first."""
    name = r["name"]
    return (r["phase"] != "prefill", r["tokens"], -1.0 if r["f"] is None else r["f"],
            -1 if name == base_name else ROW_ORDER.index(name) if name in ROW_ORDER else 9)


def summarize(rows: list[dict], base_name: str) -> dict:
    """Where compact beats frozen / the baseline, and auto against frozen (computed)."""
    ok = {(r["phase"], r["tokens"], r["f"], r["name"]): r["ms"]
          for r in rows if "ms" in r and "phase" in r}
    beats_frozen, loses_frozen, beats_base, loses_base, auto_ratio = [], [], [], [], []
    order = sorted(ok.items(), key=lambda kv: row_key(
        {"phase": kv[0][0], "tokens": kv[0][1], "f": kv[0][2], "name": kv[0][3]}, base_name))
    for (phase, L, f, name), ms in order:
        if phase != "prefill" or name != "tide compact":
            continue
        frozen = ok.get((phase, L, f, "tide frozen"))
        base = ok.get((phase, L, None, base_name))
        if frozen is not None:
            (beats_frozen if ms < frozen else loses_frozen).append(f"L={L} f={f}")
        if base is not None:
            (beats_base if ms < base else loses_base).append(f"L={L} f={f}")
    for (phase, L, f, name), ms in ok.items():
        if name == "tide auto":  # prefill (length L), decode (batch L)
            frozen = ok.get((phase, L, f, "tide frozen"))
            if frozen is not None:
                auto_ratio.append((ms / frozen - 1.0, f"{phase} {L}", f))
    lines = [
        f"compact beats frozen at: {', '.join(beats_frozen) or 'none'}; "
        f"loses at: {', '.join(loses_frozen) or 'none'}",
        f"compact beats {base_name} at: {', '.join(beats_base) or 'none'}; "
        f"loses at: {', '.join(loses_base) or 'none'}",
    ]
    if auto_ratio:
        worst = max(auto_ratio)
        within = worst[0] <= 0.02
        lines.append(f"auto within 2% of frozen everywhere: {'yes' if within else 'NO'} "
                     f"(worst {100 * worst[0]:+.1f}% at {worst[1]} f={worst[2]}; "
                     f"{len(auto_ratio)} pairs)")
    else:
        within = None
        lines.append("auto within 2% of frozen everywhere: n/a (no auto/frozen pairs)")
    dec = []
    for (phase, B, f, name), ms in order:
        if phase == "decode" and name == "tide auto" and ok.get((phase, B, None, base_name)):
            dec.append(f"B={B} f={f}: x{ok[(phase, B, None, base_name)] / ms:.2f}")
    if dec:
        lines.append(f"decode tide auto vs {base_name}: " + ", ".join(dec))
    return {"compact_beats_frozen": beats_frozen, "compact_loses_frozen": loses_frozen,
            "compact_beats_baseline": beats_base, "compact_loses_baseline": loses_base,
            "auto_vs_frozen": [{"at": at, "f": f, "rel": round(d, 4)} for d, at, f in auto_ratio],
            "auto_within_2pct": within,
            "lines": lines}


if __name__ == "__main__":
    main()
