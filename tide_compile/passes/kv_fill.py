"""Pass `kv_fill`: graphs that write skipped layers' K/V from a frozen residual state.

The one semantics: after a token exits at checkpoint ``c``, each layer ``l > c`` still
writes that token's K/V, computed by layer ``l``'s own K/V path from the frozen state
``h_c`` (input norm, K and V projections, k-norm where present, rotary on K).

Matches: a layer-tagged graph (:mod:`.layers`) and a layer range ``first .. last``.

Emits a :class:`KVFillGraph` built from the graph itself (not from the model's modules,
so every architecture's own K/V path, cache layout and cache-position logic is reused):

1. copy the nodes tagged ``first .. last`` in their original order (never re-sorted);
2. every read of ``layer_inputs[l]`` by a node of layer ``l`` reads the new input
   ``h_frozen`` instead (so the residual chain between the layers goes dead);
3. return only the graph outputs those layers produce (DynamicCache: the appended
   ``cat`` tensors; lazily created StaticCache tensors in a prefill graph), at their
   positions in the original output tuple (``output_positions``);
4. mutation-aware dead-code elimination (:func:`._fx.eliminate_dead_code`): in-place
   ops on a placeholder or an alias of one stay live (StaticCache ``index_copy_`` writes
   and the cache's ``add_`` write counter: a skipped layer's counter must advance too).
   Plain ``Graph.eliminate_dead_code()`` deletes them, since they have no users and
   ``is_impure()`` is False.

Values the range reads from earlier layers or ``pre`` (rotary tables, positions, masks,
cache positions) are inputs by their original names, exactly as for a segment; the
runner has them from the segments it ran.

What remains per layer is reported in ``matmuls`` (module paths of the remaining
``linear``/``addmm``/``matmul`` nodes, relative to the layer) and ``cache_writes`` (count
of kept in-place ops). Fused QKV projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``,
GPT-NeoX ``query_key_value``) still compute Q: the graph slices Q/K/V after the matmul.
Slicing the weight is left for later (an optimization, not a semantic change).

Mixed batches (some rows exited, others not) are not handled here: the runner calls a
KV-fill graph only when every row it covers has exited.

Refuses (:class:`PassError`, naming the node): a range outside the model; a layer whose
K/V writes cannot be found after elimination (nothing left to write: the graph has no
cache, e.g. ``use_cache=False``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ._fx import (PassError, drop_unused_placeholders, eliminate_dead_code, example_value,
                  extract, mutated_args, target_name)
from .layers import META_KEY, LayerInfo, normalize_path
from .segment import output_nodes

if TYPE_CHECKING:
    from . import PassContext

__all__ = ["KVFillGraph", "run", "kv_fill_graph", "MATMUL_NAMES"]

MATMUL_NAMES = frozenset({"linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "einsum"})

_SUFFIX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+\.?(.*)$")


@dataclass
class KVFillGraph:
    """Writes layers ``layers[0] .. layers[1]``'s K/V from ``h_frozen``.

    ``gm(*[env[n] for n in input_names])`` (``env["h_frozen"]`` the frozen state, shaped
    like the first layer's input) performs the in-place cache writes and returns the
    outputs at ``output_positions`` of the original graph's output tuple.

    Attributes:
        matmuls: per layer, the module paths (relative to the layer) of remaining matmuls.
        cache_writes: per layer, the number of kept in-place ops (writes and counters).
    """

    gm: fx.GraphModule
    layers: tuple[int, int]
    input_names: tuple[str, ...]
    output_positions: tuple[int, ...]
    matmuls: dict[int, list[str]]
    cache_writes: dict[int, int]

    def __call__(self, env: dict[str, Any]) -> tuple[Any, ...]:
        return self.gm(*[env[n] for n in self.input_names])


def _module_suffix(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        path = normalize_path(str(value[0] if isinstance(value, tuple) else value))
        m = _SUFFIX.search(path)
        if m:
            return m.group(1) or "<layer>"
    return "<?>"


def kv_fill_graph(gm: fx.GraphModule, info: LayerInfo, first: int, last: int,
                  *, dce: bool = True) -> KVFillGraph:
    """The KV-fill graph of layers ``first .. last``; see the module docstring.

    ``dce=False`` skips dead-code elimination (tests compare against it).
    """
    L = info.num_layers
    if not 0 <= first <= last < L:
        raise PassError(f"KV-fill range {first}..{last} is outside the model's layers 0..{L - 1}")
    body = [
        n for n in gm.graph.nodes
        if n.op not in ("placeholder", "output")
        and isinstance(n.meta.get(META_KEY), int) and first <= n.meta[META_KEY] <= last
    ]
    inputs = {l: info.layer_inputs[l] for l in range(first, last + 1)}
    inside = set(body)
    outs = output_nodes(gm)
    positions = [i for i, o in enumerate(outs) if o is not None and o in inside]

    def redirect(consumer: fx.Node, arg: fx.Node) -> str | None:
        tag = consumer.meta.get(META_KEY)
        return "h_frozen" if isinstance(tag, int) and inputs.get(tag) is arg else None

    ev = example_value(info.layer_inputs[first])
    if isinstance(ev, torch.Tensor):
        # A fresh fake tensor, so alias analysis does not tie h_frozen to the live state.
        ev = _fresh_like(ev)
    sub, in_names = extract(gm, body, [outs[i] for i in positions],
                            extra_inputs=[("h_frozen", ev)], redirect=redirect)
    if dce:
        eliminate_dead_code(sub.graph)
        # Inputs nothing reads any more (the live state, Q/O/MLP weights) are dropped.
        in_names = drop_unused_placeholders(sub.graph, keep=("h_frozen",))
        sub.recompile()

    matmuls: dict[int, list[str]] = {l: [] for l in range(first, last + 1)}
    writes: dict[int, int] = {l: 0 for l in range(first, last + 1)}
    for n in sub.graph.nodes:
        tag = n.meta.get(META_KEY)
        if not isinstance(tag, int) or n.op == "placeholder":
            continue
        if target_name(n) in MATMUL_NAMES:
            matmuls[tag].append(_module_suffix(n))
        if mutated_args(n):
            writes[tag] += 1
    if dce:
        for l in range(first, last + 1):
            if writes[l] == 0 and not any(outs[i].meta.get(META_KEY) == l for i in positions):
                raise PassError(
                    f"layer {l} writes no K/V into a cache (node {info.first_node[l].name!r} "
                    "onward): KV-fill needs a graph compiled with a cache (use_cache=True)"
                )
    return KVFillGraph(sub, (first, last), in_names, tuple(positions), matmuls, writes)


def _fresh_like(ev: torch.Tensor) -> torch.Tensor:
    mode = getattr(ev, "fake_mode", None)
    if mode is None:
        return ev
    with mode:
        return torch.empty_strided(ev.shape, ev.stride(), dtype=ev.dtype, device=ev.device)


def run(gm: fx.GraphModule, ctx: "PassContext") -> dict[int, KVFillGraph]:
    """Pass entry ``kv_fill``: for each checkpoint ``c``, the KV-fill of layers
    ``c+1 .. L-1`` (what the runner needs when every row exits at ``c``), derived from
    the graph before insertion (``ctx.original`` when the ``original`` pass ran, else ``gm``)."""
    if ctx.original is not None:
        gm, info = ctx.original, ctx.need("original_info", "original")
    else:
        info = ctx.need("layer_info", "layers")
    L = info.num_layers
    return {c: kv_fill_graph(gm, info, c + 1, L - 1) for c in ctx.checkpoint_layers}
