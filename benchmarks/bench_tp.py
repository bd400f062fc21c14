"""Tensor-parallel batch-1 decode with early exit (issue 21): one process per GPU.

The measurement issue 21 asks for: a Llama-3.1-8B-shaped model (bf16, random weights)
loaded tensor-parallel by transformers (``from_pretrained(dir, distributed_config=
DistributedConfig(tp_plan="auto"))``, TP=2 under ``torchrun``), batch-1 decode on a
StaticCache, rows

* ``inductor_tp``: ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``
  of the tensor-parallel model (the baseline);
* ``tide_never_exit``: the tide backend (skip strategy) with routers that never exit;
* ``tide_exit@d``: tide with ``RouterSet.forced`` exiting every token after ``d`` layers
  (default: every checkpoint, 8, 16 and 24 for the 8B shape with ``--interval 8``).

Each tide row is timed against the baseline in interleaved pairs, as
``benchmarks/bench_decode.py`` does (its decode loop and pairing are reused): the row's
median ms/token, the median ratio to Inductor and its range. Next to each row, the
**bytes bound per GPU**: the weight bytes one rank reads per decode step on that row's
path (its shards of the executed layers, of the skipped layers' K/V projections and
input norms, of the final norm and lm_head), the speedup over the full path that those
bytes allow, the time they take at ``--hbm-gbps`` (H200: 4800 GB/s), and the fraction of
that speedup the row reached (``fraction_of_bound``, relative to the baseline, as issue
16's figures on one GPU), and ``fraction_of_bytes_bound``: the bytes bound in ms over the
row's ms per token, the absolute reading (baseline included). ``--profile`` works with
both loops: 8 hand-loop steps (``--loop dynamo``) or one generate as timed (``--loop
generate``).

Lockstep: after each tide row every rank's exit counters are gathered and compared
(``lockstep``: true when all ranks counted the same exits and layers). ``--rows
broadcast`` also times what the fallback "rank 0 decides, broadcasts the flag" would add
per checkpoint read: a one-element broadcast and its host read.

NVLink multicast stays off: ``NCCL_NVLS_ENABLE=0`` is set before NCCL starts.

``--unguarded``: every row's decode steps after the first run under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` (baseline included): Dynamo's
guard evaluation over the DTensor parameters took 4.2 ms per step of the tide row on the
H200 host (``--profile``, tenth session), which a synchronized decode step pays in full.

The model is written once to ``--model-dir`` by rank 0 (8B shape: 16 GB of bf16
safetensors, default ``/tmp/tide_bench_tp_8b``) and read back sharded by every rank;
later runs reuse it.

Usage (two GPUs of one host):
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/bench_tp.py --out tp.json
CPU smoke check (gloo, tiny model, FX graphs instead of Inductor; a check of the loops,
not a measurement):
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_tp.py --tiny --no-inductor \\
        --steps 6 --warmup 2 --pairs 2 --prompt 8
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before NCCL starts (issue 21: multicast off)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_decode import (BucketedLoop, build_model, decode_loop, generate_ms,  # noqa: E402
                          interleaved_pairs, new_cache, optimized_generate,
                          record_graphed_runners, report_profile, summarize, sync)

import tide_compile  # noqa: E402,F401  (registers the backend)
from tide_compile import ExitStats, RouterSet, TIDEConfig  # noqa: E402
from tide_compile.model_probe import probe  # noqa: E402


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of this rank's part of ``t`` (a DTensor's shard, or all of a plain tensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def weight_bytes_per_gpu(model) -> dict[str, int]:
    """Weight bytes one rank reads per decode step: a layer, a skipped layer's K/V path
    (input norm and K/V projections), and the read-out (final norm and lm_head)."""
    p = probe(model)
    layer = sum(local_bytes(t) for t in p.layers[0].parameters())
    attn = p.layers[0].self_attn
    kv = sum(local_bytes(t) for t in
             [attn.k_proj.weight, attn.v_proj.weight, p.layers[0].input_layernorm.weight])
    head = sum(local_bytes(t) for t in
               list(p.lm_head.parameters()) + list(p.final_norm.parameters()))
    return {"layer": layer, "kv": kv, "head": head, "num_layers": p.num_layers}


def path_bytes(b: dict[str, int], depth: int) -> int:
    """Bytes read per step by a path that runs ``depth`` layers and K/V-fills the rest."""
    return depth * b["layer"] + (b["num_layers"] - depth) * b["kv"] + b["head"]


def load_tp_model(args, device: torch.device, dtype: torch.dtype):
    import transformers as T

    rank = dist.get_rank()
    model_dir = args.model_dir or f"/tmp/tide_bench_tp_{'tiny' if args.tiny else '8b'}"
    if rank == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
        t0 = time.time()
        full = build_model(args.tiny, str(device), dtype)  # seeded: the same weights every run
        full.save_pretrained(model_dir)
        del full
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"# wrote {model_dir} in {time.time() - t0:.0f} s", flush=True)
    dist.barrier()
    model = T.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, distributed_config=T.DistributedConfig(tp_plan="auto"))
    return model.eval(), model_dir


def same_on_all_ranks(obj) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


def rank0_says(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (so every rank takes the same branch)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def broadcast_flag_us(device: torch.device, reps: int = 200) -> dict:
    """A one-element flag broadcast from rank 0 and read on the host (what deciding on
    rank 0 would add per checkpoint read), median and p90 over ``reps``, in us."""
    flag = torch.ones(1, dtype=torch.bool, device=device)
    times = []
    for i in range(reps + 10):
        sync(device.type)
        t0 = time.perf_counter()
        dist.broadcast(flag, src=0)
        bool(flag.item())
        if i >= 10:
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"median_us": round(statistics.median(times), 1),
            "p90_us": round(times[int(0.9 * len(times))], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small model (CPU smoke check)")
    ap.add_argument("--model-dir", default=None, help="where the random-weight model is saved")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--interval", type=int, default=None,
                    help="checkpoint_interval (default 8; --tiny: 2)")
    ap.add_argument("--depths", default="", help="comma list of exit depths (default: every checkpoint)")
    ap.add_argument("--rows", default="inductor,never,exits,broadcast",
                    help="comma list of: inductor (always run: the baseline), never, exits, broadcast")
    ap.add_argument("--stack-kv", choices=("default", "on", "off"), default="default")
    ap.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM bandwidth per GPU (H200: 4800)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="baseline with Dynamo's eager backend, tide with FX graphs (smoke check)")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="stop starting new rows after this many seconds")
    ap.add_argument("--profile", default="",
                    help="comma list of row names (inductor_tp, tide_never_exit, tide_exit@16, "
                         "...) to profile after timing, under torch.profiler on every rank: "
                         "8 hand-loop steps (--loop dynamo) or one timed generate (--loop "
                         "generate); rank 0 prints the ops by device time and by self "
                         "CPU time and writes a Chrome trace beside --out")
    ap.add_argument("--loop", choices=("dynamo", "generate"), default="dynamo",
                    help="'dynamo': each step of a hand loop calls the compiled forward "
                         "(Dynamo's guards every step, a sync per step); 'generate': whole "
                         "generate calls per token (bench_decode --loop generate): tide "
                         "through optimize(..., kv=--kv).generate, which calls its "
                         "compiled runner directly after its first steps, Inductor through "
                         "an equal hand loop (eager prompt, compiled steps, no sync per step)")
    ap.add_argument("--kv", choices=("propagate", "deferred"), default="propagate",
                    help="--loop generate: optimize's kv (propagate: the exits' cost alone; "
                         "deferred, optimize's default: exited tokens' skipped layers run "
                         "later, batched with a deep step)")
    ap.add_argument("--unguarded", action="store_true",
                    help="every row's decode steps after the first skip Dynamo's full guard "
                         "evaluation (set_stance skip_guard_eval_unsafe), baseline included")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30),
                            **({"device_id": device} if cuda else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.time()

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    model, model_dir = load_tp_model(args, device, dtype)
    b = weight_bytes_per_gpu(model)
    interval = args.interval or (2 if args.tiny else 8)
    cfg = TIDEConfig(checkpoint_interval=interval)
    checkpoints = cfg.checkpoint_layers(b["num_layers"])
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=device)
    cache_len = args.prompt + args.steps + 8
    stack_kv = {"default": None, "on": True, "off": False}[args.stack_kv]
    env = {"torch": torch.__version__, "world_size": world, "device":
           torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
           "prompt": args.prompt, "steps": args.steps, "pairs": args.pairs,
           "checkpoints": checkpoints, "inductor": not args.no_inductor, "model_dir": model_dir,
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"), "stack_kv": args.stack_kv,
           "backend": dist.get_backend(), "hbm_gbps": args.hbm_gbps,
           "unguarded": args.unguarded, "loop": args.loop, "kv": args.kv}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    say(json.dumps(env))
    rows: list[dict] = []
    full_bytes = path_bytes(b, b["num_layers"])

    def bytes_fields(depth: int) -> dict:
        by = path_bytes(b, depth)
        return {"depth": depth, "bytes_per_gpu": by,
                "bound_ms": round(by / (args.hbm_gbps * 1e9) * 1e3, 4),
                "bound_speedup": round(full_bytes / by, 3)}

    def save() -> None:  # after every row: a call cut short keeps what it measured
        if rank == 0 and args.out:
            with open(args.out, "w") as f:
                json.dump({"env": env, "bytes_per_gpu": b, "rows": rows}, f, indent=1)

    def row(name, ms, **extra):
        r = {"name": name, "ms_per_token": round(ms, 4), **extra}
        # the absolute reading: the bytes bound in ms over the measured ms per token
        r["fraction_of_bytes_bound"] = round(r["bound_ms"] / r["ms_per_token"], 3)
        rows.append(r)
        say(json.dumps(r))
        save()

    # What ran as CUDA graphs: Inductor counts the graphs it declined to capture
    # (cudagraph_skips; TORCH_LOGS=cudagraphs prints why), tide's runners say whether
    # they captured their pieces (CUDA only).
    from torch._dynamo.utils import counters

    runners = record_graphed_runners() if cuda else []

    # The baseline, compiled once and kept: every tide row is paired with it.
    torch._dynamo.reset()
    t0 = time.time()
    if args.no_inductor:
        ind = torch.compile(model.forward, backend="eager", fullgraph=True)
    else:
        ind = torch.compile(model.forward, mode="reduce-overhead" if cuda else None, fullgraph=True)
    ind_cache = new_cache(model, cache_len)
    mark = cuda and not args.no_inductor

    gen_loop = args.loop == "generate"
    skip = 0 if gen_loop else args.warmup
    ind_loop = BucketedLoop(model, ind, device.type, mark, eager_prompt=True,
                            max_cache_len=cache_len, unguarded=args.unguarded)

    def run_inductor() -> list[float]:
        if gen_loop:
            return [generate_ms(ind_loop.generate, prompt, args.steps, device.type)]
        return decode_loop(ind, model, prompt, args.steps, ind_cache, device.type, mark,
                           args.unguarded)

    profiled = set(args.profile.split(",")) - {""}

    def profile_steps(name: str, work: Callable[[], Any], what: str) -> None:
        """``work`` (decode steps of a row) under torch.profiler on every rank (the
        collectives need both); rank 0 prints the tables and writes the trace."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            work()
        if rank == 0:
            report_profile(prof, f"{name}: {what}, rank 0", name, cuda, args.out)

    def profile_row(name: str, fn, cache, mark_step: bool, run: Callable[[], Any]) -> None:
        """The row's steps under the profiler, as the row was timed: 8 steps of the hand
        loop (``--loop dynamo``), or one timed generate (``--loop generate``)."""
        if gen_loop:
            profile_steps(name, run, f"one generate of {args.steps} tokens (prompt "
                                     f"{args.prompt}), as timed")
        else:
            profile_steps(name, lambda: decode_loop(fn, model, prompt, 8, cache, device.type,
                                                    mark_step, args.unguarded),
                          "8 decode steps (+ an eager prefill)")

    skips0 = counters["inductor"]["cudagraph_skips"]
    if gen_loop:
        run_inductor()  # compiles
    base = summarize(run_inductor(), skip)
    base_name = "inductor_tp" if not args.no_inductor else "eager_backend_tp"
    row(base_name, base,
        compile_and_first_s=round(time.time() - t0, 1), **bytes_fields(b["num_layers"]),
        cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips0)
    if base_name in profiled:
        profile_row(base_name, ind, ind_cache, mark, run_inductor)

    def tide_row(name: str, exit_at: int | None) -> None:
        if not rank0_says(time.time() - start <= args.time_budget):
            say(f"# skipped {name}: time budget")
            return
        routers = RouterSet.forced(model, exit_at=exit_at, config=cfg)
        t0 = time.time()
        runners.clear()
        if gen_loop:
            fast, run_tide = optimized_generate(
                model, routers, {"kv": args.kv, "inductor": not args.no_inductor},
                stack_kv, prompt, args.steps, device.type, cache_len)
            stats = fast.tide_stats
            run_tide()  # compiles, captures, switches to the direct call
            fn, cache = None, None
        else:
            stats = ExitStats(b["num_layers"])
            fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                               options={"routers": routers, "stats": stats, "strategy": "skip",
                                        "stack_kv": stack_kv,
                                        "inductor": not args.no_inductor})
            cache = new_cache(model, cache_len)

            def run_tide() -> list[float]:
                return decode_loop(fn, model, prompt, args.steps, cache, device.type, False,
                                   args.unguarded)

            run_tide()  # compiles, captures
        compiled_s = round(time.time() - t0, 1)
        stats.reset()
        paired = interleaved_pairs(run_inductor, run_tide, args.pairs, skip)
        ms = paired.pop("ms_per_token")
        depth = b["num_layers"] if exit_at is None else exit_at + 1
        fields = bytes_fields(depth)
        speedup = 1.0 / paired["ratio_median"]
        lockstep = same_on_all_ranks((dict(stats.exits_per_layer), stats.layers_executed,
                                      stats.total_tokens))
        row(name, ms, **fields, speedup_vs_inductor=round(speedup, 3),
            fraction_of_bound=round(speedup / fields["bound_speedup"], 3),
            mean_layers_executed=round(stats.mean_layers_executed, 2), lockstep=lockstep,
            compile_and_first_s=compiled_s, graphed_runners=len(runners),
            captured_runners=sum(bool(getattr(r, "captured", False)) for r in runners),
            **paired)
        if name in profiled:
            profile_row(name, fn, cache, False, run_tide)

    wanted = set(args.rows.split(","))
    if "never" in wanted:
        tide_row("tide_never_exit", None)
    if "exits" in wanted:
        depths = [int(d) for d in args.depths.split(",") if d] or [c + 1 for c in checkpoints]
        for d in depths:
            if d - 1 not in checkpoints:
                raise SystemExit(f"--depths: {d} is not a checkpoint depth "
                                 f"({[c + 1 for c in checkpoints]})")
            tide_row(f"tide_exit@{d}", d - 1)
    if "broadcast" in wanted:
        r = broadcast_flag_us(device)
        rows.append({"name": "broadcast_flag", **r})
        say(json.dumps(rows[-1]))
        save()

    if rank == 0:
        print(f"\nTP={world}; bytes per GPU per step; ratios: median of interleaved pairs")
        print("\n| row | ms/token | x baseline (pairs) | bytes/GPU (GB) | bound ms | bound x | "
              "of bound x | of bound ms | layers run | lockstep |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "ms_per_token" not in r:
                continue
            x = r.get("speedup_vs_inductor", 1.0)
            spread = ""
            if "ratio_range" in r:
                lo, hi = r["ratio_range"]
                spread = f" [{1 / hi:.3f}-{1 / lo:.3f}]"
            print(f"| {r['name']} | {r['ms_per_token']:.3f} | {x:.3f}{spread} | "
                  f"{r['bytes_per_gpu'] / 1e9:.4f} | {r['bound_ms']} | {r['bound_speedup']} | "
                  f"{r.get('fraction_of_bound', '')} | {r['fraction_of_bytes_bound']} | "
                  f"{r.get('mean_layers_executed', '')} | "
                  f"{r.get('lockstep', '')} |")
        for r in rows:
            if r["name"] == "broadcast_flag":
                print(f"\nbroadcast of a flag from rank 0 + host read: median {r['median_us']} us, "
                      f"p90 {r['p90_us']} us")
    # The eighth device session's run hung after its table (in the final barrier or the
    # process group's teardown) until the call's timeout. Every result is written by now,
    # so each rank leaves at once: no barrier, no NCCL teardown.
    say("# done")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
