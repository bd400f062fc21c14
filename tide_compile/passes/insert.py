"""Pass `insert`: put the exit decision and the frozen-state selection into the graph.

Matches: a graph tagged by :mod:`.layers` (its :class:`~.layers.LayerInfo`) and the
routers at the checkpoint layers (``ctx.routers``, ``ctx.checkpoint_layers``).

Emits (the frozen strategy, the in-graph oracle):

- after the first checkpoint's state, an all-false exit state
  ``(exited, frozen, exit_layer)`` (:func:`init_exit_state`);
- after each checkpoint's state ``h_c``: ``tide::route(h_c, state..., router weights,
  threshold, c, eps)`` giving the updated state (tagged with layer ``c``, so a
  segment cut after layer ``c`` carries the state across);
- for each layer ``l`` after the first checkpoint, its uses of its input state ``h`` go
  through ``tide::exit_select(exited, frozen, h)`` (tagged ``l``): an exited token's
  layer input is its frozen state, so the layer's own K/V path writes K/V computed
  from ``h_c`` (state propagation);
- the final norm's input goes through :func:`final_select`: exited tokens read out
  ``E_c(h_c)`` (the exit projection where one is calibrated);
- one extra graph output, appended last: ``exit_layer`` (int64, -1 = no exit), which the
  runner strips before returning the model's outputs.

Router weights become extra graph inputs (placeholders ``tide_router_<c>_*`` and
``tide_exitproj_<c>_*`` after the original ones; ``gm.meta[EXTRA_INPUTS]`` lists their
tensors in order, and whoever calls the graph appends them to the arguments). Inputs,
not ``get_attr`` constants: AOT/Inductor accept only Dynamo's own parameters as those.

With ``freeze=False`` (``kv="deferred"``) no ``exit_select`` is inserted: every layer
reads each token's own state, so every K/V is the full model's and exits only pick the
exited tokens' read-out. With ``live=True`` (the deferred decode step) one more input,
``tide_live`` (bool, one per token), starts the exit state: a token that is not live
starts as exited with exit layer -1, so it never exits, never keeps the step from
stopping, and reads out at full depth (``gm.meta[LIVE_INPUT]`` holds the tensor, which
the decode loop rewrites in place). Router weights are then copies
(``gm.meta[ROUTER_BIASES]``: checkpoint -> its output bias, which
:meth:`~..runtime.runner.SkipRunner.set_threshold` shifts in place).

Refuses: routers whose checkpoint layers are not layers of the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import operator

import torch
import torch.fx as fx

from ..confidence import candidate_logits, head_confidence
from ..kernels import exit_select_op, route_op
from ..kernels.ops import route_features_reference
from ..kernels.route_triton import MAX_CONF_CANDIDATES
from ._fx import PassError, example_value
from .layers import META_KEY, LayerInfo

if TYPE_CHECKING:
    from ..routers import RouterSet
    from . import PassContext

__all__ = ["run", "insert_exits", "init_exit_state", "final_select", "EXIT_LAYER_OUTPUT",
           "STATE_NAMES", "EXTRA_INPUTS", "LIVE_INPUT", "ROUTER_BIASES"]

#: ``gm.meta`` key holding how many outputs the graph had before this pass.
EXIT_LAYER_OUTPUT = "tide_user_outputs"
#: ``gm.meta`` key: tensors to append to the graph's arguments (router weights).
EXTRA_INPUTS = "tide_extra_inputs"
#: ``gm.meta`` key: checkpoint -> names of the ``(exited, frozen, exit_layer)`` nodes after it.
STATE_NAMES = "tide_state_names"
#: ``gm.meta`` key: the ``tide_live`` input's tensor (``live=True``).
LIVE_INPUT = "tide_live_input"
#: ``gm.meta`` key: checkpoint -> the router's output bias tensor fed to the graph.
ROUTER_BIASES = "tide_router_biases"


def init_exit_state(h: torch.Tensor, live: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exit state before the first checkpoint, shaped like ``h`` without its last dim:
    nothing exited, or, with ``live``, every token that is not live (exit layer -1)."""
    lead = h.shape[:-1]
    exited = (torch.zeros(lead, dtype=torch.bool, device=h.device) if live is None
              else ~live.reshape(lead))
    return (
        exited,
        torch.zeros_like(h),
        torch.full(lead, -1, dtype=torch.int64, device=h.device),
    )


def exit_state(h: torch.Tensor, down_w: torch.Tensor, up_w: torch.Tensor,
               up_b: torch.Tensor) -> torch.Tensor:
    """``E_c(h) = h + up(down(h))`` in the projection's dtype, back in ``h``'s dtype."""
    x = h.to(down_w.dtype)
    return (x + torch.nn.functional.linear(torch.nn.functional.linear(x, down_w), up_w, up_b)
            ).to(h.dtype)


