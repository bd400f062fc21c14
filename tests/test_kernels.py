"""Triton kernels of tide_compile.kernels against their plain-torch references.

CPU: the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which must be set
before triton decorates them; so all interpreter cases run in ONE subprocess (this
process may already have imported triton normally) and report metrics as JSON lines,
which the parametrized tests below check, each against a float64 reference. Grids are
tiny (the interpreter costs milliseconds per program instance).

CPU, this process: the ``tide::*_fused`` ops fall back to the references, the switch
the insert pass can read, and opcheck.

GPU (marked gpu): realistic sizes (hidden 4096, bottleneck 128, batch 1..16 and a
prefill), all dtypes, and the kernels' names in Inductor's generated code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tide_compile.kernels as K
from tide_compile.kernels.ops import exit_select_reference, route_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Scores are computed in float32 from h of any dtype (h upcast exactly), so the error is
# float32 arithmetic for every input dtype: far under 1e-3 relative.
SCORE_RTOL = {"float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
DTYPES = ["float32", "float16", "bfloat16"]

# (rows, hidden, bottleneck): odd sizes; rows >= 16 takes the tl.dot path.
ROUTE_SHAPES = [(1, 1, 1), (3, 33, 7), (2, 130, 64), (5, 33, 1), (1, 130, 7), (20, 33, 7),
                (17, 130, 64)]
SELECT_SHAPES = [(1, 1), (3, 33), (4, 130), (2, 1030)]

ROUTE_CASES = [f"route-{m}x{h}x{b}-{dt}" for (m, h, b) in ROUTE_SHAPES for dt in DTYPES]
# The route with confidence features from C candidate logits: (rows, hidden, bottleneck, C).
CONF_SHAPES = [(1, 33, 7, 2), (3, 130, 64, 5), (2, 33, 7, 64), (20, 33, 7, 9)]
CONF_CASES = [f"conf-{m}x{h}x{b}x{c}-{dt}" for (m, h, b, c) in CONF_SHAPES
              for dt in ("float32", "bfloat16")]
SELECT_CASES = [f"select-{m}x{h}-{dt}" for (m, h) in SELECT_SHAPES for dt in DTYPES] \
    + ["select-3x33-mixed"]

_SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from tide_compile.kernels import route_triton as RT, select_triton as ST

    def rel(a, b):
        a, b = a.double(), b.double()
        n = b.norm().item()
        return (a - b).norm().item() / (n if n > 0 else 1.0)

    def router(H, B, g):
        # nn.Linear-like scales; logits of order 1: scores well inside (0, 1).
        w1 = (torch.rand(B, H, generator=g) * 2 - 1) / H ** 0.5
        b1 = (torch.rand(B, generator=g) * 2 - 1) / H ** 0.5
        w2 = torch.randn(1, B, generator=g) * 2.0 / B ** 0.5
        b2 = torch.randn(1, generator=g) * 0.3
        return w1, b1, w2, b2

    def route_case(name, M, H, B, dt, seed, C=None):
        g = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, dt)
        # A residual stream: unit-scale noise plus a few large channels.
        h = torch.randn(M, H, generator=g) * 0.7
        h[:, : max(1, H // 16)] *= 20
        h = h.to(dtype)
        w1, b1, w2, b2 = router(H, B, g)
        conf = {}
        if C is None:
            s64 = RT.route_score_reference(h.double(), w1.double(), b1.double(), w2.double(),
                                           b2.double(), 1e-6)
        else:
            from tide_compile.confidence import confidence_features
            from tide_compile.kernels.ops import _score
            zc = torch.randn(M, C, generator=g) * 4
            zc[0, :2] = zc[0].max() + 1  # a tie for the top
            wf = torch.randn(B, 5, generator=g) * 0.05 / B ** 0.5
            conf = dict(zc=zc, wf=wf)
            s64 = _score(h.double(), w1.double(), b1.double(), w2.double(), b2.double(), 1e-6,
                         confidence_features(zc).double(), wf.double())
        # Threshold between two scores, away from every score: decisions are exact.
        srt = sorted(s64.tolist())
        gaps = [(srt[i + 1] - srt[i], i) for i in range(len(srt) - 1)]
        if gaps:
            gap, i = max(gaps[len(gaps) // 3:] or gaps)
            thr = (srt[i] + srt[i + 1]) / 2
        else:
            gap, thr = 1.0, srt[0] - 0.01
        exited = torch.rand(M, generator=g) < 0.3
        frozen = torch.randn(M, H, generator=g).to(dtype)
        exit_layer = torch.where(exited, torch.tensor(2), torch.tensor(-1))
        score = torch.full((M,), float("nan"))
        out = RT.route_triton(h, exited, frozen, exit_layer, w1, b1, w2, b2, thr, 7, 1e-6,
                              score=score, **conf)
        if C is None:
            ref = RT.route_reference(h, exited, frozen, exit_layer, w1.double(), b1.double(),
                                     w2.double(), b2.double(), thr, 7, 1e-6)
        else:
            ref = RT.route_conf_reference(h, conf["zc"], exited, frozen, exit_layer,
                                          w1.double(), b1.double(), conf["wf"].double(),
                                          w2.double(), b2.double(), thr, 7, 1e-6)
        return dict(case=name, score_rel=rel(score, s64), finite=bool(score.isfinite().all()),
                    margin=min(gap / 2, min(abs(s - thr) for s in srt)),
                    smin=min(srt), smax=max(srt),
                    exited_eq=bool(torch.equal(out[0], ref[0])),
                    layer_eq=bool(torch.equal(out[2], ref[2])),
                    frozen_eq=bool(torch.equal(out[1], ref[1].to(dtype))),
                    dtypes_ok=[str(t.dtype) for t in out] == [str(t.dtype) for t in
                                                               (exited, frozen, exit_layer)],
                    new_exits=int((out[0] & ~exited).sum()))

    def select_case(name, M, H, dt, seed):
        g = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, dt) if dt != "mixed" else torch.bfloat16
        fdtype = dtype if dt != "mixed" else torch.float32
        h = torch.randn(M, H, generator=g).to(dtype)
        frozen = torch.randn(M, H, generator=g).to(fdtype)
        mask = torch.rand(M, generator=g) < 0.5
        mask[0] = True
        out = ST.exit_select_triton(mask, frozen, h)
        ref = ST.exit_select_reference(mask, frozen, h)
        ok = torch.equal(out, ref) and out.dtype == h.dtype
        if dt == "mixed":
            # The interpreter truncates float32 -> bfloat16 (the GPU rounds to
            # nearest even, as torch does): allow one bf16 ulp here only.
            ulp = ((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30))
            ok = out.dtype == h.dtype and bool((ulp <= 2.0 ** -7).all())
        return dict(case=name, equal=bool(ok))

    cases = json.loads(sys.argv[1])
    for seed, name in enumerate(cases):
        try:
            parts = name.split("-")
            if parts[0] == "route":
                M, H, B = map(int, parts[1].split("x"))
                res = route_case(name, M, H, B, parts[2], seed)
            elif parts[0] == "conf":
                M, H, B, C = map(int, parts[1].split("x"))
                res = route_case(name, M, H, B, parts[2], seed, C)
            else:
                M, H = map(int, parts[1].split("x"))
                res = select_case(name, M, H, parts[2], seed)
        except Exception as e:  # reported per case
            res = dict(case=name, error=f"{type(e).__name__}: {e}")
        print("RESULT " + json.dumps(res), flush=True)
''')


@pytest.fixture(scope="module")
def interpreted():
    """Run every interpreter case in one subprocess; results by case name."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cases = ROUTE_CASES + CONF_CASES + SELECT_CASES
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["case"]] = r
    if not results:
        pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


