"""The command line: demo, generate, tune, bench, and the ``python -m`` entry point.

Subcommands run in-process through ``main(argv)`` on the shipped demo model (CPU,
Inductor off, small settings); one subprocess checks ``python -m tide_compile``.
Speed numbers are printed, never asserted.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tide_compile import RouterSet, TIDEConfig, demo
from tide_compile.cli import main
from tide_compile.cli_demo import DEMO_ROUTERS, demo_calibration_texts
from tide_compile.tune import TuneResult, TuneRow, parse_thresholds, sweep

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_python_m_help() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tide_compile", "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("demo", "calibrate", "generate", "tune", "bench"):
        assert name in proc.stdout


def test_shipped_routers_fit_the_demo_model() -> None:
    model, _ = demo.load()
    routers = RouterSet.load(DEMO_ROUTERS, model=model)
    assert routers.checkpoint_layers == [1, 3, 5]
    assert 0.0 < routers.config.exit_threshold < 1.0
    assert routers.calibration["target_agreement"] == 0.95


def test_demo_calibration_text_is_disjoint_from_heldout() -> None:
    paragraphs = demo_calibration_texts()
    taken = set(demo.heldout_text().split("\n\n"))
    assert len(paragraphs) > 1000 and not taken.intersection(paragraphs)


def test_demo(capsys) -> None:
    before = torch.get_num_threads()
    rc, out, _ = run(["demo", "--max-new-tokens", "16", "--repeats", "1"], capsys)
    assert rc == 0
    assert "Total tokens" in out and "Mean depth" in out and "Layers executed per token" in out
    assert "routers: shipped" in out
    assert out.count("tokens/s") >= 2
    assert "plain model.generate (eager)" in out and "tide, threshold" in out
    assert "tide / plain:" in out
    assert "Note: with a 4M-parameter model on a CPU" in out  # the demo model on a CPU
    assert "Is this a dagger" in out  # the prompt, echoed in the generated text
    assert torch.get_num_threads() == before  # --threads is restored


def test_generate_strategy_options(tmp_path, capsys) -> None:
    """generate with saved (forced) routers from a model folder, under each strategy."""
    model, _ = demo.load()
    forced = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    path = tmp_path / "forced.tide"
    forced.save(path)
    base = ["generate", "--model", str(demo.DEMO_DIR), "--routers", str(path), "--prompt",
            "ROMEO.\nWhat light", "--max-new-tokens", "4", "--threshold", "0.5", "--dtype",
            "fp32", "--device", "cpu"]
    # Strategies are kv="propagate" settings; under the default kv="deferred" they are refused.
    rc, _, err = run(base + ["--strategy", "compact"], capsys)
    assert rc == 1 and "applies to kv='propagate' only" in err
    base += ["--kv", "propagate"]
    # Compacting prefill (every token exits at layer 1: the prompt stops there too).
    rc, out, _ = run(base + ["--strategy", "compact", "--compaction-threshold", "1"], capsys)
    assert rc == 0 and "Layers executed per token: 2.00 / 8" in out
    # auto: this short prompt runs frozen (all 8 layers) unless compact_min_length allows it.
    rc, out, _ = run(base, capsys)
    assert rc == 0 and "Layers executed per token: 2.00 / 8" not in out
    # The saved routers are used: every token exits at layer 1 (exits per layer, depth).
    assert out.startswith("ROMEO.\nWhat light")
    assert "Layer 1:" in out and "(100.0%)" in out and "Mean depth: 2.00 / 8 layers" in out
    assert "new tokens in" in out
    rc, out, _ = run(base + ["--compact-min-length", "0"], capsys)
    assert rc == 0 and "Layers executed per token: 2.00 / 8" in out
    # Frozen: every layer runs for every token.
    rc, out, _ = run(base + ["--strategy", "frozen"], capsys)
    assert rc == 0 and "Layers executed per token: 8.00 / 8" in out
    with pytest.raises(SystemExit):
        run(base + ["--compaction-threshold", "2"], capsys)


def test_generate_kv_deferred(tmp_path, capsys) -> None:
    """--kv deferred: forced exits after layer 1 of 8; decode steps stop there until
    --max-pending tokens wait, then one step runs every layer for them (the prompt runs
    all 8 layers: its K/V must be exact too)."""
    model, _ = demo.load()
    forced = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    path = tmp_path / "forced.tide"
    forced.save(path)
    base = ["generate", "--model", "demo", "--routers", str(path), "--prompt",
            "ROMEO.\nWhat light", "--max-new-tokens", "7", "--threshold", "0.5"]
    rc, out, _ = run(base + ["--kv", "deferred", "--max-pending", "2"], capsys)
    assert rc == 0 and "Steps by strategy: deferred 6, frozen 1" in out
    prompt = len(demo.load()[1]("ROMEO.\nWhat light")["input_ids"])
    # 6 decode steps: 2 stop after 2 layers, the third runs 8, twice.
    want = (8 * prompt + 2 * 4 + 8 * 2) / (prompt + 6)
    assert f"Layers executed per token: {want:.2f} / 8" in out
    with pytest.raises(SystemExit):
        run(base + ["--kv", "exact"], capsys)


def test_generate_errors(tmp_path, capsys) -> None:
    rc, _, err = run(["generate", "--model", str(tmp_path / "nope"), "--routers", "r.tide",
                      "--prompt", "x"], capsys)
    assert rc == 1 and "no model folder" in err
    rc, _, err = run(["generate", "--model", "demo", "--routers", str(tmp_path / "missing.tide"),
                      "--prompt", "x"], capsys)
    assert rc == 1 and "no router file" in err


def test_tune_writes_table_and_png(tmp_path, capsys) -> None:
    out_dir = tmp_path / "tune"
    rc, out, _ = run(["tune", "--model", "demo", "--thresholds", "0.9,1.0", "--window", "64",
                      "--max-tokens", "256", "--new-tokens", "4", "--prompt-tokens", "8",
                      "--repeats", "1", "--target", "0.5", "--out", str(out_dir), "--quiet"], capsys)
    assert rc == 0
    assert "| threshold | exit rate |" in out and "smallest swept threshold" in out
    for name in ("tune.md", "tune.csv", "tune.json", "tune.png"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out_dir / "tune.csv").open()))
    assert [float(r["threshold"]) for r in rows] == [0.9, 1.0]
    result = json.loads((out_dir / "tune.json").read_text())
    assert result["scored_tokens"] == 256
    assert result["settings"]["kv"] == "deferred"  # the semantics optimize runs by default
    never = result["rows"][1]
    # threshold 1.0 never exits: tide's logits are the full model's
    assert never["exit_rate"] == 0.0 and never["mean_depth"] == 8.0 and never["agreement"] == 1.0
    assert abs(never["perplexity_change"]) < 1e-6
    assert never["tokens_per_s"] > 0 and never["plain_tokens_per_s"] > 0
    assert never["decode_layers_per_token"] == 8.0
    low = result["rows"][0]
    assert low["exit_rate"] > 0 and low["mean_depth"] < 8.0


def test_tune_without_matplotlib_says_how(tmp_path, capsys, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rc, _, err = run(["tune", "--model", "demo", "--thresholds", "0.9", "--window", "32",
                      "--max-tokens", "32", "--new-tokens", "0", "--out", str(tmp_path), "--quiet"], capsys)
    assert rc == 1 and "tide-compile[bench]" in err and "--no-plot" in err
    assert (tmp_path / "tune.md").is_file()  # the table is written before the plot


def test_tune_bad_input(tmp_path, capsys) -> None:
    rc, _, err = run(["tune", "--model", "demo", "--thresholds", "0.5,1.5", "--out", str(tmp_path)], capsys)
    assert rc == 1 and "outside [0, 1]" in err
    rc, _, err = run(["tune", "--model", str(tmp_path), "--routers", "r.tide", "--out", str(tmp_path)], capsys)
    assert rc == 1 and "--data" in err
    model, tokenizer = demo.load()
    routers = RouterSet.load(DEMO_ROUTERS, model=model)
    with pytest.raises(ValueError, match="kv must be one of"):
        sweep(model, tokenizer, routers, ["text"], [0.5], kv="exact")


def test_parse_thresholds_and_smallest() -> None:
    assert parse_thresholds("0.9, 0.5,0.9") == [0.5, 0.9]
    with pytest.raises(ValueError, match="not a number"):
        parse_thresholds("0.5,x")
    rows = [TuneRow(t, 0.1, 7.0, a, 10.0, 0.01) for t, a in ((0.5, 0.90), (0.7, 0.97), (0.8, 0.94), (0.9, 0.99))]
    result = TuneResult(rows, 8, [1, 3, 5], 100, 64, 9.0, None)
    assert result.smallest_threshold(0.95) == 0.9  # 0.7 passes, but 0.8 above it does not
    assert result.smallest_threshold(0.999) is None
    assert "| full model (plain generate) |" in result.markdown() and "n/a" in result.markdown()


def test_bench_without_cuda(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = run(["bench", "--out", str(tmp_path / "b")], capsys)
    assert rc != 0
    assert "no CUDA GPU" in err and "--tiny" in err and "RESULTS.md" in err
    assert not (tmp_path / "b").exists()


def test_bench_quality_takes_the_model_and_runs_without_cuda(tmp_path, capsys, monkeypatch) -> None:
    """`bench --only quality --model M` needs no GPU and hands M to bench_quality.py, whose
    own table (written into its output folder) is the one shown; the script is faked."""
    import subprocess

    from tide_compile import cli_bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        folder = Path(cmd[cmd.index("--out") + 1])
        folder.mkdir(parents=True)
        (folder / "bench_quality.json").write_text("{}")
        (folder / "bench_quality.md").write_text("| domain | routers |\n|---|---|\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cli_bench.subprocess, "run", fake_run)
    rc, out, err = run(["bench", "--only", "quality", "--model", "demo", "--out", str(tmp_path / "b")],
                       capsys)
    assert rc == 0, err
    assert len(seen) == 1 and seen[0][1].endswith("bench_quality.py")
    assert seen[0][seen[0].index("--model") + 1] == "demo"
    assert "| domain | routers |" in out and "| domain | routers |" in (tmp_path / "b" / "summary.md").read_text()


def test_bench_missing_scripts(tmp_path, capsys) -> None:
    rc, _, err = run(["bench", "--benchmarks", str(tmp_path), "--tiny"], capsys)
    assert rc == 1 and "source checkout" in err


def test_bench_tiny_decode_args_are_bench_decode_flags() -> None:
    """The tiny decode run passes only flags bench_decode.py takes, two interleaved pairs
    among them (the run itself compiles with Inductor: too slow for a CPU test; the
    pairs themselves are run by test_traffic.test_bench_decode_smoke)."""
    from tide_compile.cli_bench import TINY_ARGS

    args = TINY_ARGS["decode"]
    assert args[args.index("--pairs") + 1] == "2"
    help_text = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_decode.py"),
                                "--help"], capture_output=True, text=True, check=True).stdout
    assert all(a in help_text for a in args if a.startswith("--"))


def test_bench_tiny_calibration_runs(tmp_path, capsys) -> None:
    out_dir = tmp_path / "b"
    rc, out, err = run(["bench", "--tiny", "--only", "calibration", "--out", str(out_dir)], capsys)
    assert rc == 0, err
    result = json.loads((out_dir / "bench_calibration.json").read_text())
    assert result["shape"] == "tiny"
    assert "| samples | 32 |" in (out_dir / "bench_calibration.md").read_text()
    assert (out_dir / "summary.md").is_file() and "| field | value |" in out


def test_bench_tiny_compact_runs(tmp_path, capsys) -> None:
    out_dir = tmp_path / "b"
    rc, out, err = run(["bench", "--tiny", "--only", "compact", "--out", str(out_dir)], capsys)
    assert rc == 0, err
    result = json.loads((out_dir / "bench_compact.json").read_text())
    names = {r["name"] for r in result["rows"] if "ms" in r}
    assert {"eager", "tide frozen", "tide compact", "tide auto"} <= names
    table = (out_dir / "bench_compact.md").read_text()
    assert "| prefill | 64 | 0.7 | tide compact |" in table and "auto within 2% of frozen" in table


def test_bench_tables_of_recorded_gpu_results() -> None:
    from tide_compile.cli_bench import calibration_markdown, decode_markdown

    decode = json.loads((REPO / "benchmarks" / "results" / "bench_decode.json").read_text())
    table = decode_markdown(decode)
    assert "NVIDIA H200" in table and "| tide_exit@8 | 2.538 | 2.36 | 3.036 | 0.778 | 8.0 |" in table
    calib = json.loads((REPO / "benchmarks" / "results" / "bench_calibration.json").read_text())
    assert "| total_min | 0.563 |" in calibration_markdown(calib)


def test_generate_mode_lossless(tmp_path, capsys) -> None:
    """--mode lossless: forced exits after layer 1 of the demo model are drafts the deep
    steps verify; the text is the plain model's greedy continuation and the lossless
    stats are printed. --kv propagate and --strategy are refused in one line."""
    import torch

    model, tok = demo.load()
    forced = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    path = tmp_path / "forced.tide"
    forced.save(path)
    prompt, new = "ROMEO.\nWhat light", 8
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    base = ["generate", "--model", "demo", "--routers", str(path), "--prompt", prompt,
            "--max-new-tokens", str(new), "--threshold", "0.5", "--mode", "lossless"]
    rc, out, _ = run(base, capsys)
    assert rc == 0, out
    assert out.startswith(tok.decode(plain[0], skip_special_tokens=True) + "\n")
    assert "Drafted:" in out and "Drafted: 0," not in out and "Adaptive fallback:" in out
    rc, _, err = run(base + ["--kv", "propagate"], capsys)
    assert rc == 1 and "drop --kv propagate" in err
    rc, _, err = run(base + ["--strategy", "skip"], capsys)
    assert rc == 1 and "drop --strategy" in err
