"""kv="deferred" against kv="propagate" and Inductor: decode ms/token (issue 17, "Speed").

GPU, Llama-3.1-8B shape with random weights (``bench_decode.build_model``), bf16, batch 1,
forced routers (``RouterSet.forced(model, exit_at=depth - 1, ...)``: every token exits
after ``depth`` layers), in one process. For each exit depth (``--depths``, 8,16,24) and
each k (``--ks``, 2,4,8) one token in k goes deep:

* **One token in k goes deep** is a benchmark-only wrapper (:class:`DeepEveryK`), a
  context manager that patches ``SkipRunner.__call__`` and ``GraphedSkipRunner.__call__``
  (restored on exit). Only decode-step runners count: an instance of exactly one of those
  two classes whose strategy is ``skip`` (propagate) or ``deferred``; the prompt step's
  runner (Compact/Frozen, or a cut-less graphed one) passes through. A
  ``GraphedSkipRunner`` calls its inner ``SkipRunner`` during its warm-up calls: the
  outermost call counts once and sets the flag on the outermost object (the inner call
  passes through). Calls are counted over every decode-step runner together (a deferred
  generate runs one per step width) and the count is cleared before every ``generate``,
  so decode step ``i`` of each generate (``i = 0`` makes the
  second new token) runs with ``runner.force_deep = runner.force_deep or i % k == k - 1``
  (``or``: a deferred generate sets it itself when its pending buffer is full) and the
  flag is put back as it was after the call. A forced step runs every segment: under
  propagate the exited token's layers after its exit run on its frozen state (the cost of
  a token that does not exit; its output stays its exit head's), under deferred the deep
  step runs the pending tokens' skipped layers. With ``max_pending >= k - 1`` the deferred
  loop forces no extra deep step of its own.

Rows, per prompt length (``--prompts``, 128,512), ``--new`` (128) new tokens each, and
every generate on a cache of ``cache_bucket(prompt + new + max_pending)`` positions (the
same for every row, ``max_cache_len``):

* ``inductor``: the plain model under ``torch.compile`` (Inductor, ``reduce-overhead`` on
  CUDA), the greedy batch-1 loop of ``bench_decode.BucketedLoop`` (prompt step with its
  length dynamic, then one-token steps) on that one cache length;
* ``propagate`` / ``deferred`` (``--max-pending``, 7) per (depth, k):
  ``tide_compile.optimize(model, routers, kv=...).generate(ids, max_new_tokens=new,
  eos_token_id=-1, max_cache_len=...)``;
* ``never_exit`` for both kv modes (``RouterSet.forced(..., exit_at=None)``): the cost of
  the checkpoints, and of the deferred step's width at full depth.

Time: each measurement is ``generate(new)`` and ``generate(1)`` (the prompt step alone),
each between CUDA syncs (process CPU time on a CPU); decode ms/token is their difference
over ``new - 1`` (prefill differs between the modes: propagate compacts the prompt,
deferred runs every layer for it); ``prefill_ms`` and ``e2e_ms_per_token`` are reported
beside it. Each model is warmed up first on every prompt length (compiles, CUDA-graph
captures; ``warmup_s``, excluded), and each row once more before it is timed. propagate and
deferred of one (depth, k, prompt) are timed in interleaved pairs
(``bench_decode.interleaved_pairs``: propagate, deferred, deferred, propagate, ...,
``--pairs``); the row's ms/token is the median of its side, ``ratio_median`` /
``ratio_range`` are those of deferred / propagate per pair (target: <= 1.05 on every
row). ``x_inductor`` is Inductor's ms/token over the row's (medians, not paired).
``mean_layers_executed`` counts decode steps only (the prompt step subtracted),
``steps_by_strategy`` is ``fast.tide_stats``'s over the row's timed generates (prompt
steps included), ``deep_step_fraction`` the decode steps that ran every segment.

Output: ``--out`` JSON (written after every row) and a table.

Usage: python benchmarks/bench_deferred.py [--out deferred.json]
       python benchmarks/bench_deferred.py --tiny --no-inductor   # CPU smoke, < 60 s
"""

from __future__ import annotations