def _result(interpreted, case):
    r = interpreted.get(case)
    assert r is not None, f"no result for {case}"
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_route_kernel_interpreted(interpreted, case):
    r = _result(interpreted, case)
    dt = case.rsplit("-", 1)[1]
    assert r["finite"]
    assert r["score_rel"] < SCORE_RTOL[dt], r
    assert r["exited_eq"] and r["layer_eq"] and r["frozen_eq"] and r["dtypes_ok"], r


@pytest.mark.parametrize("case", CONF_CASES)
def test_route_kernel_with_confidence_features_interpreted(interpreted, case):
    """The fused route of a router that reads the confidence features: the five columns
    computed in the kernel from the candidate logits (a tie for the top included), equal
    to the reference's score and decisions."""
    r = _result(interpreted, case)
    assert r["finite"]
    assert r["score_rel"] < 1e-5, r
    assert r["exited_eq"] and r["layer_eq"] and r["frozen_eq"] and r["dtypes_ok"], r


def test_route_cases_are_not_saturated(interpreted):
    """The router scales are realistic: scores spread inside (0, 1), tokens do exit."""
    rs = [_result(interpreted, c) for c in ROUTE_CASES + CONF_CASES]
    assert all(0.005 < r["smin"] and r["smax"] < 0.995 for r in rs), rs
    assert sum(r["new_exits"] for r in rs) > 0


