"""Checks of user input, and the one error type they raise.

Every check here is a plain function that returns quietly or raises :class:`TIDEError`
with a one-line message naming the fix. The public entry points call them first, before
any work: ``TIDEModel.generate`` and ``reference.generate`` (:func:`check_generate_args`),
the ``tide`` backend's options (:func:`check_backend_options`) and its graphs
(:func:`check_graph_for_routers`); the command line calls the single-argument checks
(:func:`check_temperature`, :func:`check_top_k`, :func:`check_top_p`) as argument types.

torch is imported inside the functions that need it: importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.fx as fx
    from torch import nn

    from .routers import RouterSet

__all__ = [
    "TIDEError",
    "check_temperature",
    "check_top_k",
    "check_top_p",
    "check_sampling",
    "check_input_ids",
    "check_attention_mask",
    "check_generate_args",
    "check_min_layers",
    "check_backend_options",
    "check_graph_for_routers",
    "graph_fingerprint",
    "routers_mismatch",
]


class TIDEError(ValueError):
    """Bad input to tide_compile: the message is one line that names the fix.

    A ``ValueError``, so code that caught ``ValueError`` before keeps working. Every error
    tide_compile raises on purpose for bad input (arguments, files, models, routers) is
    one of these (or a subclass, such as ``CalibrationDataError``).
    """


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- sampling
def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float; it must be a finite number > 0."""
    if not _is_real(temperature) or temperature <= 0 or not (
            isinstance(temperature, int) or math.isfinite(temperature)):
        raise TIDEError(f"temperature must be a finite number > 0, got {temperature!r} "
                        "(1.0 samples from the model's distribution; for greedy decoding "
                        "leave do_sample off)")
    return float(temperature)


def check_top_k(top_k: Any) -> int | None:
    """``top_k``: None, or an int >= 0 (0 and None keep every token)."""
    if top_k is None:
        return None
    if not _is_int(top_k) or top_k < 0:
        raise TIDEError(f"top_k must be an integer >= 0 (0 or None: no top-k filter), got {top_k!r}")
    return top_k


def check_top_p(top_p: Any) -> float | None:
    """``top_p``: None, or a number in (0, 1] (1 and None keep every token)."""
    if top_p is None:
        return None
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise TIDEError(f"top_p must be in (0, 1] (1 or None: no nucleus filter), got {top_p!r}")
    return float(top_p)


def check_sampling(*, do_sample: Any, temperature: Any, top_k: Any, top_p: Any) -> None:
    """The sampling arguments of ``generate`` (checked whether or not ``do_sample``)."""
    if not isinstance(do_sample, bool):
        raise TIDEError(f"do_sample must be True or False, got {do_sample!r}")
    check_temperature(temperature)
    check_top_k(top_k)
    check_top_p(top_p)


# ---------------------------------------------------------------------------- inputs
def check_input_ids(input_ids: Any, *, vocab_size: int | None = None) -> None:
    """``input_ids`` must be a non-empty 2-D integer tensor ``[batch, seq]``, each id in
    ``[0, vocab_size)`` when ``vocab_size`` is given."""
    import torch

    if not isinstance(input_ids, torch.Tensor):
        raise TIDEError(f"input_ids must be a torch.Tensor [batch, seq] of token ids, got "
                        f"{type(input_ids).__name__} (tokenizer(text, return_tensors='pt').input_ids)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TIDEError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype} "
                        "(use input_ids.long())")
    if input_ids.dim() != 2:
        hint = " (add the batch dimension: input_ids[None])" if input_ids.dim() == 1 else ""
        raise TIDEError(f"input_ids must be 2-D [batch, seq], got shape {list(input_ids.shape)}{hint}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise TIDEError(f"input_ids is empty (shape {list(input_ids.shape)}): pass at least one "
                        "prompt token per row (e.g. the BOS token)")
    if vocab_size is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise TIDEError(f"input_ids holds token id {bad}, outside the model's vocabulary "
                            f"[0, {vocab_size}): was it encoded with this model's tokenizer?")


