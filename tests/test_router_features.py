"""Smoke test of benchmarks/router_features.py (issue 20's router-feature study).

``--tiny`` (the demo model, 24 calibration samples, 4 held-out windows, CPU) runs in a
fresh interpreter; the JSON must be complete and consistent, and the study's
independent-exit rule on the plain model's states must equal
``reference.forward(kv="deferred")`` exactly. The pieces the numbers rest on are checked
on their own: the candidate logits of the runtime op (k rows of ``lm_head``) equal the
full logits gathered, the full-vocabulary fast path of ``confidence`` equals the general
one, labels, the successor table and the threshold sweep. ``--tiny --heads projection``
trains exit projections and must read them out as the runtime does: the candidate logits
through the projection equal its full logits gathered, and ``reference.forward`` with the
study's routers and projections gives the study's exits and tokens.
``--per-checkpoint-thresholds`` (on in the ``--tiny`` run): the thresholds fitted per
checkpoint meet the target on the data they were fitted on, re-evaluated from the saved
scores; the per-checkpoint rule with all thresholds equal is the study's sweep and
``at_threshold``, and it matches a per-token loop at unequal thresholds.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "router_features.py"


@pytest.fixture(scope="module")
def rf():
    return runpy.run_path(str(SCRIPT), run_name="router_features")


def _run_tiny(out: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *extra], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "router_features.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("router_features")
    return out, _run_tiny(out, "--per-checkpoint-thresholds", "--five-column-combos")


@pytest.fixture(scope="module")
def tiny_projection_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("router_features_projection")
    return out, _run_tiny(out, "--heads", "projection")


def test_tiny_run(tiny_run):
    out, result = tiny_run
    assert result["complete"] is True
    assert (out / "router_features.md").read_text().startswith("# router_features")
    L = result["meta"]["num_layers"]
    assert result["meta"]["checkpoints"] == [1, 3, 5]
    for d, dom in result["domains"].items():
        od = dom["oracle_depth"]
        assert 1 <= od["agree"] <= od["stable"] <= L
        for s, r in dom["recall"].items():
            assert 0.0 <= r["all"] <= 1.0
    names = {(v["name"], v["label"]) for v in result["variants"]}
    assert ("rms", "agree") in names and ("conf:full", "agree") in names
    assert ("conf:succ8", "agree") in names and ("rms+conf:succ8", "agree") in names
    assert ("rms+conf:succ8/5", "agree") in names  # --five-column-combos: the runtime's columns
    for v in result["variants"]:
        for d, r in v["domains"].items():
            for tgt in ("0.99", "0.95"):
                f = r["frontier"][tgt]
                assert f["agreement"] >= float(tgt) - 1e-9
                assert 1 <= f["depth"] <= L
            assert r["frontier"]["0.95"]["depth"] <= r["frontier"]["0.99"]["depth"] + 1e-9
            assert r["curve"]["depth"][0] == L and r["curve"]["agreement"][0] == 1.0  # never exit
    # the states-based rule is reference.forward(kv="deferred")
    for d, c in result["reference_check"].items():
        assert c["exit_rate"] > 0
        assert c["exit_layer_mismatches"] == 0 and c["top1_mismatches"] == 0


def test_tiny_projection_run(tiny_run, tiny_projection_run):
    out, result = tiny_projection_run
    _, ident = tiny_run
    meta = result["meta"]
    assert result["complete"] is True and meta["heads"] == "projection" and ident["meta"]["heads"] == "identity"
    assert "(projection heads)" in (out / "router_features.md").read_text()
    L, layers = meta["num_layers"], meta["checkpoints"]
    pr = meta["projection"]
    assert pr["rank"] == 64 and pr["split_tokens"]["heldout"] == meta["split_tokens"]["heldout"]
    assert pr["device"] == "cpu"  # --projection-device's default
    for c in layers:  # train_projection keeps its best validation epoch: never worse than the identity
        assert pr[str(c)]["val_loss"] <= pr[str(c)]["identity_val_loss"]
    for d, dom in result["domains"].items():
        # the runtime op through the projection head gives the logits the study gathers
        assert dom["candidate_logits_max_abs_diff"] < 1e-3
        # labels and oracle are over the projection heads, not the identity heads
        assert dom["head_agreement"] != ident["domains"][d]["head_agreement"]
        assert dom["identity_heads"]["head_agreement"] == ident["domains"][d]["head_agreement"]
        assert dom["identity_heads"]["oracle_depth"] == ident["domains"][d]["oracle_depth"]
        assert 1 <= dom["oracle_depth"]["agree"] <= dom["oracle_depth"]["stable"] <= L
    for v in result["variants"]:
        for d, r in v["domains"].items():
            for tgt in ("0.99", "0.95"):
                f = r["frontier"][tgt]
                assert 0.0 <= f["depth_frac"] <= 1.0 and f["agreement"] >= float(tgt) - 1e-9
    # reference.forward(kv="deferred") with the study's rms routers and exit projections
    assert result["reference_check_routers"].endswith("exit projections")
    for d, c in result["reference_check"].items():
        assert c["exit_rate"] > 0
        assert c["exit_layer_mismatches"] == 0 and c["top1_mismatches"] == 0


def test_projection_head_readout(rf):
    from tide_compile import demo
    from tide_compile.model_probe import probe
    from tide_compile.routers import ExitProjection

    model, _ = demo.load("demo")
    p = probe(model)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, p.hidden_size, generator=gen) * 3
    proj = ExitProjection(p.hidden_size, 8)
    with torch.no_grad():
        for w in proj.parameters():
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
        full = rf["exit_logits"](p, h, proj).float()
        assert torch.equal(rf["exit_logits"](p, h, None), p.head(h))       # identity: the plain head
        assert not torch.allclose(full, p.head(h).float(), atol=1e-2)       # the projection is applied
        torch.testing.assert_close(full, p.head(proj(h)).float())
        idx = torch.randint(0, p.vocab_size, (6, 16), generator=gen)
        got = rf["candidate_logits"](p.lm_head.weight, rf["head_input"](p, h, proj), idx)
    torch.testing.assert_close(got, full.gather(1, idx), rtol=1e-4, atol=1e-4)


def test_candidate_logits_and_confidence(rf):
    from tide_compile import demo
    from tide_compile.model_probe import probe

    model, _ = demo.load("demo")
    p = probe(model)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, p.hidden_size, generator=gen) * 3
    full = p.head(h).float()
    idx = torch.randint(0, p.vocab_size, (5, 16), generator=gen)
    got = rf["candidate_logits"](p.lm_head.weight, p.final_norm(h), idx)
    torch.testing.assert_close(got, full.gather(1, idx), rtol=1e-4, atol=1e-4)
    fast, t_fast = rf["confidence"](full, None)
    slow, t_slow = rf["confidence"](full, torch.arange(p.vocab_size).repeat(5, 1))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert torch.equal(t_fast, full.argmax(-1)) and torch.equal(t_slow, t_fast)
    # masked candidates: one finite entry -> max prob 1, margin 1, no candidate -> zeros, -1
    z = torch.tensor([[2.0, -math.inf, -math.inf], [-math.inf] * 3])
    f, t = rf["confidence"](z, torch.tensor([[7, 8, 9], [1, 2, 3]]))
    assert f[0, 0] == 1.0 and f[0, 1] == 1.0 and t.tolist() == [7, -1] and f[1].abs().sum() == 0


def test_labels_table_and_sweep(rf):
    TokenSet = rf["TokenSet"]
    head = torch.tensor([[1, 9, 3, 9], [1, 5, 3, 4], [1, 2, 6, 4]])  # [C=3, n=4]
    ts = TokenSet("t", torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                  torch.arange(4), {}, final_top1=torch.tensor([1, 2, 3, 4]), head_top1=head)
    lab = rf["labels"](ts)
    assert lab["agree"].tolist() == [[True, False, True, False], [True, False, True, True],
                                     [True, True, False, True]]
    assert lab["stable"].tolist() == [[True, False, False, False], [True, False, False, True],
                                      [True, True, False, True]]
    table = rf["successor_table"](torch.tensor([0, 0, 0, 1]), torch.tensor([5, 5, 6, 7]), vocab=10, k=3)
    assert table[0].tolist() == [5, 6, 7] and table[1].tolist()[0] == 7
    assert all(len(set(r)) == 3 for r in table.tolist())
    layers, L = [1, 3, 5], 8
    # a perfect router (score = agree) reaches the oracle: agreement 1 at its depth
    agree = lab["agree"]
    sw = rf["sweep"](agree.float(), agree, layers, L)
    assert sw["depth"][0] == L and sw["agreement"][0] == 1.0
    i = rf["at_target"](sw, 1.0)
    assert sw["agreement"][i] == 1.0
    oracle = rf["oracle"](agree, lab["stable"], layers, L)
    assert oracle == {"agree": 3.5, "stable": 5.0}  # first agreeing: 2, 6, 2, 4; stable: 2, 6, 8, 4
    assert float(sw["depth"][i]) == pytest.approx(oracle["agree"])


def test_per_checkpoint_thresholds_tiny(rf, tiny_run):
    out, result = tiny_run
    pres = json.loads((out / "per_checkpoint_thresholds.json").read_text())
    dump = torch.load(out / "pct_scores.pt")
    layers, L = dump["layers"], dump["L"]
    assert layers == result["meta"]["checkpoints"] and len(pres["routers"]) == len(dump["names"]) >= 2
    variants = {(v["name"], v["label"]): v for v in result["variants"]}
    for i, r in enumerate(pres["routers"]):
        assert (r["name"], r["label"]) == tuple(dump["names"][i])
        cs, ca = dump["calibration"]["scores"][i], dump["calibration"]["agree"]
        for tgt in ("0.99", "0.95"):
            fit = r["calibration_split"][tgt]
            th = torch.tensor([math.inf if x is None else x for x in fit["per_checkpoint"]["thresholds"]])
            # re-evaluated with the rule: meets the target where it was fitted, as reported,
            # and never deeper there than the global threshold it started from
            again = rf["at_thresholds"](cs, ca, layers, L, th)
            assert again["agreement"] >= float(tgt) - 1e-9
            assert again["depth"] == pytest.approx(fit["per_checkpoint"]["depth"], abs=1e-3)
            assert again["depth"] <= fit["global"]["depth"] + 1e-3
            for d in dump["domains"]:
                x = r["domains"][d][tgt]
                sc, ag = dump[d]["scores"][i], dump[d]["agree"]
                got = rf["at_thresholds"](sc, ag, layers, L, th)
                assert got["depth"] == pytest.approx(x["per_checkpoint"]["depth"], abs=1e-3)
                assert got["agreement"] == pytest.approx(x["per_checkpoint"]["agreement"], abs=1e-4)
                # (a) is the study's own "cal. t" delivery, (c) its frontier
                study = variants[(r["name"], r["label"])]["domains"][d]
                assert x["global"]["depth"] == pytest.approx(study["calibrated"][tgt]["depth"], abs=1e-3)
                assert x["global"]["agreement"] == pytest.approx(study["calibrated"][tgt]["agreement"], abs=1e-4)
                assert x["frontier_global"]["depth_frac"] == study["frontier"][tgt]["depth_frac"]
                # in-sample per-checkpoint fit: at least as shallow as the global frontier
                assert x["frontier_per_checkpoint"]["agreement"] >= float(tgt) - 1e-9
                assert x["frontier_per_checkpoint"]["depth_frac"] <= x["frontier_global"]["depth_frac"] + 1e-3
    assert (out / "per_checkpoint_thresholds.md").read_text().startswith("# Per-checkpoint thresholds")


def test_per_checkpoint_rule_and_fit(rf):
    gen = torch.Generator().manual_seed(3)
    layers, L, C, n = [1, 3, 5, 7], 10, 4, 300
    agree = torch.rand(C, n, generator=gen) < torch.tensor([0.3, 0.5, 0.7, 0.85])[:, None]
    scores = agree.float() + torch.randn(C, n, generator=gen)
    scores[:, ::25] = -math.inf                      # a window's first token: never exits
    sw = rf["sweep"](scores, agree, layers, L)
    for j in range(0, sw["threshold"].numel(), 7):   # all thresholds equal: the study's rule
        t = float(sw["threshold"][j])
        got = rf["at_thresholds"](scores, agree, layers, L, torch.full((C,), t))
        assert got["depth"] == pytest.approx(float(sw["depth"][j]), abs=1e-9)
        assert got["agreement"] == pytest.approx(float(sw["agreement"][j]), abs=1e-12)
        assert got == pytest.approx(rf["at_threshold"](scores, agree, layers, L, t))
    # unequal thresholds: a per-token loop
    th = torch.tensor([1.5, 0.8, math.inf, -0.2])
    ok = dep = 0.0
    for k in range(n):
        ci = next((i for i in range(C) if scores[i, k] > th[i]), None)
        ok += 1.0 if ci is None else float(agree[ci, k])
        dep += L if ci is None else layers[ci] + 1
    got = rf["at_thresholds"](scores, agree, layers, L, th)
    assert got["agreement"] == pytest.approx(ok / n) and got["depth"] == pytest.approx(dep / n)
    # the fit: feasible, never deeper than the global threshold it starts from
    for tgt in (0.99, 0.95):
        t = float(sw["threshold"][rf["at_target"](sw, tgt)])
        g = rf["at_thresholds"](scores, agree, layers, L, torch.full((C,), t))
        fit = rf["fit_checkpoint_thresholds"](scores, agree, layers, L, tgt, start=torch.full((C,), t))
        assert fit["agreement"] >= tgt - 1e-12 and fit["depth"] <= g["depth"] + 1e-12
        assert rf["at_thresholds"](scores, agree, layers, L, fit["thresholds"])["depth"] == fit["depth"]