@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_kernel_interpreted(interpreted, case):
    assert _result(interpreted, case)["equal"]


# ---------------------------------------------------------------- CPU ops (this process)
def _route_inputs(M, H, B, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(M, H, generator=g) * 2).to(dtype)
    w1 = (torch.rand(B, H, generator=g) * 2 - 1) / H ** 0.5
    b1 = (torch.rand(B, generator=g) * 2 - 1) / H ** 0.5
    w2 = torch.randn(1, B, generator=g) * 2 / B ** 0.5
    b2 = torch.randn(1, generator=g) * 0.3
    exited = torch.rand(M, generator=g) < 0.3
    frozen = torch.randn(M, H, generator=g).to(dtype)
    exit_layer = torch.where(exited, torch.tensor(1), torch.tensor(-1))
    ts = [h, exited, frozen, exit_layer, w1, b1, w2, b2]
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_on_cpu_are_the_references(dtype):
    args = _route_inputs(6, 33, 7, dtype)
    got = torch.ops.tide.route_fused(*args, 0.5, 3, 1e-6)
    ref = route_reference(*args, 0.5, 3, 1e-6)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    h, exited, frozen = args[0], args[1], args[2]
    assert torch.equal(torch.ops.tide.exit_select_fused(exited, frozen, h),
                       exit_select_reference(exited, frozen, h))
    # batch x seq leading dims
    args3 = [t.reshape(2, 3, *t.shape[1:]) if i < 4 else t for i, t in enumerate(args)]
    got3 = torch.ops.tide.route_fused(*args3, 0.5, 3, 1e-6)
    assert [tuple(t.shape) for t in got3] == [(2, 3), (2, 3, 33), (2, 3)]


def test_fused_ops_opcheck():
    args = _route_inputs(4, 16, 5, torch.float32)
    torch.library.opcheck(torch.ops.tide.route_fused.default, (*args, 0.5, 3, 1e-6))
    torch.library.opcheck(torch.ops.tide.exit_select_fused.default, (args[1], args[2], args[0]))
    h, exited, frozen, exit_layer, w1, b1, w2, b2 = args
    zc, wf = torch.randn(4, 6), torch.randn(5, 5) * 0.1
    torch.library.opcheck(torch.ops.tide.route_conf_fused.default,
                          (h, zc, exited, frozen, exit_layer, w1, b1, wf, w2, b2, 0.5, 3, 1e-6))


def test_fused_ops_gradients_equal_the_references():
    # A compiled call with grad enabled makes AOT trace a joint graph through these ops
    # (seen on the H200 before they had autograd formulas).
    args = _route_inputs(6, 16, 5, torch.float32)
    h, exited, frozen = args[0], args[1], args[2]
    exited = exited.clone()
    exited[:] = False
    exited[0] = True  # some rows exited before, some exit now, some continue
    from tide_compile.kernels.route_triton import route_score_reference

    thr = float(route_score_reference(h, *args[4:], 1e-6)[1:].median())

    def grads(route, select):
        hh = h.clone().requires_grad_()
        ff = frozen.clone().requires_grad_()
        ex, fr, _ = route(hh, exited, ff, *args[3:], thr, 3, 1e-6)
        out = select(ex, fr, hh * 2)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        return hh.grad, ff.grad, ex

    got = grads(torch.ops.tide.route_fused, torch.ops.tide.exit_select_fused)
    ref = grads(route_reference, exit_select_reference)
    assert got[2].any() and not got[2].all()
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0

    # The feature route: the same gradients for the states (zero feature weights keep the
    # decisions); none for the candidate logits.
    from tide_compile.kernels.route_triton import route_conf_reference

    zc, wf = torch.randn(6, 4), torch.zeros(5, 5)
    w1, b1, w2, b2 = args[4:]

    def conf(route):
        return lambda hh, ex, ff, el, *rest: route(hh, zc, ex, ff, el, w1, b1, wf, w2, b2, *rest[4:])

    got_conf = grads(conf(torch.ops.tide.route_conf_fused), exit_select_reference)
    ref_conf = grads(conf(route_conf_reference), exit_select_reference)
    for a, b, c in zip(got_conf, ref_conf, ref):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("rows", [6, 40])
