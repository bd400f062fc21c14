"""Does this stack capture a CUDA graph with a device-side IF node, and what does it cost?

The lead for issue 21 (and one-GPU decode): a decode step as one launch, with the deep
segment under a device-side predicate ("some token has not exited") instead of a host
read between the step's pieces. This script checks the building block on one GPU:

- ``torch.cuda.CUDAGraph.begin_capture_to_if_node`` exists on this torch;
- a graph ``x -> A (n_a matmuls) -> IF(pred) { B (n_b matmuls) } -> y`` replays correctly
  with the predicate set on the device to true and to false (compared with eager);
- replay time of that graph with pred false / true, next to plain graphs of A alone and
  of A + B, and to the host-read loop it would replace (replay A, read pred, replay B).

Output: one JSON object on stdout (and ``--out``). Not a unit test; CUDA only.

    python benchmarks/probe_conditional_graph.py --out /tmp/if_node.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _time(fn, reps: int) -> float:
    """Median ms per call of ``fn`` (synchronized), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--n-a", type=int, default=16, help="matmuls before the IF node")
    ap.add_argument("--n-b", type=int, default=16, help="matmuls inside the IF node")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_conditional_graph needs CUDA")
    result: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "device": torch.cuda.get_device_name(),
                    "has_if_node": hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")}
    if not result["has_if_node"]:
        return _report(result, args.out)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    wa = [torch.randn(args.width, args.width, device=dev, dtype=dt) / args.width ** 0.5
          for _ in range(args.n_a)]
    wb = [torch.randn(args.width, args.width, device=dev, dtype=dt) / args.width ** 0.5
          for _ in range(args.n_b)]
    x = torch.randn(1, args.width, device=dev, dtype=dt)
    pred = torch.ones((), dtype=torch.bool, device=dev)

    def seg_a(h):
        for w in wa:
            h = torch.tanh(h @ w)
        return h

    def seg_b(h):
        for w in wb:
            h = torch.tanh(h @ w)
        return h

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (cuBLAS handles, workspaces)
        seg_b(seg_a(x))
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    g_if = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_if):
        ha = seg_a(x)
        out = ha.clone()
        g_if.begin_capture_to_if_node(pred)
        out.copy_(seg_b(ha))
        g_if.end_capture_to_conditional_node()
    g_a = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_a):
        ha2 = seg_a(x)
    g_b = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_b):
        hb2 = seg_b(ha2)
    g_ab = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_ab):
        hab = seg_b(seg_a(x))

    ref_a, ref_ab = seg_a(x), seg_b(seg_a(x))
    checks = {}
    for value in (True, False):
        pred.fill_(value)
        g_if.replay()
        torch.cuda.synchronize()
        want = ref_ab if value else ref_a
        checks[f"pred_{str(value).lower()}_max_abs_err"] = float((out - want).abs().max())
    result["checks"] = checks
    result["correct"] = all(v < 1e-2 for v in checks.values())

    def host_read_loop(value: bool):
        pred.fill_(value)
        g_a.replay()
        if bool(pred):  # the host read a per-step exit decision needs today
            g_b.replay()

    def if_loop(value: bool):
        pred.fill_(value)
        g_if.replay()

    result["ms"] = {
        "graph_A": _time(g_a.replay, args.reps),
        "graph_A+B": _time(g_ab.replay, args.reps),
        "if_node_pred_false": _time(lambda: if_loop(False), args.reps),
        "if_node_pred_true": _time(lambda: if_loop(True), args.reps),
        "host_read_pred_false": _time(lambda: host_read_loop(False), args.reps),
        "host_read_pred_true": _time(lambda: host_read_loop(True), args.reps),
    }
    result["shape"] = {"width": args.width, "n_a": args.n_a, "n_b": args.n_b, "dtype": "bf16"}
    del hb2, hab
    return _report(result, args.out)


def _report(result: dict, out: str | None) -> dict:
    """Print ``result`` as JSON, and write it to ``out`` where given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