def check_attention_mask(attention_mask: Any, input_ids: "torch.Tensor") -> None:
    """An ``attention_mask`` for ``input_ids``: same shape, 0/1 values, padding on the left
    only, at least one real token per row."""
    import torch

    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TIDEError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise TIDEError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids "
                        f"{list(input_ids.shape)}: pass the mask the tokenizer returned with the ids")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise TIDEError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.bool()
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise TIDEError(f"attention_mask row {int(empty[0, 0])} is all padding: every row needs "
                        "at least one token")
    # A 0 after a 1 in a row: right padding (or a hole), which the decode loop cannot take.
    right = (mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()
    if right.numel():
        raise TIDEError(f"attention_mask row {int(right[0, 0])} has padding after its tokens "
                        "(right padding): pad prompts on the left (tokenizer.padding_side = 'left')")


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if _is_int(value) and value > 0:
            return value
    return None


def check_generate_args(
    model: "nn.Module",
    input_ids: Any,
    max_new_tokens: Any,
    *,
    attention_mask: Any = None,
    do_sample: Any = False,
    temperature: Any = 1.0,
    top_k: Any = None,
    top_p: Any = None,
) -> None:
    """All argument checks of a ``generate`` call, before any work.

    Raises :class:`TIDEError` for bad ``input_ids`` (not a non-empty 2-D integer tensor, an
    id outside the vocabulary), a bad ``attention_mask`` (shape, values, right padding),
    bad sampling arguments, or ``max_new_tokens`` that is not an int >= 0. Warns when
    prompt + ``max_new_tokens`` passes the model's ``max_position_embeddings``.
    """
    vocab = None
    embed = getattr(model, "get_input_embeddings", None)
    if callable(embed):
        table = embed()
        vocab = getattr(table, "num_embeddings", None)
    check_input_ids(input_ids, vocab_size=vocab if _is_int(vocab) else None)
    check_attention_mask(attention_mask, input_ids)
    check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise TIDEError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = _max_positions(model)
    total = input_ids.shape[1] + max_new_tokens
    if limit is not None and total > limit:
        warnings.warn(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"positions passes the model's max_position_embeddings ({limit}): text past it is "
            "usually garbage; shorten the prompt or lower max_new_tokens",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------- backend
def check_min_layers(min_layers: Any, num_layers: int) -> None:
    """``min_layers`` (None: the routers' own) must be an int in [1, num_layers]."""
    if min_layers is None:
        return
    if not _is_int(min_layers) or min_layers < 1:
        raise TIDEError(f"min_layers must be an integer >= 1, got {min_layers!r}")
    if min_layers > num_layers:
        raise TIDEError(f"min_layers={min_layers} is beyond the model's {num_layers} layers, so no "
                        f"token could exit: set min_layers to at most {num_layers - 1} "
                        "(or exit_threshold=1.0 to never exit)")


def check_backend_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``tide`` backend's options, checked; returns a copy with a router file path
    replaced by the loaded :class:`~tide_compile.routers.RouterSet`.

    Checks what ``BackendOptions`` cannot see from its types: ``inductor`` must be a bool
    (a string such as ``'no'`` is truthy), and ``min_layers`` must not pass the routers'
    layer count.
    """
    from .routers import RouterSet

    if options is not None and not isinstance(options, Mapping):
        raise TIDEError(f"tide backend options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    if "inductor" in options and not isinstance(options["inductor"], bool):
        raise TIDEError(f"options['inductor'] must be True or False, got {options['inductor']!r}")
    routers = options.get("routers")
    if isinstance(routers, (str, os.PathLike)):
        routers = options["routers"] = RouterSet.load(routers)
    if isinstance(routers, RouterSet):
        check_min_layers(options.get("min_layers"), routers.num_layers)
    return options


# Suffix of a decoder layer's module path (as passes.layers matches it), after
# ``_modules['x']`` / ``[N]`` spellings are normalized to dots.
_LAYER_PATH = re.compile(r"(?:^|\.)(layers|h|blocks)\.(\d+)$")


def _normalize_path(path: str) -> str:
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    return re.sub(r"\[['\"]?(\w+)['\"]?\]", r".\1", path)


def _layer_index(node: "fx.Node") -> int | None:
    """Decoder layer of a node from its deepest ``nn_module_stack`` entry, or None."""
    found = None
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) else value
        m = _LAYER_PATH.search(_normalize_path(str(path)))
        if m:
            found = int(m.group(2))
    return found


def graph_fingerprint(gm: "fx.GraphModule") -> dict[str, int]:
    """What a Dynamo graph of a causal LM's forward says about its model.

    Only for a whole forward (the token embedding before the first decoder layer, module
    calls after the last one), so that the graph's layers are all of the model's; a
    graph that is only part of one (a graph break) gives ``{}``. Keys: ``num_layers``;
    ``hidden_size``, the width of the last layer's output where the first module after
    the layers (the final norm) reads it; ``vocab_size`` from the logits (the one 3-D
    floating output computed after the last layer), where the graph shows them.
    """
    import torch
    import torch.nn.functional as F

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    layer_at = [_layer_index(n) for n in nodes]
    in_layer = [i for i, l in enumerate(layer_at) if l is not None]
    if not in_layer:
        return {}
    first, last = in_layer[0], in_layer[-1]
    embeds = any(n.op == "call_function" and n.target in (F.embedding, torch.embedding)
                 for n in nodes[:first])
    after = [n for n in nodes[last + 1:] if n.meta.get("nn_module_stack")]
    if not embeds or not after:
        return {}
    info = {"num_layers": max(l for l in layer_at if l is not None) + 1}
    layer_nodes = {nodes[i] for i in in_layer}
    for n in after:
        widths = {
            int(v.shape[-1]) for a in n.all_input_nodes if a in layer_nodes
            for v in [a.meta.get("example_value")]
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.dtype.is_floating_point
            and isinstance(v.shape[-1], int)
        }
        if widths:
            if len(widths) == 1:
                info["hidden_size"] = widths.pop()
            break
    late = set(nodes[last + 1:])
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = [
        v for a in torch.utils._pytree.tree_leaves(output.args)
        if isinstance(a, torch.fx.Node) and a in late
        for v in [a.meta.get("example_value")]
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.dtype.is_floating_point
    ]
    if len(logits) == 1 and isinstance(logits[0].shape[-1], int):
        info["vocab_size"] = int(logits[0].shape[-1])
    return info


def check_graph_for_routers(gm: "fx.GraphModule", routers: "RouterSet") -> None:
    """Raise the same "made for another model" :class:`TIDEError` as
    ``RouterSet.check_model`` when a Dynamo graph's model is not the routers' (layer
    count, hidden size, vocabulary), before any pass reads the graph.

    A graph that is only part of a forward (a graph break) shows fewer facts; what it
    does not show is not compared.
    """
    seen = graph_fingerprint(gm)
    info = routers.model_info
    diffs = [
        f"{key}: routers {info.get(key)!r}, model {seen[key]!r}"
        for key in ("num_layers", "hidden_size", "vocab_size")
        if key in seen and info.get(key) is not None and info.get(key) != seen[key]
    ]
    if diffs:
        raise routers_mismatch(diffs)


def routers_mismatch(diffs: list[str]) -> TIDEError:
    """The error for routers made for another model; ``diffs`` name what differs."""
    return TIDEError(
        "these routers were made for another model (" + "; ".join(diffs) + "). "
        "Calibrate routers for this model with tide_compile.calibrate(model, ...)."
    )
