"""Bad input gets one clear line and loses nothing (issue 18).

Table-driven: the command line (a few cases through a subprocess, the rest in process
through ``main(argv)``), output files, router file loading (with a hypothesis fuzz of the
loader), the evidence behind ``threshold_for`` (in test_calibration), and the API
argument checks of :mod:`tide_compile.validation`.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from tide_compile import ExitProjection, RouterSet, TIDEConfig, TokenRouter, demo
from tide_compile.calibration import quality
from tide_compile.cli import main
from tide_compile.outputs import atomic_write, check_output_dir, check_output_file
from tide_compile.routers import RouterFileError
from tide_compile.validation import (
    TIDEError,
    check_attention_mask,
    check_backend_options,
    check_generate_args,
    check_graph_for_routers,
    check_input_ids,
    check_min_layers,
    check_sampling,
    graph_fingerprint,
)

from tiny_models import make_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TIDE_DEBUG": ""}


# ----------------------------------------------------------------------------- helpers
# Progress bars (transformers' "Loading weights", datasets' "Generating ...") are not errors.
_PROGRESS = re.compile(r"\d+/\d+ \[|it/s\]|examples/s\]|examples \[")


def one_line(err: str) -> str:
    """The single line of stderr besides progress bars (asserting there is exactly one)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not _PROGRESS.search(ln)]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    import tide_compile.cli_demo as cli_demo

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(cli_demo, "load_any", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs for the CLI cases: text (good, Latin-1, binary), model folders (no config,
    no weights, no tokenizer), a read-only folder."""
    d = tmp_path_factory.mktemp("bad_input")
    text = d / "text.txt"
    text.write_text(demo.heldout_text()[:4000], encoding="utf-8")
    (d / "latin1.txt").write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    (d / "binary.txt").write_bytes(b"text\x00\x01\x02")
    (d / "notes.txt").write_text("my notes\n")
    (d / "empty_dir").mkdir()
    (d / "config_only").mkdir()
    (d / "config_only" / "config.json").write_text("{}")
    make_model("llama", 2).save_pretrained(d / "no_tokenizer")
    readonly = d / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    return {"dir": d, "text": text, "latin1": d / "latin1.txt", "binary": d / "binary.txt",
            "notes": d / "notes.txt", "empty_dir": d / "empty_dir", "config_only": d / "config_only",
            "no_tokenizer": d / "no_tokenizer", "readonly": readonly}


def _unwritable_folder(files: dict[str, Path]) -> Path:
    # root writes through permission bits; /proc takes no new files from anyone.
    return Path("/proc") if os.geteuid() == 0 else files["readonly"]


# ----------------------------------------------------------------------------- CLI: subprocess
def _python_m(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tide_compile", *args], capture_output=True,
                          text=True, env=env or ENV, cwd=REPO, timeout=300)


def test_cli_error_in_a_process(files) -> None:
    """``python -m tide_compile`` on a folder that is not a model: one line, status 1.
    (Each process costs seconds; the other cases run in process through ``main``.)"""
    proc = _python_m(["calibrate", "--model", str(files["empty_dir"]), "--data", str(files["text"]),
                      "--out", str(files["dir"] / "r.tide")])
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert line == (f"tide-compile calibrate: error: no config.json in {files['empty_dir']}: it is not a "
                    "HuggingFace model folder (pass a local HuggingFace model folder, or one of: demo, "
                    "smollm2; save one with model.save_pretrained(folder))")


def test_ctrl_c_is_one_line_and_status_130(tmp_path) -> None:
    """A real SIGINT during calibration: one line, status 130, the old --out intact."""
    out = tmp_path / "r.tide"
    out.write_bytes(b"the old routers")
    text = tmp_path / "t.txt"
    text.write_text("ROMEO.\nWhat light\n" * 20)
    code = (
        "import os, signal, sys, time\n"
        # Python leaves SIGINT ignored when it starts ignored (a background job of a
        # non-interactive shell): install the KeyboardInterrupt handler explicitly.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import tide_compile.calibration as c\n"
        "def interrupted(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        # The handler runs when the main thread next checks for signals: wait for it.
        "    for _ in range(1000):\n"
        "        time.sleep(0.01)\n"
        "    raise SystemExit('no KeyboardInterrupt within 10 s of the SIGINT')\n"
        "c.calibrate = interrupted\n"
        "from tide_compile.cli import main\n"
        f"sys.exit(main(['calibrate', '--model', 'demo', '--data', {str(text)!r}, '--out', "
        f"{str(out)!r}, '--force', '--quiet']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 130, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if "tide-compile" in ln]
    assert line == ["tide-compile calibrate: interrupted (no output file was left half-written)"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b"the old routers"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.tide", "t.txt"]


# ----------------------------------------------------------------------------- CLI: in process
_CAL = ["calibrate", "--model", "demo", "--data", "{text}", "--out"]

CLI_CASES = [
    # (id, argv, expected substring of the one line)
    ("model is a file", ["calibrate", "--model", "{notes}", "--data", "{text}", "--out", "{dir}/r.tide"],
     "is a file, not a model folder"),
    ("model folder without weights", ["calibrate", "--model", "{config_only}", "--data", "{text}",
                                      "--out", "{dir}/r.tide"], "no weights in"),
    ("model folder without tokenizer", ["calibrate", "--model", "{no_tokenizer}", "--data", "{text}",
                                        "--out", "{dir}/r.tide"], "no tokenizer files in"),
    ("missing model", ["calibrate", "--model", "{dir}/nope", "--data", "{text}", "--out", "{dir}/r.tide"],
     "no model folder at"),
    ("Latin-1 text", ["calibrate", "--model", "demo", "--data", "{latin1}", "--out", "{dir}/r.tide"],
     "latin1.txt is not utf-8 text (byte 0xe9"),
    ("binary text", ["calibrate", "--model", "demo", "--data", "{binary}", "--out", "{dir}/r.tide"],
     "binary.txt is not text: it holds a NUL byte"),
    ("out in a missing folder", _CAL + ["{dir}/nodir/sub/r.tide"], "does not exist: create it first"),
    ("out is a folder", _CAL + ["{empty_dir}"], "is a folder"),
    ("out exists", _CAL + ["{notes}"], "exists: pass --force"),
    ("out is the data file", _CAL + ["{text}", "--force"], "is an input of this run"),
    ("out is the model's weights", _CAL + [str(demo.DEMO_DIR / "model.safetensors"), "--force"],
     "is an input of this run"),
    ("plot exists", _CAL + ["{dir}/r.tide", "--plot", "{notes}"], "exists: pass --force"),
    ("tune out is a file", ["tune", "--model", "demo", "--out", "{notes}"], "is a file, not a folder"),
    ("tune out in a missing folder", ["tune", "--model", "demo", "--out", "{dir}/nodir/sub"],
     "does not exist"),
    ("demo save-routers exists", ["demo", "--save-routers", "{notes}"], "exists: pass --force"),
    ("empty prompt", ["generate", "--model", "demo", "--prompt", ""], "--prompt is empty"),
    ("temperature nan", ["generate", "--model", "demo", "--prompt", "x", "--do-sample",
                         "--temperature", "nan"], "temperature must be a finite number > 0"),
    ("temperature 0", ["generate", "--model", "demo", "--prompt", "x", "--temperature", "0"],
     "temperature must be a finite number > 0"),
    ("top-p -1", ["generate", "--model", "demo", "--prompt", "x", "--top-p", "-1"], "top_p must be in (0, 1]"),
    ("top-p nan", ["generate", "--model", "demo", "--prompt", "x", "--top-p", "nan"], "top_p must be in (0, 1]"),
    ("top-k -3", ["generate", "--model", "demo", "--prompt", "x", "--top-k", "-3"], "top_k must be an integer >= 0"),
    ("top-k not a number", ["generate", "--model", "demo", "--prompt", "x", "--top-k", "x"], "not an integer"),
    ("threshold 2", ["generate", "--model", "demo", "--prompt", "x", "--threshold", "2"], "must be in [0, 1]"),
]


@pytest.mark.parametrize("argv, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_before_any_work(files, no_model_load, capsys, argv, match) -> None:
    notes_before = files["notes"].read_bytes()
    weights = demo.DEMO_DIR / "model.safetensors"
    weights_stat = weights.stat()
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 1, err
    line = one_line(err)
    assert line.startswith(f"tide-compile {argv[0]}: error: ") and match in line, line
    assert "Traceback" not in err
    # Nothing was written or replaced.
    assert files["notes"].read_bytes() == notes_before
    assert weights.stat().st_mtime_ns == weights_stat.st_mtime_ns
    assert not (files["dir"] / "r.tide").exists()


def test_cli_out_in_an_unwritable_folder(files, no_model_load, capsys) -> None:
    folder = _unwritable_folder(files)
    rc, _, err = run_cli(["calibrate", "--model", "demo", "--data", str(files["text"]), "--out",
                          str(folder / "r.tide")], capsys)
    assert rc == 1 and "cannot write to the folder" in one_line(err)


def test_cli_tune_out_with_old_tables_needs_force(files, no_model_load, capsys) -> None:
    out = files["dir"] / "tune_old"
    out.mkdir(exist_ok=True)
    (out / "tune.json").write_text("{}")
    rc, _, err = run_cli(["tune", "--model", "demo", "--out", str(out)], capsys)
    assert rc == 1 and "tune.json' exists: pass --force" in one_line(err)
    assert (out / "tune.json").read_text() == "{}"


def test_cli_broken_router_file(files, capsys) -> None:
    broken = files["dir"] / "broken.tide"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    rc, _, err = run_cli(["generate", "--model", "demo", "--routers", str(broken), "--prompt", "x",
                          "--max-new-tokens", "1"], capsys)
    assert rc == 1 and "is not a safetensors router file (its header is not JSON)" in one_line(err)


@pytest.mark.parametrize("debug", ["--debug", "TIDE_DEBUG=1"])
def test_cli_debug_shows_the_traceback(files, capsys, monkeypatch, debug) -> None:
    argv = ["calibrate", "--model", str(files["empty_dir"]), "--data", str(files["text"]), "--out",
            str(files["dir"] / "r.tide")]
    if debug == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("TIDE_DEBUG", "1")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err and "ModelLoadError" in err
    assert err.splitlines()[-1].startswith("tide-compile calibrate: error: no config.json in")
    rc, _, err = run_cli(["--debug", *argv[:-1]] if debug == "--debug" else argv, capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err  # --debug before the command too


def test_cli_unexpected_error_is_one_line_and_debug_shows_it(files, capsys, monkeypatch) -> None:
    import tide_compile.cli_demo as cli_demo

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli_demo, "load_any", boom)
    argv = ["calibrate", "--model", "demo", "--data", str(files["text"]), "--out", str(files["dir"] / "u.tide")]
    rc, _, err = run_cli(argv, capsys)
    line = one_line(err)
    assert rc == 1 and "RuntimeError: boom" in line and "--debug" in line and "second line" not in line
    monkeypatch.setenv("TIDE_DEBUG", "1")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err and 'raise RuntimeError("boom' in err
    assert err.splitlines()[-1].startswith("tide-compile calibrate: error: RuntimeError: boom")


def test_cli_ctrl_c_in_process_keeps_the_old_file(files, capsys, monkeypatch) -> None:
    import tide_compile.calibration as calibration

    out = files["dir"] / "kept.tide"
    out.write_bytes(b"old")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "calibrate", interrupted)
    rc, _, err = run_cli(["calibrate", "--model", "demo", "--data", str(files["text"]), "--out",
                          str(out), "--force", "--quiet"], capsys)
    assert rc == 130 and one_line(err).endswith("interrupted (no output file was left half-written)")
    assert out.read_bytes() == b"old"


def test_cli_too_small_calibration_says_so(files, capsys) -> None:
    """The issue's `--samples 1 --threshold-target 0.95`: a one-line warning, and the saved
    threshold is 1.0 (no exits) instead of a number no held-out token supports."""
    out = files["dir"] / "small.tide"
    rc, stdout, err = run_cli(["calibrate", "--model", "demo", "--data", str(files["text"]), "--out",
                               str(out), "--samples", "1", "--max-length", "32", "--threshold-target",
                               "0.95", "--quiet"], capsys)
    assert rc == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("tide-compile calibrate: warning:")]
    assert len(warned) == 1 and "too small to support held-out agreement 0.95" in warned[0]
    assert "exit_threshold 1.00 (no token exits)" in stdout
    routers = RouterSet.load(out)
    assert routers.config.exit_threshold == 1.0
    # report() shows how few exiting tokens back each row.
    assert "exiting" in str(routers.report()) and "*" in str(routers.report())


# ----------------------------------------------------------------------------- output files
def _small_routers(num_layers: int = 4, seed: int = 0, projection: bool = True) -> RouterSet:
    torch.manual_seed(seed)
    model = make_model("llama", num_layers)
    config = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
    info = RouterSet.describe(model)
    layers = config.checkpoint_layers(num_layers)
    routers = {c: TokenRouter(info["hidden_size"], 8) for c in layers}
    proj = {layers[0]: ExitProjection(info["hidden_size"], 4)} if projection else None
    scores = {c: torch.rand(300) for c in layers}
    agree = {c: torch.rand(300) > 0.3 for c in layers}
    table = quality.quality_table(scores, agree, num_layers, thresholds=(0.1, 0.5, 0.9))
    return RouterSet(routers, model_info=info, config=config, exit_projections=proj,
                     calibration={"kind": "test"}, quality_table=table)


def test_save_refuses_overwrite_and_writes_atomically(tmp_path, monkeypatch) -> None:
    routers = _small_routers()
    path = tmp_path / "r.tide"
    path.write_bytes(b"old")
    with pytest.raises(TIDEError, match="exists: pass overwrite=True"):
        routers.save(path)
    assert path.read_bytes() == b"old"

    # An interrupted write leaves the old file and no temporary file.
    import safetensors.torch

    def half_then_interrupt(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        routers.save(path, overwrite=True)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["r.tide"]
    monkeypatch.undo()

    # The mode follows the umask (no 0600 left behind).
    old_mask = os.umask(0o027)
    try:
        routers.save(path, overwrite=True)
    finally:
        os.umask(old_mask)
    assert (path.stat().st_mode & 0o777) == 0o640
    assert RouterSet.load(path).checkpoint_layers == routers.checkpoint_layers


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda d: d, {}, "is a folder"),
        (lambda d: d / "missing" / "x", {}, "does not exist"),
        (lambda d: d / "file.txt" / "x", {}, "is not a folder"),
        (lambda d: d / "file.txt", {}, "exists: pass overwrite=True"),
        (lambda d: d / "file.txt", {"inputs": ["{dir}/file.txt"], "overwrite": True}, "is an input"),
        (lambda d: d / "link.txt", {"inputs": ["{dir}/file.txt"], "overwrite": True}, "is an input"),
        (lambda d: Path("/dev/null"), {"overwrite": True}, "not a regular file"),
    ],
)
def test_check_output_file(tmp_path, make, kwargs, match) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "link.txt").symlink_to(tmp_path / "file.txt")
    kwargs = {k: [i.format(dir=tmp_path) for i in v] if k == "inputs" else v for k, v in kwargs.items()}
    with pytest.raises(TIDEError, match=match):
        check_output_file(make(tmp_path), **kwargs)
    assert check_output_file(tmp_path / "new.tide") == tmp_path / "new.tide"
    assert check_output_file(tmp_path / "file.txt", overwrite=True) == tmp_path / "file.txt"


def test_check_output_dir_and_tune_tables(tmp_path) -> None:
    from tide_compile.tune import TuneResult, TuneRow, write_tables

    result = TuneResult([TuneRow(0.9, 0.1, 7.0, 0.99, 10.0, 0.01)], 8, [1, 3, 5], 100, 64, 9.0, None)
    paths = write_tables(result, tmp_path / "t")  # created: its parent exists
    assert [p.name for p in paths] == ["tune.md", "tune.csv", "tune.json"]
    with pytest.raises(TIDEError, match="tune.md' exists"):
        write_tables(result, tmp_path / "t")
    assert write_tables(result, tmp_path / "t", overwrite=True) == paths
    with pytest.raises(TIDEError, match="does not exist"):
        write_tables(result, tmp_path / "a" / "b")
    with pytest.raises(TIDEError, match="is a file"):
        check_output_dir(paths[0], ["x"])


def test_calibrate_checks_save_path_before_any_work(tmp_path) -> None:
    import tide_compile

    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    existing = tmp_path / "r.tide"
    existing.write_text("old")
    not_a_model = object()  # any work would fail on it with another error
    with pytest.raises(TIDEError, match="exists: pass overwrite=True"):
        tide_compile.calibrate(not_a_model, None, dataset=[Path(text)], save_path=existing)
    with pytest.raises(TIDEError, match="is an input"):
        tide_compile.calibrate(not_a_model, None, dataset=str(text), save_path=text, overwrite=True)
    assert existing.read_text() == "old" and text.read_text() == "hello\n"


def test_atomic_write_cleans_up_on_error(tmp_path) -> None:
    target = tmp_path / "x.json"

    def fail(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- router files
@pytest.fixture(scope="module")
def router_file(tmp_path_factory) -> tuple[Path, RouterSet]:
    path = tmp_path_factory.mktemp("routers") / "r.tide"
    routers = _small_routers()
    routers.save(path)
    return path, routers


def _parts(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["tide_compile"])


def _write(path: Path, tensors: dict[str, torch.Tensor], meta) -> Path:
    save_file(tensors, str(path), metadata={"tide_compile": json.dumps(meta)})
    return path


def _mutate(meta: dict, tensors: dict, case: str):
    m = json.loads(json.dumps(meta))
    t = {k: v.clone() for k, v in tensors.items()}
    if case == "json list":
        return [m], t
    if case == "no model":
        del m["model"]
    elif case == "no router":
        del m["router"]
    elif case == "changed checkpoints":
        m["checkpoint_layers"] = [0, 2]
    elif case == "string checkpoints":
        m["checkpoint_layers"] = [str(c) for c in m["checkpoint_layers"]]
    elif case == "unsorted checkpoints":
        m["checkpoint_layers"] = [2, 1, 0]
    elif case == "checkpoint at the last layer":
        m["checkpoint_layers"] = [0, 1, 3]
    elif case == "200k checkpoints":
        m["checkpoint_layers"] = list(range(200_000))
        m["model"]["num_layers"] = 200_001
    elif case == "huge hidden size":  # would have been 2 x 2^20 x 2^16 floats (512 GiB)
        m["model"]["hidden_size"] = 1 << 20
        m["router"]["bottleneck_dim"] = 1 << 16
    elif case == "bottleneck beyond bounds":
        m["router"]["bottleneck_dim"] = 10 ** 9
    elif case == "huge projection rank":
        m["exit_projection_rank"] = {"0": 1 << 20}
    elif case == "projection at no checkpoint":
        m["exit_projection_rank"] = {"7": 4}
    elif case == "eps nan":
        m["router"]["eps"] = float("nan")
    elif case == "version as string":
        m["format_version"] = "1"
    elif case == "bad config":
        m["config"]["exit_threshold"] = 5
    elif case == "bad quality row":
        row = next(r for r in m["quality_table"] if r.get("view") == "first_exit")
        del row["exits"]
    elif case == "checksum changed":
        m["tensors_sha256"] = "0" * 64
    elif case == "weights changed":
        t["routers.1.up.bias"] += 1.0
    elif case == "nan weights":
        t["routers.1.down.weight"][0, 0] = float("nan")
        del m["tensors_sha256"]
    elif case == "inf projection":
        t["exit_projections.0.up.bias"][3] = float("inf")
        del m["tensors_sha256"]
    elif case == "tensor dtype int":
        t["routers.1.up.bias"] = t["routers.1.up.bias"].to(torch.int32)
    else:
        raise KeyError(case)
    return m, t


ROUTER_FILE_CASES = [
    ("json list", "not an object"),
    ("no model", "'model' is missing"),
    ("no router", "'router' is missing"),
    ("changed checkpoints", "has tensors the metadata does not describe"),
    ("string checkpoints", "checkpoint_layers is"),
    ("unsorted checkpoints", "not strictly increasing"),
    ("checkpoint at the last layer", "the final layer is never a checkpoint"),
    ("200k checkpoints", "model.num_layers"),
    ("huge hidden size", "has shape"),
    ("bottleneck beyond bounds", "router.bottleneck_dim"),
    ("huge projection rank", "exit_projection_rank at layer 0"),
    ("projection at no checkpoint", "names layer '7'"),
    ("eps nan", "router.eps"),
    ("version as string", "format version '1'"),
    ("bad config", "config is invalid"),
    ("bad quality row", "quality_table row"),
    ("checksum changed", "do not match the checksum"),
    ("weights changed", "do not match the checksum"),
    ("nan weights", "router weights at checkpoint 1 (routers.1.down.weight) hold NaN or Inf"),
    ("inf projection", "exit projection weights at checkpoint 0"),
    ("tensor dtype int", "tensor routers.1.up.bias is I32; router weights are floats"),
]


@pytest.mark.parametrize("case, match", ROUTER_FILE_CASES, ids=[c[0] for c in ROUTER_FILE_CASES])
def test_router_file_errors(router_file, tmp_path, case, match) -> None:
    tensors, meta = _parts(router_file[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m, t = _mutate(meta, tensors, case)
    path = _write(tmp_path / "bad.tide", t, m)
    with pytest.raises(RouterFileError, match=match.replace("(", r"\(").replace(")", r"\)")) as err:
        RouterSet.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 256, f"loading a {path.stat().st_size}-byte file raised peak RSS by {grown_mb:.0f} MB"


def test_router_file_bytes_errors(router_file, tmp_path, monkeypatch) -> None:
    data = router_file[0].read_bytes()
    cases = [
        (data[:5], "too short"),
        (data[:200], "header claims"),
        (data[: len(data) - 4], "byte range"),
        ((10 ** 9).to_bytes(8, "little") + data[8:], "header claims"),
        (data[:8] + b"[" + data[9:], "not JSON"),
    ]
    for i, (raw, match) in enumerate(cases):
        path = tmp_path / f"b{i}.tide"
        path.write_bytes(raw)
        with pytest.raises(RouterFileError, match=match):
            RouterSet.load(path)
    import tide_compile.routers as routers_mod

    monkeypatch.setattr(routers_mod, "MAX_FILE_BYTES", 1000)
    with pytest.raises(RouterFileError, match="larger than any router file"):
        RouterSet.load(router_file[0])


def test_router_file_checksum_and_older_files(router_file, tmp_path) -> None:
    path, routers = router_file
    tensors, meta = _parts(path)
    assert len(meta["tensors_sha256"]) == 64
    loaded = RouterSet.load(path)
    for key, value in routers.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    del meta["tensors_sha256"]  # as written before checksums existed
    old = RouterSet.load(_write(tmp_path / "old.tide", tensors, meta))
    assert old.checkpoint_layers == routers.checkpoint_layers
    assert old.quality_table == routers.quality_table
    # The shipped demo routers predate checksums and still load.
    model, _ = demo.load()
    assert RouterSet.load(demo.DEMO_DIR / "routers.tide", model=model).checkpoint_layers == [1, 3, 5]


def _json_leaves(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):  # a few rows of long lists
            yield from _json_leaves(v, path + (i,))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _load_outcome(path: Path) -> None:
    """Load ``path``: a RouterSet with finite weights, or a RouterFileError; nothing else."""
    try:
        loaded = RouterSet.load(path)
    except RouterFileError as exc:
        assert "\n" not in str(exc)
        return
    assert all(bool(torch.isfinite(p).all()) for p in loaded.parameters())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_router_loader(router_file, data) -> None:
    """Byte flips, truncations and metadata mutations: only RouterFileError comes out,
    and peak memory stays within a bound."""
    path, _ = router_file
    raw = path.read_bytes()
    tensors, meta = _parts(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kind = data.draw(st.sampled_from(["flip", "truncate", "metadata"]))
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "f.tide"
        if kind == "flip":
            buf = bytearray(raw)
            for pos, xor in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                                               min_size=1, max_size=6)):
                buf[pos] ^= xor
            target.write_bytes(bytes(buf))
        elif kind == "truncate":
            target.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        else:
            m = json.loads(json.dumps(meta))
            paths = list(_json_leaves(m))
            where = data.draw(st.sampled_from(paths))
            value = data.draw(_JSON)
            if not where:
                m = value
            else:
                parent = m
                for key in where[:-1]:
                    parent = parent[key]
                if data.draw(st.booleans()) and isinstance(parent, dict):
                    del parent[where[-1]]
                else:
                    parent[where[-1]] = value
            try:
                _write(target, tensors, m)
            except ValueError:  # json.dumps of NaN is fine; a float key etc. is not JSON-able
                return
        _load_outcome(target)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 256


# ----------------------------------------------------------------------------- API checks
SAMPLING_CASES = [
    (dict(top_p=-1), "top_p"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p="0.5"), "top_p"), (dict(top_p=True), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(temperature=0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(do_sample="yes"), "do_sample"),
]


@pytest.mark.parametrize("bad, match", SAMPLING_CASES)
def test_sampling_arguments(bad, match) -> None:
    args = dict(do_sample=True, temperature=1.0, top_k=None, top_p=None)
    check_sampling(**args)
    check_sampling(**{**args, "top_p": 1.0, "top_k": 0, "temperature": 0.7})
    check_sampling(**{**args, "top_p": 0.3, "top_k": 5})
    with pytest.raises(TIDEError, match=match):
        check_sampling(**{**args, **bad})


INPUT_CASES = [
    ([[1, 2]], "must be a torch.Tensor"),
    (torch.zeros(0, 4, dtype=torch.long), "is empty"),
    (torch.zeros(1, 0, dtype=torch.long), "is empty"),
    (torch.ones(1, 4), "integer token ids"),
    (torch.ones(1, 4, dtype=torch.bool), "integer token ids"),
    (torch.ones(4, dtype=torch.long), r"2-D .*add the batch dimension"),
    (torch.ones(1, 2, 3, dtype=torch.long), "2-D"),
    (torch.tensor([[1, 97]]), "token id 97, outside the model's vocabulary"),
    (torch.tensor([[-1, 2]]), "token id -1"),
]


@pytest.mark.parametrize("ids, match", INPUT_CASES)
def test_input_ids(ids, match) -> None:
    check_input_ids(torch.tensor([[1, 96]]), vocab_size=97)
    with pytest.raises(TIDEError, match=match):
        check_input_ids(ids, vocab_size=97)


MASK_CASES = [
    (torch.tensor([[1, 1, 0]]), "right padding.*pad prompts on the left"),
    (torch.tensor([[1, 0, 1]]), "right padding"),
    (torch.tensor([[0, 0, 0]]), "all padding"),
    (torch.tensor([[1, 1]]), "shape"),
    (torch.tensor([[1, 2, 1]]), "only 0"),
    ([[1, 1, 1]], "torch.Tensor"),
]


@pytest.mark.parametrize("mask, match", MASK_CASES)
def test_attention_mask(mask, match) -> None:
    ids = torch.ones(1, 3, dtype=torch.long)
    check_attention_mask(None, ids)
    check_attention_mask(torch.tensor([[0, 1, 1]]), ids)  # left padding is fine
    check_attention_mask(torch.tensor([[True, True, True]]), ids)
    with pytest.raises(TIDEError, match=match):
        check_attention_mask(mask, ids)


def test_generate_args_warn_past_max_positions() -> None:
    model = make_model("llama", 2)  # max_position_embeddings 128
    ids = torch.ones(1, 100, dtype=torch.long)
    check_generate_args(model, ids, 28)
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        check_generate_args(model, ids, 29)
    with pytest.raises(TIDEError, match="max_new_tokens"):
        check_generate_args(model, ids, -1)
    with pytest.raises(TIDEError, match="vocabulary"):
        check_generate_args(model, torch.tensor([[500]]), 1)


def test_min_layers_and_backend_options(router_file) -> None:
    path, routers = router_file
    check_min_layers(None, 4)
    check_min_layers(4, 4)
    with pytest.raises(TIDEError, match="beyond the model's 4 layers, so no token could exit: set min_layers to at most 3"):
        check_min_layers(5, 4)
    with pytest.raises(TIDEError, match="integer >= 1"):
        check_min_layers(0, 4)
    with pytest.raises(TIDEError, match=r"options\['inductor'\] must be True or False, got 'no'"):
        check_backend_options({"inductor": "no"})
    opts = check_backend_options({"routers": str(path), "inductor": False})
    assert isinstance(opts["routers"], RouterSet) and opts["routers"].checkpoint_layers == [0, 1, 2]
    with pytest.raises(TIDEError, match="min_layers=99"):
        check_backend_options({"routers": routers, "min_layers": 99})
    with pytest.raises(TIDEError, match="must be a dict"):
        check_backend_options(["routers"])


def test_backend_options_are_checked_on_every_route(router_file) -> None:
    """parse_options, where optimize, attach and torch.compile's options all go, raises the
    project's error for a truthy non-bool inductor and for min_layers past the model."""
    from tide_compile.options import parse_options

    path, routers = router_file
    with pytest.raises(TIDEError, match=r"options\['inductor'\] must be True or False"):
        parse_options({"routers": routers, "inductor": "no"})
    with pytest.raises(TIDEError, match="min_layers=99"):
        parse_options({"routers": str(path), "min_layers": 99})
    assert parse_options({"routers": str(path), "inductor": False}).inductor is False


def _dynamo_graph(model) -> "torch.fx.GraphModule":
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.forward, backend=keep, fullgraph=True)(input_ids=torch.tensor([[1, 2, 3]]))
    torch._dynamo.reset()
    return graphs[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graph_for_other_routers_is_the_mismatch_error(arch) -> None:
    model = make_model(arch, 4)
    gm = _dynamo_graph(model)
    assert graph_fingerprint(gm) == {"num_layers": 4, "hidden_size": 32, "vocab_size": 97}
    cfg = TIDEConfig(checkpoint_interval=1)
    check_graph_for_routers(gm, RouterSet.forced(model, exit_at=None, config=cfg))
    other = RouterSet.forced(make_model(arch, 6), exit_at=None, config=cfg)
    with pytest.raises(TIDEError, match=r"made for another model \(num_layers: routers 6, model 4\)"):
        check_graph_for_routers(gm, other)
    wide = RouterSet.forced(model, exit_at=None, config=cfg)
    wide.model_info["hidden_size"] = 64
    with pytest.raises(TIDEError, match="hidden_size: routers 64, model 32"):
        check_graph_for_routers(gm, wide)


# ----------------------------------------------------------------------------- API entry points
GENERATE_CASES = [
    (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), "is empty"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "is empty"),
    (dict(input_ids=torch.ones(1, 3)), "integer token ids"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), "2-D"),
    (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "right padding"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-3), "top_k"),
]


