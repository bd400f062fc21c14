"""FX helpers shared by the passes: tensor identity, in-place mutation, live-code analysis
and subgraph extraction.

Dynamo graphs of HF models mutate their inputs: StaticCache writes are ``index_copy_``
calls on placeholder cache tensors, and the cache's write counter is bumped with ``add_``
on a placeholder (or on ``.to()`` of one, which is the same tensor). Such nodes have no
users and ``Node.is_impure()`` is False for them, so ``Graph.eliminate_dead_code()``
deletes them silently. :func:`eliminate_dead_code` here keeps every in-place op whose
target shares storage with a placeholder or with a live value.

Tensor identity comes from the fake ``example_value`` Dynamo stores on every node (views
share their base's fake storage). Graphs without it (``symbolic_trace``) fall back to a
syntactic rule: view-like ops and in-place ops alias their first argument.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = [
    "example_value",
    "storage_key",
    "mutated_args",
    "is_mutation",
    "mutated_placeholders",
    "eliminate_dead_code",
    "drop_unused_placeholders",
    "extract",
    "target_name",
    "PassError",
]


class PassError(ValueError):
    """A graph a pass refuses; the message names the node and what to do."""


# Ops whose result is (or may be) a view of their first argument: used only when a node
# has no fake example_value to read storage identity from.
_VIEW_NAMES = frozenset({
    "view", "view_as", "reshape", "transpose", "permute", "expand", "expand_as",
    "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select", "as_strided",
    "t", "detach", "getitem", "to", "contiguous", "type_as", "float", "type",
    "split", "chunk", "unbind", "movedim", "diagonal", "alias",
})

_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
})


def example_value(node: fx.Node) -> Any:
    """The fake value Dynamo (``example_value``) or make_fx/AOT (``val``) recorded."""
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def target_name(node: fx.Node) -> str:
    """``add_`` for ``x.add_(...)``, ``linear`` for ``F.linear``, ``addmm`` for ``torch.addmm``."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """The argument nodes ``node`` writes to in place (empty for pure ops)."""
    out: list[fx.Node] = []
    args = node.args
    if node.op == "call_method":
        name = node.target
        if isinstance(name, str) and name.endswith("_") and not name.startswith("_"):
            out.append(args[0])
    elif node.op == "call_function":
        t = node.target
        if t is operator.setitem:
            out.append(args[0])
        elif t in _INPLACE_OPERATORS:
            # x += y mutates only tensors; a SymInt/int accumulator is rebound, not written.
            ev = example_value(args[0]) if isinstance(args[0], fx.Node) else 0
            if ev is None or isinstance(ev, torch.Tensor):
                out.append(args[0])
        elif isinstance(t, torch._ops.OpOverload):
            for i, a in enumerate(t._schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    v = args[i] if i < len(args) else node.kwargs.get(a.name)
                    out.append(v)
        else:
            name = getattr(t, "__name__", "")
            if name.endswith("_") and not name.startswith("_") and args:
                out.append(args[0])
    if isinstance(node.kwargs.get("out"), fx.Node):
        out.append(node.kwargs["out"])
    return [a for a in out if isinstance(a, fx.Node)]


def is_mutation(node: fx.Node) -> bool:
    return bool(mutated_args(node))


def storage_key(node: fx.Node) -> Any:
    """A hashable identity of the memory ``node``'s tensor lives in (None: not a tensor)."""
    ev = example_value(node)
    if isinstance(ev, torch.Tensor):
        try:
            return ("storage", StorageWeakRef(ev.untyped_storage()))
        except Exception:  # noqa: BLE001 - some fake/sparse tensors have no storage
            pass
    elif ev is not None and not isinstance(ev, (list, tuple)):
        return None  # SymInt, None, ...: not memory
    root = node
    while (
        root.op in ("call_method", "call_function")
        and root.args
        and isinstance(root.args[0], fx.Node)
        and (target_name(root) in _VIEW_NAMES or is_mutation(root))
    ):
        root = root.args[0]
    return ("node", root)


