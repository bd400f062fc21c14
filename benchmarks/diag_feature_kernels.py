"""Which kernels the confidence features add to a checkpoint (diagnostic, one GPU or CPU).

A Llama with the 8B shape's widths (hidden 4096, vocabulary 128256, bf16 on CUDA) and
``--layers`` layers, a checkpoint after every ``--interval`` layers, never-exit routers
from ``RouterSet.forced``: once plain (``rms``), once reading the confidence features
(``RouterSet.forced(..., confidence_k=k)``). Each is compiled with the tide backend
(Inductor, CUDA graphs off so the profiler sees every kernel) and one decode step on a
StaticCache is profiled. Printed: the kernels of the step by name and count, and the
kernels and device time the features add per checkpoint.

Usage: python benchmarks/diag_feature_kernels.py [--layers 4] [--interval 2] [--k 64] [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tide_compile import ExitStats, RouterSet, TIDEConfig  # noqa: E402


def step_kernels(model, routers, prompt, device: str) -> tuple[collections.Counter, float]:
    """Kernel name -> launches, and device microseconds, of one compiled decode step."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    torch._dynamo.reset()
    stats = ExitStats(routers.num_layers)
    fn = torch.compile(model.forward, backend="tide", fullgraph=True,
                       options={"routers": routers, "stats": stats, "strategy": "skip",
                                "cuda_graphs": False})
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 16)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)  # eager prefill
        tok = prompt[:, -1:].clone()
        for _ in range(3):  # compile, warm
            fn(input_ids=tok, past_key_values=cache, use_cache=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            fn(input_ids=tok, past_key_values=cache, use_cache=True)
            if device == "cuda":
                torch.cuda.synchronize()
    counts: collections.Counter = collections.Counter()
    us = 0.0
    for e in prof.events():
        if device == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            counts[e.name[:90]] += 1
            us += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif device != "cuda" and e.name.startswith(("cpp_fused", "aten::mm", "aten::addmm")):
            counts[e.name[:90]] += 1
    return counts, us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    config = TIDEConfig(checkpoint_interval=args.interval)
    checkpoints = len(config.checkpoint_layers(args.layers))
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    rms, rms_us = step_kernels(model, RouterSet.forced(model, None, config), prompt, device)
    conf, conf_us = step_kernels(model, RouterSet.forced(model, None, config, confidence_k=args.k),
                                 prompt, device)
    added = conf - rms
    removed = rms - conf
    result = {"device": device, "layers": args.layers, "checkpoints": checkpoints, "k": args.k,
              "kernels_rms": sum(rms.values()), "kernels_conf": sum(conf.values()),
              "added_per_checkpoint": (sum(conf.values()) - sum(rms.values())) / checkpoints,
              "device_us_rms": round(rms_us, 1), "device_us_conf": round(conf_us, 1),
              "added_us_per_checkpoint": round((conf_us - rms_us) / checkpoints, 2),
              "added": dict(added), "removed": dict(removed)}
    print(json.dumps(result, indent=1))
    print("\nall kernels of the conf step:")
    for name, n in sorted(conf.items(), key=lambda kv: -kv[1]):
        print(f"{n:4d}  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