def final_select(
    exit_layer: torch.Tensor,
    frozen: torch.Tensor,
    h: torch.Tensor,
    projections: Sequence[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The state each token is read out from: ``E_c(frozen)`` if it exited at ``c``, else ``h``.

    ``projections`` holds ``(c, down_w, up_w, up_b)`` for checkpoints with an exit
    projection ``E_c(x) = x + up(down(x))``; other checkpoints use the identity.
    """
    out = torch.where((exit_layer >= 0).unsqueeze(-1), frozen.to(h.dtype), h)
    for c, down_w, up_w, up_b in projections:
        proj = exit_state(frozen, down_w, up_w, up_b)
        out = torch.where((exit_layer == c).unsqueeze(-1), proj.to(h.dtype), out)
    return out


def candidates(input_ids: torch.Tensor, successor: torch.Tensor) -> torch.Tensor:
    """Each position's candidate tokens, ``successor[input_ids]`` (``[..., k]``)."""
    return successor[input_ids]


_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_EMBEDDINGS = (torch.nn.functional.embedding, torch.embedding)


def _head_reader(graph: fx.Graph, info: LayerInfo, routers: "RouterSet"
                 ) -> tuple[fx.Node, tuple, fx.Node, list[fx.Node]]:
    """What confidence features read, found in the graph: the token ids the embedding reads, the
    ``lm_head`` linear's weight (and bias) arguments, and the chain of ``post`` nodes from
    the last layer's output to ``lm_head``'s input (the final norm), in graph order."""
    vocab, hidden = routers.model_info.get("vocab_size"), routers.hidden_size

    def is_head_weight(a: object) -> bool:
        ev = example_value(a) if isinstance(a, fx.Node) else None
        return (isinstance(a, fx.Node) and a.op == "placeholder" and isinstance(ev, torch.Tensor)
                and tuple(ev.shape) == (vocab, hidden))

    head = next((n for n in graph.nodes if n.op == "call_function" and n.target in _LINEARS
                 and n.meta.get(META_KEY) == "post" and len(n.args) >= 2
                 and is_head_weight(n.args[1])), None)
    embed = next((n for n in graph.nodes if n.op == "call_function" and n.target in _EMBEDDINGS
                  and isinstance(n.args[0], fx.Node) and is_head_weight(n.args[1])), None)
    if head is None or embed is None:
        raise PassError("routers with confidence features need the graph's lm_head linear and "
                        "token-embedding lookup (a [vocab, hidden] weight each); this graph has "
                        + ("neither" if head is None and embed is None
                           else "no lm_head linear" if head is None else "no embedding of input ids"))
    if type(example_value(head.args[1])) is not torch.Tensor and hasattr(
            example_value(head.args[1]), "device_mesh"):
        raise PassError("routers with confidence features do not run under tensor parallelism "
                        "(lm_head is sharded over the vocabulary)")
    x = head.args[0]
    last = info.last_output
    downstream: set[fx.Node] = {last}
    for n in graph.nodes:
        if n is not last and any(a in downstream for a in n.all_input_nodes):
            downstream.add(n)
    upstream: set[fx.Node] = set()
    stack = [x]
    while stack:
        n = stack.pop()
        if n in upstream or n is last:
            continue
        upstream.add(n)
        stack.extend(n.all_input_nodes)
    if not isinstance(x, fx.Node) or x not in downstream:
        raise PassError("lm_head does not read the last layer's output in this graph")
    # The nodes lm_head's input needs after the last layer: its own values and the "post"
    # shape arithmetic beside them (e.g. a view's size, built after the last layer).
    chain = [n for n in graph.nodes if n in upstream and n is not last and n.op != "placeholder"
             and (n in downstream or n.meta.get(META_KEY) == "post")]
    bias = head.args[2] if len(head.args) > 2 else head.kwargs.get("bias")
    return embed.args[0], (head.args[1], bias), x, chain


def _fake_exit_state(h: fx.Node) -> tuple[torch.Tensor, ...] | None:
    ev = example_value(h)
    mode = getattr(ev, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return init_exit_state(ev)


def _input(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A new placeholder after the existing ones, fed ``value`` by the runner."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    node.meta["example_value"] = value
    gm.meta.setdefault(EXTRA_INPUTS, []).append(value)
    return node


def _confidence_nodes(gm: fx.GraphModule, graph: fx.Graph, c: int, h_c: fx.Node, last: fx.Node,
                      routers: "RouterSet", device: torch.device | None, idx_node: fx.Node,
                      head_w: fx.Node, head_b: object, head_x: fx.Node, chain: list[fx.Node],
                      tag, logits_only: bool = False) -> fx.Node:
    """After ``h_c``: ``E_c(h_c)``, a copy of the final-norm chain (``last`` -> ``head_x``)
    on it, and the confidence features of ``lm_head`` over the candidates (only their
    logits with ``logits_only``: the fused route computes the features). Returns that
    node, the last one inserted."""
    anchor = state = h_c
    proj = routers.exit_projection(c)
    if proj is not None:
        names = [tag(_input(gm, f"tide_confproj_{c}_{suffix}",
                            (tensor.to(device) if device is not None else tensor).detach()), c)
                 for suffix, tensor in (("down_w", proj.down.weight), ("up_w", proj.up.weight),
                                        ("up_b", proj.up.bias))]
        with graph.inserting_after(anchor):
            state = anchor = tag(graph.call_function(exit_state, (h_c, *names)), c)
    env: dict[fx.Node, fx.Node] = {last: state}
    for n in chain:
        with graph.inserting_after(anchor):
            anchor = tag(graph.node_copy(n, lambda a: env.get(a, a)), c)
        env[n] = anchor
    with graph.inserting_after(anchor):
        if logits_only:
            return tag(graph.call_function(candidate_logits, (head_w, env[head_x], idx_node, head_b)), c)
        return tag(graph.call_function(head_confidence, (env[head_x], head_w, idx_node, head_b)), c)


def run(gm: fx.GraphModule, ctx: "PassContext") -> fx.GraphModule:
    """Pass entry ``insert``: :func:`insert_exits` with the context's layer info, routers,
    checkpoints, threshold and kernels."""
    if ctx.routers is None:
        raise PassError("insert needs routers (ctx.routers is None)")
    return insert_exits(gm, ctx.need("layer_info", "layers"), ctx.routers, ctx.checkpoint_layers,
                        ctx.threshold, kernels=ctx.kernels, freeze=ctx.kv != "deferred",
                        live=ctx.live_input)


def insert_exits(
    gm: fx.GraphModule,
    info: LayerInfo,
    routers: "RouterSet",
    checkpoints: Sequence[int],
    threshold: float,
    kernels: str = "inductor",
    freeze: bool = True,
    live: bool = False,
) -> fx.GraphModule:
    """Insert the exit state, routes, selections and the exit-layer output (in place).

    ``kernels="triton"`` emits the hand-kernel ops ``tide::route_fused`` /
    ``tide::exit_select_fused`` instead of the composites Inductor fuses itself.
    ``freeze`` / ``live``: the module docstring.
    """
    graph = gm.graph
    checkpoints = sorted(checkpoints)
    bad = [c for c in checkpoints if not 0 <= c < info.num_layers - 1]
    if bad:
        raise PassError(
            f"router checkpoints {bad} are not exit layers of this {info.num_layers}-layer graph"
        )
    if not checkpoints:
        raise PassError("no checkpoint layers to insert routes at")
    device = None
    for n in graph.nodes:
        if n.op == "placeholder":
            ev = n.meta.get("example_value")
            if isinstance(ev, torch.Tensor) and ev.is_floating_point():
                device = ev.device
                break

    def tag(node: fx.Node, layer: int | str) -> fx.Node:
        node.meta[META_KEY] = layer
        return node

    def unpack(node: fx.Node, layer: int) -> tuple[tuple[fx.Node, fx.Node, fx.Node], fx.Node]:
        """``(exited, frozen, exit_layer)`` getitems right after ``node``, and the last one."""
        parts = []
        anchor = node
        fakes = _fake_exit_state(info.state_after(layer))
        for i in range(3):
            with graph.inserting_after(anchor):
                anchor = tag(graph.call_function(operator.getitem, (node, i)), layer)
            if fakes is not None:
                # Shapes for pieces compiled from fake inputs (symbolic lengths).
                anchor.meta["example_value"] = fakes[i]
            parts.append(anchor)
        return (parts[0], parts[1], parts[2]), anchor

    state: tuple[fx.Node, fx.Node, fx.Node] | None = None
    state_by_layer: dict[int, tuple[fx.Node, fx.Node, fx.Node]] = {}
    route_end: dict[int, fx.Node] = {}
    conf = routers.successor is not None
    # The hand kernel computes the features from the candidate logits in the route's launch.
    fused_conf = conf and kernels == "triton" and routers.confidence_k <= MAX_CONF_CANDIDATES
    if conf:
        ids_node, (head_w, head_b), head_x, chain = _head_reader(graph, info, routers)
        successor = routers.successor
        succ = tag(_input(gm, "tide_successor",
                          (successor.to(device) if device is not None else successor).detach()),
                   "pre")
        # A "pre" value, read at every checkpoint; after the ids (placeholders come first).
        with graph.inserting_after(succ if ids_node.op == "placeholder" else ids_node):
            idx_node = tag(graph.call_function(candidates, (ids_node, succ)), "pre")
    for c in checkpoints:
        h_c = info.state_after(c)
        r = routers.router(c)
        anchor = h_c
        feats = None
        if conf:
            anchor = feats = _confidence_nodes(gm, graph, c, h_c, info.last_output, routers,
                                               device, idx_node, head_w, head_b, head_x, chain,
                                               tag, logits_only=fused_conf)
        if state is None:
            init_args: tuple = (h_c,)
            if live:
                ev = example_value(h_c)
                if not isinstance(ev, torch.Tensor) or any(
                        isinstance(s, torch.SymInt) for s in ev.shape):
                    raise PassError("the live input needs static sizes")
                live_value = torch.ones(tuple(ev.shape[:-1]), dtype=torch.bool, device=ev.device)
                init_args = (h_c, tag(_input(gm, "tide_live", live_value), c))
                gm.meta[LIVE_INPUT] = live_value
            with graph.inserting_after(anchor):
                init = tag(graph.call_function(init_exit_state, init_args), c)
            state, anchor = unpack(init, c)
        weights = []
        named = [("w1", r.down.weight), ("b1", r.down.bias)]
        if feats is not None:
            named.append(("wf", r.feat.weight))
        for suffix, tensor in (*named, ("w2", r.up.weight), ("b2", r.up.bias)):
            value = (tensor.to(device) if device is not None else tensor).detach()
            if live:  # the runner's own copy: set_threshold shifts the bias in place
                value = value.clone()
                if suffix == "b2":
                    gm.meta.setdefault(ROUTER_BIASES, {})[c] = value
            node = _input(gm, f"tide_router_{c}_{suffix}", value)
            tag(node, c)
            weights.append(node)
        if feats is None:
            target, reads = route_op(kernels), ()
        else:  # the fused op reads the candidate logits, the composite the features
            target = (torch.ops.tide.route_conf_fused.default if fused_conf
                      else route_features_reference)
            reads = (feats,)
        with graph.inserting_after(anchor):
            route = tag(graph.call_function(
                target, (h_c, *reads, *state, *weights, float(threshold), int(c), float(r.eps)),
            ), c)
        state, anchor = unpack(route, c)
        state_by_layer[c] = state
        route_end[c] = anchor
    gm.meta[STATE_NAMES] = {c: tuple(n.name for n in st) for c, st in state_by_layer.items()}

    # Every layer after the first checkpoint reads its input through exit_select.
    for l in range(checkpoints[0] + 1, info.num_layers if freeze else 0):
        c = max(k for k in checkpoints if k < l)
        exited, frozen, _ = state_by_layer[c]
        h_in = info.layer_inputs[l]
        users = [u for u in h_in.users if u.meta.get(META_KEY) == l]
        if not users:
            raise PassError(f"layer {l} does not read its input state {h_in.name!r}")
        anchor = route_end[c] if l == c + 1 else h_in
        with graph.inserting_after(anchor):
            sel = tag(graph.call_function(exit_select_op(kernels),
                                          (exited, frozen, h_in)), l)
        for u in users:
            u.replace_input_with(h_in, sel)

    # The final norm reads E_c(h_c) for exited tokens.
    _, frozen, exit_layer = state
    last = info.last_output
    post_users = [u for u in last.users if u.meta.get(META_KEY) == "post"]
    projections = []
    anchor = last
    for c in checkpoints:
        proj = routers.exit_projection(c)
        if proj is None:
            continue
        names = []
        for suffix, tensor in (("down_w", proj.down.weight), ("up_w", proj.up.weight),
                               ("up_b", proj.up.bias)):
            node = _input(gm, f"tide_exitproj_{c}_{suffix}",
                          (tensor.to(device) if device is not None else tensor).detach())
            tag(node, "post")
            names.append(node)
        projections.append((c, *names))
    with graph.inserting_after(anchor):
        readout = tag(graph.call_function(final_select,
                                          (exit_layer, frozen, last, tuple(projections))), "post")
    for u in post_users:
        u.replace_input_with(last, readout)

    # Expose exit_layer as the last output.
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = out_node.args[0]
    if isinstance(outs, (tuple, list)):
        gm.meta[EXIT_LAYER_OUTPUT] = len(outs)
        out_node.args = (tuple(outs) + (exit_layer,),)
    else:
        gm.meta[EXIT_LAYER_OUTPUT] = None
        out_node.args = ((outs, exit_layer),)
    graph.lint()
    gm.recompile()
    return gm
