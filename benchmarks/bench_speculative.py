"""Lossless speculative mode on the demo model: tokens/s against full-depth baselines.

Rows, one process, one GPU, the same held-out prompts, greedy, ``--new-tokens`` each
(EOS disabled so every row decodes the same number of tokens):

* ``compiled_baseline``: ``torch.compile(model.forward)`` (Inductor, ``reduce-overhead``)
  in a hand decode loop on a StaticCache: eager prefill, then one compiled step per token.
* ``speculative``: ``tide_compile.optimize(model, routers, mode="speculative")``: tide
  skip-strategy drafts, one full-depth Inductor verify per round, same prefill.
  Its tokens are compared with the baseline's (bf16 kernels may differ in near-ties).
* ``hf_eager``: ``model.generate`` (eager, DynamicCache).
* ``hf_early_exit@k``: transformers' ``assistant_early_exit=k`` self-speculation
  (eager), for k = 1 .. L-1; the best is reported.

Routers are calibrated at start (a few seconds) on held-out Shakespeare
(``data/shakespeare/heldout/*.txt``, else ``demo.heldout_text()``); prompts come from
paragraphs not used for calibration. Times include prefill, are the median over
prompts of warm runs, and count only new tokens.

Then a **projection** (not a measurement) for the Llama-3.1-8B shape: the measured
draft-depth histogram and tokens per verify of the demo run, priced with the 8B decode
step costs of ``benchmarks/results/bench_decode.json`` (Inductor full step; tide exit
after 8/16/24 of 32 layers, which are the same fractions as the demo's checkpoints
2/4/6 of 8; a verify of up to ``max_draft + 1`` tokens priced as one full step, as
batch-1 decode is weight-bandwidth bound). Acceptance on the 8B model may differ.

Usage:
    python benchmarks/bench_speculative.py [--out results.json]
    python benchmarks/bench_speculative.py --cpu-smoke      # CPU, small, no Inductor
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tide_compile  # noqa: E402
from tide_compile import TIDEConfig, demo  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# 8B decode step costs (ms) from bench_decode.json (H200, bf16, torch 2.11), used when
# the file is not there.
DEFAULT_8B = {"inductor": 5.995, "depth_ms": {8: 2.538, 16: 3.714, 24: 4.995, 32: 6.169}}


def paragraphs() -> tuple[list[str], str]:
    files = sorted(glob.glob(os.path.join(ROOT, "data", "shakespeare", "heldout", "*.txt")))
    if files:
        text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
        source = "data/shakespeare/heldout"
    else:
        text, source = demo.heldout_text(), "demo.heldout_text()"
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    return paras, source


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def baseline_generate(step, model, ids: torch.Tensor, new_tokens: int, cache,
                      cuda: bool) -> torch.Tensor:
    """Eager prefill, then one compiled full-depth step per token (greedy, no EOS)."""
    cache.reset()
    prompt = ids.shape[1]
    out = model(input_ids=ids, position_ids=torch.arange(prompt, device=ids.device)[None],
                past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    pos = torch.full((1, 1), prompt, device=ids.device, dtype=torch.long)
    for _ in range(new_tokens - 1):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(input_ids=token, position_ids=pos, past_key_values=cache,
                      use_cache=True).logits
        token = logits[:, -1:].argmax(-1).clone()
        tokens.append(token)
        pos = pos + 1
    return torch.cat([ids] + tokens, dim=-1)


def timed(fn, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time (s) of ``repeats`` warm calls, and the last output."""
    fn()  # warm-up (compiles, captures CUDA graphs)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def project_8b(stats: dict, num_layers: int, costs: dict) -> dict:
    """Price the measured draft depths and verify calls with the 8B step costs."""
    depth_ms = {int(k): v for k, v in costs["depth_ms"].items()}
    big_layers = max(depth_ms)

    def cost(depth: int) -> float:
        big = depth * big_layers / num_layers
        known = sorted(depth_ms)
        if big in depth_ms:
            return depth_ms[int(big)]
        lo = max([d for d in known if d <= big], default=known[0])
        hi = min([d for d in known if d >= big], default=known[-1])
        if hi == lo:
            return depth_ms[lo]
        return depth_ms[lo] + (depth_ms[hi] - depth_ms[lo]) * (big - lo) / (hi - lo)

    draft_ms = sum(cost(int(d)) * n for d, n in stats["draft_depths"].items())
    verify_ms = stats["verify_calls"] * costs["inductor"]
    per_token = (draft_ms + verify_ms) / max(1, stats["tokens"])
    return {"ms_per_token": round(per_token, 3), "baseline_ms_per_token": costs["inductor"],
            "speedup": round(costs["inductor"] / per_token, 3),
            "note": "projection from demo-model acceptance and 8B step costs, not a measurement"}


