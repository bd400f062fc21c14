"""Where a drafting lossless row's GPU output left the compiled plain loop's: near-ties?

``bench_lossless.py`` records, per model row, the new tokens of every prompt and
``first_mismatch`` against the ``plain`` row (Inductor's plain graph, bf16). On the H200 the
rows that always draft (``lossless_fixed``) left it at a few positions (tenth and eleventh
device sessions: demo new tokens 7, 18 and 53; SmolLM2 50), while every adaptive row and
every fp32 CPU test was token-identical. This script takes such a result file and, for
each mismatch, recomputes on the CPU the model's own next-token logits at that position
(HF eager forward of prompt + the shared prefix, real weights) in fp32 and in bf16, and
reports the two tokens' logits, the top-2 margin, and which token each precision picks.

A mismatch where the two tokens' fp32 logits lie within bf16's rounding of each other is a
near-tie that kernels with different reduction orders may break either way; a wide margin
would be a wrong token.

    python benchmarks/diag_mismatch.py benchmarks/results/session11/merged.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="a bench_lossless JSON (rows with tokens and first_mismatch)")
    ap.add_argument("--out", default=None, help="write the findings here (JSON)")
    args = ap.parse_args(argv)

    import bench_lossless
    from tide_compile import cli_demo, demo

    result = json.load(open(args.result))
    parts = result["env"].get("parts") or [result["env"]]
    prompt_count = max(len(r["prompt_tokens"]) for r in result["rows"] if "prompt_tokens" in r)
    rows = {r["name"]: r for r in result["rows"] if "tokens" in r}
    found: list[dict] = []
    for name in sorted({n.split(":")[0] for n in rows}):
        plain = rows.get(f"{name}:plain")
        if plain is None:
            continue
        cases = [(r, i, at) for r in rows.values() if r["name"].startswith(name + ":")
                 for i, at in enumerate(r.get("first_mismatch") or []) if at is not None]
        if not cases:
            continue
        models = {}
        for dtype in (torch.float32, torch.bfloat16):  # loaded twice: GGUF models refuse .to
            models[dtype], tok = demo.load(name, dtype=dtype, device="cpu")
        prompts = bench_lossless.model_prompts(tok, cli_demo.heldout_texts(name), prompt_count,
                                               max(plain["prompt_tokens"]))
        if [p.shape[1] for p in prompts] != plain["prompt_tokens"]:
            raise SystemExit(f"{name}: the prompts rebuilt here ({[p.shape[1] for p in prompts]}"
                             f" tokens) are not the run's ({plain['prompt_tokens']})")
        for r, i, at in cases:
            want, got = plain["tokens"][i][at], r["tokens"][i][at]
            prefix = torch.cat([prompts[i], torch.tensor([plain["tokens"][i][:at]])], 1)
            assert r["tokens"][i][:at] == plain["tokens"][i][:at]
            f = {"row": r["name"], "prompt": i, "new_token": at, "plain_token": want,
                 "row_token": got}
            for dtype in (torch.float32, torch.bfloat16):
                with torch.no_grad():
                    logits = models[dtype](prefix).logits[0, -1].float()
                top = logits.topk(2)
                key = "fp32" if dtype == torch.float32 else "bf16"
                f[key] = {"plain_logit": round(logits[want].item(), 4),
                          "row_logit": round(logits[got].item(), 4),
                          "gap": round((logits[want] - logits[got]).item(), 4),
                          "top2_margin": round((top.values[0] - top.values[1]).item(), 4),
                          "argmax": int(top.indices[0]),
                          "logit_scale": round(logits.abs().max().item(), 2)}
            # bf16 keeps 8 significant bits: one unit in the last place of a logit of
            # magnitude x is about x / 128.
            f["bf16_ulp_at_logit"] = round(abs(f["fp32"]["plain_logit"]) / 128, 4)
            found.append(f)
            print(json.dumps(f), flush=True)
        del models
    print("\n| row | prompt | new token | plain / row token | fp32 gap (plain - row) | "
          "bf16 ulp there | fp32 picks | bf16 (CPU) picks |")
    print("|---|---|---|---|---|---|---|---|")
    for f in found:
        pick = lambda d: ("plain's" if d["argmax"] == f["plain_token"] else "row's"
                          if d["argmax"] == f["row_token"] else str(d["argmax"]))
        print(f"| {f['row']} | {f['prompt']} | {f['new_token']} | {f['plain_token']} / "
              f"{f['row_token']} | {f['fp32']['gap']} | {f['bf16_ulp_at_logit']} | "
              f"{pick(f['fp32'])} | {pick(f['bf16'])} |")
    if args.out:
        json.dump({"source": args.result, "runs": parts, "mismatches": found},
                  open(args.out, "w"), indent=1)
    return found


if __name__ == "__main__":
    main()
