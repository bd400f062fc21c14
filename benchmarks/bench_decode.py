"""Batch-1 decode on a Llama-3.1-8B-shaped model (bf16, random weights), side by side.

Rows, all in one process on one GPU, same prompt, same StaticCache size:

* ``hf_eager``: ``model.generate`` (greedy), per new token.
* ``inductor``: ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``
  in a hand decode loop on a StaticCache (cudagraph_mark_step_begin + clone per step).
* ``tide_never``: the tide backend (skip strategy, segments captured as CUDA graphs) with
  routers that never exit: the overhead of the checkpoints.
* ``tide_exit@d``: tide with ``RouterSet.forced`` exiting every token after ``d`` layers.

The tide rows and the Inductor row use the same decode loop; prefill runs eagerly on the
StaticCache for all of them (not timed). For each exit depth the weight-bytes bound is
full-model bytes / (bytes of executed layers + K/V projection bytes of skipped layers +
final norm and lm_head): the speedup no implementation of that exit could beat when
decode is memory-bound.

Usage: python benchmarks/bench_decode.py [--tiny] [--steps 64] [--out results.json]
"""

from __future__ import annotations

import argparse
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
def decode_loop(fn, model, prompt, steps: int, cache_len: int, device: str,
                mark_step: bool, keep: dict | None = None) -> list[float]:
    """Eager prefill on a fresh StaticCache, then `steps` compiled decode steps.
    Returns per-step wall times (ms), each step synchronized by the argmax read-back
    being fed to the next step (as in generate). ``keep["cache"]`` receives the cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    if keep is not None:
        keep["cache"] = cache
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    pos = torch.full((1, 1), prompt.shape[1], device=device, dtype=torch.long)
    times = []
    for _ in range(steps):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small model (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--interval", type=int, default=8, help="checkpoint_interval")
    ap.add_argument("--kernels", choices=("inductor", "triton"), default="inductor",
                    help="tide backend option: route/exit-select as Inductor-fused composites "
                         "or hand Triton kernels")
    ap.add_argument("--rows", default="eager,inductor,never,exits",
                    help="comma list of: eager, inductor, never, exits")
    ap.add_argument("--out", default=None)
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
    args = ap.parse_args()
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
           "checkpoints": checkpoints}
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
    if "eager" in wanted:
        row("hf_eager_generate", hf_eager_ms(model, prompt, device))

    # Inductor baseline on the same static cache (always: the other rows are relative to it).
    # Measured first and again after the tide rows (the same compiled code has moved by
    # ~4% between processes on the lent H200); the ratios use the faster of the two.
    mode = "reduce-overhead" if device == "cuda" else None

    def inductor_ms() -> tuple[float, float]:
        torch._dynamo.reset()
        t0 = time.time()
        ind = torch.compile(model.forward, mode=mode, fullgraph=True)
        times = decode_loop(ind, model, prompt, args.steps, cache_len, device, device == "cuda")
        return summarize(times, args.warmup), round(time.time() - t0, 1)

    base, took = inductor_ms()
    row("inductor", base, compile_and_first_s=took)

    graphed: list = []
    if args.breakdown and device == "cuda":
        from tide_compile.runtime.cudagraphs import GraphedSkipRunner

        init = GraphedSkipRunner.__init__

        def recording_init(self, *a, **k):  # benchmark-only: find the runner to time
            init(self, *a, **k)
            graphed.append(self)

        GraphedSkipRunner.__init__ = recording_init

    def tide_row(name, exit_at):
        if time.time() - start > args.time_budget:
            print(f"# skipped {name}: time budget", flush=True)
            return
        torch._dynamo.reset()
        routers = RouterSet.forced(model, exit_at=exit_at, config=cfg)
        stats = ExitStats(b["num_layers"])
        t0 = time.time()
        fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                           options={"routers": routers, "stats": stats, "strategy": "skip",
                                    "kernels": args.kernels, "inductor_config": patches,
                                    "stack_kv": stack_kv})
        keep: dict = {}
        graphed.clear()
        times = decode_loop(fn, model, prompt, args.steps, cache_len, device, False, keep)
        ms = summarize(times, args.warmup)
        depth = b["num_layers"] if exit_at is None else exit_at + 1
        bound = bound_speedup(b, depth)
        extra = {}
        captured = [g for g in graphed if g.captured]
        if captured:
            extra = graph_breakdown(captured[-1], keep["cache"], exit_at)
            extra["host_and_gaps_ms"] = round(ms - extra["gpu_path_ms"], 4)
        row(name, ms, depth=depth, bound_speedup=round(bound, 3),
            mean_layers_executed=round(stats.mean_layers_executed, 2),
            compile_and_first_s=round(time.time() - t0, 1), **extra)
        if name in args.profile.split(","):
            profile_steps(fn, name)

    def profile_steps(fn, name, steps=8):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            decode_loop(fn, model, prompt, steps, cache_len, device, False)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        averages = prof.key_averages()
        print(f"# profile of {name}: {steps} decode steps (+ an eager prefill)", flush=True)
        print(averages.table(sort_by=key, row_limit=30), flush=True)
        print(f"# host side of {name}: ops by self CPU time", flush=True)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
        if args.out:
            trace = f"{os.path.splitext(args.out)[0]}_{name.replace('@', '_')}.trace.json"
            prof.export_chrome_trace(trace)
            print(f"# trace: {trace}", flush=True)

    if "never" in wanted:
        tide_row("tide_never_exit", None)
    if "exits" in wanted:
        depths = [int(d) for d in args.depths.split(",") if d] or [c + 1 for c in checkpoints]
        for d in depths:
            if d - 1 not in checkpoints:
                raise SystemExit(f"--depths: {d} is not a checkpoint depth ({[c + 1 for c in checkpoints]})")
            tide_row(f"tide_exit@{d}", d - 1)

    end, _ = inductor_ms()
    row("inductor_again", end)
    base = min(base, end)
    env["inductor_ms_used"] = round(base, 3)
    for r in rows:
        if "bound_speedup" in r:
            speedup = base / r["ms_per_token"]
            r["speedup_vs_inductor"] = round(speedup, 3)
            r["fraction_of_bound"] = round(speedup / r["bound_speedup"], 3)
    print(f"\nratios against the faster Inductor measurement: {base:.3f} ms")
    print("\n| row | ms/token | x Inductor | bound | of bound | layers run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ms_per_token']:.3f} | "
              f"{r.get('speedup_vs_inductor', base / r['ms_per_token']):.2f} | "
              f"{r.get('bound_speedup', '')} | {r.get('fraction_of_bound', '')} | "
              f"{r.get('mean_layers_executed', '')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "bytes": b, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
