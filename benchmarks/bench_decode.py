"""Batch-1 decode on a Llama-3.1-8B-shaped model (bf16, random weights), side by side.

Fixed-shape rows, all in one process on one GPU, same prompt, same StaticCache size:

* ``hf_eager``: ``model.generate`` (greedy), per new token.
* ``inductor``: ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``
  in a hand decode loop on a StaticCache (cudagraph_mark_step_begin + clone per step).
* ``tide_never``: the tide backend (skip strategy, segments captured as CUDA graphs) with
  routers that never exit: the overhead of the checkpoints.
* ``tide_never_exit_conf<k>`` (``--rows ...,never_conf``): never-exit routers that read the
  confidence features over ``--confidence-k`` candidates (``RouterSet.forced(...,
  confidence_k=k)``): at every checkpoint the graph also gathers ``k`` rows of ``lm_head``
  per token and computes the five feature columns. Its ratio minus ``tide_never_exit``'s,
  over the checkpoints, is the features' cost per checkpoint.
* ``tide_exit@d``: tide with ``RouterSet.forced`` exiting every token after ``d`` layers.

The tide rows and the Inductor row use the same decode loop; prefill runs eagerly on the
StaticCache for all of them (not timed). Every tide row is measured against Inductor in
interleaved pairs, in one process: Inductor, tide, then tide, Inductor, and so on
(``--pairs``, at least 6, after one warm-up loop each), each measurement the median step
time of one decode loop; the row reports the median ratio tide / Inductor and its range
(single runs moved by up to 10% on the lent H200; paired ones by about 1%). For each exit
depth the weight-bytes bound is full-model bytes / (bytes of executed layers + K/V
projection bytes of skipped layers + final norm and lm_head): the speedup no
implementation of that exit could beat when decode is memory-bound.

``--loop generate``: the fixed-shape rows timed as whole generate calls per token
(``(t(1 + steps) - t(1)) / steps``) instead of per step of a hand loop through Dynamo:
tide through ``optimize(...).generate``, which calls the compiled runner directly after
its first steps (no Dynamo guards or input gathering per step), Inductor through an equal
loop (eager prompt, compiled one-token steps, no host sync per step). The difference
between the two loops' tide rows is the host time per step that the direct call saves.

``--traffic``: mixed traffic instead: ``--requests`` (64) requests one after another at
batch 1, prompt lengths and new-token counts drawn from ``--prompt-range`` (16..1024) and
``--new-range`` (16..256) with a fixed seed; rows (``--traffic-rows``) Inductor (its own
bucketed decode loop, as ``generate`` buckets), tide never-exit and tide forced exit after
``--exit-depth`` (16) layers, both through ``optimize(...).generate``. Each row first runs
a warm-up (the first two requests of every cache bucket: a bucket's graphs compile at its
first request), then one timed pass over all requests. Reported: tokens/s of the timed
pass, the compile time (the warm-up minus its tokens at the timed rate) and the graphs
compiled during the timed pass (0 when every shape reused its bucket's graphs).
``--max-cache-len N`` gives every request one static cache of N positions (the generate
keyword): each row compiles one prompt and one decode graph instead of two per bucket.

Usage: python benchmarks/bench_decode.py [--tiny] [--steps 64] [--pairs 6] [--out results.json]
       python benchmarks/bench_decode.py --loop generate [--rows inductor,never,exits]
       python benchmarks/bench_decode.py --traffic [--traffic-rows inductor,never,exit]
           [--max-cache-len 1280] [--tiny] [--out traffic.json]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tide_compile  # noqa: E402
from tide_compile import ExitStats, RouterSet, TIDEConfig  # noqa: E402
from tide_compile.model_probe import probe  # noqa: E402


class TimingGate:
    """Several benchmark processes on one GPU: they compile in parallel, they time one at a time.

    ``spec`` is ``"DIR:N"`` (a ``--gate`` argument): ``N`` processes share the folder
    ``DIR``. :meth:`exclusive` holds an exclusive lock on ``DIR/lock`` (model construction,
    whose float32 peak would not fit ``N`` times; every timed section). :meth:`arrive`
    marks this process warm (every compile done) and waits until all ``N`` have arrived,
    so no process times while another compiles. Only the first call waits: give each
    process one timed role (its compiles first, then its timing). ``spec=None``: both are
    no-ops (one process).
    """

    def __init__(self, spec: str | None, timeout_s: float = 1800.0) -> None:
        self.folder = self.count = None
        if spec:
            folder, _, count = spec.rpartition(":")
            if not folder or not count.isdigit() or int(count) < 1:
                raise SystemExit(f"--gate: expected DIR:N, got {spec!r}")
            self.folder, self.count = folder, int(count)
            os.makedirs(folder, exist_ok=True)
        self.timeout_s = timeout_s
        self.arrived = False
        self.waited_s = 0.0

    def arrive(self) -> None:
        """Mark this process warm; wait for the others (once)."""
        if self.folder is None or self.arrived:
            return
        self.arrived = True
        open(os.path.join(self.folder, f"ready.{os.getpid()}"), "w").close()
        t0 = time.time()
        while sum(n.startswith("ready.") for n in os.listdir(self.folder)) < self.count:
            if time.time() - t0 > self.timeout_s:
                raise SystemExit(f"--gate: {self.count} processes did not all arrive "
                                 f"within {self.timeout_s:.0f} s")
            time.sleep(0.5)
        self.waited_s = round(time.time() - t0, 1)

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the gate's lock (no other gated process is inside its own block)."""
        if self.folder is None:
            yield
            return
        with open(os.path.join(self.folder, "lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def report_profile(prof, title: str, name: str, cuda: bool, out: str | None,
                   rows: int = 25) -> None:
    """Print a torch.profiler run's ops by device time (CPU time without CUDA) and by self
    CPU time (the host side), and write its Chrome trace beside ``out`` (if given)."""
    averages = prof.key_averages()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"# profile of {title}", flush=True)
    print(averages.table(sort_by=key, row_limit=rows), flush=True)
    print(f"# host side of {name}: ops by self CPU time", flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    if out:
        trace = f"{os.path.splitext(out)[0]}_{name.replace('@', '_')}.trace.json"
        prof.export_chrome_trace(trace)
        print(f"# trace: {trace}", flush=True)


def merge_parts(paths: list[str], lists: tuple[str, ...]) -> tuple[list[dict], dict]:
    """The JSON results of gated processes (``TimingGate``) read back: the parts, and one
    result whose ``lists`` are the parts' lists concatenated in file order (``env`` names
    the files and keeps each part's ``env``). The callers fill in the cross-file fields."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    result = {"env": {"merged_from": [os.path.basename(p) for p in paths],
                      "parts": [part["env"] for part in parts],
                      "clock": parts[0]["env"]["clock"]},
              **{key: [x for part in parts for x in part.get(key, [])] for key in lists}}
    return parts, result


def record_graphed_runners() -> list:
    """Benchmark-only: from now on every ``GraphedSkipRunner`` this process creates is
    appended to the returned list (its ``__init__`` is patched for the process's life)."""
    from tide_compile.runtime.cudagraphs import GraphedSkipRunner

    made: list = []
    init = GraphedSkipRunner.__init__

    def recording_init(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    GraphedSkipRunner.__init__ = recording_init
    return made


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                          max_position_embeddings=1024)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def weight_bytes(model) -> dict[str, int]:
    p = probe(model)
    layer = sum(t.numel() * t.element_size() for t in p.layers[0].parameters())
    attn = p.layers[0].self_attn
    kv = sum(t.numel() * t.element_size() for t in
             [attn.k_proj.weight, attn.v_proj.weight, p.layers[0].input_layernorm.weight])
    head = sum(t.numel() * t.element_size() for t in
               list(p.lm_head.parameters()) + list(p.final_norm.parameters()))
    return {"layer": layer, "kv": kv, "head": head, "num_layers": p.num_layers}


def bound_speedup(b: dict[str, int], depth: int) -> float:
    full = b["num_layers"] * b["layer"] + b["head"]
    part = depth * b["layer"] + (b["num_layers"] - depth) * b["kv"] + b["head"]
    return full / part


@torch.no_grad()
def decode_loop(fn, model, prompt, steps: int, cache, device: str,
                mark_step: bool, unguarded: bool = False) -> list[float]:
    """Eager prefill on ``cache`` (reset first: the same tensors every loop, so nothing
    recompiles), then `steps` compiled decode steps. Returns per-step wall times (ms),
    each step synchronized by the argmax read-back being fed to the next step (as in
    generate). ``unguarded``: the steps after the first run with Dynamo checking only the
    guards that tell its cache entries apart (``tide_compile.runtime.lossless.unguarded``;
    every step passes tensors of the same shapes, the same cache)."""
    from tide_compile.runtime.lossless import unguarded as skip_guards

    cache.reset()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    pos = torch.full((1, 1), prompt.shape[1], device=device, dtype=torch.long)
    times = []
    with contextlib.ExitStack() as guards:
        for i in range(steps):
            if i == 1 and unguarded:
                guards.enter_context(skip_guards())
            sync(device)
            t0 = time.perf_counter()
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            logits = fn(input_ids=token, position_ids=pos, past_key_values=cache,
                        use_cache=True).logits
            token = logits[:, -1:].argmax(-1).clone()
            pos = pos + 1
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def new_cache(model, cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=cache_len)


def interleaved_pairs(base, tide, pairs: int, skip: int) -> dict:
    """``pairs`` A/B pairs of decode loops, ``base`` (Inductor) and ``tide`` alternating
    which goes first (Inductor, tide, tide, Inductor, ...): per pair the median step time
    of each and their ratio. ``base`` / ``tide``: callables running one decode loop and
    returning its step times."""
    base_ms, tide_ms, ratios = [], [], []
    for i in range(pairs):
        order = (base, tide) if i % 2 == 0 else (tide, base)
        measured = {id(f): summarize(f(), skip) for f in order}
        b, t = measured[id(base)], measured[id(tide)]
        base_ms.append(b)
        tide_ms.append(t)
        ratios.append(t / b)
    return {"ms_per_token": statistics.median(tide_ms),
            "inductor_ms_median": round(statistics.median(base_ms), 4),
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
            "pairs": pairs}


@torch.no_grad()
def hf_eager_ms(model, prompt, device: str, n: int = 16) -> float:
    """HF eager generate per new token: (t(1 + n) - t(1)) / n, second of two runs."""
    for _ in range(2):
        sync(device); t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                       pad_token_id=0)
        sync(device); t1 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1 + n, min_new_tokens=1 + n, do_sample=False,
                       pad_token_id=0)
        sync(device); t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) * 1e3 / n


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a StaticCache holds (K/V and, where the version has them, counters)."""
    out = []
    for layer in getattr(cache, "layers", []):
        out += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    return out


@torch.no_grad()
def graph_breakdown(runner, cache, depth_cut: int | None, reps: int = 20) -> dict:
    """GPU time of each captured graph of a :class:`GraphedSkipRunner` (CUDA events around
    each replay, mean of ``reps``), and the path one decode step takes: segments up to the
    exiting checkpoint, then its exit tail. The cache's small tensors (write counters,
    which replays advance) are restored after every replay, outside the timed interval."""
    small = [t for t in cache_tensors(cache) if t.numel() <= 4096]
    saved = [t.clone() for t in small]

    def timed(g) -> float:
        total = 0.0
        for i in range(reps + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            for t, s in zip(small, saved):
                t.copy_(s)
            torch.cuda.synchronize()
            if i:  # the first replay warms up
                total += a.elapsed_time(b)
        return total / reps

    cuts = list(runner.runner.cuts)
    seg = [round(timed(g), 4) for g in runner.graphs]
    tails = {c: round(timed(g), 4) for c, g in runner.exit_graphs.items()}
    if depth_cut is None:
        path = sum(seg)
    else:
        k = cuts.index(depth_cut)
        path = sum(seg[:k + 1]) + tails[depth_cut]
    return {"segment_ms": seg, "exit_tail_ms": {str(c): v for c, v in tails.items()},
            "gpu_path_ms": round(path, 4)}


def summarize(times: list[float], skip: int) -> float:
    return statistics.median(times[skip:])


def generate_ms(generate, prompt: torch.Tensor, steps: int, device: str) -> float:
    """Per new token of a whole generate call, as a user sees it: (t(1 + steps) - t(1)) /
    steps, prompt step included in both (so it cancels) and no sync inside the loop
    beyond the loop's own."""
    sync(device)
    t0 = time.perf_counter()
    generate(prompt, 1)
    sync(device)
    t1 = time.perf_counter()
    generate(prompt, 1 + steps)
    sync(device)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) * 1e3 / steps