import argparse
import functools
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
from tide_compile.runtime.cudagraphs import GraphedSkipRunner  # noqa: E402
from tide_compile.runtime.model import cache_bucket  # noqa: E402
from tide_compile.runtime.runner import SkipRunner  # noqa: E402


def _load_bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode_for_deferred",
                                                  os.path.join(HERE, "bench_decode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_decode = _load_bench_decode()

DECODE_STRATEGIES = ("skip", "deferred")


class DeepEveryK:
    """Benchmark-only: every ``k``-th decode step of a generate runs deep (module doc).

    ``k`` may change between generates (None: no step is forced). ``tag`` names the row
    whose steps are counted in ``steps`` / ``deep`` (decode steps, and those that ran
    every segment). Call :meth:`reset` before every ``generate``."""

    CLASSES = (SkipRunner, GraphedSkipRunner)

    def __init__(self) -> None:
        self.k: int | None = None
        self.tag = ""
        self.calls: dict[Any, int] = {}
        self.steps: dict[str, int] = {}
        self.deep: dict[str, int] = {}
        self._inside = False
        self._saved: dict[type, Callable] = {}

    def reset(self) -> None:
        self.calls.clear()

    def __enter__(self) -> "DeepEveryK":
        for cls in self.CLASSES:
            original = cls.__dict__["__call__"]
            self._saved[cls] = original
            cls.__call__ = self._wrap(original)
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, original in self._saved.items():
            cls.__call__ = original
        self._saved.clear()

    @classmethod
    def decode_step(cls, runner: Any) -> bool:
        return type(runner) in cls.CLASSES and runner.strategy in DECODE_STRATEGIES

    def _wrap(self, original: Callable) -> Callable:
        bench = self

        def __call__(runner: Any, *args: Any) -> Any:
            if bench._inside or not DeepEveryK.decode_step(runner):
                return original(runner, *args)  # a prompt step, or a graphed runner's inner call
            # One count over every decode runner: a deferred generate runs one per step
            # width (1, 2, 4, .. max_pending + 1), picked by how many tokens are pending.
            n = bench.calls.get("decode", 0)
            bench.calls["decode"] = n + 1
            saved = runner.force_deep
            if bench.k is not None:
                runner.force_deep = saved or n % bench.k == bench.k - 1
            bench._inside = True
            try:
                out = original(runner, *args)
            finally:
                bench._inside = False
                runner.force_deep = saved
            bench.steps[bench.tag] = bench.steps.get(bench.tag, 0) + 1
            bench.deep[bench.tag] = bench.deep.get(bench.tag, 0) + int(runner.reached_end)
            return out

        return __call__


def clock(device: str) -> float:
    """Seconds: wall time after a CUDA sync, or this process's CPU time on a CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def snapshot(fast) -> tuple[int, int]:
    s = fast.tide_stats
    return s.total_tokens, s.layers_executed


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="small model for a CPU smoke run (defaults: --interval 2 --depths 4 "
                         "--ks 2,4 --prompts 16 --new 16 --pairs 2)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="no Inductor (baseline: Dynamo's eager backend; tide: inductor=False)")
    ap.add_argument("--depths", default=None, help="exit depths, comma list (8,16,24)")
    ap.add_argument("--ks", default=None, help="one token in k goes deep, comma list (2,4,8)")
    ap.add_argument("--prompts", default=None, help="prompt lengths, comma list (128,512)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per generate (128)")
    ap.add_argument("--pairs", type=int, default=None,
                    help="interleaved propagate/deferred pairs per row (3)")
    ap.add_argument("--max-pending", type=int, default=7)
    ap.add_argument("--interval", type=int, default=None, help="checkpoint_interval (8)")
    ap.add_argument("--rows", default="inductor,never,exits",
                    help="comma list of: inductor, never (never-exit rows), exits (the grid); "
                         "on an H200 the whole grid compiles for longer than one 600 s call: "
                         "split it by --depths")
    ap.add_argument("--time-budget", type=float, default=float("inf"),
                    help="start no new exit depth after this many seconds")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU only: torch threads (1: a shared machine's other load does not "
                         "show up as spinning worker threads in the CPU time)")
    ap.add_argument("--gate", default=None,
                    help="DIR:N: one of N processes on one GPU that compile in parallel and "
                         "time one at a time (bench_decode.TimingGate); give each process one "
                         "role: --rows inductor, or --rows exits with one depth")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="JSON files of gated processes: one result (x_inductor filled in "
                         "from the inductor row), written to --out, and its table")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    full = {"depths": "8,16,24", "ks": "2,4,8", "prompts": "128,512", "new": 128, "pairs": 3,
            "interval": 8}
    tiny = {"depths": "4", "ks": "2,4", "prompts": "16", "new": 16, "pairs": 2, "interval": 2}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.depths, args.ks, args.prompts = (parse_ints(args.depths), parse_ints(args.ks),
                                          parse_ints(args.prompts))
    if args.new < 2:
        ap.error("--new must be >= 2 (decode time is generate(new) - generate(1))")
    if args.pairs < 1 or any(k < 1 for k in args.ks):
        ap.error("--pairs and every k must be >= 1")
    args.rows = set(args.rows.split(","))
    if not args.rows <= {"inductor", "never", "exits"}:
        ap.error(f"--rows: unknown {sorted(args.rows - {'inductor', 'never', 'exits'})}")
    return args


def merge(paths: list[str], out: str | None) -> dict:
    """One result from gated processes' files: their rows and pairs in file order, every
    tide row's ``x_inductor`` from the inductor row of its prompt length (measured in the
    same call, timed while no other process ran)."""
    _, result = bench_decode.merge_parts(paths, ("rows", "pairs"))
    inductor_ms = {r["prompt"]: r["ms_per_token"] for r in result["rows"] if r["kv"] is None}
    for r in result["rows"]:
        if r["kv"] is not None and r["prompt"] in inductor_ms and r["ms_per_token"] > 0:
            r["x_inductor"] = round(inductor_ms[r["prompt"]] / r["ms_per_token"], 3)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inductor = not args.no_inductor
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, inductor)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: str, inductor: bool) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.time()
    gate = bench_decode.TimingGate(args.gate)
    with gate.exclusive():
        model = bench_decode.build_model(args.tiny, device, dtype)
    num_layers = model.config.num_hidden_layers
    cfg = TIDEConfig(checkpoint_interval=args.interval)
    checkpoints = cfg.checkpoint_layers(num_layers)
    for d in args.depths:
        if d - 1 not in checkpoints:
            raise SystemExit(f"--depths: {d} is not a checkpoint depth "
                             f"({[c + 1 for c in checkpoints]})")
    prompts = {}
    for p in args.prompts:
        g = torch.Generator().manual_seed(args.seed + p)
        prompts[p] = torch.randint(0, model.config.vocab_size, (1, p), generator=g).to(device)
    cache_len = {p: cache_bucket(p + args.new + args.max_pending) for p in args.prompts}
    env = {"torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "clock": "wall, CUDA-synced" if device == "cuda" else "process CPU time",
           "dtype": str(dtype), "num_layers": num_layers, "checkpoints": checkpoints,
           "depths": args.depths, "ks": args.ks, "prompts": args.prompts, "new": args.new,
           "pairs": args.pairs, "max_pending": args.max_pending, "inductor": inductor,
           "cache_len": cache_len, "tiny": args.tiny,
           "threads": torch.get_num_threads() if device == "cpu" else None,
           "gate": args.gate}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    print(json.dumps(env), flush=True)
    result: dict = {"env": env, "rows": [], "pairs": []}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    def row(r: dict) -> dict:
        result["rows"].append(r)
        print(json.dumps(r), flush=True)
        save()
        return r

    deep = DeepEveryK()

    def timed_generate(fast, ids, n: int, tag: str) -> float:
        deep.tag = tag
        deep.reset()
        t0 = clock(device)
        fast.generate(ids, max_new_tokens=n, eos_token_id=-1, max_cache_len=cache_len[ids.shape[1]])
        return (clock(device) - t0) * 1e3

    class Side:
        """One tide model's measurements for one row: decode ms/token per measurement,
        prefill and end-to-end, decode-only layer counts."""

        def __init__(self, fast, kv: str, ids) -> None:
            self.fast, self.kv, self.ids = fast, kv, ids
            self.decode, self.prefill, self.e2e = [], [], []
            self.tokens = self.layers = 0

        def measure(self) -> list[float]:
            t0, l0 = snapshot(self.fast)
            one = timed_generate(self.fast, self.ids, 1, self.kv)
            t1, l1 = snapshot(self.fast)
            full = timed_generate(self.fast, self.ids, args.new, self.kv)
            t2, l2 = snapshot(self.fast)
            self.tokens += (t2 - t1) - (t1 - t0)
            self.layers += (l2 - l1) - (l1 - l0)
            ms = (full - one) / (args.new - 1)
            self.decode.append(ms)
            self.prefill.append(one)
            self.e2e.append(full / args.new)
            return [ms]

    def warm(fast, kv: str) -> dict[int, float]:
        """First generate(new) and generate(1) of every prompt length (compiles, captures),
        then one more of each; seconds per prompt length."""
        spent = {}
        for p, ids in prompts.items():
            t0 = time.time()
            for n in (args.new, 1, args.new, 1):
                timed_generate(fast, ids, n, kv)
            spent[p] = round(time.time() - t0, 2)
        return spent

    inductor_ms: dict[int, float] = {}

    def tide_rows(label: str, depth: int | None, ks: list[int | None]) -> None:
        torch._dynamo.reset()
        exit_at = None if depth is None else depth - 1
        routers = RouterSet.forced(model, exit_at=exit_at, config=cfg)
        fasts, warmup = {}, {}
        deep.k = None if ks[0] is None else min(ks)  # the warm-up runs deep steps too
        for kv in ("propagate", "deferred"):
            fasts[kv] = tide_compile.optimize(model, routers, kv=kv,
                                              max_pending=args.max_pending, inductor=inductor)
            warmup[kv] = warm(fasts[kv], kv)
        gate.arrive()
        with gate.exclusive():
            timed_ks(label, depth, ks, fasts, warmup)
        del fasts
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    def timed_ks(label: str, depth: int | None, ks: list[int | None], fasts: dict,
                 warmup: dict) -> None:
        for k in ks:
            deep.k = k
            for p, ids in prompts.items():
                for kv, fast in fasts.items():  # once more at this k, untimed
                    Side(fast, kv, ids).measure()
                    fast.tide_stats.reset()
                sides = {kv: Side(fasts[kv], kv, ids) for kv in fasts}
                deep.steps.clear()
                deep.deep.clear()
                paired = bench_decode.interleaved_pairs(
                    sides["propagate"].measure, sides["deferred"].measure, args.pairs, 0)
                ratio = {"ratio_median": paired["ratio_median"],
                         "ratio_range": paired["ratio_range"], "pairs": paired["pairs"]}
                where = {"depth": depth if depth is not None else num_layers, "k": k,
                         "prompt": p}
                for kv, side in sides.items():
                    ms = statistics.median(side.decode)
                    stats = side.fast.tide_stats
                    steps = deep.steps.get(kv, 0)
                    r = {"name": f"{kv}_{label}" + (f"_k{k}" if k is not None else ""),
                         "kv": kv, **where, "ms_per_token": round(ms, 4),
                         "ms_range": [round(min(side.decode), 4), round(max(side.decode), 4)],
                         "prefill_ms": round(statistics.median(side.prefill), 3),
                         "e2e_ms_per_token": round(statistics.median(side.e2e), 4),
                         "x_inductor": (round(inductor_ms[p] / ms, 3)
                                        if p in inductor_ms and ms > 0 else None),
                         "mean_layers_executed": (round(side.layers / side.tokens, 3)
                                                  if side.tokens else None),
                         "mean_layers_executed_all": round(stats.mean_layers_executed, 3),
                         "steps_by_strategy": dict(stats.steps_by_strategy),
                         "deep_step_fraction": round(deep.deep.get(kv, 0) / steps, 3)
                         if steps else None,
                         "warmup_s": warmup[kv][p]}
                    if kv == "deferred":
                        r.update(ratio)
                        r["regret_checked"] = stats.regret_checked
                    row(r)
                result["pairs"].append({"label": label, **where, **ratio,
                                        "within_5pct": paired["ratio_median"] <= 1.05})

    def inductor_rows() -> None:
        """The plain model, one compiled forward for every prompt length."""
        torch._dynamo.reset()
        if inductor:
            fn = torch.compile(model.forward, mode="reduce-overhead" if device == "cuda" else None,
                               fullgraph=True, dynamic=False)
        else:
            fn = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
        mark = device == "cuda" and inductor
        loops = {p: bench_decode.BucketedLoop(model, fn, device, mark,
                                              max_cache_len=cache_len[p]) for p in prompts}

        def run(p: int, n: int) -> float:
            t0 = clock(device)
            loops[p].generate(prompts[p], n)
            return (clock(device) - t0) * 1e3

        warm_s = {}
        for p in prompts:
            t0 = time.time()
            for n in (args.new, 1, args.new, 1):
                run(p, n)
            warm_s[p] = round(time.time() - t0, 2)
        gate.arrive()
        with gate.exclusive():
            for p in prompts:
                inductor_timed(p, functools.partial(run, p), warm_s[p])

    def inductor_timed(p: int, run: Callable[[int], float], warm_s: float) -> None:
        decode, prefill, e2e = [], [], []
        for _ in range(args.pairs):
            one, full = run(1), run(args.new)
            decode.append((full - one) / (args.new - 1))
            prefill.append(one)
            e2e.append(full / args.new)
        inductor_ms[p] = statistics.median(decode)
        row({"name": "inductor", "kv": None, "depth": num_layers, "k": None, "prompt": p,
             "ms_per_token": round(inductor_ms[p], 4),
             "ms_range": [round(min(decode), 4), round(max(decode), 4)],
             "prefill_ms": round(statistics.median(prefill), 3),
             "e2e_ms_per_token": round(statistics.median(e2e), 4), "x_inductor": 1.0,
             "mean_layers_executed": num_layers, "warmup_s": warm_s})

    with torch._dynamo.config.patch(recompile_limit=64), deep:
        if "inductor" in args.rows:
            inductor_rows()
        if "never" in args.rows:
            tide_rows("never_exit", None, [None])
        for d in args.depths if "exits" in args.rows else []:
            if time.time() - start > args.time_budget:
                print(f"# skipped depth {d}: time budget", flush=True)
                continue
            tide_rows(f"exit@{d}", d, args.ks)
    env["total_s"] = round(time.time() - start, 1)
    env["gate_waited_s"] = gate.waited_s
    save()
    print_table(result)
    return result


def print_table(result: dict) -> None:
    rows = result["rows"]
    unit = "CPU ms" if result["env"]["clock"] == "process CPU time" else "ms"
    print(f"\ndecode {unit}/token (median of pairs); deferred/propagate: median [range] of "
          "interleaved pairs; x Ind: Inductor ms / row ms; layers: decode layers/token")
    print("\n| prompt | row | k | propagate | deferred | deferred/propagate | x Ind (p / d) "
          "| layers (p / d) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kv"] is None:
            print(f"| {r['prompt']} | inductor | | {r['ms_per_token']:.3f} | | | 1.000 | "
                  f"{r['mean_layers_executed']} |")
    by_key = {}
    for r in rows:
        if r["kv"] is not None:
            label = r["name"].split("_", 1)[1].rsplit("_k", 1)[0]
            by_key.setdefault((r["prompt"], label, r["k"]), {})[r["kv"]] = r
    for (prompt, label, k), pair in by_key.items():
        p, d = pair.get("propagate"), pair.get("deferred")
        if p is None or d is None:
            continue
        lo, hi = d["ratio_range"]
        print(f"| {prompt} | {label} | {k if k is not None else ''} | {p['ms_per_token']:.3f} | "
              f"{d['ms_per_token']:.3f} | {d['ratio_median']:.3f} [{lo:.3f}-{hi:.3f}] | "
              f"{p['x_inductor']} / {d['x_inductor']} | "
              f"{p['mean_layers_executed']} / {d['mean_layers_executed']} |")
    ok = [q["within_5pct"] for q in result["pairs"] if q["label"] != "never_exit"]
    if ok:
        print(f"\ndeferred within 5% of propagate: {sum(ok)}/{len(ok)} rows")


if __name__ == "__main__":
    main()
