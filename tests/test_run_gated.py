"""benchmarks/run_gated.py and bench_decode.TimingGate: gated processes compile side by side
and time one at a time; the gated benchmarks' --merge."""

import importlib.util
import json
import os
import sys
import textwrap

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROLE = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {bench!r})
    from bench_decode import TimingGate

    delay, out = float(sys.argv[1]), sys.argv[2]
    gate = TimingGate(sys.argv[sys.argv.index("--gate") + 1])
    time.sleep(delay)                      # "compiling"
    arrived = time.time()
    gate.arrive()
    with gate.exclusive():                 # "timing"
        start = time.time()
        time.sleep(0.3)
        end = time.time()
    json.dump({{"arrived": arrived, "start": start, "end": end}}, open(out, "w"))
""")


def test_gated_processes_time_one_at_a_time_after_all_compiled(tmp_path):
    run_gated = load("run_gated")
    role = tmp_path / "role.py"
    role.write_text(ROLE.format(bench=BENCH))
    delays = (0.0, 0.6, 1.2)
    commands = [f"{sys.executable} {role} {d} {tmp_path / f'r{i}.json'}" for i, d in enumerate(delays)]
    # A process that dies before it arrives must not keep the others waiting.
    commands.append(f"{sys.executable} -c 'import sys; sys.exit(3)'")
    failed = run_gated.main(commands + ["--logs", str(tmp_path / "logs"), "--tail", "2"])
    assert failed == 1
    records = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(len(delays))]
    last_arrival = max(r["arrived"] for r in records)
    for r in records:
        assert r["start"] >= last_arrival  # nobody timed while another still "compiled"
    spans = sorted((r["start"], r["end"]) for r in records)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end  # the timed sections never overlapped


def test_gate_spec_errors(tmp_path):
    bench_decode = load("bench_decode")
    for bad in ("nocount", f"{tmp_path}:0", f"{tmp_path}:x", ":2"):
        with pytest.raises(SystemExit, match="--gate"):
            bench_decode.TimingGate(bad)
    gate = bench_decode.TimingGate(None)  # one process: no-ops
    gate.arrive()
    with gate.exclusive():
        pass
    assert gate.waited_s == 0.0


def test_deferred_merge_fills_x_inductor(tmp_path):
    bench_deferred = load("bench_deferred")
    env = {"clock": "wall, CUDA-synced"}
    ind = {"env": env, "pairs": [], "rows": [
        {"name": "inductor", "kv": None, "prompt": 128, "ms_per_token": 6.0,
         "mean_layers_executed": 32}]}
    rows = [{"name": f"{kv}_exit@8_k2", "kv": kv, "prompt": 128, "k": 2, "ms_per_token": ms,
             "x_inductor": None, "mean_layers_executed": 20.0,
             **({"ratio_median": 1.0, "ratio_range": [0.9, 1.1]} if kv == "deferred" else {})}
            for kv, ms in (("propagate", 3.0), ("deferred", 4.0))]
    exits = {"env": env, "rows": rows,
             "pairs": [{"label": "exit@8", "ratio_median": 1.0, "within_5pct": True}]}
    paths = []
    for name, part in (("ind", ind), ("d8", exits)):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    merged = bench_deferred.merge(paths, str(tmp_path / "m.json"))
    got = {r["name"]: r["x_inductor"] for r in merged["rows"] if r["kv"]}
    assert got == {"propagate_exit@8_k2": 2.0, "deferred_exit@8_k2": 1.5}
    assert json.loads((tmp_path / "m.json").read_text())["pairs"] == exits["pairs"]


def test_lossless_merge_fills_x_plain_and_the_projection(tmp_path):
    bench_lossless = load("bench_lossless")
    env = {"clock": "wall, CUDA-synced", "max_pending": 7}
    parts = {
        "plain": [{"name": "plain", "model": "8B-shape", "ms_per_token": 5.0, "x_plain": 1.0}],
        "fixed": [{"name": "lossless_never_exit_fixed", "model": "8B-shape",
                   "ms_per_token": 6.0, "x_plain": None}],
        "ceiling": [{"name": "lossless_ceiling@16", "model": "8B-shape", "depth": 16,
                     "ms_per_token": 2.5, "x_plain": None}],
        "demo": [{"name": "demo:plain", "model": "demo", "ms_per_token": 1.0},
                 {"name": "demo:lossless", "model": "demo", "ms_per_token": 0.8}],
    }
    paths = []
    for name, rows in parts.items():
        for r in rows:
            r["tokens_per_s"] = round(1e3 / r["ms_per_token"], 1)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"env": env, "rows": rows, "projection": []}))
        paths.append(str(path))
    merged = bench_lossless.merge(paths, None)
    x = {r["name"]: r["x_plain"] for r in merged["rows"]}
    assert x == {"plain": 1.0, "lossless_never_exit_fixed": round(5 / 6, 3),
                 "lossless_ceiling@16": 2.0, "demo:plain": 1.0, "demo:lossless": 1.25}
    (p,) = merged["projection"]
    assert p == bench_lossless.projection_row(16, 5.0, 6.0, 2.5, 7)
    assert p["t_stop_ms"] == round((8 * 2.5 - 6.0) / 7, 4)


def test_lossless_merge_compares_tokens_across_processes(tmp_path):
    """Model rows timed in separate processes: first_mismatch comes from their recorded
    tokens against the same model's plain row, per prompt (None: identical)."""
    bench_lossless = load("bench_lossless")
    env = {"clock": "wall, CUDA-synced", "max_pending": 7}
    plain = [[1, 2, 3, 4], [5, 6, 7, 8]]
    parts = {
        "plain": {"name": "demo:plain", "model": "demo", "ms_per_token": 1.0, "tokens": plain},
        "same": {"name": "demo:lossless", "model": "demo", "ms_per_token": 0.9,
                 "tokens": [[1, 2, 3, 4], [5, 6, 7, 8]]},
        "differs": {"name": "demo:speculative", "model": "demo", "ms_per_token": 2.0,
                    "tokens": [[1, 2, 9, 4], [5, 6, 7]]},
        "other": {"name": "smollm2:lossless", "model": "smollm2", "ms_per_token": 1.0,
                  "tokens": [[0, 0, 0, 0]]},
    }
    paths = []
    for name, r in parts.items():
        r["tokens_per_s"] = round(1e3 / r["ms_per_token"], 1)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"env": env, "rows": [r], "projection": []}))
        paths.append(str(path))
    rows = {r["name"]: r for r in bench_lossless.merge(paths, None)["rows"]}
    assert rows["demo:lossless"]["first_mismatch"] == [None, None]
    assert rows["demo:speculative"]["first_mismatch"] == [2, 3]  # a change, a short row
    assert "first_mismatch" not in rows["demo:plain"]
    assert "first_mismatch" not in rows["smollm2:lossless"]  # no plain row of its model