@pytest.mark.parametrize("bad, match", GENERATE_CASES)
def test_generate_entry_points_check_their_arguments(bad, match) -> None:
    """``TIDEModel.generate`` and ``reference.generate`` refuse bad arguments before any
    work (no compilation, no forward)."""
    import tide_compile
    from tide_compile import reference

    model = make_model("llama", 4)
    routers = RouterSet.forced(model, exit_at=1, config=TIDEConfig(checkpoint_interval=2))
    args = dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=None, do_sample=False)
    args.update(bad)
    fast = tide_compile.optimize(model, routers, inductor=False)
    ids = args.pop("input_ids")
    with pytest.raises(TIDEError, match=match):
        fast.generate(ids, max_new_tokens=2, **args)
    with pytest.raises(TIDEError, match=match):
        reference.generate(model, routers, ids, 2, **args)


def test_torch_compile_with_another_models_routers(tmp_path) -> None:
    """Routers for another model through ``torch.compile(..., options={"routers": path})``:
    the mismatch error of ``optimize``, not a graph break hint."""
    import tide_compile

    model = make_model("llama", 4)
    path = tmp_path / "six.tide"
    RouterSet.forced(make_model("llama", 6), exit_at=1, config=TIDEConfig(checkpoint_interval=2)).save(path)
    with pytest.raises(TIDEError, match=r"made for another model \(num_layers: routers 6, model 4\)"):
        tide_compile.optimize(model, str(path))
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="tide", options={"routers": str(path), "inductor": False})
    with pytest.raises(Exception, match=r"made for another model \(num_layers: routers 6, model 4\)") as err:
        compiled(input_ids=torch.tensor([[1, 2, 3]]))
    assert "fullgraph" not in str(err.value)
    torch._dynamo.reset()
