"""Where lossless's adaptive fallback loses to the compiled plain loop (issue 19).

On the H200 (tenth session) lossless ran 0.946x plain on the demo model and 0.954x on
SmolLM2 while it drafted nothing: every timed step was a plain fallback step. This script
splits that gap, in one process, on one model (real weights, bf16 on CUDA):

* ``plain``: ``bench_lossless.PlainLoop`` (the baseline: Inductor ``reduce-overhead``);
* ``plain_unguarded``: the same loop, its decode steps after the first two unguarded
  (``tide_compile.runtime.lossless.unguarded``): the tightest compiled plain loop;
* ``lossless``: ``optimize(model, routers, mode="lossless")``, adaptive, as shipped (since
  the tenth session its runs of fallback steps are unguarded after their first step);
* ``lossless_guarded``: the same with ``unguarded=False`` (every step guarded in full);
* ``lossless_steady``: the shipped fallback with no probes and no timing windows once
  the controller has fallen back (``probe_every = max_probe_every = sample_every =
  10**9``): the plain path alone, without what the controller spends on measuring;
* ``bare``: the fallback's own compiled plain forward (``LosslessDecoder.plain_forward``)
  on the lossless bucket's cache, called in a loop as bare as ``PlainLoop``'s (guarded).

The tenth session's log (``benchmarks/results/session10/diag_demo.log``) came from this
script at ``9c79bd9``, whose rows were ``plain``, ``lossless``, ``lossless_nowin`` (no
windows), ``bare`` and ``<row>_noguard`` (a whole generate under
``set_stance(skip_guard_eval_unsafe=True)``).

Each row is timed interleaved (rotating order) over ``--rounds`` rounds, ms per decode
token from generate(new) minus generate(1); then one generate of each row runs under
``torch.profiler`` and the host ops (self CPU) and the device total are printed.

Usage: python benchmarks/diag_fallback.py [--model demo] [--new 128] [--out diag.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="demo or smollm2")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rows", default="plain,plain_unguarded,lossless,lossless_guarded,"
                    "lossless_steady,bare")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-inductor", action="store_true",
                    help="plain: Dynamo's eager backend; lossless: inductor=False (a CPU smoke "
                         "run of the rows, not a measurement)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import bench_lossless
    import tide_compile
    from tide_compile import cli_demo, demo
    from tide_compile.routers import RouterSet
    from tide_compile.runtime.lossless import DraftController
    from tide_compile.runtime.model import cache_bucket

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_num_threads(1 if not cuda else torch.get_num_threads())
    model, tok = demo.load(args.model, dtype=dtype, device=device)
    routers = RouterSet.load(str(demo.SHIPPED_ROUTERS[args.model]), model=model)
    text = cli_demo.heldout_texts(args.model)[0]
    ids = tok(text, return_tensors="pt").input_ids[:, :args.prompt_tokens].to(device)
    cache_len = cache_bucket(ids.shape[1] + args.new + 8)
    rows = [r for r in args.rows.split(",") if r]
    inductor = not args.no_inductor

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    gens = {}
    built = {}
    for name, unguarded in (("plain", False), ("plain_unguarded", True)):
        if name in rows:
            loop = bench_lossless.PlainLoop(model, inductor, device, cache_len,
                                            unguarded=unguarded)
            gens[name] = (lambda p: lambda n: p.generate(ids, max_new_tokens=n))(loop)
    steady = DraftController(probe_every=10**9, max_probe_every=10**9, sample_every=10**9)
    variants = (("lossless", True, True), ("lossless_guarded", True, False),
                ("lossless_steady", steady, True))
    for name, ctl, unguarded in variants:
        if name in rows or (name == "lossless" and "bare" in rows):
            fast = tide_compile.optimize(model, routers, mode="lossless", max_pending=7,
                                         adaptive=ctl, unguarded=unguarded, inductor=inductor)
            built[name] = fast
            gens[name] = (lambda f: lambda n: f.generate(ids, max_new_tokens=n, eos_token_id=-1,
                                                         max_cache_len=cache_len))(fast)
    if "bare" in rows:
        fast = built["lossless"]
        gens["lossless"](2)  # the bucket, its cache and the plain graph exist
        fn, graphs = fast.lossless.plain_forward(fast, torch.device(device))
        bucket = next(iter(fast._buckets.values()))
        past = bucket.cache
        buf = torch.zeros(1, 1, dtype=torch.long, device=device)

        @torch.no_grad()
        def bare(n: int) -> torch.Tensor:
            past.reset()
            cur = ids[0, -1]
            out = []
            for _ in range(n):
                buf.fill_(cur)
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = fn(input_ids=buf, past_key_values=past, use_cache=True).logits
                cur = logits[0, -1].argmax(-1)
                out.append(cur)
            return torch.stack(out)
        gens["bare"] = bare
    gens = {k: v for k, v in gens.items() if k in rows}

    warm = {}
    for k, g in gens.items():
        t0 = time.time()
        for n in (args.new, 1, args.new, args.new):
            g(n)
        sync()
        warm[k] = round(time.time() - t0, 1)
    print(json.dumps({"warmup_s": warm}), flush=True)
    new_tokens = {k: g(args.new).reshape(-1)[-args.new:].tolist() for k, g in gens.items()}
    ref = new_tokens.get("plain")
    per = {k: [] for k in gens}
    kinds = list(gens)
    for r in range(args.rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            sync()
            t0 = time.perf_counter()
            gens[k](1)
            sync()
            t1 = time.perf_counter()
            gens[k](args.new)
            sync()
            t2 = time.perf_counter()
            per[k].append(((t2 - t1) - (t1 - t0)) / (args.new - 1) * 1e3)
    result = {"model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "new": args.new, "warmup_s": warm, "rows": {}}
    base = per.get("plain")
    for k, v in per.items():
        r = {"ms_per_token": round(statistics.median(v), 4),
             "ms": [round(x, 4) for x in v],
             # (bare decodes from the last prompt token alone: its tokens differ)
             "tokens_equal_plain": None if ref is None or k == "bare" else new_tokens[k] == ref}
        if base:
            ratios = [b / x for b, x in zip(base, v)]
            r["x_plain_paired"] = round(statistics.median(ratios), 3)
        result["rows"][k] = r
    for name, fast in built.items():
        result["rows"].setdefault(name, {})["stats"] = str(fast.lossless_stats)
    print("\n| row | ms/token | x plain (paired) | tokens = plain |\n|---|---|---|---|")
    for k, r in result["rows"].items():
        if "ms_per_token" in r:
            print(f"| {k} | {r['ms_per_token']:.4f} | {r.get('x_plain_paired', '')} | "
                  f"{r['tokens_equal_plain']} |")
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for k, g in gens.items():
            sync()
            with profile(activities=acts) as prof:
                g(args.new)
                sync()
            ka = prof.key_averages()
            host = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:14]
            dev = sum(getattr(e, "self_device_time_total", 0) for e in ka)
            result["rows"][k]["profile"] = {
                "device_us_per_token": round(dev / args.new, 1),
                "host_us_per_token": round(sum(e.self_cpu_time_total for e in ka) / args.new, 1),
                "top_host": [(e.key, e.count, round(e.self_cpu_time_total / args.new, 2))
                             for e in host]}
            p = result["rows"][k]["profile"]
            print(f"\n# {k}: host {p['host_us_per_token']} us/token, device "
                  f"{p['device_us_per_token']} us/token; top host ops (calls, us/token):")
            for key, count, us in p["top_host"]:
                print(f"  {key[:60]:60s} {count:6d} {us:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
