"""benchmarks/bench_deferred.py runs on CPU in its tiny mode (FX graphs, no Inductor): a
smoke run of its rows, its one-in-k deep-step wrapper and its JSON, not a measurement."""

import importlib.util
import json
import os

import torch

from tide_compile.runtime.cudagraphs import GraphedSkipRunner
from tide_compile.runtime.runner import SkipRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_deferred", os.path.join(ROOT, "benchmarks", "bench_deferred.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_deferred_smoke(tmp_path):
    bench = load_bench()
    calls = (SkipRunner.__call__, GraphedSkipRunner.__call__)
    threads = torch.get_num_threads()
    out = tmp_path / "deferred.json"
    new, k, depth = 8, 2, 4
    bench.main(["--tiny", "--no-inductor", "--depths", str(depth), "--ks", str(k),
                "--prompts", "8", "--new", str(new), "--pairs", "1", "--out", str(out)])
    # The runner classes and the thread count are as they were.
    assert (SkipRunner.__call__, GraphedSkipRunner.__call__) == calls
    assert torch.get_num_threads() == threads

    result = json.loads(out.read_text())
    layers = result["env"]["num_layers"]
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"inductor", "propagate_never_exit", "deferred_never_exit",
                         f"propagate_exit@{depth}_k{k}", f"deferred_exit@{depth}_k{k}"}
    for r in rows.values():
        assert r["ms_per_token"] > 0 and r["e2e_ms_per_token"] > 0, r
        assert r["prompt"] == 8
    for name, r in rows.items():
        if r["kv"] == "deferred":
            assert r["steps_by_strategy"].get("deferred", 0) > 0, r
            lo, hi = r["ratio_range"]
            assert lo <= r["ratio_median"] <= hi
        elif r["kv"] == "propagate":
            assert r["steps_by_strategy"].get("skip", 0) > 0, r
    # Forced exit after `depth` layers, decode step i deep when i % k == k - 1: of the
    # new - 1 decode steps, (new - 1) // k run every layer (both kv modes).
    steps = new - 1
    deep = steps // k
    expected = (deep * layers + (steps - deep) * depth) / steps
    for kv in ("propagate", "deferred"):
        r = rows[f"{kv}_exit@{depth}_k{k}"]
        assert r["mean_layers_executed"] < layers
        assert abs(r["mean_layers_executed"] - expected) < 1e-3, (r, expected)
        assert r["deep_step_fraction"] == round(deep / steps, 3)
        assert rows[f"{kv}_never_exit"]["mean_layers_executed"] == layers
    assert {(q["label"], q["k"]) for q in result["pairs"]} == {("never_exit", None),
                                                              (f"exit@{depth}", k)}
