"""Pass `layers`: tag every node of a Dynamo graph with the decoder layer it belongs to.

Matches: ``node.meta["nn_module_stack"]`` entries whose path ends in
``layers.N`` / ``h.N`` / ``blocks.N`` (:data:`LAYER_PATH`; the prefix differs across
torch/transformers versions, e.g. ``L['self'].model.layers.3`` or
``L['self']._modules['model']._modules['layers']._modules['3']``, and is never read) and
whose module class is the decoder-layer class (``ctx.layer_class_names``, or, when that
is empty, the class most often found as the outermost such entry). The deepest matching
entry gives the layer.

Emits: ``node.meta["tide_layer"]`` on every node, one of ``"pre"``, ``0 .. L-1``,
``"post"`` (the graph's structure is not changed), and a :class:`LayerInfo`:

- untagged nodes before the first layer node are ``pre``, after the last are ``post``;
  in between they take the highest layer among their inputs, never lower than the
  node before them (so every layer stays a contiguous run of nodes);
- placeholders (parameters, buffers and inputs alike in Dynamo graphs) take the tag of
  their first user; their own stack names only that user's module;
- ``layer_inputs[l]``: the unique node produced by layer ``l-1`` (``pre`` for l = 0) and
  read by layer ``l``; where several cross (layer 0 also reads rotary tables and masks
  from ``pre``), the one shaped like the residual stream (``[..., hidden_size]``, floating)
  is it;
- ``last_output``: the same for the last layer and ``post`` (the final norm's input).

Refuses (:class:`PassError`, naming the node): a layer node out of order (layer ``l+1``
before the end of layer ``l``: segments must be prefixes of the node order, nodes are
never re-sorted), missing or extra layers (a graph break splits the model: compile with
``fullgraph=True``), no or several candidate layer inputs.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.fx as fx

from ._fx import PassError, example_value

if TYPE_CHECKING:
    from . import PassContext

__all__ = ["LayerInfo", "LAYER_PATH", "Tag", "run", "rank", "layer_of", "normalize_path"]

#: Suffix of a decoder layer's module path (after normalizing ``_modules['x']`` and
#: ``[N]`` spellings to dots).
LAYER_PATH = re.compile(r"(?:^|\.)(layers|h|blocks)\.(\d+)$")

Tag = Union[int, str]  # "pre", 0 .. L-1, "post"
META_KEY = "tide_layer"


@dataclass
class LayerInfo:
    """Decoder-layer structure of a graph, as found by :func:`run`.

    Attributes:
        num_layers: number of decoder layers found.
        layer_class: class name of the decoder layer.
        layer_inputs: per layer, the node holding its input residual state.
        last_output: the last layer's output residual state (input of the final norm).
        first_node / last_node: per layer, its first and last (non-placeholder) node.
    """

    num_layers: int
    layer_class: str
    layer_inputs: list[fx.Node]
    last_output: fx.Node
    first_node: list[fx.Node]
    last_node: list[fx.Node]

    def state_after(self, layer: int) -> fx.Node:
        """The residual state ``h_layer`` (output of ``layer``)."""
        if layer == self.num_layers - 1:
            return self.last_output
        return self.layer_inputs[layer + 1]


def rank(tag: Tag, num_layers: int) -> int:
    """Position of a tag in execution order: pre < 0 < ... < L-1 < post."""
    if tag == "pre":
        return -1
    if tag == "post":
        return num_layers
    return int(tag)


def layer_of(node: fx.Node) -> Tag | None:
    return node.meta.get(META_KEY)


def normalize_path(path: str) -> str:
    """A module path with ``_modules['x']`` and ``[N]`` spellings written as ``.x`` / ``.N``."""
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    return re.sub(r"\[['\"]?(\w+)['\"]?\]", r".\1", path)


def _class_name(cls: Any) -> str:
    if isinstance(cls, type):
        return cls.__name__
    return str(cls).rsplit(".", 1)[-1].strip("'>")


def _layer_entries(node: fx.Node) -> list[tuple[int, str]]:
    """(layer index, class name) of every stack entry matching LAYER_PATH, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    found = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) else (value, "")
        m = LAYER_PATH.search(normalize_path(str(path)))
        if m:
            found.append((int(m.group(2)), _class_name(cls)))
    return found


