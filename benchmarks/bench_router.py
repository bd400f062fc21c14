"""Per-checkpoint router cost in a batch-1 decode step (Llama-3.1-8B shape: hidden 4096,
router bottleneck 128, bf16 residual stream, float32 router weights).

Rows, each the whole ``route`` (RMS norm, router MLP, sigmoid, threshold, exit-state
update), timed two ways:

* ``graph``: a CUDA graph of ``N`` calls, each with its own router weights and states
  (``N`` x 2 MB of weights, more than L2: in a real step the layer weights between two
  checkpoints evict the router's), replayed; median replay / ``N``. This is what the
  runner pays: it replays captured graphs.
* ``launch``: ``triton.testing.do_bench`` median of one call (host launch overhead
  included; weights hot in L2).

1. ``triton``: the hand kernel (:func:`tide_compile.kernels.route_triton.route_triton`).
2. ``inductor(route_reference)``: ``torch.compile`` of a function calling the composite
   reference (what ``tide::route`` becomes: Inductor's own fusion).
3. ``inductor(route_fused op)``: ``torch.compile`` of a function calling
   ``tide::route_fused`` (the hand kernel inside Inductor's graph).
4. ``eager``: the reference, eager.

Each is reported with its fraction of the measured 8B decode step (5.995 ms), for one
checkpoint and for all checkpoints of interval 8 (3) and interval 4 (7); target: all
checkpoints together <= 1% of the step.

Usage: python benchmarks/bench_router.py [--out results.json] [--calls 32]
       python benchmarks/bench_router.py --cpu-smoke      (CPU: reference runs, no timing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tide_compile.kernels.ops import route_reference  # noqa: E402

STEP_MS = 5.995  # measured 8B batch-1 decode step (bench_decode, H200, torch 2.11)
CHECKPOINTS = {"interval 8": 3, "interval 4": 7}
HIDDEN, BOTTLENECK = 4096, 128


def make_inputs(n: int, batch: int, hidden: int, bottleneck: int, dtype, device, seed=0):
    """``n`` independent argument sets (router weights at nn.Linear scales)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(n):
        h = torch.randn(batch, hidden, generator=g) * 0.7
        h[:, :64] *= 20
        w1 = (torch.rand(bottleneck, hidden, generator=g) * 2 - 1) / hidden ** 0.5
        b1 = (torch.rand(bottleneck, generator=g) * 2 - 1) / hidden ** 0.5
        w2 = torch.randn(1, bottleneck, generator=g) * 2 / bottleneck ** 0.5
        b2 = torch.randn(1, generator=g) * 0.3
        exited = torch.zeros(batch, dtype=torch.bool)
        frozen = torch.zeros(batch, hidden)
        exit_layer = torch.full((batch,), -1, dtype=torch.int64)
        ts = [h.to(dtype), exited, frozen.to(dtype), exit_layer, w1, b1, w2, b2]
        sets.append([t.to(device) for t in ts])
    return sets


def route_args(args, threshold=0.5, layer=7, eps=1e-6):
    return (*args, threshold, layer, eps)


