"""Pass `kv_stack`: one batched matmul for the K/V projections of a KV-fill graph.

A KV-fill graph (:mod:`.kv_fill`) computes, for each skipped layer, its input norm of the
same frozen state and then its K and V projections: two small matmuls per layer (at
decode, matrix-vector products of a few MB each: two GEMV kernels per skipped layer; the
measurements are in benchmarks/RESULTS.md). This pass replaces every group of
projections of the same shape by one ``bmm`` over weights stacked once, at compile time,
into a ``[G, in, out]`` buffer of the graph module.

Matches: ``linear(x, W[, b])`` nodes whose weight (and bias) are placeholders fed with
real tensors, grouped by weight shape, dtype, bias presence and input shape; a group
needs at least two members. The input ``x`` of each member must be computed by pure
nodes (no in-place op, reading nothing the graph mutates): those nodes are moved to the
top of the graph, in their order, so the stacked product can run before any member's
users (the graph's other nodes are never re-sorted).

Emits: per group, a ``get_attr`` of the stacked weights (and biases), one
``tide_stacked_linear`` call, and a ``getitem`` per member in place of its ``linear``;
weight placeholders nothing reads any more are removed. Numerically a ``bmm`` instead of
separate matmuls (the same products, another reduction order).

Costs memory: a copy of the stacked weights (for a Llama-3.1-8B shape with checkpoints
every 8 layers, the K/V projections of layers 8..31: 0.8 GB in bf16, shared by every
checkpoint's KV-fill graph through views). The copy is taken at compile time: weights
changed afterwards are not seen (compile again).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx

from ._fx import drop_unused_placeholders, example_value, mutated_args, storage_key, target_name

if TYPE_CHECKING:
    from . import PassContext

__all__ = ["run", "run_pass", "stacked_linear", "StackCache"]


def stacked_linear(wt: torch.Tensor, b: torch.Tensor | None, *xs: torch.Tensor
                   ) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(x_i, W_i, b_i))`` for ``wt[i] = W_i.T`` as one batched matmul."""
    x = torch.stack(xs, 0)
    lead = x.shape[1:-1]
    y = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), wt)
    if b is not None:
        y = y + b.unsqueeze(1)
    return tuple(y.reshape(x.shape[0], *lead, wt.shape[-1]).unbind(0))


class StackCache:
    """Stacked weights shared between KV-fill graphs: a group whose weights are a suffix
    of an existing stack's (a later checkpoint's skipped layers) gets a view of it."""

    def __init__(self) -> None:
        self._stacks: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def get(self, tensors: list[torch.Tensor], transpose: bool) -> torch.Tensor:
        key = tuple(t.data_ptr() for t in tensors)
        for k, stack in self._stacks:
            if len(k) >= len(key) and k[len(k) - len(key):] == key:
                return stack[len(k) - len(key):]
        with torch.no_grad():
            stack = torch.stack([t.detach().t() if transpose else t.detach() for t in tensors])
            stack = stack.contiguous()
        self._stacks.append((key, stack))
        return stack


def _pure_ancestors(x: fx.Node, mutated: set[Any]) -> list[fx.Node] | None:
    """Non-placeholder ancestors of ``x`` (with ``x``), or None if one is not pure."""
    seen: set[fx.Node] = set()
    stack = [x]
    while stack:
        n = stack.pop()
        if n in seen or n.op == "placeholder":
            continue
        if n.op not in ("call_function", "call_method") or mutated_args(n):
            return None
        if any(storage_key(a) in mutated for a in n.all_input_nodes
               if storage_key(a) is not None):
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return list(seen)


