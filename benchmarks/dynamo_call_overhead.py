"""Host time of one Dynamo call of a decode step, with a backend that does nothing.

A 32-layer Llama (tiny hidden size: the number of graph inputs, 390, is what costs) on
a StaticCache; the backend returns the outputs it computed once, so each timed call is
Dynamo's guards, the gathering of the graph inputs and the output reconstruction, the
host work every compiled decode step pays (Inductor's and tide's alike) before its own.

Usage: python benchmarks/dynamo_call_overhead.py [--layers 32] [--calls 300]
"""

import argparse
import time

import torch
import transformers as T
from transformers import StaticCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                        max_position_embeddings=512)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    inputs = {}

    def backend(gm, example_inputs, **_):
        outs = gm(*example_inputs)
        inputs["n"] = len(example_inputs)
        return lambda *a: outs

    cache = StaticCache(config=cfg, max_cache_len=256)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 1000, (1, 8)), past_key_values=cache, use_cache=True)
        fn = torch.compile(model.forward, backend=backend, fullgraph=True)
        tok, pos = torch.tensor([[5]]), torch.tensor([[8]])
        for _ in range(5):
            fn(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
        us = (time.perf_counter() - t0) / args.calls * 1e6
    print(f"{args.layers} layers, {inputs['n']} graph inputs: {us:.1f} us per call")


if __name__ == "__main__":
    main()
