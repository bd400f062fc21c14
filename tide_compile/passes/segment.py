"""Pass `segment`: split a layer-tagged graph at checkpoint layers into consecutive graphs.

Matches: a graph tagged by :mod:`.layers` (``node.meta["tide_layer"]``), checkpoint
layers ``c_1 < c_2 < ... < c_K`` in ``0 .. L-2``.

Emits a :class:`SplitGraph`:

- segment ``k`` holds, in the original order, the nodes after the previous cut up to and
  including the last node of layer ``c_k``; segment 0 starts with ``pre``, the last
  segment runs to the end (later layers, final norm, lm_head). A node the layers pass did
  not tag (inserted later, e.g. by the insert pass) belongs with the node before it.
  Nodes are never re-sorted: attention reads the cache placeholder itself, so cache reads
  and writes are ordered only by position.
- each segment's inputs: the placeholders it reads, every SymInt placeholder (dynamic
  shapes: each segment sees every size symbol), and the values computed by earlier
  segments that it reads. Its outputs: the values later segments or the graph's outputs
  need, always including ``h_{c_k}`` (``Segment.state_name``, the residual state after
  the checkpoint, so the runner can route it).
- all values live in one namespace keyed by the original node names; ``SplitGraph.run``
  seeds it with the original placeholders, runs the segments in order and rebuilds the
  original output tuple (``output_layout``). In-place cache writes (StaticCache
  ``index_copy_`` on placeholders) stay in the segment of their layer and land in the
  caller's tensors; DynamicCache appends (``cat``s returned as outputs) keep their place
  in the output layout.
- :class:`HeadGraph` (:func:`head_graph`): the graph's own tail, ``post`` nodes only
  (final norm, ``logits_to_keep`` slicing, lm_head, any softcapping) with the last
  layer's output replaced by an input ``h``. It returns the graph outputs computed in
  ``post`` (the logits), so an exited state gets exactly the head the model runs.

Refuses (:class:`PassError`, naming the node): checkpoints outside ``0 .. L-2`` or not
increasing; a value crossing a cut that shares storage with a tensor a later segment
mutates in place (the runner or a compiled segment would see it change behind its back);
an output entry that is neither a node nor None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx as fx

from ._fx import PassError, example_value, extract, mutated_args, storage_key
from .insert import STATE_NAMES
from .layers import META_KEY, LayerInfo, rank

if TYPE_CHECKING:
    from . import PassContext

__all__ = ["Segment", "SplitGraph", "HeadGraph", "run", "run_before_head", "run_whole", "run_head",
           "split", "head_graph", "output_nodes"]


@dataclass
class Segment:
    """One consecutive piece of the graph.

    Attributes:
        gm: the segment's GraphModule; ``gm(*[env[n] for n in input_names])`` returns a
            tuple of values for ``output_names``.
        layers: first and last decoder layer inside (inclusive).
        input_names / output_names: names of values in the split's namespace (original
            placeholder and node names).
        state_name: the name of ``h_c`` among ``output_names`` (residual state after the
            checkpoint layer ``layers[1]``); None for the last segment.
    """

    gm: fx.GraphModule
    layers: tuple[int, int]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    state_name: str | None

    def __call__(self, env: dict[str, Any]) -> None:
        outs = self.gm(*[env[n] for n in self.input_names])
        env.update(zip(self.output_names, outs))


@dataclass
class HeadGraph:
    """``logits = head(h)`` from the graph's own tail.

    ``gm(*[env[n] for n in input_names])`` with ``env["h"]`` the residual state returns
    the outputs at ``output_positions`` of the original output tuple (the logits).
    """

    gm: fx.GraphModule
    input_names: tuple[str, ...]
    output_positions: tuple[int, ...]


@dataclass
class SplitGraph:
    """Segments of one graph, plus how to feed them and rebuild its outputs.

    Attributes:
        segments: in execution order.
        checkpoint_layers: the cut layers.
        placeholder_names: the original graph's inputs, in call order.
        output_layout: per entry of the original output tuple, the value name (None for a
            literal None).
    """

    segments: list[Segment]
    checkpoint_layers: tuple[int, ...]
    placeholder_names: tuple[str, ...]
    output_layout: tuple[str | None, ...]
    head: HeadGraph | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def env(self, *args: Any) -> dict[str, Any]:
        """The namespace seeded with the original call's arguments."""
        if len(args) != len(self.placeholder_names):
            raise TypeError(f"graph takes {len(self.placeholder_names)} inputs, got {len(args)}")
        return dict(zip(self.placeholder_names, args))

    def outputs(self, env: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(None if n is None else env[n] for n in self.output_layout)

    def run(self, *args: Any) -> tuple[Any, ...]:
        """Run every segment in order: the original graph's outputs and input mutations."""
        env = self.env(*args)
        for seg in self.segments:
            seg(env)
        return self.outputs(env)


def output_nodes(gm: fx.GraphModule) -> list[fx.Node | None]:
    """The flat list the graph returns (Dynamo returns one tuple)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    vals = out.args[0]
    if not isinstance(vals, (tuple, list)):
        vals = (vals,)
    for v in vals:
        if v is not None and not isinstance(v, fx.Node):
            raise PassError(
                f"graph output {out.name!r} holds {v!r}: tide handles outputs that are a flat "
                "tuple of tensors/None"
            )
    return list(vals)


def _segment_index(gm: fx.GraphModule, cuts: Sequence[int], L: int) -> dict[fx.Node, int]:
    """Segment of every non-placeholder node, by position: after the last node of c_k."""
    seg_of: dict[fx.Node, int] = {}
    k = 0
    prev_rank = -1
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        tag = n.meta.get(META_KEY)
        r = prev_rank if tag is None else rank(tag, L)
        while k < len(cuts) and r > cuts[k]:
            k += 1
        seg_of[n] = k
        prev_rank = r
    return seg_of


def split(gm: fx.GraphModule, info: LayerInfo, checkpoint_layers: Sequence[int],
          *, with_head: bool = True, cut_before_head: bool = False) -> SplitGraph:
    """Split ``gm`` after each checkpoint layer; see the module docstring.

    ``cut_before_head``: one more cut after the last layer, so the ``post`` nodes (exit
    read-out, final norm, lm_head) form the last segment on their own (the compaction
    runner runs the layers on a subset of tokens and the head on all of them).
    ``checkpoint_layers`` then ends with ``L - 1``.
    """
    L = info.num_layers
    cuts = tuple(int(c) for c in checkpoint_layers)
    if cut_before_head:
        cuts = cuts + (L - 1,)
    if list(cuts) != sorted(set(cuts)) or any(
        not 0 <= c <= L - 2 for c in (cuts[:-1] if cut_before_head else cuts)
    ):
        raise PassError(
            f"checkpoint layers {list(cuts)} must be strictly increasing in 0..{L - 2} "
            "(the final layer is never a checkpoint)"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symints = [p for p in placeholders if isinstance(example_value(p), torch.SymInt)]
    seg_of = _segment_index(gm, cuts, L)
    nseg = len(cuts) + 1
    seg_nodes: list[list[fx.Node]] = [[] for _ in range(nseg)]
    for n, k in seg_of.items():
        seg_nodes[k].append(n)
    outs = output_nodes(gm)

    # Which values each segment must hand on: read by a later segment or returned.
    needed_later: list[set[fx.Node]] = [set() for _ in range(nseg)]
    for n, k in seg_of.items():
        for a in n.all_input_nodes:
            ka = seg_of.get(a)
            if ka is not None and ka < k:
                needed_later[ka].add(a)
    for o in outs:
        if o is not None and o in seg_of:
            needed_later[seg_of[o]].add(o)
    states = [info.state_after(c) for c in cuts]
    for k, h in enumerate(states):
        if seg_of.get(h) != k:
            raise PassError(
                f"the state after checkpoint layer {cuts[k]} ({h.name!r}) is not computed in "
                f"segment {k}: the layer tags and the cut disagree"
            )
        needed_later[k].add(h)
    # The exit state after each checkpoint (the insert pass's): the runner reads it there,
    # even where no later node does (kv="deferred" selects no frozen states).
    by_name = {n.name: n for n in seg_of}
    for c, names in gm.meta.get(STATE_NAMES, {}).items():
        for name in names:
            node = by_name.get(name)
            if node is not None:
                needed_later[seg_of[node]].add(node)

    _check_crossing_aliases(seg_of, needed_later, nseg)

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    segments: list[Segment] = []
    for k in range(nseg):
        nodes = seg_nodes[k]
        out_list = sorted(needed_later[k], key=order.__getitem__)
        sub, in_names = extract(gm, nodes, out_list, always_inputs=symints)
        lo = -1 if k == 0 else cuts[k - 1]
        segments.append(Segment(
            gm=sub,
            layers=(lo + 1, cuts[k] if k < len(cuts) else L - 1),
            input_names=in_names,
            output_names=tuple(o.name for o in out_list),
            state_name=states[k].name if k < len(cuts) else None,
        ))
    result = SplitGraph(
        segments=segments,
        checkpoint_layers=cuts,
        placeholder_names=tuple(p.name for p in placeholders),
        output_layout=tuple(None if o is None else o.name for o in outs),
    )
    if with_head:
        result.head = head_graph(gm, info)
    return result


def _check_crossing_aliases(seg_of, needed_later, nseg) -> None:
    """Refuse a value handed from segment j to a later one that a later segment mutates."""
    mutated_in: list[dict[Any, fx.Node]] = [{} for _ in range(nseg)]
    for n, k in seg_of.items():
        for a in mutated_args(n):
            key = storage_key(a)
            if key is not None:
                mutated_in[k].setdefault(key, n)
    for j in range(nseg):
        for v in needed_later[j]:
            key = storage_key(v)
            if key is None:
                continue
            for k in range(j + 1, nseg):
                m = mutated_in[k].get(key)
                if m is not None:
                    raise PassError(
                        f"value {v.name!r} crosses the cut after segment {j} but shares storage "
                        f"with {m.args[0].name if m.args else '?'!s}, which node {m.name!r} in "
                        f"segment {k} mutates in place: the split would change what {v.name!r} "
                        "holds behind the runner's back; choose other checkpoint layers"
                    )


def head_graph(gm: fx.GraphModule, info: LayerInfo) -> HeadGraph:
    """The graph's ``post`` tail as ``head(h, ...)``; see the module docstring."""
    L = info.num_layers
    post = [
        n for n in gm.graph.nodes
        if n.op not in ("placeholder", "output") and n.meta.get(META_KEY) == "post"
    ]
    outs = output_nodes(gm)
    positions = [i for i, o in enumerate(outs) if o is not None and o.meta.get(META_KEY) == "post"
                 and o.op != "placeholder"]
    if not positions:
        raise PassError("no graph output is computed after the last layer: no logits to exit to")
    last = info.last_output
    post_set = set(post)
    for n in post:
        for a in n.all_input_nodes:
            if a not in post_set and a is not last and a.op != "placeholder":
                # Values from layers other than the residual state (e.g. a mask): refuse,
                # an exited token has no such value from the skipped layers.
                if rank(a.meta.get(META_KEY, "pre"), L) >= 0:
                    raise PassError(
                        f"the head node {n.name!r} reads {a.name!r} from layer "
                        f"{a.meta.get(META_KEY)}: the head may read only the residual state"
                    )
    ev = example_value(last)
    sub, in_names = extract(
        gm, post, [outs[i] for i in positions],
        extra_inputs=[("h", ev)],
        redirect=lambda consumer, arg: "h" if arg is last else None,
    )
    return HeadGraph(sub, in_names, tuple(positions))


def run(gm: fx.GraphModule, ctx: "PassContext") -> SplitGraph:
    """Pass entry ``segment``: split at ``ctx.checkpoint_layers`` (no head graph: the
    ``head`` pass derives it from the graph before insertion)."""
    return split(gm, ctx.need("layer_info", "layers"), ctx.checkpoint_layers, with_head=False)


def run_before_head(gm: fx.GraphModule, ctx: "PassContext") -> SplitGraph:
    """Pass entry ``segment_before_head``: as ``segment``, with one more cut after the
    last layer (the compaction runner runs the head on every token)."""
    return split(gm, ctx.need("layer_info", "layers"), ctx.checkpoint_layers,
                 with_head=False, cut_before_head=True)


def run_whole(gm: fx.GraphModule, ctx: "PassContext") -> SplitGraph:
    """Pass entry ``segment_whole``: the whole graph as one segment (no cut)."""
    return split(gm, ctx.need("layer_info", "layers"), (), with_head=False)


def run_head(gm: fx.GraphModule, ctx: "PassContext") -> HeadGraph:
    """Pass entry ``head``: the read-out of the graph before insertion (``ctx.original``
    when the ``original`` pass ran, else ``gm``)."""
    if ctx.original is not None:
        return head_graph(ctx.original, ctx.need("original_info", "original"))
    return head_graph(gm, ctx.need("layer_info", "layers"))
