"""The executable spec of early exit: eager, layer by layer, with the model's own modules.

This is the oracle every compiled path is tested against, and the plainest statement of
what an exit means. It is not the fast path: it runs every layer for every token.

Semantics (the one every compiled path is held to):

* A token exits at the first checkpoint ``c`` (in ``routers.checkpoint_layers``, at or
  after ``min_layers``) where its router score is strictly greater than
  ``exit_threshold``. Padding tokens never exit.
* Its logits are ``lm_head(final_norm(E_c(h_c)))``.
* Its K/V at the layers ``l > c`` it skipped, which later tokens attend to, come from
  one of two semantics (``kv``):

  - ``"propagate"`` (CALM's state propagation): layer ``l``'s own K/V path (input norm,
    k/v projections, k-norm, rotary) applied to the frozen state ``h_c``. Every cache
    stays complete, but later tokens attend to K/V the full model would never produce.
  - ``"deferred"`` (exact): the token's remaining layers run later, before any later
    token reads them, so every K/V in the cache is the full model's own and only the
    exited token's own logits are approximate. Teacher-forced, this is each token's own
    exit head with all K/V exact ("independent exits", what calibration measures). The
    reference runs every layer for every token at once, which writes the same cache;
    when the compiled runner runs the deferred layers is an execution detail that does
    not change any output.

How: the model's own forward runs unchanged, with three kinds of hooks (``deferred``
registers no pre-hooks on the later layers). A forward hook
on each checkpoint layer scores the tokens that have not exited yet and freezes the
exiting ones' states. A pre-hook on every later layer feeds exited tokens their frozen
state as that layer's input, so the layer computes (and caches) their K/V from ``h_c``;
what the layer computes for them beyond K/V is discarded at the next layer's input. A
pre-hook on the final norm replaces exited tokens' states by ``E_c(h_c)``. Masks,
positions, rotary and cache handling are therefore exactly the model's own, for every
architecture the probe supports.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import TIDEConfig
from .model_probe import ModelProbe, probe
from .options import KV_MODES, resolve_exits
from .routers import RouterSet
from .sampling import eos_and_pad, position_ids_from_mask, sample_next
from .stats import ExitStats
from .validation import check_generate_args

__all__ = ["forward", "generate", "ForwardOutput", "GenerateOutput", "ExitState", "KV_MODES", "check_kv"]

def check_kv(kv: str) -> str:
    """``kv`` if it is one of :data:`~.options.KV_MODES` (the K/V semantics of skipped
    layers, module docstring), else a ValueError naming them."""
    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}, got {kv!r}")
    return kv


class ForwardOutput(NamedTuple):
    logits: torch.Tensor
    """``[batch, seq, vocab]``."""
    stats: ExitStats
    exit_layers: torch.Tensor
    """``[batch, seq]``: the checkpoint each token exited at, -1 for none."""
    past_key_values: Any


class GenerateOutput(NamedTuple):
    sequences: torch.Tensor
    """``[batch, prompt + new]``, as ``model.generate`` returns (finished rows padded)."""
    stats: ExitStats


class ExitState:
    """Per-token exit bookkeeping for one forward call."""

    def __init__(self, batch: int, seq: int, hidden: int, like: torch.Tensor,
                 valid: torch.Tensor) -> None:
        self.exited = torch.zeros(batch, seq, dtype=torch.bool, device=like.device)
        self.exit_layer = torch.full((batch, seq), -1, dtype=torch.long, device=like.device)
        self.frozen = torch.zeros(batch, seq, hidden, dtype=like.dtype, device=like.device)
        self.valid = valid


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _replace_hidden_arg(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = value
    return args, kwargs


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def forward(
    model: nn.Module,
    routers: RouterSet,
    input_ids: torch.Tensor,
    config: TIDEConfig | None = None,
    past_key_values: Any = None,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    exit_threshold: float | None = None,
    kv: str = "propagate",
    _probe: ModelProbe | None = None,
) -> ForwardOutput:
    """One forward pass with per-token early exit.

    Args:
        model: an HF causal LM.
        routers: routers made for ``model`` (checked).
        input_ids: ``[batch, seq]``.
        config: threshold and ``min_layers``; defaults to ``routers.config``.
        past_key_values: a ``DynamicCache`` or ``StaticCache`` (updated in place), or None.
        attention_mask: ``[batch, past + seq]``, 0 at padding, as HF models take it.
        position_ids: passed to the model where it accepts them (left padding).
        exit_threshold: overrides ``config.exit_threshold``.
        kv: ``"propagate"`` or ``"deferred"``: the K/V of exited tokens at the layers
            they skip (module docstring).

    Returns:
        logits, stats (counted over non-padding tokens), exit layers, the cache.
    """
    check_kv(kv)
    p = _probe or probe(model)
    routers.check_model(p)
    config = config or routers.config
    if exit_threshold is not None:  # TIDEConfig checks the range (a ValueError)
        config = config.replace(exit_threshold=float(exit_threshold))
    threshold, active = resolve_exits(routers, config.exit_threshold, config.min_layers)
    batch, seq = input_ids.shape
    if attention_mask is not None:
        valid = attention_mask[:, -seq:].bool()
    else:
        valid = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
    param = next(model.parameters())
    state = ExitState(batch, seq, p.hidden_size, param, valid)
    first = active[0] if active else p.num_layers
    handles = []

    def make_checkpoint_hook(c: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h = _layer_output(output)
            features = (routers.confidence(c, h, input_ids, p) if routers.successor is not None
                        else None)
            score = routers.score(c, h, features)
            new = (~state.exited) & state.valid & (score > threshold)
            state.frozen = torch.where(new[..., None], h, state.frozen)
            state.exit_layer = torch.where(new, torch.full_like(state.exit_layer, c),
                                           state.exit_layer)
            state.exited = state.exited | new
        return hook

    def freeze_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
        if not bool(state.exited.any()):
            return None
        h = _hidden_arg(args, kwargs)
        return _replace_hidden_arg(args, kwargs, torch.where(state.exited[..., None],
                                                             state.frozen.to(h.dtype), h))

    def final_norm_pre_hook(module: nn.Module, args: tuple):
        if not bool(state.exited.any()):
            return None
        h = args[0]
        out = h
        for c in active:
            rows = state.exit_layer == c
            if bool(rows.any()):
                out = torch.where(rows[..., None], routers.exit_state(c, state.frozen).to(h.dtype),
                                  out)
        return (out, *args[1:])

    try:
        for c in active:
            handles.append(p.layers[c].register_forward_hook(make_checkpoint_hook(c),
                                                             with_kwargs=True))
        for layer_idx in range(first + 1, p.num_layers) if kv == "propagate" else ():
            handles.append(p.layers[layer_idx].register_forward_pre_hook(freeze_pre_hook,
                                                                         with_kwargs=True))
        handles.append(p.final_norm.register_forward_pre_hook(final_norm_pre_hook))
        kwargs: dict[str, Any] = {"use_cache": past_key_values is not None}
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None and _accepts(model, "position_ids"):
            kwargs["position_ids"] = position_ids
        out = model(input_ids=input_ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    stats = ExitStats(num_layers=p.num_layers)
    exits = state.exit_layer[state.valid]
    # The reference runs every layer for every token: count what ran.
    stats.record(exits, layers_executed=int(exits.numel()) * p.num_layers)
    return ForwardOutput(out.logits, stats, state.exit_layer,
                         getattr(out, "past_key_values", past_key_values))


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def generate(
    model: nn.Module,
    routers: RouterSet,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    config: TIDEConfig | None = None,
    exit_threshold: float | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cache: str = "dynamic",
    kv: str = "propagate",
) -> GenerateOutput:
    """Decode with early exit, one token per step, as ``model.generate`` would.

    Left-padded batches take an ``attention_mask``; a row stops at EOS (from the
    arguments or ``model.generation_config``) and is padded afterwards; decoding stops
    when every row has stopped or after ``max_new_tokens``.

    Args:
        cache: ``"dynamic"`` (``DynamicCache``) or ``"static"`` (``StaticCache`` sized
            to prompt + ``max_new_tokens``).
        kv: ``"propagate"`` or ``"deferred"`` (module docstring). With ``"deferred"``
            every prompt token's K/V is exact too; its last position may exit.
    """
    check_generate_args(model, input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p)
    from transformers import DynamicCache, StaticCache

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_kv(kv)
    p = probe(model)
    routers.check_model(p)
    batch, prompt_len = input_ids.shape
    eos, pad_token_id = eos_and_pad(model, eos_token_id, pad_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cache == "dynamic":
        past: Any = DynamicCache(config=model.config)
    elif cache == "static":
        past = StaticCache(config=model.config, max_cache_len=prompt_len + max_new_tokens)
    else:
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")

    stats = ExitStats(num_layers=p.num_layers)
    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    positions = position_ids_from_mask(attention_mask)
    for _ in range(max_new_tokens):
        out = forward(model, routers, step_ids, config, past_key_values=past,
                      attention_mask=attention_mask, position_ids=positions,
                      exit_threshold=exit_threshold, kv=kv, _probe=p)
        stats.merge(_live_rows(out, step_ids, unfinished, attention_mask, p.num_layers))
        past = out.past_key_values
        next_ids = sample_next(out.logits[:, -1, :], do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, generator=generator)
        next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
        sequences = torch.cat([sequences, next_ids[:, None]], dim=-1)
        if eos:
            unfinished = unfinished & ~torch.isin(next_ids, torch.tensor(eos, device=next_ids.device))
        if not bool(unfinished.any()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        positions = positions[:, -1:] + 1
        step_ids = next_ids[:, None]
    return GenerateOutput(sequences, stats)


def _live_rows(out: ForwardOutput, step_ids: torch.Tensor, unfinished: torch.Tensor,
               attention_mask: torch.Tensor, num_layers: int) -> ExitStats:
    """Stats of one step counting only real tokens of rows still generating."""
    seq = step_ids.shape[1]
    keep = attention_mask[:, -seq:].bool() & unfinished[:, None]
    stats = ExitStats(num_layers=num_layers)
    exits = out.exit_layers[keep]
    stats.record(exits, layers_executed=int(exits.numel()) * num_layers)
    return stats
