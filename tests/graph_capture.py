"""Capture the Dynamo graphs of a tiny HF model's forward, with the real inputs of each call.

A recording backend keeps every (GraphModule, example_inputs) Dynamo hands it and returns
a forward that also records the actual arguments of every call, cloned before the graph
runs (the graph mutates cache tensors in place). Dynamic-shape graphs get SymInts as
example inputs; the recorded calls hold the real ints, so tests run graphs on those.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Call", "Captured", "capture", "clone_args", "tensors_equal"]


@dataclass
class Call:
    """One call of a captured graph."""

    step: str
    args: tuple  # the graph's inputs as it received them, cloned before it ran
    model_kwargs: dict  # what model.forward got; the cache deep-copied as it was before

    def fresh_args(self) -> list:
        return clone_args(self.args)

    def fresh_model_kwargs(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.model_kwargs.items()}


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    example_inputs: list
    calls: list[Call] = field(default_factory=list)


def clone_args(args) -> list:
    """Clone every tensor except parameters (never mutated; keeps tied weights tied)."""
    return [
        a.clone() if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) else a
        for a in args
    ]


def tensors_equal(a: Any, b: Any, atol: float = 1e-5) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-5)
    return a == b


def capture(model: nn.Module, cache: str, prompt_len: int = 5, decode_steps: int = 2,
            batch: int = 1, seed: int = 0, max_cache_len: int = 64) -> list[Captured]:
    """Prefill ``prompt_len`` tokens then ``decode_steps`` single-token steps, compiled with
    a recording backend; ``cache`` is ``"static"`` or ``"dynamic"``."""
    from transformers import DynamicCache, StaticCache

    torch._dynamo.reset()
    graphs: list[Captured] = []
    state: dict[str, Any] = {}

    def backend(gm, example_inputs):
        cap = Captured(gm, list(example_inputs))
        graphs.append(cap)

        def forward(*args):
            cap.calls.append(Call(state["step"], tuple(clone_args(args)), state["kwargs"]))
            return gm.forward(*args)

        return forward

    f = torch.compile(model.forward, backend=backend, fullgraph=True)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    if cache == "static":
        pkv = StaticCache(config=model.config, max_cache_len=max_cache_len)
    elif cache == "dynamic":
        pkv = DynamicCache(config=model.config)
    else:
        raise ValueError(cache)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
    with torch.no_grad():
        for step in range(decode_steps + 1):
            kwargs = dict(input_ids=ids, past_key_values=pkv, use_cache=True)
            state["step"] = "prefill" if step == 0 else f"decode{step}"
            state["kwargs"] = {k: copy.deepcopy(v) for k, v in kwargs.items()}
            out = f(**kwargs)
            pkv = out.past_key_values
            ids = out.logits[:, -1:].argmax(-1)
    torch._dynamo.reset()
    return graphs