def load_8b_costs() -> dict:
    path = os.path.join(ROOT, "benchmarks", "results", "bench_decode.json")
    try:
        rows = {r["name"]: r for r in json.load(open(path))["rows"]}
        depth = {int(r["depth"]): r["ms_per_token"] for r in rows.values()
                 if r["name"].startswith("tide_exit@")}
        depth[32] = rows["tide_never_exit"]["ms_per_token"]
        return {"inductor": rows["inductor"]["ms_per_token"], "depth_ms": depth,
                "source": "benchmarks/results/bench_decode.json"}
    except Exception:
        return {**DEFAULT_8B, "source": "built-in copy of bench_decode.json"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, float32, no Inductor, small settings (a check that it runs)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per prompt")
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--max-draft-depth", type=int, default=None)
    ap.add_argument("--target-agreement", type=float, default=0.9,
                    help="router threshold: calibrated first-exit agreement target")
    ap.add_argument("--exit-threshold", type=float, default=None,
                    help="override the calibrated threshold")
    ap.add_argument("--hf-layers", default=None,
                    help="assistant_early_exit layers to sweep, e.g. 1,2,3 (default 1..L-1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = "cuda" if cuda else "cpu"
    if args.cpu_smoke:
        args.new_tokens = min(args.new_tokens, 24)
        args.prompts = min(args.prompts, 2)
        args.repeats = 1
    inductor = cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    t_start = time.time()
    model, tok = demo.load(dtype=dtype, device=device)
    num_layers = model.config.num_hidden_layers
    paras, source = paragraphs()
    calib, prompt_paras = paras[:-40], paras[-40:]
    if args.cpu_smoke:
        calib = calib[:60]
    t0 = time.time()
    routers = tide_compile.calibrate(
        model, tok, dataset=calib, config=TIDEConfig(checkpoint_interval=2),
        target_agreement=args.target_agreement, progress=False,
        max_tokens_per_checkpoint=20_000 if args.cpu_smoke else 100_000)
    calib_s = time.time() - t0
    threshold = args.exit_threshold if args.exit_threshold is not None \
        else routers.config.exit_threshold
    step = max(1, len(prompt_paras) // args.prompts)
    prompts = []
    for p in prompt_paras[::step][:args.prompts]:
        ids = tok(p, return_tensors="pt").input_ids[:, :args.prompt_tokens]
        prompts.append(ids.to(device))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": str(dtype), "new_tokens": args.new_tokens, "prompts": len(prompts),
           "prompt_tokens": args.prompt_tokens, "max_draft": args.max_draft,
           "max_draft_depth": args.max_draft_depth, "target_agreement": args.target_agreement,
           "exit_threshold": threshold, "checkpoints": routers.checkpoint_layers,
           "calibration_s": round(calib_s, 1), "calibration_text": source,
           "inductor": inductor, "cpu_smoke": args.cpu_smoke}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    print(json.dumps(env), flush=True)
    rows: list[dict] = []

    def row(name: str, seconds: list[float], **extra) -> dict:
        tps = args.new_tokens / statistics.median(seconds)
        r = {"name": name, "tokens_per_s": round(tps, 1),
             "ms_per_token": round(1e3 / tps, 3), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    from transformers import StaticCache

    new = args.new_tokens
    cache_len = -(-(args.prompt_tokens + new + args.max_draft + 1) // 128) * 128

    # --- compiled full-depth baseline
    torch._dynamo.reset()
    t0 = time.time()
    if inductor:
        step_fn = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True,
                                dynamic=False)
    else:
        step_fn = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    base_out, secs = [], []
    for ids in prompts:
        s, out = timed(lambda: baseline_generate(step_fn, model, ids, new, cache, cuda),
                       device, args.repeats)
        secs.append(s)
        base_out.append(out)
    base = row("compiled_baseline", secs, total_s=round(time.time() - t0, 1))

    # --- speculative
    torch._dynamo.reset()
    t0 = time.time()
    fast = tide_compile.optimize(model, routers, mode="speculative", max_draft=args.max_draft,
                                 max_draft_depth=args.max_draft_depth, exit_threshold=threshold,
                                 inductor=inductor)
    secs, same = [], []
    for ids, ref in zip(prompts, base_out):
        s, out = timed(lambda: fast.generate(ids, new, eos_token_id=[]), device, args.repeats)
        secs.append(s)
        n = min(out.shape[1], ref.shape[1])
        diff = (out[0, :n] != ref[0, :n]).nonzero()
        same.append(None if diff.numel() == 0 else int(diff[0, 0]) - ids.shape[1])
    fast.spec_stats.reset()
    fast.draft_stats.reset()
    for ids in prompts:  # stats over exactly one run per prompt
        fast.generate(ids, new, eos_token_id=[])
    st = fast.spec_stats
    spec_stats = {"acceptance_rate": round(st.acceptance_rate, 4),
                  "tokens_per_verify": round(st.tokens_per_verify, 3),
                  "mean_draft_depth": round(st.mean_draft_depth, 3),
                  "mean_draft_length": round(st.mean_draft_length, 3),
                  "verify_calls": st.verify_calls, "tokens": st.tokens, "drafted": st.drafted,
                  "accepted": st.accepted, "draft_depths": dict(sorted(st.draft_depths.items()))}
    spec = row("speculative", secs, **spec_stats,
               speedup_vs_compiled=round(new / statistics.median(secs) / base["tokens_per_s"], 3),
               first_mismatch_vs_baseline=same, total_s=round(time.time() - t0, 1))
    print(st.summary(), flush=True)

    # --- transformers: eager generate, and assistant_early_exit self-speculation
    torch._dynamo.reset()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
    secs = [timed(lambda: model.generate(ids, **gen_kw), device, args.repeats)[0]
            for ids in prompts]
    row("hf_eager", secs)
    layers = ([int(x) for x in args.hf_layers.split(",")] if args.hf_layers
              else list(range(1, num_layers)))
    best = None
    for k in layers:
        try:
            secs = [timed(lambda: model.generate(ids, assistant_early_exit=k, **gen_kw),
                          device, args.repeats)[0] for ids in prompts]
        except Exception as e:  # report, keep going
            print(f"# hf_early_exit@{k} failed: {type(e).__name__}: {e}", flush=True)
            continue
        r = row(f"hf_early_exit@{k}", secs)
        if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
            best = r

    costs = load_8b_costs()
    projection = project_8b(spec_stats, num_layers, costs)
    projection["costs_source"] = costs["source"]
    print(json.dumps({"projection_8b": projection}), flush=True)

    speedup = spec["tokens_per_s"] / base["tokens_per_s"]
    print("\n| row | tokens/s | ms/token | x compiled baseline |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.3f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    print(f"\nspeculative: acceptance {spec_stats['acceptance_rate']:.1%}, "
          f"{spec_stats['tokens_per_verify']:.2f} tokens/verify, mean draft depth "
          f"{spec_stats['mean_draft_depth']:.2f}/{num_layers}; measured {speedup:.2f}x the "
          f"compiled baseline (target >= 1.5x)")
    if best is not None:
        print(f"best transformers assistant_early_exit: {best['name']} "
              f"({best['tokens_per_s']:.1f} tokens/s)")
    print(f"8B-shape PROJECTION (not measured): {projection['ms_per_token']:.3f} ms/token vs "
          f"{projection['baseline_ms_per_token']:.3f} Inductor = {projection['speedup']:.2f}x")
    print(f"total {time.time() - t_start:.0f}s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "best_hf_early_exit": best,
                       "projection_8b": projection, "costs_8b": costs}, f, indent=1)


if __name__ == "__main__":
    main()
