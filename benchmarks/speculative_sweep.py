"""Speculative mode on the demo model: acceptance and draft depth against the exit
threshold, priced with measured 8B step costs. A projection, not a speed measurement.

On CPU in float32 (no GPU needed): acceptance, tokens per verify and the draft-depth
histogram of greedy speculative decoding do not depend on the hardware (float32, greedy:
the output is also checked token for token against ``model.generate``). For each
threshold the script prices the run's draft steps and verify calls with the 8B decode
step costs measured on the H200 (``bench_speculative.project_8b``): two cost sets,
``run1`` (``results/bench_decode.json``, KV-fill unstacked) and ``run5_stack_kv``
(``results/session3/bench_decode_run5_exits_stack_kv.json``, depths 8 and 24 measured,
16 interpolated, a draft that does not exit priced with run 3's never-exit overhead of
+1.1%), against Inductor's full step; a verify is priced as one full step. The demo model itself is not priced:
its GPU steps are launch-bound, so depth barely changes their cost.

Usage: python benchmarks/speculative_sweep.py [--thresholds 0.5,0.7,0.9] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tide_compile  # noqa: E402
from tide_compile import TIDEConfig, demo  # noqa: E402
from bench_speculative import ROOT, load_8b_costs, paragraphs, project_8b  # noqa: E402


def stack_kv_costs() -> dict:
    path = os.path.join(ROOT, "benchmarks", "results", "session3",
                        "bench_decode_run5_exits_stack_kv.json")
    plain = os.path.join(ROOT, "benchmarks", "results", "session3",
                         "bench_decode_run5_exits.json")
    rows = json.load(open(path))["rows"]
    base = min(r["ms_per_token"] for r in rows + json.load(open(plain))["rows"]
               if r["name"] == "inductor")
    depth = {int(r["depth"]): r["ms_per_token"] for r in rows if r["name"].startswith("tide_exit@")}
    # A draft that does not exit: run 3's never-exit step relative to its own Inductor step.
    run3 = {r["name"]: r["ms_per_token"] for r in json.load(open(os.path.join(
        ROOT, "benchmarks", "results", "bench_decode_run3_triton.json")))["rows"]}
    depth[32] = base * run3["tide_never_exit"] / run3["inductor"]
    return {"inductor": base, "depth_ms": depth, "source": os.path.relpath(path, ROOT)
            + " (depth 32: run 3's never-exit overhead)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--thresholds", default="0.3,0.5,0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--target-agreement", type=float, default=0.9)
    ap.add_argument("--exit-strategy", choices=("identity", "projection"), default="identity",
                    help="calibrate exit read-outs: lm_head(norm(h_c)) or with a learned "
                         "low-rank projection E_c (TIDEConfig.exit_strategy)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = demo.load(dtype=torch.float32, device="cpu")
    paras, source = paragraphs()
    calib, prompt_paras = paras[:-40], paras[-40:]
    routers = tide_compile.calibrate(model, tok, dataset=calib,
                                     config=TIDEConfig(checkpoint_interval=2,
                                                       exit_strategy=args.exit_strategy),
                                     target_agreement=args.target_agreement, progress=False)
    step = max(1, len(prompt_paras) // args.prompts)
    prompts = [tok(p, return_tensors="pt").input_ids[:, :args.prompt_tokens]
               for p in prompt_paras[::step][:args.prompts]]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    refs = [model.generate(ids, **gen) for ids in prompts]
    cost_sets = {"run1": load_8b_costs(), "run5_stack_kv": stack_kv_costs()}
    env = {"model": "demo", "dtype": "float32", "device": "cpu", "calibration_text": source,
           "target_agreement": args.target_agreement, "exit_strategy": args.exit_strategy,
           "calibrated_threshold": routers.config.exit_threshold,
           "checkpoints": routers.checkpoint_layers, "prompts": len(prompts),
           "new_tokens": args.new_tokens, "max_draft": args.max_draft,
           "costs": cost_sets}
    print(json.dumps(env), flush=True)
    rows = []
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        torch._dynamo.reset()
        t0 = time.time()
        fast = tide_compile.optimize(model, routers, mode="speculative",
                                     max_draft=args.max_draft, exit_threshold=threshold,
                                     inductor=False)
        identical = 0
        for ids, ref in zip(prompts, refs):
            out = fast.generate(ids, args.new_tokens, eos_token_id=[])
            identical += int(torch.equal(out, ref))
        st = fast.spec_stats
        stats = {"tokens": st.tokens, "verify_calls": st.verify_calls, "drafted": st.drafted,
                 "accepted": st.accepted, "draft_depths": dict(sorted(st.draft_depths.items()))}
        r = {"threshold": threshold, "acceptance": round(st.acceptance_rate, 4),
             "tokens_per_verify": round(st.tokens_per_verify, 3),
             "mean_draft_depth": round(st.mean_draft_depth, 3),
             "identical_to_generate": f"{identical}/{len(prompts)}", **stats,
             "seconds": round(time.time() - t0, 1)}
        for name, costs in cost_sets.items():
            r[f"projected_8b_{name}"] = project_8b(stats, routers.num_layers, costs)["speedup"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| threshold | acceptance | tokens/verify | mean draft depth | identical | "
          "8B projection (run 1 costs) | 8B projection (run 5, stack_kv) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']} | {100 * r['acceptance']:.1f}% | {r['tokens_per_verify']:.2f} | "
              f"{r['mean_draft_depth']:.2f} / {routers.num_layers} | {r['identical_to_generate']} | "
              f"{r['projected_8b_run1']:.2f}x | {r['projected_8b_run5_stack_kv']:.2f}x |")
    print("(projections: demo-model acceptance priced with 8B step costs; not measurements)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