def mutated_placeholders(gm: fx.GraphModule) -> set[int]:
    """Indices of the placeholders ``gm`` writes in place (directly or through a view)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {storage_key(a) for n in gm.graph.nodes for a in mutated_args(n)}
    written.discard(None)
    return {i for i, p in enumerate(placeholders) if storage_key(p) in written}


def drop_unused_placeholders(graph: fx.Graph, keep: Iterable[str] = ()) -> tuple[str, ...]:
    """Erase the tensor placeholders nothing reads (SymInt ones stay: every piece gets every
    size symbol), except those named in ``keep``. Returns the remaining input names."""
    keep = set(keep)
    for p in [n for n in graph.nodes if n.op == "placeholder"]:
        if not p.users and p.target not in keep and not isinstance(example_value(p), torch.SymInt):
            graph.erase_node(p)
    return tuple(n.target for n in graph.nodes if n.op == "placeholder")


def eliminate_dead_code(graph: fx.Graph, keep: Iterable[fx.Node] = ()) -> list[fx.Node]:
    """Remove nodes that no output, impure op or live mutation needs; return the removed.

    Live roots: the output node, ``keep``, impure nodes (``Node.is_impure()``) and every
    in-place op whose target shares storage with a placeholder or with a live value
    (computed to a fixpoint: a buffer created in the graph, written in place and then
    returned keeps its writes). Placeholders are never removed.
    """
    nodes = list(graph.nodes)
    live: set[fx.Node] = set()
    live_storages: set[Any] = set()
    for n in nodes:
        if n.op == "placeholder":
            k = storage_key(n)
            if k is not None:
                live_storages.add(k)
    mutations = [(n, {storage_key(a) for a in mutated_args(n)} - {None}) for n in nodes]
    mutations = [(n, ks) for n, ks in mutations if ks]
    work: list[fx.Node] = [n for n in nodes if n.op in ("output", "placeholder")]
    work += list(keep)
    work += [n for n in nodes if n.op not in ("placeholder", "output") and _impure(n)]

    def mark(stack: list[fx.Node]) -> None:
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            k = storage_key(n) if n.op != "output" else None
            if k is not None:
                live_storages.add(k)
            stack.extend(n.all_input_nodes)

    mark(work)
    changed = True
    while changed:
        changed = False
        for n, ks in mutations:
            if n not in live and ks & live_storages:
                mark([n])
                changed = True
    removed = [n for n in reversed(nodes) if n not in live]
    for n in removed:
        graph.erase_node(n)
    return removed[::-1]


def _impure(node: fx.Node) -> bool:
    if _waits_on_functional_collective(node):
        return False
    try:
        return node.is_impure()
    except Exception:  # noqa: BLE001 - is_impure can fail on odd targets; keep them
        return True


def _waits_on_functional_collective(node: fx.Node) -> bool:
    """``wait_tensor(c)`` where ``c`` is a functional collective (``_c10d_functional``,
    e.g. a tensor-parallel layer's all-reduce) that only waits read.

    torch marks ``wait_tensor`` side-effectful (a collective must not be left without
    its wait), so DCE would keep every all-reduce of a layer whose result nothing needs
    (a KV-fill graph would keep the skipped layers' whole attention and MLP). Dead, the
    wait and its collective go together; every rank runs the same pass on the same
    graph, so every rank drops the same collectives (no rank is left waiting)."""
    if node.op != "call_function" or target_name(node) != "wait_tensor" or not node.args:
        return False
    c = node.args[0]
    if not (isinstance(c, fx.Node) and c.op == "call_function"
            and isinstance(c.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            and str(c.target).startswith("_c10d_functional.")
            and target_name(c) != "wait_tensor"):
        return False
    return all(target_name(u) == "wait_tensor" for u in c.users)


def extract(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    *,
    extra_inputs: Sequence[tuple[str, Any]] = (),
    redirect: Callable[[fx.Node, fx.Node], str | None] | None = None,
    always_inputs: Sequence[fx.Node] = (),
) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Copy ``nodes`` (in their order) into a new GraphModule returning ``outputs``.

    Inputs of the new graph, in this order: every value the copied nodes read that is
    not among them (placeholders and values computed elsewhere; named by the source
    node's name, in source-graph order, ``always_inputs`` included), then
    ``extra_inputs`` (``(name, example_value)``). ``redirect(consumer, arg)`` may name an
    extra input to read instead of ``arg`` in that consumer.

    Returns the GraphModule and its input names. Outputs are returned as a tuple.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = set(nodes)
    external: set[fx.Node] = set(always_inputs)
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and (redirect is None or redirect(n, a) is None):
                external.add(a)
    for o in outputs:
        if o not in inside:
            external.add(o)
    ext_sorted = sorted(external, key=order.__getitem__)

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    names: list[str] = []
    for a in ext_sorted:
        p = g.placeholder(a.name)
        p.meta = dict(a.meta)
        env[a] = p
        names.append(a.name)
    extra: dict[str, fx.Node] = {}
    for name, ev in extra_inputs:
        p = g.placeholder(name)
        if ev is not None:
            p.meta["example_value"] = ev
        extra[name] = p
        names.append(name)

    for n in nodes:
        if redirect is None:
            env[n] = g.node_copy(n, env.__getitem__)
        else:
            env[n] = g.node_copy(n, lambda a, n=n: extra[r] if (r := redirect(n, a)) else env[a])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, g), tuple(names)