def run(gm: fx.GraphModule, ctx: "PassContext") -> LayerInfo:
    """Tag ``gm``'s nodes with their decoder layer; see the module docstring."""
    graph = gm.graph
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    entries = {n: _layer_entries(n) for n in body}

    classes = set(ctx.layer_class_names)
    if not classes:
        outer = collections.Counter(e[0][1] for e in entries.values() if e)
        if not outer:
            raise PassError(
                "no node of the graph belongs to a decoder layer: no nn_module_stack path ends "
                f"in {LAYER_PATH.pattern} (is this the graph of an HF causal LM?)"
            )
        classes = {outer.most_common(1)[0][0]}
    layer_class = sorted(classes)[0]

    direct: dict[fx.Node, int] = {}
    for n, es in entries.items():
        matching = [idx for idx, cls in es if cls in classes]
        if matching:
            direct[n] = matching[-1]  # deepest entry
    if not direct:
        raise PassError(
            f"no node of the graph belongs to a decoder layer of class {sorted(classes)} "
            f"(module paths ending in {LAYER_PATH.pattern})"
        )
    L = ctx.num_layers
    first_i = next(i for i, n in enumerate(body) if n in direct)
    last_i = max(i for i, n in enumerate(body) if n in direct)

    tags: dict[fx.Node, Tag] = {}
    running = -1
    for i, n in enumerate(body):
        if i < first_i:
            tag: Tag = "pre"
        elif i > last_i:
            tag = "post"
        elif n in direct:
            tag = direct[n]
            if tag < running:
                raise PassError(
                    f"node {n.name!r} ({n.format_node()}) belongs to layer {tag} but comes after "
                    f"nodes of layer {running}: layers must be contiguous runs of the node order "
                    "(tide never re-sorts nodes, since cache reads and writes are ordered only by "
                    "position)"
                )
            if tag > running + 1:
                raise PassError(
                    f"node {n.name!r} belongs to layer {tag} but no node of layer {running + 1} "
                    "comes before it: the graph skips a layer"
                )
            running = tag
        else:
            # Between layers: the highest layer among the inputs, never below the node
            # before (a layer stays a contiguous run).
            ins = [rank(tags[a], L) for a in n.all_input_nodes if a in tags]
            tag = max([running, *ins])
            running = tag
        tags[n] = tag

    found = sorted({t for t in tags.values() if isinstance(t, int)})
    if found != list(range(L)):
        raise PassError(
            f"the graph holds decoder layers {found} but the model has {L} "
            f"(layers 0..{L - 1}): a graph break split the model; compile the whole forward "
            "with fullgraph=True"
        )

    for n in graph.nodes:
        if n.op == "placeholder":
            users = [u for u in n.users if u in tags]
            first = min(users, key=lambda u: rank(tags[u], L)) if users else None
            n.meta[META_KEY] = tags[first] if first is not None else "pre"
        elif n.op == "output":
            n.meta[META_KEY] = "post"
        else:
            n.meta[META_KEY] = tags[n]

    first_node: list[fx.Node] = [None] * L  # type: ignore[list-item]
    last_node: list[fx.Node] = [None] * L  # type: ignore[list-item]
    for n in body:
        t = tags[n]
        if isinstance(t, int):
            if first_node[t] is None:
                first_node[t] = n
            last_node[t] = n

    hidden = ctx.hidden_size
    layer_inputs = [
        _crossing(body, tags, "pre" if l == 0 else l - 1, l, hidden, L) for l in range(L)
    ]
    last_output = _crossing(body, tags, L - 1, "post", hidden, L)
    return LayerInfo(L, layer_class, layer_inputs, last_output, first_node, last_node)


def _is_state_like(node: fx.Node, hidden_size: int | None) -> bool:
    ev = example_value(node)
    if not isinstance(ev, torch.Tensor):
        return ev is None  # no fake value (symbolic_trace): cannot tell, keep it
    if not ev.is_floating_point() or ev.dim() < 2:
        return False
    return hidden_size is None or ev.shape[-1] == hidden_size


def _crossing(body, tags, src: Tag, dst: Tag, hidden_size: int | None, L: int) -> fx.Node:
    """The unique node tagged ``src`` that a node tagged ``dst`` reads."""
    cands = [
        n for n in body
        if tags[n] == src and any(tags.get(u) == dst for u in n.users)
    ]
    if len(cands) > 1:
        cands = [n for n in cands if _is_state_like(n, hidden_size)]
    what = "the final norm" if dst == "post" else f"layer {dst}"
    if len(cands) != 1:
        names = ", ".join(repr(n.name) for n in cands) or "none"
        raise PassError(
            f"cannot find the residual state entering {what}: expected exactly one "
            f"[..., {hidden_size}] tensor produced by {src!r} and read by {dst!r}, found {names}"
        )
    return cands[0]
