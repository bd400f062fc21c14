"""Pass `compact`: the segment graphs that run the layers after a checkpoint on a subset
of the step's tokens (prefill compaction along the sequence).

Matches: a graph with a symbolic sequence length (Dynamo's dynamic-shape graph, e.g. a
prefill with ``torch._dynamo.mark_dynamic(input_ids, 1)``) that writes a StaticCache in
place, split by :mod:`.segment` with ``cut_before_head=True``.

The idea: a segment graph compiled for a symbolic length ``s`` runs unchanged on ``n``
tokens when every value it reads that has a dimension of size ``s`` is gathered along
that dimension (hidden states, exit state, rotary tables, mask rows, cache positions) and
``n`` is passed for ``s``. Attention still reads the whole cache (keys are positions, not
``s``), so the compacted tokens attend to every earlier token, whose K/V the KV-fill
graph wrote from the frozen states. Two things in a layer depend on the tokens being
``0 .. s-1`` of the step and are rewritten here:

- ``torch.arange(s)``: the step's token offsets (transformers' StaticCache computes its
  write positions as ``arange(s) + counter``). In a compacted graph it reads a new input
  ``tide_offsets``: the original offsets of the kept tokens.
- the cache's write counters (0-dim integer placeholders advanced in place by ``s``)
  advance by ``n`` instead; :class:`CompactPlan` lists them so the runner can correct
  them after the step.

Emits a :class:`CompactPlan`: the sequence symbol, per value name its sequence dimension,
the compacted copy of every segment after the first checkpoint (inputs as the segment's,
then ``tide_offsets``), the sequence-length placeholders, and the counters.

Refuses (:class:`PassError`, with the reason; the backend then falls back to the frozen
strategy with a warning): a static graph (no symbolic length to compact); no in-place
cache writes after the first checkpoint (a DynamicCache appends K/V by ``cat``, whose
length is ``s``: keys could not be gathered); a graph output computed by the layers
(StaticCache tensors created inside the graph); a value with the symbol in two
dimensions or in a derived size (``s + 1``); an ``arange`` over ``s`` with a start or step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ._fx import PassError, example_value, mutated_args, storage_key, target_name
from .insert import STATE_NAMES
from .layers import META_KEY, LayerInfo
from .segment import SplitGraph, output_nodes

if TYPE_CHECKING:
    from . import PassContext

__all__ = ["CompactPlan", "run", "compacted_segments", "OFFSETS"]

#: Name of the extra input of compacted segments: the kept tokens' offsets in the step.
OFFSETS = "tide_offsets"


@dataclass
class CompactPlan:
    """How to run the segments after a checkpoint on a subset of tokens.

    Attributes:
        seq_dims: value name -> the dimension of size ``s`` (values without one absent).
        seq_symbols: names of the SymInt placeholders equal to ``s`` (passed ``n``).
        segments: segment index -> compacted GraphModule (segments ``1 ..`` of the split;
            inputs: the segment's ``input_names`` then :data:`OFFSETS`).
        counters: names of the 0-dim integer placeholders the compacted segments advance
            in place (StaticCache write counters).
    """

    seq_dims: dict[str, int]
    seq_symbols: tuple[str, ...]
    segments: dict[int, fx.GraphModule] = field(default_factory=dict)
    counters: tuple[str, ...] = ()


def _expr(v: Any) -> Any:
    return v.node.expr if isinstance(v, torch.SymInt) else None


def run(gm: fx.GraphModule, ctx: "PassContext") -> CompactPlan:
    """Pass entry ``compact``: :func:`compacted_segments` of ``ctx.split`` (made by
    ``segment_before_head``)."""
    return compacted_segments(gm, ctx.need("layer_info", "layers"), ctx.need("split", "segment"))


def compacted_segments(gm: fx.GraphModule, info: LayerInfo, split: SplitGraph) -> CompactPlan:
    """The compacted segments of ``split`` (made from ``gm`` with ``cut_before_head=True``)."""
    first_cut = split.checkpoint_layers[0]
    state = example_value(info.state_after(first_cut))
    if not isinstance(state, torch.Tensor) or state.dim() < 2:
        raise PassError("the residual state has no sequence dimension")
    seq = _expr(state.shape[-2])
    if seq is None or not hasattr(seq, "free_symbols") or len(seq.free_symbols) != 1 \
            or seq not in seq.free_symbols:
        raise PassError(
            "compaction needs a graph whose sequence length is a symbol (a dynamic-shape "
            "prefill: torch._dynamo.mark_dynamic(input_ids, 1)); this graph is static"
        )

    # StaticCache: in-place writes on placeholders (or views of them) by the layers after
    # the first cut.
    placeholder_keys = {storage_key(p): p for p in gm.graph.nodes if p.op == "placeholder"}
    placeholder_keys.pop(None, None)
    writes = [n for n in gm.graph.nodes
              if isinstance(n.meta.get(META_KEY), int) and n.meta[META_KEY] > first_cut
              and any(storage_key(a) in placeholder_keys for a in mutated_args(n))]
    if not writes:
        raise PassError(
            "the layers after the first checkpoint write no cache in place: compaction needs "
            "a StaticCache (a DynamicCache appends K/V along the sequence)"
        )
    exit_state = {n for names in gm.meta.get(STATE_NAMES, {}).values() for n in names}
    for o in output_nodes(gm):
        if o is None or o.op == "placeholder" or o.name in exit_state:
            continue
        tag = o.meta.get(META_KEY)
        if isinstance(tag, int) and tag > first_cut:
            raise PassError(
                f"graph output {o.name!r} is computed by layer {tag} (a cache created inside "
                "the graph?): initialize the StaticCache before compiling "
                "(cache.early_initialization(...))"
            )

    seq_dims: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        ev = example_value(n)
        if not isinstance(ev, torch.Tensor):
            continue
        dims = [d for d, size in enumerate(ev.shape)
                if (e := _expr(size)) is not None and seq in e.free_symbols]
        if not dims:
            continue
        exact = [d for d in dims if _expr(ev.shape[d]) == seq]
        if len(dims) == 1 and exact:
            seq_dims[n.name] = dims[0]
        else:
            seq_dims[n.name] = -1  # refused only if a compacted segment reads it

    # The exit state the insert pass added (no fake values): [..., s] and [..., s, H].
    for names in gm.meta.get(STATE_NAMES, {}).values():
        for name in names:
            seq_dims[name] = state.dim() - 2
    known = {n.name for n in gm.graph.nodes if n.op == "placeholder"
             or example_value(n) is not None} | set(seq_dims)

    symbols = tuple(
        n.name for n in gm.graph.nodes
        if n.op == "placeholder" and _expr(example_value(n)) == seq
    )
    if not symbols:
        raise PassError("no graph input carries the sequence length: the runner could not "
                        "tell a step's length or pass the compacted one")
    result = CompactPlan(seq_dims=seq_dims, seq_symbols=symbols)
    mode = getattr(state, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        offsets_ev = torch.empty(state.shape[-2], dtype=torch.int64, device=state.device)

    counters: set[str] = set()
    for k in range(1, len(split.segments) - 1):
        seg = split.segments[k]
        for name in seg.input_names:
            if name not in known:
                raise PassError(f"value {name!r} read after checkpoint {first_cut} has no "
                                "recorded shape: cannot tell whether to gather it")
            if seq_dims.get(name) == -1:
                ev = example_value(next(n for n in gm.graph.nodes if n.name == name))
                raise PassError(
                    f"value {name!r} (shape {tuple(ev.shape)}) read after checkpoint "
                    f"{first_cut} has the sequence length in a derived size or in two "
                    "dimensions: it cannot be gathered to a subset of tokens"
                )
        result.segments[k] = _compacted(seg.gm, seq, offsets_ev)
        # Write counters: 0-dim integer inputs the segment advances in place.
        for n in seg.gm.graph.nodes:
            for a in mutated_args(n):
                p = placeholder_keys.get(storage_key(a))
                ev = example_value(p) if p is not None else None
                if isinstance(ev, torch.Tensor) and ev.dim() == 0 and not ev.is_floating_point():
                    counters.add(p.name)
    result.counters = tuple(sorted(counters))
    return result


def _compacted(seg_gm: fx.GraphModule, seq: Any, offsets_ev: Any) -> fx.GraphModule:
    """A copy of ``seg_gm`` whose ``arange(s)`` nodes read :data:`OFFSETS`."""
    gm = copy.deepcopy(seg_gm)
    graph = gm.graph
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_ph):
        offsets = graph.placeholder(OFFSETS)
    offsets.meta["example_value"] = offsets_ev
    for n in list(graph.nodes):
        if n.op != "call_function" or target_name(n) != "arange":
            continue
        args = list(n.args)
        ends = [a for a in args if _expr(_value(a)) is not None and seq in _expr(_value(a)).free_symbols]
        if not ends:
            continue
        start_ok = len(args) == 1 or (len(args) == 2 and args[0] == 0)
        if not start_ok or _expr(_value(args[-1])) != seq or "step" in n.kwargs \
                or "start" in n.kwargs or "end" in n.kwargs:
            raise PassError(
                f"{n.name!r} is torch.arange{tuple(args)} over the sequence length with a "
                "start or step: compaction rewrites only arange(s) (the step's token offsets)"
            )
        with graph.inserting_before(n):
            repl = graph.call_function(
                _as_offsets,
                (offsets,),
                {"dtype": n.kwargs.get("dtype"), "device": n.kwargs.get("device")},
            )
        repl.meta = dict(n.meta)
        n.replace_all_uses_with(repl)
        graph.erase_node(n)
    gm.recompile()
    return gm


def _value(a: Any) -> Any:
    return example_value(a) if isinstance(a, fx.Node) else a


def _as_offsets(offsets: torch.Tensor, dtype: torch.dtype | None = None,
                device: Any = None) -> torch.Tensor:
    """``arange(s)`` of a compacted step: the kept tokens' offsets."""
    return offsets.to(dtype=dtype or torch.int64, device=device or offsets.device)