def test_route_launch_keeps_a_symbolic_row_count_symbolic(rows):
    """The launch of tide::route_fused as Inductor traces it for a graph whose length is
    symbolic (fake CUDA tensors on this CPU): it must not read the row count. Reading it
    (block sizes from int(M)) specialized the symbol to the traced length, and Dynamo
    refused optimize(...).generate's prompt marked dynamic on CUDA with
    "specialized it to be a constant (6)"."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from tide_compile.kernels.route_triton import _launch_route

    env = ShapeEnv()
    symbol = env.create_symbol(rows, source=ConstantSource("s"), dynamic_dim=DimDynamic.DYNAMIC)
    s = env.create_symintnode(symbol, hint=rows)
    launched = []

    class Kernel:  # records the grid instead of launching
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, kwargs))

    with FakeTensorMode(shape_env=env):
        h = torch.empty(1, s, 32, device="cuda")
        exited = torch.zeros(1, s, dtype=torch.bool, device="cuda")
        exit_layer = torch.zeros(1, s, dtype=torch.long, device="cuda")
        w1, b1 = torch.empty(8, 32, device="cuda"), torch.empty(8, device="cuda")
        w2, b2 = torch.empty(1, 8, device="cuda"), torch.empty(1, device="cuda")
        out = _launch_route(Kernel(), h, exited, torch.empty_like(h), exit_layer, w1, b1, w2,
                            b2, 0.5, 1, 1e-6)
    ((grid, kwargs),) = launched
    assert isinstance(grid[0], torch.SymInt)  # the grid follows the length
    assert kwargs["USE_DOT"] and kwargs["BLOCK_M"] == 32
    assert not env.replacements and not env.guards  # nothing specialized or guarded
    assert out[1].shape[1] is s or str(out[1].shape[1]) == str(s)


def test_route_launch_picks_decode_tiles_for_few_static_rows():
    from tide_compile.kernels.route_triton import _blocks

    assert _blocks(1, 4096, 128) == (1, 4, 1024, False)
    assert _blocks(16, 4096, 128)[3] is True


def test_kernels_option_switches_the_ops():
    assert K.route_op() is torch.ops.tide.route.default
    assert K.exit_select_op() is torch.ops.tide.exit_select.default
    assert K.route_op("triton") is torch.ops.tide.route_fused.default
    assert K.exit_select_op("triton") is torch.ops.tide.exit_select_fused.default


def test_backend_with_triton_kernels_option_equals_reference():
    """kernels="triton" puts the *_fused ops in the graph; on CPU they run the references."""
    import sys
    from tide_compile import ExitStats, RouterSet, TIDEConfig
    from tide_compile import reference as R
    from tiny_models import make_model

    model = make_model("llama", num_layers=4)
    cfg = TIDEConfig(checkpoint_interval=1, router_bottleneck_dim=8)
    routers = RouterSet.forced(model, exit_at=1, config=cfg)
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "inductor": False, "kernels": "triton",
                                "stats": ExitStats(4)})
    ids = torch.randint(2, 97, (1, 4))
    torch.testing.assert_close(fn(input_ids=ids).logits, R.forward(model, routers, ids, cfg).logits,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 333])
def test_route_kernel_gpu(rows, dtype):
    from tide_compile.kernels.route_triton import route_score_reference, route_triton

    H, B = 4096, 128
    args = _route_inputs(rows, H, B, dtype, device="cuda", seed=rows)
    h, exited, frozen, exit_layer, w1, b1, w2, b2 = args
    s64 = route_score_reference(h.double(), w1.double(), b1.double(), w2.double(), b2.double(),
                                1e-6)
    thr = s64.median().item() if rows > 1 else s64.item() - 0.05
    score = torch.full((rows,), float("nan"), device="cuda")
    out = route_triton(*args, thr, 5, 1e-6, score=score)
    assert score.isfinite().all()
    assert _rel(score, s64) < 1e-5  # fp32 arithmetic on upcast h: far under 1e-3
    ref = route_reference(h, exited, frozen, exit_layer, w1.double(), b1.double(),
                          w2.double(), b2.double(), thr, 5, 1e-6)
    sure = (s64 - thr).abs() > 1e-5  # decisions at the threshold itself may round either way
    assert torch.equal(out[0][sure], ref[0][sure])
    assert torch.equal(out[2][sure], ref[2][sure])
    assert torch.equal(out[1][sure], ref[1].to(dtype)[sure])
    # Deterministic: a fixed-order reduction, no float atomics.
    score2 = torch.empty_like(score)
    route_triton(*args, thr, 5, 1e-6, score=score2)
    assert torch.equal(score, score2)
    # The op on CUDA is the kernel.
    got = torch.ops.tide.route_fused(*args, thr, 5, 1e-6)
    for a, b in zip(got, out):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 333])
def test_route_conf_kernel_gpu(rows, dtype):
    """The fused route with confidence features (64 candidate logits) at the 8B router's
    sizes: scores and decisions of the float64 reference, deterministic, and the op is
    the kernel on CUDA."""
    from tide_compile.confidence import confidence_features
    from tide_compile.kernels.ops import _score
    from tide_compile.kernels.route_triton import route_conf_reference, route_triton

    H, B, C = 4096, 128, 64
    h, exited, frozen, exit_layer, w1, b1, w2, b2 = _route_inputs(rows, H, B, dtype, "cuda", rows)
    g = torch.Generator(device="cpu").manual_seed(100 + rows)
    zc = (torch.randn(rows, C, generator=g) * 4).cuda()
    wf = (torch.randn(B, 5, generator=g) * 0.05 / B ** 0.5).cuda()
    s64 = _score(h.double(), w1.double(), b1.double(), w2.double(), b2.double(), 1e-6,
                 confidence_features(zc).double(), wf.double())
    thr = s64.median().item() if rows > 1 else s64.item() - 0.05
    score = torch.full((rows,), float("nan"), device="cuda")
    args = (h, exited, frozen, exit_layer, w1, b1, w2, b2, thr, 5, 1e-6)
    out = route_triton(*args, score=score, zc=zc, wf=wf)
    assert score.isfinite().all() and _rel(score, s64) < 1e-5
    ref = route_conf_reference(h, zc, exited, frozen, exit_layer, w1.double(), b1.double(),
                               wf.double(), w2.double(), b2.double(), thr, 5, 1e-6)
    sure = (s64 - thr).abs() > 1e-5
    for i in range(3):
        assert torch.equal(out[i][sure], ref[i].to(out[i].dtype)[sure])
    score2 = torch.empty_like(score)
    route_triton(*args, score=score2, zc=zc, wf=wf)
    assert torch.equal(score, score2)
    got = torch.ops.tide.route_conf_fused(h, zc, exited, frozen, exit_layer, w1, b1, wf, w2, b2,
                                          thr, 5, 1e-6)
    for a, b in zip(got, out):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 333])
def test_select_kernel_gpu(rows, dtype):
    from tide_compile.kernels import select_triton as ST

    H = 4096
    h = torch.randn(rows, H, device="cuda").to(dtype)
    frozen = torch.randn(rows, H, device="cuda").to(dtype)
    mask = torch.rand(rows, device="cuda") < 0.5
    assert torch.equal(ST.exit_select_triton(mask, frozen, h),
                       ST.exit_select_reference(mask, frozen, h))
    assert torch.equal(torch.ops.tide.exit_select_fused(mask, frozen, h),
                       ST.exit_select_reference(mask, frozen, h))
    frozen32 = frozen.float() * 1.001  # mixed dtypes: frozen fp32, h lower precision
    assert torch.equal(ST.exit_select_triton(mask, frozen32, h),
                       ST.exit_select_reference(mask, frozen32, h))


@pytest.mark.gpu
def test_inductor_code_contains_the_kernels():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    args = _route_inputs(2, 4096, 128, torch.bfloat16, device="cuda")
    h, exited, frozen, exit_layer, w1, b1, w2, b2 = args

    def step(h, exited, frozen, exit_layer):
        e, f, l = torch.ops.tide.route_fused(h, exited, frozen, exit_layer, w1, b1, w2, b2,
                                             0.5, 3, 1e-6)
        return torch.ops.tide.exit_select_fused(e, f, h * 2), l

    fn = torch.compile(step, fullgraph=True)
    out, code = run_and_get_code(fn, h, exited, frozen, exit_layer)
    src = "\n".join(code)
    assert "_route_fused_kernel" in src and "_exit_select_kernel" in src
    ref = step(h, exited, frozen, exit_layer)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[0], ref[0])
