"""Smoke test of benchmarks/bench_quality.py (--tiny: the demo model, on the CPU).

Runs the script's ``main`` in a fresh interpreter (so that it can also check that the
script never imports ``datasets``, which the GPU machine does not have) and checks the
structure of ``bench_quality.json`` and what must hold on any routers: rates in [0, 1],
depths in [1, L], and a threshold that never exits (1.0) equals the plain model in both
K/V modes (all-token agreement 1, perplexity change 0, greedy continuations identical).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_quality.py"

_RUN = """
import json, runpy, sys
bench = runpy.run_path(sys.argv[1], run_name="bench_quality")
bench["main"](sys.argv[2:])
print("DATASETS_IMPORTED=" + json.dumps("datasets" in sys.modules))
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quality")
    argv = ["--tiny", "--no-progress", "--threads", "2", "--router-features", "rms,rms+conf",
            "--confidence-k", "16", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(SCRIPT), *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench_quality.json").read_text())
    return out, result, proc.stdout


def _rate(x):
    return x is None or 0.0 <= x <= 1.0


def test_outputs_and_no_datasets(tiny_run):
    out, result, stdout = tiny_run
    assert "DATASETS_IMPORTED=false" in stdout
    assert result["complete"] is True
    assert (out / "bench_quality.md").read_text().startswith("# bench_quality")
    assert (out / "routers" / "identity_k4.tide").is_file()
    assert (out / "routers" / "projection_k4.tide").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "bench_quality.png").stat().st_size > 0
    assert "| domain | routers |" in stdout  # the printed summary table


def test_structure_and_ranges(tiny_run):
    _, result, _ = tiny_run
    meta = result["meta"]
    L = meta["num_layers"]
    assert meta["model"] == "demo" and L == 8
    assert set(result["domains"]) == {"code", "prose"}
    for dom in result["domains"].values():
        assert dom["tokens"] == meta["windows"] * meta["window"]
        assert dom["plain_ppl"] > 1.0
        heads = dom["identity_head_agreement"]
        assert [int(k) for k in heads] == list(range(L - 1))
        assert all(_rate(v) for v in heads.values())
        assert 1.0 <= dom["identity_oracle_mean_depth"] <= L
    assert [rs["name"] for rs in result["router_sets"]] == [
        "identity_k4", "identity_k4_conf", "projection_k4", "projection_k4_conf"]
    assert meta["router_features"] == ["rms", "rms+conf"] and meta["confidence_k"] == 16
    for rs in result["router_sets"]:
        assert rs["router_features"] == (["rms", "conf"] if rs["name"].endswith("_conf") else ["rms"])
        assert rs["checkpoints"] == [3]
        assert {tr["threshold"] for tr in rs["thresholds"]} >= {0.5, 1.0}
        for dname, ceiling in rs["ceilings"].items():
            assert list(ceiling["head_agreement"]) == ["3"] and _rate(ceiling["head_agreement"]["3"])
            if rs["exit_strategy"] == "identity":  # the same head as the every-layer ceiling
                assert ceiling["head_agreement"]["3"] == result["domains"][dname]["identity_head_agreement"]["3"]
        _check_rows(rs, L, meta)


def _check_rows(rs, L, meta):
    for tr in rs["thresholds"]:
        for dname, d in tr["domains"].items():
            assert 1.0 <= rs["ceilings"][dname]["oracle_mean_depth"] <= L
            for kv in ("propagate", "deferred"):
                row = d[kv]
                for key in ("exit_rate", "agreement_all", "agreement_exiting", "regret_rate",
                            "predicted_agreement_all"):
                    assert _rate(row[key]), (key, row[key])
                assert 1.0 <= row["mean_depth"] <= L
                assert row["ppl"] > 0 and math.isfinite(row["ppl_change"])
                if kv == "propagate":
                    assert row["layers_executed"] == row["mean_depth"]
                    assert row["kv_fill_layers"] == pytest.approx(L - row["mean_depth"], abs=1e-3)
                else:
                    assert row["layers_executed"] == L
                exited = sum(row["exits_per_layer"].values())
                assert exited == round(row["exit_rate"] * row["tokens"])
                assert set(row["exits_per_layer"]) <= {"3"}
                g = row["greedy"]
                assert _rate(g["identical_share"]) and 0 <= g["mean_identical_prefix"] <= meta["new_tokens"]
            # kv='deferred' from reference.forward equals the independent exits computed from
            # the plain model's states (same semantics, the same float32 CPU ops up to shapes).
            check = d["deferred"]["check_vs_states"]
            assert check["exit_layer_mismatches"] == 0
            assert check["top1_mismatches"] <= 1


def test_never_exit_equals_plain(tiny_run):
    _, result, _ = tiny_run
    rows = [tr for rs in result["router_sets"] for tr in rs["thresholds"] if tr["threshold"] == 1.0]
    assert rows
    for tr in rows:
        assert tr["predicted"]["token_agreement"] == 1.0
        for d in tr["domains"].values():
            for kv in ("propagate", "deferred"):
                row = d[kv]
                assert row["exit_rate"] == 0.0 and row["agreement_exiting"] is None
                assert row["agreement_all"] == 1.0
                assert abs(row["ppl_change"]) < 1e-6
                assert row["within_1pt"] is True
                assert row["greedy"]["identical_share"] == 1.0
                assert row["greedy"]["mean_identical_prefix"] == result["meta"]["new_tokens"]


def test_exits_happen_and_heldout_is_not_calibration(tiny_run):
    _, result, _ = tiny_run
    # Threshold 0.5 on routers trained with class-balanced labels: some tokens exit, so the
    # exit paths (and the deferred cross-check) are exercised, not only never-exit.
    assert any(tr["domains"][d][kv]["exit_rate"] > 0
               for rs in result["router_sets"] for tr in rs["thresholds"] if tr["threshold"] == 0.5
               for d in tr["domains"] for kv in ("propagate", "deferred"))
    cal = {p.name for k in ("code/calibration", "shakespeare/train") for p in (REPO / "data" / k).glob("*.txt")}
    for dom in result["domains"].values():
        assert dom["files"] and not set(dom["files"]) & cal
