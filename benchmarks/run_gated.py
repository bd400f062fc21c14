"""Run benchmark processes side by side: they compile in parallel, they time one at a time.

Each command (one argument per process, a quoted command line) gets ``--gate DIR:N``
appended (``bench_decode.TimingGate``: model construction and every timed section hold one
lock, and no process times before all ``N`` have finished compiling). Compiling dominates
a device call on the 8B shape (90-150 s per compiled model), so ``N`` single-role
processes finish in about the time of the slowest one's compile plus every timing, instead
of the sum of the compiles.

A process that exits before it arrives (an error, out of memory) is marked arrived here,
so the others do not wait for it. ``--env I:KEY=VALUE`` sets a variable for process ``I``
(0-based), e.g. ``--env 3:CUDA_VISIBLE_DEVICES=1``. Logs go to ``--logs`` (one per process,
``<i>.log``); each process's last lines are printed when all have ended. The exit status
is the number of processes that failed.

Usage: python benchmarks/run_gated.py --logs OUT \\
           "python benchmarks/bench_deferred.py --rows inductor --out OUT/ind.json" \\
           "python benchmarks/bench_deferred.py --rows exits --depths 8 --out OUT/d8.json"
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commands", nargs="+", help="one quoted command line per process")
    ap.add_argument("--logs", required=True, help="folder for the processes' logs")
    ap.add_argument("--env", action="append", default=[], metavar="I:KEY=VALUE")
    ap.add_argument("--tail", type=int, default=25, help="log lines printed per process")
    args = ap.parse_args(argv)
    os.makedirs(args.logs, exist_ok=True)
    gate = tempfile.mkdtemp(prefix="tide_gate_")
    n = len(args.commands)
    envs = [dict(os.environ) for _ in range(n)]
    for spec in args.env:
        index, _, assignment = spec.partition(":")
        key, _, value = assignment.partition("=")
        if not index.isdigit() or int(index) >= n or not key:
            ap.error(f"--env: expected I:KEY=VALUE with I < {n}, got {spec!r}")
        envs[int(index)][key] = value
    procs = []
    for i, command in enumerate(args.commands):
        log = open(os.path.join(args.logs, f"{i}.log"), "w")
        argv_i = shlex.split(command) + ["--gate", f"{gate}:{n}"]
        procs.append((subprocess.Popen(argv_i, stdout=log, stderr=subprocess.STDOUT,
                                       env=envs[i]), log, command))
    t0 = time.time()
    running = set(range(n))
    while running:
        for i in sorted(running):
            p = procs[i][0]
            if p.poll() is None:
                continue
            running.discard(i)
            ready = os.path.join(gate, f"ready.{p.pid}")
            if not os.path.exists(ready):  # ended before arriving: do not keep the rest waiting
                open(ready, "w").close()
            print(f"[{time.time() - t0:.0f} s] process {i} ended, rc={p.returncode}",
                  flush=True)
        time.sleep(1.0)
    failed = 0
    for i, (p, log, command) in enumerate(procs):
        log.close()
        failed += p.returncode != 0
        print(f"\n== process {i} (rc={p.returncode}): {command}")
        with open(os.path.join(args.logs, f"{i}.log")) as f:
            print("".join(f.readlines()[-args.tail:]), end="")
    return failed


if __name__ == "__main__":
    sys.exit(main())
