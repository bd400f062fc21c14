"""Graph passes of the ``tide`` backend, one file each, run from lists by :func:`run_passes`.

Each pass is ``run(gm, ctx) -> result``: it reads the Dynamo graph and the results of
earlier passes from the :class:`PassContext`, and returns its own result, which
:func:`run_passes` stores on the context (:class:`Pass` names the attribute). Only
``insert`` (and ``kv_stack``, on the KV-fill graphs) rewrite a graph in place; ``layers``
annotates ``node.meta``; the others build new GraphModules.

The pipelines, as data (reading them tells you the backend):

* :data:`ANALYSIS`, before planning: ``layers`` tags every node with its decoder layer
  and finds each layer's input state (the planner reads the step's shape from it).
* :data:`PIPELINES`, per plan (:attr:`tide_compile.plan.Plan.pipeline`):

  - ``frozen``: ``insert`` (tide::route / tide::exit_select at the checkpoints, the exit
    read-out, ``exit_layer`` as an output); the whole graph is compiled.
  - ``frozen_graphed``: ``insert``, then ``segment_whole`` (the whole graph as one
    segment, which the runner captures into one CUDA graph).
  - ``skip``: ``original`` (a tagged copy of the graph before insertion), ``insert``,
    ``segment`` (split at the checkpoints), ``kv_fill`` (per checkpoint, the graph writing
    the skipped layers' K/V from the frozen state, derived from the original),
    ``kv_stack`` (with ``stack_kv``: the KV-fill's projections as one batched matmul),
    ``head`` (the read-out ``h -> logits``).
  - ``compact``: as ``skip`` with one more cut before the head (``segment_before_head``)
    and ``compact`` (the later segments' variants for a subset of the tokens).
  - ``deferred``: ``insert`` (no frozen-state selection; the ``tide_live`` input),
    ``segment``, ``head``: the skip strategy with no KV-fill (the decode loop runs the
    skipped layers of pending tokens in a later step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
import torch.fx as fx

from . import compact, insert, kv_fill, kv_stack, layers, segment
from ._fx import PassError
from .compact import CompactPlan
from .kv_fill import KVFillGraph
from .layers import LayerInfo
from .segment import HeadGraph, Segment, SplitGraph

if TYPE_CHECKING:
    from ..model_probe import ModelProbe
    from ..routers import RouterSet

__all__ = [
    "PassContext",
    "PassError",
    "Pass",
    "ANALYSIS",
    "PIPELINES",
    "run_passes",
    "LayerInfo",
    "Segment",
    "SplitGraph",
    "HeadGraph",
    "KVFillGraph",
    "CompactPlan",
]


@dataclass
class PassContext:
    """What the passes know about the model and this compile, and what they found so far.

    Attributes:
        num_layers: decoder layers of the model (the graph must hold all of them).
        checkpoint_layers: layers after which a token may exit (strictly increasing,
            each below ``num_layers - 1``).
        hidden_size: width of the residual stream (picks the layer input among the
            values crossing into a layer); None: do not check shapes.
        layer_class_names: class names of the decoder layer (e.g. ``("LlamaDecoderLayer",)``);
            empty: inferred from the graph.
        routers / threshold / kernels: what ``insert`` puts into the graph.
        stack_kv: whether ``kv_stack`` stacks the KV-fill graphs' projections.
        kv: ``"propagate"`` or ``"deferred"`` (``insert`` freezes exited tokens' states
            only under ``"propagate"``).
        live_input: ``insert`` adds the ``tide_live`` input (the deferred decode step).
        input_values: placeholder name -> the real tensor Dynamo feeds it (parameters,
            buffers), for ``kv_stack``.
        layer_info: result of ``layers`` on the graph.
        original / original_info: the graph before ``insert``, tagged (``original``).
        split / kv_fills / head / compact: results of the passes of those names.
        log: the names of the passes run, in order.
    """

    num_layers: int
    checkpoint_layers: tuple[int, ...]
    hidden_size: int | None = None
    layer_class_names: tuple[str, ...] = ()
    routers: "RouterSet | None" = None
    threshold: float = 0.5
    kernels: str = "inductor"
    stack_kv: bool = False
    kv: str = "propagate"
    live_input: bool = False
    input_values: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_info: LayerInfo | None = None
    original: fx.GraphModule | None = None
    original_info: LayerInfo | None = None
    split: SplitGraph | None = None
    kv_fills: dict[int, KVFillGraph] = field(default_factory=dict)
    head: HeadGraph | None = None
    compact: CompactPlan | None = None
    log: list[str] = field(default_factory=list)

    @classmethod
    def from_probe(cls, probe: "ModelProbe", checkpoint_layers) -> "PassContext":
        return cls(
            num_layers=probe.num_layers,
            checkpoint_layers=tuple(int(c) for c in checkpoint_layers),
            hidden_size=probe.hidden_size,
            layer_class_names=(type(probe.layers[0]).__name__,),
        )

    def need(self, attr: str, pass_name: str) -> Any:
        """``getattr(self, attr)``, or a PassError saying which pass must run first."""
        value = getattr(self, attr)
        if value is None:
            raise PassError(f"this pass needs {pass_name!r} to run first (ctx.{attr} is None)")
        return value


class Pass(NamedTuple):
    """A pass in a pipeline: ``fn(gm, ctx)``'s result goes to ``ctx.<result>`` (None: dropped)."""

    name: str
    fn: Callable[[fx.GraphModule, PassContext], Any]
    result: str | None


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: tuple[Pass, ...] | list[Pass]
               ) -> PassContext:
    """Run ``passes`` in order on ``gm``, storing each result on ``ctx``; return ``ctx``."""
    for p in passes:
        result = p.fn(gm, ctx)
        if p.result is not None:
            setattr(ctx, p.result, result)
        ctx.log.append(p.name)
    return ctx


def _original(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """A copy of the graph before ``insert``, tagged by ``layers`` (KV-fill and the head
    are derived from the model's own graph, not from the one with exits inserted)."""
    original = copy.deepcopy(gm)
    ctx.original_info = layers.run(original, ctx)
    return original


LAYERS = Pass("layers", layers.run, "layer_info")
ORIGINAL = Pass("original", _original, "original")
INSERT = Pass("insert", insert.run, None)
SEGMENT = Pass("segment", segment.run, "split")
SEGMENT_WHOLE = Pass("segment_whole", segment.run_whole, "split")
SEGMENT_BEFORE_HEAD = Pass("segment_before_head", segment.run_before_head, "split")
COMPACT = Pass("compact", compact.run, "compact")
KV_FILL = Pass("kv_fill", kv_fill.run, "kv_fills")
KV_STACK = Pass("kv_stack", kv_stack.run_pass, None)
HEAD = Pass("head", segment.run_head, "head")

#: Run on every graph before planning.
ANALYSIS: tuple[Pass, ...] = (LAYERS,)

#: The passes after :data:`ANALYSIS`, per :attr:`tide_compile.plan.Plan.pipeline`.
PIPELINES: dict[str, tuple[Pass, ...]] = {
    "frozen": (INSERT,),
    "frozen_graphed": (INSERT, SEGMENT_WHOLE),
    "skip": (ORIGINAL, INSERT, SEGMENT, KV_FILL, KV_STACK, HEAD),
    "compact": (ORIGINAL, INSERT, SEGMENT_BEFORE_HEAD, COMPACT, KV_FILL, KV_STACK, HEAD),
    "deferred": (ORIGINAL, INSERT, SEGMENT, HEAD),
}