def time_graph(fn, sets, reps: int = 50) -> float:
    """Median ms per call of ``fn`` over a CUDA graph of ``len(sets)`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for args in sets[:3]:
            fn(*route_args(args))  # warm-up: compile, autotune, allocator
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    outs = []
    with torch.cuda.graph(graph):
        for args in sets:
            outs.append(fn(*route_args(args)))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(sets))
    del outs
    return statistics.median(times)


def time_launch(fn, args) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: fn(*route_args(args)), warmup=25, rep=100, return_mode="median")


def check_same(fns: dict, args, threshold: float = 0.5) -> None:
    """All rows compute route_reference's exit state, for tokens whose score is not
    within rounding of the threshold."""
    from tide_compile.kernels.route_triton import route_score_reference

    h, w1, b1, w2, b2 = args[0], *args[4:8]
    sure = (route_score_reference(h, w1, b1, w2, b2, 1e-6) - threshold).abs() > 1e-4
    ref = route_reference(*route_args(args, threshold))
    for name, fn in fns.items():
        out = fn(*route_args(args, threshold))
        for a, b, what in zip(out, ref, ("exited", "frozen", "exit_layer")):
            if not torch.equal(a[sure], b[sure]):
                raise AssertionError(f"{name}: {what} differs from route_reference")


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':<28}{'graph us':>10}{'launch us':>11}{'% step/ckpt':>13}"
             + "".join(f"{'% ' + k:>14}" for k in CHECKPOINTS)]
    for r in rows:
        g = r["graph_ms"]
        cells = "".join(f"{100 * n * g / STEP_MS:>14.3f}" for n in CHECKPOINTS.values())
        lines.append(f"{r['name']:<28}{1000 * g:>10.2f}{1000 * r['launch_ms']:>11.2f}"
                     f"{100 * g / STEP_MS:>13.3f}{cells}")
    lines.append(f"(step {STEP_MS} ms; target: all checkpoints <= 1% of the step, "
                 f"i.e. <= {1000 * 0.01 * STEP_MS / 7:.1f} us per checkpoint at interval 4)")
    return "\n".join(lines)


def cpu_smoke() -> int:
    import tide_compile.kernels  # noqa: F401  (registers tide::route_fused)

    sets = make_inputs(2, 1, 256, 16, torch.bfloat16, "cpu")
    check_same({"route_fused op (cpu reference)": torch.ops.tide.route_fused,
                "tide::route": torch.ops.tide.route}, sets[0])
    t0 = time.perf_counter()
    for args in sets:
        route_reference(*route_args(args))
    dt = (time.perf_counter() - t0) / len(sets)
    print(f"cpu smoke ok: reference {1000 * dt:.3f} ms/call (hidden 256, bottleneck 16; "
          f"not a measurement)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--calls", type=int, default=32, help="calls per CUDA graph (weight sets)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cpu-smoke", action="store_true", help="check it runs on CPU, no timing")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        return cpu_smoke()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or pass --cpu-smoke)")
        return 2
    import triton

    from tide_compile.kernels.route_triton import route_triton

    t_start = time.perf_counter()
    sets = make_inputs(args.calls, args.batch, HIDDEN, BOTTLENECK, torch.bfloat16, "cuda")

    def compiled_reference(*a):
        return route_reference(*a)

    def compiled_fused(*a):
        return torch.ops.tide.route_fused(*a)

    variants = {
        "triton": route_triton,
        "inductor(route_reference)": torch.compile(compiled_reference, fullgraph=True),
        "inductor(route_fused op)": torch.compile(compiled_fused, fullgraph=True),
        "eager": route_reference,
    }
    check_same(variants, sets[0])
    rows = []
    for name, fn in variants.items():
        g = time_graph(fn, sets)
        lt = time_launch(fn, sets[0])
        rows.append({"name": name, "graph_ms": g, "launch_ms": lt})
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "hidden": HIDDEN, "bottleneck": BOTTLENECK, "batch": args.batch,
        "dtype": "bfloat16", "router_dtype": "float32", "calls_per_graph": args.calls,
        "step_ms": STEP_MS, "checkpoints": CHECKPOINTS,
        "rows": [{**r, "fraction_per_checkpoint": r["graph_ms"] / STEP_MS,
                  **{f"fraction_{k.replace(' ', '_')}": n * r["graph_ms"] / STEP_MS
                     for k, n in CHECKPOINTS.items()}} for r in rows],
        "seconds": time.perf_counter() - t_start,
    }
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}; batch "
          f"{args.batch}, hidden {HIDDEN}, bottleneck {BOTTLENECK}, bf16 h, fp32 router "
          f"({result['seconds']:.0f} s)")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
