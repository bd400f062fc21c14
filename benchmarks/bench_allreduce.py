"""Latency of one decode-sized all-reduce at TP=2: NCCL against symmetric-memory one-shot.

Issue 21's decode at TP=2 (8B shape, bf16, batch 1) runs 64 all-reduces of a 4096-wide
bf16 vector per step (after attention and after the MLP of each layer). Its eleventh
device-session run, guards skipped, measured Inductor TP=2 at 6.7-7.9 ms/token and tide's
exit after 16 layers at 3.55 ms against a weight-bytes bound of 0.86 ms per GPU. This
script measures what one such all-reduce costs by itself, so the collectives' share of a
step can be read off: a chain of ``--ops`` dependent all-reduces of ``[1, --width]``
(each output feeds the next input), captured in one CUDA graph and replayed, per op:

* ``nccl``: ``torch.distributed.all_reduce`` (what DTensor / transformers' TP layers and
  Inductor's ``_c10d_functional.all_reduce_`` run);
* ``nccl_eager``: the same, not captured (launch latency included);
* ``one_shot``: ``torch.ops.symm_mem.one_shot_all_reduce`` on a symmetric-memory buffer
  (each rank reads its peers' buffers over NVLink; no NVLink multicast, which the project
  keeps off: ``NCCL_NVLS_ENABLE=0``);
* ``two_shot``: ``torch.ops.symm_mem.two_shot_all_reduce_`` (in place).

A method that is not available on this stack is reported with its error; the rest go on.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/bench_allreduce.py

``--cpu`` runs ``nccl_eager``'s loop on gloo (a smoke run of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--ops", type=int, default=64, help="dependent all-reduces per replay")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--methods", default="nccl,nccl_eager,one_shot,two_shot")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = not args.cpu
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    group = dist.group.WORLD
    methods = args.methods.split(",") if cuda else ["nccl_eager"]
    rows: list[dict] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def chain_nccl(x: torch.Tensor) -> torch.Tensor:
        for _ in range(args.ops):
            dist.all_reduce(x)
            x.mul_(1.0 / world)  # keep the values bounded; a dependent step, as a layer is
        return x

    symm = {}

    def chain_one_shot(x: torch.Tensor) -> torch.Tensor:
        buf = symm["buf"]
        for _ in range(args.ops):
            buf.copy_(x)
            x = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
            x = x * (1.0 / world)
        return x

    def chain_two_shot(x: torch.Tensor) -> torch.Tensor:
        buf = symm["buf"]
        buf.copy_(x)
        for _ in range(args.ops):
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group.group_name)
            buf.mul_(1.0 / world)
        return buf

    for method in methods:
        row = {"method": method, "width": args.width, "ops": args.ops, "world": world}
        try:
            x = torch.ones(1, args.width, device=device, dtype=dtype)
            if method in ("one_shot", "two_shot"):
                import torch.distributed._symmetric_memory as symm_mem

                if not symm:
                    if hasattr(symm_mem, "enable_symm_mem_for_group"):
                        symm_mem.enable_symm_mem_for_group(group.group_name)
                    symm["buf"] = symm_mem.empty(1, args.width, dtype=dtype, device=device)
                    symm_mem.rendezvous(symm["buf"], group.group_name)
            fn = {"nccl": chain_nccl, "nccl_eager": chain_nccl, "one_shot": chain_one_shot,
                  "two_shot": chain_two_shot}[method]
            for _ in range(3):
                fn(x)  # warm-up: communicators, workspaces
            sync()
            if method == "nccl_eager":
                step = lambda: fn(x)  # noqa: E731
            else:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    fn(x)
                torch.cuda.current_stream().wait_stream(s)
                sync()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = fn(x)
                step = graph.replay
            step()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.replays):
                step()
            sync()
            total = time.perf_counter() - t0
            row["us_per_op"] = round(total / (args.replays * args.ops) * 1e6, 2)
            row["ms_per_chain"] = round(total / args.replays * 1e3, 4)
            if method != "nccl_eager":
                row["finite"] = bool(torch.isfinite(out).all())
        except Exception as e:  # noqa: BLE001  (a method this stack lacks: reported)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            sync()
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        print(f"\n| method | us per all-reduce of [1, {args.width}] | ms per {args.ops} |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r.get('us_per_op', r.get('error', ''))} | "
                  f"{r.get('ms_per_chain', '')} |")
        if args.out:
            env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda
                   else "cpu", "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}
            json.dump({"env": env, "rows": rows}, open(args.out, "w"), indent=1)
    sync()
    os._exit(0)  # no teardown: NCCL's can hang (bench_tp, eighth session)


if __name__ == "__main__":
    main()
