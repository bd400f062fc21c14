"""Host time of one Dynamo call of a decode step, with a backend that does nothing.

A 32-layer Llama (tiny hidden size: the number of graph inputs, 390, is what costs) on
a StaticCache; the backend returns the outputs it computed once, so each timed call is
Dynamo's guards, the gathering of the graph inputs and the output reconstruction, the
host work every compiled decode step pays (Inductor's and tide's alike) before its own.
Each call is timed with Dynamo's guards evaluated (``guarded``) and with guard evaluation
skipped (``unguarded``: ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, as
``fast.generate``'s first steps and lossless's fallback runs do).

``--tp`` (under ``torchrun --nproc-per-node 2``, gloo): the same model loaded
tensor-parallel by transformers (``tp_plan="auto"``: its parameters are DTensors) next
to the unsharded one, each rank timing its own calls; rank 0 prints. On the 2-core CPU
(eleventh session, ``results/session11/dynamo_call_overhead_tp_cpu.json``) a TP=2 call
cost 1.8-3.0 ms guarded (three runs) and 0.66 ms unguarded, against 0.25 and 0.085 ms
unsharded: the cost a decode loop of one's own pays per step under TP, which
``fast.generate``'s direct runner calls do not. Under cProfile, most of the unguarded
call is the compiled frame's own bytecode gathering the graph inputs: one
``nn.Module.__getattr__`` and one ``DTensor.device_mesh`` read per DTensor parameter.

Usage: python benchmarks/dynamo_call_overhead.py [--layers 32] [--calls 300]
       torchrun --standalone --nproc-per-node 2 benchmarks/dynamo_call_overhead.py --tp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import transformers as T
from transformers import StaticCache


def time_calls(model, calls: int, repeats: int = 5) -> dict:
    """Median over ``repeats`` of the mean host time of ``calls`` Dynamo calls of the
    model's one-token step (no-op backend), guarded and unguarded, and the graph's
    input count."""
    torch._dynamo.reset()
    seen: dict = {}

    def backend(gm, example_inputs, **_):
        outs = gm(*example_inputs)
        seen["inputs"] = len(example_inputs)
        seen["dtensor_inputs"] = sum(1 for e in example_inputs if hasattr(e, "to_local"))
        return lambda *a: outs

    cache = StaticCache(config=model.config, max_cache_len=256)
    out: dict = {}
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, 8)),
              past_key_values=cache, use_cache=True)
        fn = torch.compile(model.forward, backend=backend, fullgraph=True)
        tok, pos = torch.tensor([[5]]), torch.tensor([[8]])

        def step():
            fn(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)

        for _ in range(5):
            step()
        for mode in ("guarded", "unguarded"):
            samples = []
            for _ in range(repeats):
                with torch.compiler.set_stance("default",
                                               skip_guard_eval_unsafe=mode == "unguarded"):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        step()
                    samples.append((time.perf_counter() - t0) / calls * 1e6)
            out[f"{mode}_us"] = round(statistics.median(samples), 1)
    return {**out, **seen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--tp", action="store_true",
                    help="also the tensor-parallel model (run under torchrun, 2 ranks, gloo)")
    ap.add_argument("--out", default=None, help="write the rows as JSON (rank 0)")
    args = ap.parse_args()
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                        max_position_embeddings=512)
    rows: dict = {}
    if not args.tp:
        rows["single"] = time_calls(T.AutoModelForCausalLM.from_config(cfg).eval(), args.calls)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        path = os.path.join(tempfile.gettempdir(), f"tide_dco_llama_{args.layers}")
        if rank == 0:
            torch.manual_seed(0)
            T.LlamaForCausalLM(cfg).save_pretrained(path)
        dist.barrier()
        rows["single"] = time_calls(
            T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), args.calls)
        rows[f"tp{dist.get_world_size()}"] = time_calls(
            T.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32,
                distributed_config=T.DistributedConfig(tp_plan="auto")).eval(), args.calls)
        dist.barrier()
        if rank != 0:
            return
    for name, r in rows.items():
        print(f"{name}: {args.layers} layers, {r['inputs']} graph inputs "
              f"({r['dtensor_inputs']} DTensor): {r['guarded_us']:.1f} us per call guarded, "
              f"{r['unguarded_us']:.1f} us unguarded")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"layers": args.layers, "calls": args.calls, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
