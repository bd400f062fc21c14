"""Graph passes of the ``tide`` backend, one file each, run in :data:`PIPELINE` order.

Each pass is ``run(gm, ctx) -> result``: it reads the Dynamo graph and the results of
earlier passes from the :class:`PassContext`, and returns its own result, which
:func:`run_pipeline` stores on the context under the pass's name. Passes do not change
the input graph's structure (``layers`` only annotates ``node.meta``); they build new
GraphModules.

Pipeline (reading the list tells you the backend):

1. ``layers``   tag nodes with their decoder layer; find each layer's input state.
2. (``insert``  tide::route / tide::exit_select at checkpoints: the lead's pass, added here
   once it exists.)
3. ``segment``  split at the checkpoint layers; the head graph ``h -> logits``.
4. ``kv_fill``  per checkpoint, the graph writing the skipped layers' K/V from ``h_c``.
5. ``kv_stack`` (option ``stack_kv``) a KV-fill graph's K/V projections as one batched
   matmul over weights stacked at compile time.
6. ``compact``  (strategy ``compact``) the segments after a checkpoint rewritten to run
   on a subset of a dynamic-length step's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch.fx as fx

from . import kv_fill, layers, segment
from ._fx import PassError
from .kv_fill import KVFillGraph
from .layers import LayerInfo
from .segment import HeadGraph, Segment, SplitGraph

if TYPE_CHECKING:
    from ..model_probe import ModelProbe

__all__ = [
    "PassContext",
    "PassError",
    "PIPELINE",
    "run_pipeline",
    "LayerInfo",
    "Segment",
    "SplitGraph",
    "HeadGraph",
    "KVFillGraph",
]


@dataclass
class PassContext:
    """What the passes know about the model, and what they have found so far.

    Attributes:
        num_layers: decoder layers of the model (the graph must hold all of them).
        checkpoint_layers: layers after which a token may exit (strictly increasing,
            each below ``num_layers - 1``).
        hidden_size: width of the residual stream (picks the layer input among the
            values crossing into a layer); None: do not check shapes.
        layer_class_names: class names of the decoder layer (e.g. ``("LlamaDecoderLayer",)``);
            empty: inferred from the graph.
        layer_info / split / kv_fills: results of the passes of those names.
    """

    num_layers: int
    checkpoint_layers: tuple[int, ...]
    hidden_size: int | None = None
    layer_class_names: tuple[str, ...] = ()
    layer_info: LayerInfo | None = None
    split: SplitGraph | None = None
    kv_fills: dict[int, KVFillGraph] = field(default_factory=dict)

    @classmethod
    def from_probe(cls, probe: "ModelProbe", checkpoint_layers) -> "PassContext":
        return cls(
            num_layers=probe.num_layers,
            checkpoint_layers=tuple(int(c) for c in checkpoint_layers),
            hidden_size=probe.hidden_size,
            layer_class_names=(type(probe.layers[0]).__name__,),
        )


# (name, pass, attribute of PassContext receiving the result)
PIPELINE: list[tuple[str, Callable[[fx.GraphModule, PassContext], Any], str]] = [
    ("layers", layers.run, "layer_info"),
    ("segment", segment.run, "split"),
    ("kv_fill", kv_fill.run, "kv_fills"),
]


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, pipeline=None) -> PassContext:
    """Run the passes in order, storing each result on ``ctx``; return ``ctx``."""
    for _name, fn, attr in pipeline or PIPELINE:
        setattr(ctx, attr, fn(gm, ctx))
    return ctx
