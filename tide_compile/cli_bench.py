"""``tide-compile bench``: run the GPU benchmark scripts of a source checkout.

The scripts live in ``benchmarks/`` next to the package (a source checkout; they are not
part of the installed package): ``bench_decode.py`` (batch-1 decode on the
Llama-3.1-8B shape: plain HF generate, Inductor, tide never-exit and forced exits) and
``bench_calibration.py`` (calibration throughput) and ``bench_compact.py`` (prefill
compaction and decode with a fraction of tokens exiting), and ``bench_quality.py``
(early-exit quality on real weights: ``--model smollm2`` or ``demo``, held-out code and
prose, under both K/V semantics). Each runs in its own process (a fresh Dynamo and CUDA
state, as ``benchmarks/gpu_session.sh`` runs them); their JSON results, logs and markdown
tables go to ``--out``.

The speed benchmarks need a CUDA GPU; the quality benchmark runs anywhere (slowly on a
CPU). ``--tiny`` runs their tiny smoke modes instead (small models, any device, CPU
included): it checks that they run, it measures nothing useful.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["BENCHMARKS", "GPU_ONLY", "TINY_ARGS", "find_benchmarks", "run_bench", "decode_markdown",
           "calibration_markdown", "compact_markdown"]

#: name -> (script, argument that names its JSON output)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "decode": ("bench_decode.py", "--out"),
    "calibration": ("bench_calibration.py", "--json"),
    "compact": ("bench_compact.py", "--out"),
    "quality": ("bench_quality.py", "--out"),
}
#: Benchmarks whose ``--out`` is a folder (they write ``bench_<name>.json`` and ``.md`` there).
_OUT_DIRS = {"quality"}
#: Benchmarks that need a CUDA GPU (outside ``--tiny``).
GPU_ONLY = ("decode", "calibration", "compact")
#: Arguments of the tiny smoke modes. bench_decode's default ``--interval 8`` leaves the
#: tiny 8-layer model no checkpoint, and its default 48 steps after a 128-token prompt
#: and 6 interleaved Inductor/tide pairs per row take minutes on a 2-core CPU; 2 pairs
#: still run the interleaved A/B method.
TINY_ARGS: dict[str, list[str]] = {
    "decode": ["--tiny", "--interval", "4", "--steps", "8", "--warmup", "2", "--prompt", "16",
               "--pairs", "2"],
    "calibration": ["--tiny"],
    "quality": ["--tiny"],
    "compact": ["--tiny", "--lengths", "64", "--fractions", "0.7", "--batches", "1",
                "--decode-fractions", "0.9", "--decode-steps", "6", "--iters", "2"],
}


def find_benchmarks(explicit: str | None = None) -> Path:
    """The ``benchmarks/`` folder: ``explicit``, else the one beside the package."""
    here = Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "benchmarks"
    missing = [s for s, _ in BENCHMARKS.values() if not (here / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark scripts {missing} not found in {here}: `tide-compile bench` runs the "
            "scripts of a source checkout (git clone the repository and `pip install -e .` "
            "there), or pass --benchmarks DIR"
        )
    return here


def decode_markdown(result: dict[str, Any]) -> str:
    env = result.get("env", {})
    lines = [
        f"Batch-1 decode, {env.get('device')}, {env.get('dtype')}, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}; prompt {env.get('prompt')} tokens, "
        f"{env.get('steps')} steps, checkpoints {env.get('checkpoints')}.",
        "",
        "| row | ms/token | x Inductor | weight-bytes bound | fraction of bound | layers run/token |",
        "|---|---|---|---|---|---|",
    ]
    rows = result.get("rows", [])
    base = env.get("inductor_ms_used",  # the faster of its two Inductor measurements
                   next((r["ms_per_token"] for r in rows if r["name"] == "inductor"), None))
    for r in rows:
        x = r.get("speedup_vs_inductor", base / r["ms_per_token"] if base else None)
        lines.append(
            f"| {r['name']} | {r['ms_per_token']:.3f} | {'' if x is None else f'{x:.2f}'} | "
            f"{r.get('bound_speedup', '')} | {r.get('fraction_of_bound', '')} | "
            f"{r.get('mean_layers_executed', '')} |"
        )
    return "\n".join(lines)


def calibration_markdown(result: dict[str, Any]) -> str:
    keys = ["shape", "device", "dtype", "samples", "max_length", "tokens", "tokens_kept",
            "checkpoints", "exit_strategy", "collect_s", "total_s", "total_min", "samples_per_s",
            "peak_gpu_gib", "torch", "transformers"]
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {result[k]} |" for k in keys if k in result]
    return "\n".join(lines)


def compact_markdown(result: dict[str, Any]) -> str:
    env = result.get("env", {})
    base = env.get("baseline", "baseline")
    lines = [
        f"Prefill compaction and decode with exits, {env.get('device')}, {env.get('dtype')}, "
        f"torch {env.get('torch')}; exits at checkpoint {env.get('exit_checkpoint')}",
        "",
        f"| phase | tokens / batch | f | row | ms | x {base} | layers per token | exit fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("rows", []):
        if "ms" not in r:
            continue
        f = "" if r.get("f") is None else f"{r['f']:.1f}"
        sp = r.get("speedup_vs_baseline")
        lines.append(f"| {r['phase']} | {r['tokens']} | {f} | {r['name']} | {r['ms']:.3f} | "
                     f"{'' if sp is None else f'{sp:.2f}'} | {r.get('layers_per_token', '')} | "
                     f"{r.get('exit_fraction', '')} |")
    lines += [""] + list(result.get("summary", {}).get("lines", []))
    return "\n".join(lines)


_MARKDOWN = {"decode": decode_markdown, "calibration": calibration_markdown,
             "compact": compact_markdown}


def run_bench(args: argparse.Namespace) -> int:
    import torch

    bench_dir = find_benchmarks(args.benchmarks)
    names = args.only or list(BENCHMARKS)
    if not torch.cuda.is_available() and not args.tiny and any(n in GPU_ONLY for n in names):
        print(
            "tide-compile bench: error: no CUDA GPU here (torch.cuda.is_available() is False). "
            "The benchmarks measure decode on a Llama-3.1-8B-shaped model in bf16 and need a "
            "GPU; recorded results are in benchmarks/RESULTS.md. Pass --tiny (or --allow-cpu) "
            "to run their tiny CPU smoke modes, which check that they run and measure nothing "
            "useful; `--only quality` runs the quality benchmark on the CPU.",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    status = 0
    summary = [f"# tide-compile bench ({'tiny smoke modes' if args.tiny else 'GPU'})", ""]
    for name in names:
        script, out_flag = BENCHMARKS[name]
        json_path = out / f"bench_{name}.json"
        log_path = out / f"bench_{name}.log"
        target = json_path
        if name in _OUT_DIRS:
            target = out / name
            json_path = target / f"bench_{name}.json"
        cmd = [sys.executable, str(bench_dir / script), out_flag, str(target)]
        if args.tiny:
            cmd += TINY_ARGS[name]
        elif name == "quality":
            cmd += ["--model", args.model]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with log_path.open("w", encoding="utf-8") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        took = time.perf_counter() - t0
        if rc != 0 or not json_path.is_file():
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print(f"{name} failed (rc={rc}, {took:.0f} s); last lines of {log_path}:", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
            status = 1
            continue
        if name in _OUT_DIRS:  # the script writes its own table
            table = (json_path.parent / f"bench_{name}.md").read_text(encoding="utf-8").strip()
        else:
            table = _MARKDOWN[name](json.loads(json_path.read_text(encoding="utf-8")))
        if name not in _OUT_DIRS:
            (out / f"bench_{name}.md").write_text(table + "\n", encoding="utf-8")
        summary += [f"## {name}", "", f"`{' '.join(cmd)}` ({took:.0f} s)", "", table, ""]
        print(table)
        print(f"({took:.0f} s; wrote {json_path}, {out / f'bench_{name}.md'}, {log_path})", flush=True)
    (out / "summary.md").write_text("\n".join(summary), encoding="utf-8")
    print(f"wrote {out / 'summary.md'}")
    return status
