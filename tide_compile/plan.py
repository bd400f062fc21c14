"""Which strategy runs a graph: one pure function, :func:`plan`.

The backend reads a few facts off each Dynamo graph (:class:`GraphFacts`: the step's
length per row or a symbol, whether any size is symbolic, whether it writes a StaticCache
in place, the device) and asks :func:`plan` what to do with them under the user's
:class:`~.options.TideOptions`. The answer (:class:`Plan`) names the strategy, the pass
list that builds it (:data:`.passes.PIPELINES`), the kernels, whether its pieces are
captured into CUDA graphs, and a cause to warn about once when the shapes force a slower
path than the options asked for. Nothing here looks at a graph or compiles anything.

Strategy ``auto`` (the default):

====================================  ==========================================
step                                  strategy
====================================  ==========================================
one token per row (decode), any       ``skip``: static sizes compile each piece once
batch, static or symbolic sizes       for those sizes (CUDA graphs on CUDA); symbolic
                                      sizes compile each piece once for every size
multi-token, symbolic length,         ``compact``: per call, fewer than
StaticCache (a prefill)               ``compact_min_length`` positions run the frozen
                                      graph, longer ones compact
anything else (static prefill,        ``frozen``
DynamicCache prefill)
no checkpoint at or after             ``plain``: the model as it is
``min_layers``
====================================  ==========================================

With ``kv="deferred"`` the table is different: the deferred decode step of
``TIDEModel.generate`` (``max_pending + 1`` tokens wide, static sizes) runs ``deferred``
(the skip strategy without KV-fill: a step stops when every row's current token has
exited, and the tokens it leaves pending run their skipped layers in a later step);
every other graph runs ``frozen`` with exact K/V (every layer for every token; nothing
frozen, the exits pick the exited tokens' logits). A one-token step outside ``generate``
warns once that it saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .options import TideOptions

__all__ = ["GraphFacts", "Plan", "plan"]

PlannedStrategy = Literal["plain", "frozen", "skip", "compact", "deferred"]


@dataclass(frozen=True)
class GraphFacts:
    """What the planner knows about one Dynamo graph.

    Attributes:
        step_length: positions per row of the step (the residual state's sequence
            size); None when it is a symbol (a dynamic-length step).
        symbolic: some input size is a symbol (Dynamo's dynamic shapes): pieces must be
            compiled for every size, and CUDA graphs do not apply.
        writes_cache_in_place: the graph writes its inputs in place (a StaticCache);
            compaction needs it.
        on_cuda: the graph's tensors are on a CUDA device.
        compact_error: why the compact passes refused this graph (set when planning
            again after they did).
        deferred_decode: the graph is ``TIDEModel.generate``'s deferred decode step
            (:data:`.options.DEFERRED_DECODE` was set while Dynamo traced it).
    """

    step_length: int | None
    symbolic: bool
    writes_cache_in_place: bool
    on_cuda: bool
    compact_error: str | None = None
    deferred_decode: bool = False

    def without_compaction(self, reason: str) -> "GraphFacts":
        """These facts, with the compact passes' refusal."""
        return replace(self, compact_error=reason)


@dataclass(frozen=True)
class Plan:
    """How one graph runs.

    Attributes:
        strategy: ``"plain"`` (no exits possible), ``"frozen"``, ``"skip"``, ``"compact"``
            (a dynamic-length graph; its runner runs a step of fewer than
            ``compact_min_length`` positions frozen) or ``"deferred"``.
        kv: the K/V semantics the passes build (``options.kv``): ``"deferred"`` inserts
            no frozen-state selection (every layer sees each token's own state).
        kernels: the route / exit-select ops: ``"inductor"`` or ``"triton"``.
        cuda_graphs: capture the pieces into CUDA graphs (static sizes only).
        stack_kv: stack the KV-fill graphs' K/V projections (:mod:`.passes.kv_stack`).
        compact_min_length: compact plans: multi-token steps shorter than this run the
            frozen graph (0: never).
        symbolic: compile every piece once for symbolic sizes (from Dynamo's fake inputs).
        warning: a cause to warn about (once): the shapes or the cache force a slower
            path than the options asked for.
    """

    strategy: PlannedStrategy
    kv: Literal["propagate", "deferred"] = "propagate"
    kernels: Literal["inductor", "triton"] = "inductor"
    cuda_graphs: bool = False
    stack_kv: bool = False
    compact_min_length: int = 0
    symbolic: bool = False
    warning: str | None = None

    @property
    def pipeline(self) -> str:
        """The name of the pass list that builds this plan (:data:`.passes.PIPELINES`)."""
        if self.strategy == "frozen" and self.cuda_graphs:
            return "frozen_graphed"
        return self.strategy


def plan(facts: GraphFacts, options: TideOptions) -> Plan:
    """The strategy and its settings for a graph with ``facts``; see the module table.

    Raises ``ValueError`` when ``options.cuda_graphs`` is True for a graph not on CUDA,
    and for a deferred decode step with symbolic sizes.
    """
    if options.checkpoints is None:
        raise ValueError("plan() needs options resolved with routers (parse_options)")
    if not options.checkpoints:
        return Plan("plain", symbolic=facts.symbolic)
    if options.cuda_graphs and not facts.on_cuda:
        raise ValueError("options['cuda_graphs']=True needs the model on a CUDA device")
    if options.kv == "deferred":
        return _plan_deferred(facts, options)
    one_token = facts.step_length == 1
    dynamic_length = facts.step_length is None
    compactable = dynamic_length and facts.writes_cache_in_place and facts.compact_error is None
    asked = options.strategy
    warning = None
    if asked == "auto":
        strategy = "skip" if one_token else "compact" if compactable else "frozen"
        if (strategy == "frozen" and facts.step_length is not None
                and facts.writes_cache_in_place
                and facts.step_length >= max(options.compact_min_length, 2)):
            warning = (f"tide: a static {facts.step_length}-position step runs the frozen "
                       "strategy (all layers): compaction needs a symbolic length; mark it "
                       "with torch._dynamo.mark_dynamic(input_ids, 1)")
    elif asked == "compact":
        strategy = "skip" if one_token else "compact" if compactable else "frozen"
        if strategy == "frozen":
            warning = ("tide: strategy 'compact' falls back to 'frozen' for this graph: "
                       + (facts.compact_error or _why_not_compactable(facts)))
    else:
        strategy = asked
    graphs_wanted = options.inductor and facts.on_cuda if options.cuda_graphs is None \
        else options.cuda_graphs
    static = not facts.symbolic
    cuda_graphs = bool(graphs_wanted and static
                       and (strategy == "skip" or (strategy == "frozen" and one_token)))
    if graphs_wanted and not static and one_token and strategy == "skip":
        warning = ("tide: a one-token step with symbolic sizes runs the skip strategy "
                   "without CUDA graphs (they need static sizes): keep the batch and cache "
                   "sizes fixed per compiled graph, as tide_compile.optimize(...).generate "
                   "does with its buckets")
    kernels = options.kernels
    if kernels == "auto":
        # The hand kernels are for static steps: their launch picks tiles from the row
        # count, which a symbolic length must not be specialized on.
        kernels = "triton" if options.inductor and facts.on_cuda and static else "inductor"
    stack_kv = options.stack_kv
    if stack_kv is None:
        stack_kv = bool(options.inductor and facts.on_cuda and static and strategy == "skip")
    return Plan(
        strategy=strategy,
        kernels=kernels,
        cuda_graphs=cuda_graphs,
        stack_kv=bool(stack_kv and strategy in ("skip", "compact")),
        compact_min_length=options.compact_min_length if asked == "auto" else 0,
        symbolic=facts.symbolic,
        warning=warning,
    )


def _plan_deferred(facts: GraphFacts, options: TideOptions) -> Plan:
    """``kv="deferred"``: the decode loop's step skips; every other graph runs every layer."""
    kernels = "inductor" if options.kernels == "auto" else options.kernels
    if facts.deferred_decode:
        if facts.symbolic:
            raise ValueError("a deferred decode step needs static sizes: generate with "
                             "dynamic=None or False under kv='deferred'")
        if not facts.writes_cache_in_place:
            raise ValueError("a deferred decode step needs a StaticCache (it rewrites the "
                             "pending tokens' K/V in place)")
        graphs_wanted = (options.inductor and facts.on_cuda if options.cuda_graphs is None
                         else options.cuda_graphs)
        if options.kernels == "auto" and options.inductor and facts.on_cuda:
            kernels = "triton"
        return Plan("deferred", kv="deferred", kernels=kernels, cuda_graphs=bool(graphs_wanted))
    warning = None
    if facts.step_length == 1:
        warning = ("tide: kv='deferred' skips layers only in TIDEModel.generate (its decode "
                   "loop feeds the pending tokens back); this one-token step runs every "
                   "layer, with exact K/V")
    return Plan("frozen", kv="deferred", kernels=kernels, symbolic=facts.symbolic,
                warning=warning)


def _why_not_compactable(facts: GraphFacts) -> str:
    if facts.step_length is not None:
        return (f"the step has a static length ({facts.step_length}); compaction needs a "
                "symbolic one (torch._dynamo.mark_dynamic(input_ids, 1))")
    return "the graph writes no cache in place; compaction needs a StaticCache"