def optimized_generate(model, routers, options: dict, stack_kv: bool | None,
                       prompt: torch.Tensor, steps: int, device: str, cache_len: int):
    """A ``--loop generate`` tide row: ``(fast, run)``, ``fast = optimize(model, routers,
    **options)`` (``stack_kv`` added unless None) and ``run()`` -> ``[ms per new token]``
    of a greedy ``fast.generate`` of ``steps`` tokens after ``prompt`` (:func:`generate_ms`)."""
    if stack_kv is not None:
        options = {**options, "stack_kv": stack_kv}
    fast = tide_compile.optimize(model, routers, **options)

    def gen(ids, n):
        return fast.generate(ids, max_new_tokens=n, eos_token_id=-1, max_cache_len=cache_len)

    def run() -> list[float]:
        return [generate_ms(gen, prompt, steps, device)]

    return fast, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small model (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=6,
                    help="interleaved Inductor/tide pairs per tide row (at least 6 for a figure)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--interval", type=int, default=8, help="checkpoint_interval")
    ap.add_argument("--kernels", choices=("inductor", "triton"), default="inductor",
                    help="tide backend option: route/exit-select as Inductor-fused composites "
                         "or hand Triton kernels")
    ap.add_argument("--rows", default="eager,inductor,never,exits",
                    help="comma list of: eager, inductor, never, never_conf (never-exit "
                         "routers that read the confidence features, --confidence-k "
                         "candidates), exits")
    ap.add_argument("--out", default=None)
    ap.add_argument("--confidence-k", type=int, default=64,
                    help="candidates per token of the never_conf row's confidence features")
    ap.add_argument("--inductor-config", default="",
                    help="Inductor config patches for the tide rows, key=value comma list "
                         "(e.g. combo_kernels=1: horizontal fusion of the KV-fill's small kernels)")
    ap.add_argument("--stack-kv", choices=("default", "on", "off"), default="default",
                    help="tide option stack_kv (the KV-fill's K/V projections as one batched "
                         "matmul); default: the backend's (on for CUDA)")
    ap.add_argument("--profile", default="",
                    help="comma list of row names (e.g. tide_exit@8) to profile after timing: "
                         "prints the GPU kernels of 8 decode steps by total time and the host "
                         "ops by self CPU time; with --out, also a Chrome trace beside it")
    ap.add_argument("--depths", default="",
                    help="comma list of exit depths for the exits rows (default: every checkpoint)")
    ap.add_argument("--breakdown", action="store_true",
                    help="after each tide row, time every captured CUDA graph alone (GPU only)")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="stop starting new rows after this many seconds")
    ap.add_argument("--loop", choices=("dynamo", "generate"), default="dynamo",
                    help="fixed-shape rows: 'dynamo' times each step of a hand loop that "
                         "calls the compiled forward (through Dynamo's guards every step); "
                         "'generate' times whole generate calls per token: tide through "
                         "optimize(...).generate (after its first steps it calls the "
                         "compiled runner directly), Inductor through an equal hand loop "
                         "(eager prompt, compiled steps, no sync per step)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="compile without Inductor (baseline: Dynamo's eager backend; tide: "
                         "FX graphs): a quick CPU smoke run of the loops, not a measurement")
    ap.add_argument("--kv", choices=("propagate", "deferred"), default="propagate",
                    help="K/V semantics of the tide rows run through optimize(...).generate "
                         "(--loop generate, --traffic); propagate (the default here, as in "
                         "every recorded run) although optimize's own default is deferred: "
                         "bench_deferred.py compares the two")
    ap.add_argument("--traffic", action="store_true", help="mixed traffic (module docstring)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-range", default="16,1024")
    ap.add_argument("--new-range", default="16,256")
    ap.add_argument("--exit-depth", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traffic-rows", default="inductor,never,exit",
                    help="traffic rows, comma list of: inductor, never, exit")
    ap.add_argument("--max-cache-len", type=int, default=None,
                    help="traffic: one static cache length for every request (the generate "
                         "keyword; each row then compiles one prompt and one decode graph) "
                         "instead of the cache buckets")
    args = ap.parse_args()
    if args.traffic:
        traffic(args)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.time()
    model = build_model(args.tiny, device, dtype)
    b = weight_bytes(model)
    cfg = TIDEConfig(checkpoint_interval=args.interval)
    checkpoints = cfg.checkpoint_layers(b["num_layers"])
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=device)
    cache_len = args.prompt + args.steps + 8
    rows: list[dict] = []
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda"
           else "cpu", "dtype": str(dtype), "prompt": args.prompt, "steps": args.steps,
           "checkpoints": checkpoints, "pairs": args.pairs, "inductor": not args.no_inductor}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    print(json.dumps(env), flush=True)

    def row(name, ms, **extra):
        r = {"name": name, "ms_per_token": round(ms, 3), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    wanted = set(args.rows.split(","))
    patches = {}
    for item in filter(None, args.inductor_config.split(",")):
        key, value = item.split("=")
        patches[key] = {"1": True, "0": False}.get(value, value)
    env["inductor_config"] = patches
    stack_kv = {"default": None, "on": True, "off": False}[args.stack_kv]
    env["stack_kv"] = args.stack_kv
    env["kernels"] = args.kernels
    env["kv"] = args.kv
    if "eager" in wanted:
        row("hf_eager_generate", hf_eager_ms(model, prompt, device))

    # The Inductor baseline, compiled once and kept: every tide row is paired with it.
    # (Dynamo keeps one cache entry per backend for model.forward; no reset between rows.)
    torch._dynamo.reset()
    t0 = time.time()
    if args.no_inductor:
        ind = torch.compile(model.forward, backend="eager", fullgraph=True)
    else:
        ind = torch.compile(model.forward, mode="reduce-overhead" if device == "cuda" else None,
                            fullgraph=True)
    ind_cache = new_cache(model, cache_len)
    mark = device == "cuda" and not args.no_inductor

    gen_loop = args.loop == "generate"
    skip = 0 if gen_loop else args.warmup
    env["loop"] = args.loop
    ind_loop = BucketedLoop(model, ind, device, mark, eager_prompt=True, max_cache_len=cache_len)

    def run_inductor() -> list[float]:
        if gen_loop:
            return [generate_ms(ind_loop.generate, prompt, args.steps, device)]
        return decode_loop(ind, model, prompt, args.steps, ind_cache, device, mark)

    if gen_loop:
        run_inductor()  # compiles
    base = summarize(run_inductor(), skip)
    row("inductor", base, compile_and_first_s=round(time.time() - t0, 1))

    graphed = record_graphed_runners() if args.breakdown and device == "cuda" else []

    def tide_row(name, exit_at, confidence_k=None):
        if time.time() - start > args.time_budget:
            print(f"# skipped {name}: time budget", flush=True)
            return
        routers = RouterSet.forced(model, exit_at=exit_at, config=cfg, confidence_k=confidence_k)
        t0 = time.time()
        graphed.clear()
        if gen_loop:
            fast, run_tide = optimized_generate(
                model, routers, {"kernels": args.kernels, "inductor_config": patches,
                                 "inductor": not args.no_inductor, "kv": args.kv},
                stack_kv, prompt, args.steps, device, cache_len)
            stats = fast.tide_stats
            run_tide()  # compiles, captures, switches to the direct call
            cache = next(iter(fast._buckets.values())).cache
            fn = None
        else:
            stats = ExitStats(b["num_layers"])
            fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                               options={"routers": routers, "stats": stats, "strategy": "skip",
                                        "kernels": args.kernels, "inductor_config": patches,
                                        "stack_kv": stack_kv, "inductor": not args.no_inductor})
            cache = new_cache(model, cache_len)

            def run_tide() -> list[float]:
                return decode_loop(fn, model, prompt, args.steps, cache, device, False)

        run_tide()  # compiles, captures
        compiled_s = round(time.time() - t0, 1)
        stats.reset()
        paired = interleaved_pairs(run_inductor, run_tide, args.pairs, skip)
        ms = paired.pop("ms_per_token")
        depth = b["num_layers"] if exit_at is None else exit_at + 1
        bound = bound_speedup(b, depth)
        speedup = 1.0 / paired["ratio_median"]
        extra = {}
        captured = [g for g in graphed if g.captured]
        if captured:
            extra = graph_breakdown(captured[-1], cache, exit_at)
            extra["host_and_gaps_ms"] = round(ms - extra["gpu_path_ms"], 4)
        row(name, ms, depth=depth, bound_speedup=round(bound, 3),
            speedup_vs_inductor=round(speedup, 3),
            fraction_of_bound=round(speedup / bound, 3),
            mean_layers_executed=round(stats.mean_layers_executed, 2),
            compile_and_first_s=compiled_s, **paired, **extra)
        if name in args.profile.split(","):
            profile_steps(fn, cache, name, run=gen if gen_loop else None)

    def profile_steps(fn, cache, name, steps=8, run=None):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            if run is not None:  # --loop generate: one generate call of `steps` tokens
                run(prompt, steps)
            else:
                decode_loop(fn, model, prompt, steps, cache, device, False)
        report_profile(prof, f"{name}: {steps} decode steps (+ an eager prefill)", name,
                       device == "cuda", args.out)

    if "never" in wanted:
        tide_row("tide_never_exit", None)
    if "never_conf" in wanted:
        tide_row(f"tide_never_exit_conf{args.confidence_k}", None, args.confidence_k)
    if "exits" in wanted:
        depths = [int(d) for d in args.depths.split(",") if d] or [c + 1 for c in checkpoints]
        for d in depths:
            if d - 1 not in checkpoints:
                raise SystemExit(f"--depths: {d} is not a checkpoint depth "
                                 f"({[c + 1 for c in checkpoints]})")
            tide_row(f"tide_exit@{d}", d - 1)

    env["inductor_ms_used"] = round(base, 3)
    print("\nratios: median of interleaved pairs (range in brackets)")
    print("\n| row | ms/token | x Inductor (pairs) | bound | of bound | layers run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        x = r.get("speedup_vs_inductor", base / r["ms_per_token"])
        spread = ""
        if "ratio_range" in r:
            lo, hi = r["ratio_range"]
            spread = f" [{1 / hi:.3f}-{1 / lo:.3f}]"
        print(f"| {r['name']} | {r['ms_per_token']:.3f} | {x:.3f}{spread} | "
              f"{r.get('bound_speedup', '')} | {r.get('fraction_of_bound', '')} | "
              f"{r.get('mean_layers_executed', '')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "bytes": b, "rows": rows}, f, indent=1)


# ---------------------------------------------------------------------- traffic
def traffic_requests(args, vocab: int, device: str) -> list[tuple[torch.Tensor, int]]:
    """``--requests`` (prompt ids, new tokens), lengths uniform in the ranges, fixed seed."""
    lo_p, hi_p = map(int, args.prompt_range.split(","))
    lo_n, hi_n = map(int, args.new_range.split(","))
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(args.requests):
        p = int(torch.randint(lo_p, hi_p + 1, (1,), generator=g))
        n = int(torch.randint(lo_n, hi_n + 1, (1,), generator=g))
        out.append((torch.randint(0, vocab, (1, p), generator=g).to(device), n))
    return out


class BucketedLoop:
    """The Inductor baseline's generate: greedy, batch 1, one StaticCache per cache bucket
    (as ``TIDEModel.generate``), the prompt step with its length marked dynamic, then
    one-token steps; the same compiled ``model.forward`` for both."""

    def __init__(self, model, fn, device: str, mark_step: bool, *, eager_prompt: bool = False,
                 max_cache_len: int | None = None, unguarded: bool = False) -> None:
        self.model, self.fn, self.device, self.mark_step = model, fn, device, mark_step
        self.eager_prompt, self.max_cache_len = eager_prompt, max_cache_len
        self.unguarded = unguarded  # one-token steps after the first: decode_loop's
        self.caches: dict[int, object] = {}

    def generate(self, ids: torch.Tensor, new: int) -> int:
        """Generate ``new`` tokens after ``ids``; returns ``new``."""
        self.tokens(ids, new)
        return new

    @torch.no_grad()
    def tokens(self, ids: torch.Tensor, new: int) -> list[torch.Tensor]:
        """The greedy loop: its ``new`` tokens, each ``[batch, 1]``."""
        from tide_compile.runtime.lossless import unguarded
        from tide_compile.runtime.model import cache_bucket

        length = self.max_cache_len or cache_bucket(ids.shape[1] + new)
        cache = self.caches.get(length)
        if cache is None:
            cache = self.caches[length] = new_cache(self.model, length)
            self.model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        cache.reset()
        step = ids.clone()
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        out = []
        if self.eager_prompt:  # the prompt eagerly, then compiled one-token steps
            logits = self.model(input_ids=step, position_ids=positions, past_key_values=cache,
                                use_cache=True).logits
            step = logits[:, -1:].argmax(-1)
            out.append(step)
            positions = positions[:, -1:] + 1
        else:
            torch._dynamo.mark_dynamic(step, 1)
            torch._dynamo.mark_dynamic(positions, 1)
        with contextlib.ExitStack() as guards:
            for i in range(new - self.eager_prompt):
                if i == 1 + (not self.eager_prompt) and self.unguarded:
                    guards.enter_context(unguarded())
                if self.mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self.fn(input_ids=step, position_ids=positions, past_key_values=cache,
                                 use_cache=True).logits
                step = logits[:, -1:].argmax(-1).clone()
                out.append(step)
                positions = positions[:, -1:] + 1
        return out


def traffic(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(args.tiny, device, dtype)
    b = weight_bytes(model)
    cfg = TIDEConfig(checkpoint_interval=args.interval)
    if args.exit_depth - 1 not in cfg.checkpoint_layers(b["num_layers"]):
        raise SystemExit(f"--exit-depth {args.exit_depth} is not a checkpoint depth of "
                         f"--interval {args.interval}")
    requests = traffic_requests(args, model.config.vocab_size, device)
    inductor = not args.no_inductor
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda"
           else "cpu", "dtype": str(dtype), "requests": args.requests,
           "prompt_range": args.prompt_range, "new_range": args.new_range, "seed": args.seed,
           "tokens": sum(n for _, n in requests), "inductor": inductor,
           "exit_depth": args.exit_depth, "interval": args.interval, "kv": args.kv}
    env["max_cache_len"] = args.max_cache_len
    if args.max_cache_len and args.max_cache_len < max(ids.shape[1] + n for ids, n in requests):
        raise SystemExit("--max-cache-len is shorter than the longest request")
    # Warm-up: the first two requests of every cache bucket (a bucket's graphs compile at
    # its first request; the second has another prompt length). Then one timed pass over
    # all requests; graphs compiled during it are counted (0 expected).
    from tide_compile.runtime.model import cache_bucket

    seen: dict[int, int] = {}
    warm = []
    for ids, n in requests:
        key = args.max_cache_len or cache_bucket(ids.shape[1] + n)
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            warm.append((ids, n))
    env["buckets"] = sorted(seen)
    env["warmup_requests"] = len(warm)
    print(json.dumps(env), flush=True)
    rows = []
    wanted = set(args.traffic_rows.split(","))
    unknown = wanted - {"inductor", "never", "exit"}
    if unknown:
        raise SystemExit(f"--traffic-rows: unknown {sorted(unknown)} (inductor, never, exit)")

    def graphs() -> int:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    def run_row(name: str, generate) -> None:
        sync(device)
        t0 = time.perf_counter()
        warm_tokens = sum(generate(ids, n) for ids, n in warm)
        sync(device)
        warm_s = time.perf_counter() - t0
        before = graphs()
        t0 = time.perf_counter()
        tokens = sum(generate(ids, n) for ids, n in requests)
        sync(device)
        timed = time.perf_counter() - t0
        r = {"name": name, "tokens_per_s": round(tokens / timed, 1),
             "ms_per_token": round(1e3 * timed / tokens, 4), "tokens": tokens,
             "timed_s": round(timed, 2),
             # the warm-up minus what its tokens cost at the timed rate
             "compile_s": round(warm_s - warm_tokens * timed / tokens, 1),
             "graphs_compiled_in_timed_pass": graphs() - before}
        rows.append(r)
        print(json.dumps(r), flush=True)

    if "inductor" in wanted:
        torch._dynamo.reset()
        if inductor:
            ind = torch.compile(model.forward,
                                mode="reduce-overhead" if device == "cuda" else None,
                                fullgraph=True, dynamic=False)
        else:
            ind = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
        loop = BucketedLoop(model, ind, device, mark_step=device == "cuda" and inductor,
                            max_cache_len=args.max_cache_len)
        with torch._dynamo.config.patch(recompile_limit=64):
            run_row("inductor", loop.generate)
    for key, name, exit_at in (("never", "tide_never_exit", None),
                               ("exit", f"tide_exit@{args.exit_depth}", args.exit_depth - 1)):
        if key not in wanted:
            continue
        torch._dynamo.reset()
        routers = RouterSet.forced(model, exit_at=exit_at, config=cfg)
        fast = tide_compile.optimize(model, routers, inductor=inductor, kv=args.kv)
        run_row(name, lambda ids, n: fast.generate(ids, max_new_tokens=n, eos_token_id=-1,
                                                   max_cache_len=args.max_cache_len)
                .shape[1] - ids.shape[1])
        rows[-1]["mean_layers_executed"] = round(fast.tide_stats.mean_layers_executed, 2)
        rows[-1]["steps_by_strategy"] = fast.tide_stats.steps_by_strategy
        rows[-1]["cache_bytes_per_bucket"] = {f"{r}x{n}": v for (r, n, _), v in
                                              fast.cache_memory().items()}
    base = rows[0]["tokens_per_s"] if rows and rows[0]["name"] == "inductor" else None
    print("\n| row | tokens/s | x Inductor | compile s | layers run/token |")
    print("|---|---|---|---|---|")
    for r in rows:
        if base:
            r["speedup_vs_inductor"] = round(r["tokens_per_s"] / base, 3)
        print(f"| {r['name']} | {r['tokens_per_s']} | {r.get('speedup_vs_inductor', '')} | "
              f"{r['compile_s']} | {r.get('mean_layers_executed', '')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "bytes": b, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
