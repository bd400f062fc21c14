"""benchmarks/bench_lossless.py runs on CPU in its tiny mode (FX graphs, no Inductor): a
smoke run of its ceiling rows, projections and JSON, not a measurement."""

import importlib.util
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_lossless", os.path.join(ROOT, "benchmarks", "bench_lossless.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_lossless_smoke(tmp_path):
    bench = load_bench()
    threads = torch.get_num_threads()
    out = tmp_path / "lossless.json"
    new, depth = 8, 2
    bench.main(["--tiny", "--no-inductor", "--depths", str(depth), "--new", str(new),
                "--max-pending", "3", "--out", str(out)])
    assert torch.get_num_threads() == threads

    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "lossless_never_exit", "lossless_never_exit_fixed",
                         f"lossless_ceiling@{depth}"}
    for r in rows.values():
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["x_plain"] > 0, r
    fixed = rows["lossless_never_exit_fixed"]  # every step a deep step, nothing drafted
    assert fixed["drafted"] == 0 and fixed["plain_step_fraction"] == 0.0
    assert fixed["tokens_per_deep_step"] == 1.0 and fixed["fallbacks"] == 0
    assert rows["lossless_never_exit"]["drafted"] == 0
    ceiling = rows[f"lossless_ceiling@{depth}"]
    if ceiling["drafted"]:  # the zeroed layers: every draft is the full model's token
        assert ceiling["acceptance"] == 1.0
        assert ceiling["draft_depths"] == {str(depth): ceiling["drafted"]}
    (p,) = result["projection"]
    assert p["depth"] == depth and "projection" in p["kind"]
    assert set(p["at_acceptance"]) == {"0.6", "0.8", "0.9"}
    for v in p["at_acceptance"].values():
        assert 1 <= v["best_pending"] <= 3 and v["best_speedup"] >= v["speedup"]
        assert v["with_fallback"] >= 1.0


def test_bench_lossless_model_rows_interleaved(tmp_path):
    """The demo model's rows (real weights, shipped routers) are timed interleaved in one
    process: per-measurement ratios to the plain row, the same prompts' tokens, and
    greedy lossless output equal to the plain loop's (fp32 CPU)."""
    bench = load_bench()
    out = tmp_path / "models.json"
    new, repeats = 6, 2
    bench.main(["--rows", "models", "--models", "demo", "--no-inductor", "--new", str(new),
                "--prompts", "1", "--prompt-tokens", "16", "--repeats", str(repeats),
                "--max-pending", "3", "--out", str(out),
                "--model-rows", "plain,lossless,lossless_fixed,plain_unguarded"])
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"demo:plain", "demo:lossless", "demo:lossless_fixed",
                         "demo:plain_unguarded"}
    plain = rows["demo:plain"]
    assert len(plain["decode_ms"]) == repeats and len(plain["tokens"][0]) == new
    for kind in ("lossless", "lossless_fixed"):
        r = rows[f"demo:{kind}"]
        assert len(r["decode_ms"]) == repeats
        ratios = [p / t for p, t in zip(plain["decode_ms"], r["decode_ms"])]
        lo, hi = r["x_plain_paired_range"]
        assert lo == round(min(ratios), 3) and hi == round(max(ratios), 3)
        assert lo <= r["x_plain_paired"] <= hi
        assert r["tokens"] == plain["tokens"] and r["first_mismatch"] == [None]
        base = rows["demo:plain_unguarded"]["decode_ms"]  # the claim's second baseline
        ratios = [b / t for b, t in zip(base, r["decode_ms"])]
        assert r["x_unguarded_paired_range"] == [round(min(ratios), 3), round(max(ratios), 3)]
    unguarded = rows["demo:plain_unguarded"]  # the plain loop, steps after the second
    assert unguarded["tokens"] == plain["tokens"] and "acceptance" not in unguarded
    assert len(unguarded["decode_ms"]) == repeats and unguarded["x_plain_paired"] > 0
    assert "x_unguarded_paired" not in unguarded and "x_unguarded_paired" not in plain
    fixed = rows["demo:lossless_fixed"]  # always drafts: every step a stop or a deep step
    assert fixed["plain_step_fraction"] == 0.0 and fixed["fallbacks"] == 0


def test_diag_fallback_smoke(tmp_path):
    """benchmarks/diag_fallback.py on the demo model (real weights, FX graphs, CPU): every
    row runs and times, and every row that decodes the prompt gives the plain loop's
    tokens (a smoke run of the rows, not a measurement)."""
    spec = importlib.util.spec_from_file_location(
        "diag_fallback", os.path.join(ROOT, "benchmarks", "diag_fallback.py"))
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    out = tmp_path / "diag.json"
    result = diag.main(["--no-inductor", "--new", "6", "--prompt-tokens", "12", "--rounds", "2",
                        "--no-profile", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    assert set(rows) == {"plain", "plain_unguarded", "lossless", "lossless_guarded",
                         "lossless_steady", "bare"}
    # (wall-clock differences of two short generates: their sign is noise on a loaded CPU)
    assert all(math.isfinite(r["ms_per_token"]) and len(r["ms"]) == 2 for r in rows.values())
    assert all(r["tokens_equal_plain"] for k, r in rows.items() if k != "bare"), rows
    assert rows["bare"]["tokens_equal_plain"] is None


def test_diag_mismatch_finds_the_tokens_logits(tmp_path):
    """benchmarks/diag_mismatch.py on a made-up result (demo model, real weights): a row
    that took the runner-up token at new token 2 is reported with the fp32 gap between
    the two tokens' logits, which equals the top-2 margin, and fp32 picks the plain
    row's token."""
    spec = importlib.util.spec_from_file_location(
        "diag_mismatch", os.path.join(ROOT, "benchmarks", "diag_mismatch.py"))
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    from tide_compile import cli_demo, demo

    bench = load_bench()
    model, tok = demo.load("demo", dtype=torch.float32, device="cpu")
    prompt = bench.model_prompts(tok, cli_demo.heldout_texts("demo"), 1, 16)[0]
    with torch.no_grad():
        seq = model.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        runner_up = int(model(seq[:, :-1]).logits[0, -1].topk(2).indices[1])
    plain = seq[0, prompt.shape[1]:].tolist()
    row = plain[:2] + [runner_up]
    src = tmp_path / "result.json"
    src.write_text(json.dumps({"env": {"device": "made up"}, "rows": [
        {"name": "demo:plain", "prompt_tokens": [prompt.shape[1]], "tokens": [plain]},
        {"name": "demo:lossless_fixed", "prompt_tokens": [prompt.shape[1]], "tokens": [row],
         "first_mismatch": [2]}]}))
    found = diag.main([str(src), "--out", str(tmp_path / "out.json")])
    assert len(found) == 1
    f = found[0]
    assert (f["new_token"], f["plain_token"], f["row_token"]) == (2, plain[2], runner_up)
    assert f["fp32"]["argmax"] == plain[2] and f["fp32"]["gap"] > 0
    assert math.isclose(f["fp32"]["gap"], f["fp32"]["top2_margin"], abs_tol=1e-3)
    assert json.loads((tmp_path / "out.json").read_text())["mismatches"] == found