def _weight(node: Any, value_of: Callable[[str], Any]) -> torch.Tensor | None:
    """The real tensor a ``linear``'s weight (or bias) argument reads: a placeholder's
    value, or a tensor-parallel parameter's local shard (``p.to_local()`` of a DTensor
    placeholder, as transformers' TP layers call it at inference). None otherwise."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        v = value_of(node.target)
        # A DTensor read as it is (not its shard) is left alone.
        return v if isinstance(v, torch.Tensor) and not hasattr(v, "to_local") else None
    if (node.op == "call_method" and node.target == "to_local" and len(node.args) == 1
            and not node.kwargs and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "placeholder"):
        v = value_of(node.args[0].target)
        if hasattr(v, "to_local"):
            return v.to_local()
    return None


def run(gm: fx.GraphModule, value_of: Callable[[str], Any], cache: StackCache,
        keep: set[str] = frozenset({"h_frozen"})) -> int:
    """Stack the projections of ``gm`` in place. ``value_of(name)`` gives the real tensor
    fed to a placeholder (None when unknown). Returns the number of groups stacked."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    mutated = {storage_key(a) for n in graph.nodes for a in mutated_args(n)}
    mutated.discard(None)
    groups: dict[tuple, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op != "call_function" or target_name(n) != "linear" or n.kwargs:
            continue
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else None
        wv, bv = _weight(w, value_of), _weight(b, value_of) if b is not None else None
        if not isinstance(wv, torch.Tensor) or wv.dim() != 2 or (b is not None and bv is None):
            continue
        xv = example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(xv, torch.Tensor):
            continue
        key = (tuple(wv.shape), wv.dtype, wv.device, b is not None, str(tuple(xv.shape)),
               xv.dtype)
        groups.setdefault(key, []).append(n)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    placed: set[fx.Node] = set()
    point = placeholders[-1]  # where the next group's nodes go: after the previous group's
    stacked = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        ancestors: set[fx.Node] = set()
        ok = True
        for n in members:
            anc = _pure_ancestors(n.args[0], mutated)
            if anc is None:
                ok = False
                break
            ancestors.update(anc)
        if not ok:
            continue
        # Right after the placeholders (and any earlier group), in their own order.
        # (Nodes an earlier group already moved stay where they are.)
        for a in sorted(ancestors - placed, key=order.__getitem__):
            if a is not point:
                point.append(a)
            point = a
            placed.add(a)
        wts = [_weight(n.args[1], value_of) for n in members]
        name = f"tide_kv_stack_{stacked}"
        gm.register_buffer(name + "_w", cache.get(wts, transpose=True))
        has_bias = len(members[0].args) > 2 and members[0].args[2] is not None
        if has_bias:
            gm.register_buffer(name + "_b", cache.get(
                [_weight(n.args[2], value_of) for n in members], transpose=False))
        with graph.inserting_after(point):
            w_node = graph.get_attr(name + "_w")
        with graph.inserting_after(w_node):
            b_node = graph.get_attr(name + "_b") if has_bias else None
        with graph.inserting_after(b_node if b_node is not None else w_node):
            call = graph.call_function(stacked_linear,
                                       (w_node, b_node, *[n.args[0] for n in members]))
        outs, point = [], call
        for i in range(len(members)):
            with graph.inserting_after(point):
                point = graph.call_function(operator.getitem, (call, i))
            outs.append(point)
        placed.update([w_node, call, *outs] + ([b_node] if b_node is not None else []))
        for n, o in zip(members, outs):
            o.meta = dict(n.meta)
            n.replace_all_uses_with(o)
            weights = [a for a in n.args[1:3] if isinstance(a, fx.Node) and a.op != "placeholder"]
            graph.erase_node(n)
            for a in weights:  # a DTensor parameter's ``to_local()``, now unread
                if not a.users:
                    graph.erase_node(a)
        stacked += 1
    if stacked:
        drop_unused_placeholders(graph, keep)
        graph.lint()
        gm.recompile()
    return stacked



def run_pass(gm: fx.GraphModule, ctx: "PassContext") -> int:
    """Pass entry ``kv_stack``: with ``ctx.stack_kv``, stack the projections of each KV-fill
    graph in ``ctx.kv_fills`` (weights from ``ctx.input_values``; later checkpoints' graphs
    view the first one's stacks). Returns the number of groups stacked."""
    if not ctx.stack_kv:
        return 0
    cache = StackCache()
    stacked = 0
    for c in sorted(ctx.kv_fills):
        kv = ctx.kv_fills[c]
        groups = run(kv.gm, ctx.input_values.get, cache)
        if groups:
            kv.input_names = tuple(n.target for n in kv.gm.graph.nodes if n.op == "placeholder")
        stacked += groups
    return stacked
