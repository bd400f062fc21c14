"""Runners: execute a Dynamo graph with early exit, by one of the strategies.

* :class:`FrozenRunner` runs the whole graph with the exit state inserted
  (:mod:`..passes.insert`): every layer runs for every token, exited tokens' layer inputs
  are their frozen states. No savings; one graph; the in-graph oracle.
* :class:`SkipRunner` runs the same graph split at the checkpoints. After each
  checkpoint it reads one flag from the device (one host sync): if every token of the
  batch has exited, the remaining segments are not run; a KV-fill graph writes the
  skipped layers' K/V from the frozen states and the head reads the logits out.
  Otherwise the next segment runs, with exited rows frozen as in the frozen strategy.
  (:mod:`.compact` adds compaction, :mod:`.cudagraphs` CUDA-graph capture.)
  Under ``kv="deferred"`` (the ``deferred`` strategy) the same runner runs the decode
  loop's wide step: there is no KV-fill (the skipped layers of the step's tokens run in
  a later step, which the loop drives with :attr:`SkipRunner.live` and
  :attr:`SkipRunner.force_deep`), and nothing is frozen.

Every runner is built from one :class:`RunnerArtifacts` (what the backend's passes made),
counts :class:`~..stats.ExitStats` from what actually ran, with the strategy of the step,
and returns the model's outputs in the graph's own layout (the exit-layer output the
insert pass appended is stripped).

Pieces (segments, KV-fills, head) compile on their first call (:class:`LazyGraph`): a
graph with static sizes from that call's inputs; a graph with symbolic sizes once, from
the placeholders' fake values, so one compiled piece serves every size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx

from ..passes._fx import example_value, mutated_placeholders
from ..passes.insert import final_select
from ..stats import ExitStats

if TYPE_CHECKING:
    from ..passes import CompactPlan, HeadGraph, KVFillGraph, SplitGraph

__all__ = ["FrozenRunner", "SkipRunner", "RunnerArtifacts", "LazyGraph", "Compiler",
           "strip_exit_layer", "exit_outputs"]

#: ``compile(gm, example_inputs) -> callable``: Inductor's compile_fx, or ``gm.forward``.
Compiler = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]

#: ``(c, down_w, up_w, up_b)`` of the exit projection at checkpoint ``c``.
Projection = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class RunnerArtifacts:
    """Everything a runner runs: the results of the backend's passes for one graph.

    Attributes:
        stats: where the runner counts exits.
        compiler: compiles the pieces (segments, KV-fills, head, compacted segments).
        user_outputs: outputs of the graph before insertion (None: a single output).
        extra_inputs: tensors appended to every call's arguments (router weights).
        symbolic: the graph has symbolic sizes: every piece compiles once, from fakes.
        whole: the inserted graph (the frozen strategy), compiled by ``whole_compiler``
            from ``example_inputs`` (Dynamo's).
        mutated_inputs: indices of the graph inputs it writes in place (cache tensors).
        split / kv_fills / head: the segments, the KV-fill graph per checkpoint, the
            read-out (skip and compact strategies).
        state_names: per checkpoint, the names of ``(exited, frozen, exit_layer)`` after it.
        projections: the exit projections.
        compact: the compacted segments (compact strategy).
        compaction_threshold: compact when fewer than this fraction of positions continue.
        compact_min_length: steps of fewer positions run ``whole`` (0: never).
        live: the deferred decode step's ``tide_live`` input (None: not a deferred step).
        router_biases: checkpoint -> the router output bias the graph reads (the
            deferred step's own copies, shifted by ``set_threshold``).
        threshold: the exit threshold compiled into the graph.
    """

    stats: ExitStats
    compiler: Compiler
    user_outputs: int | None
    extra_inputs: list[torch.Tensor] = field(default_factory=list)
    symbolic: bool = False
    whole: fx.GraphModule | None = None
    whole_compiler: Compiler | None = None
    example_inputs: list[Any] = field(default_factory=list)
    mutated_inputs: set[int] = field(default_factory=set)
    split: "SplitGraph | None" = None
    kv_fills: "dict[int, KVFillGraph]" = field(default_factory=dict)
    head: "HeadGraph | None" = None
    state_names: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    projections: list[Projection] = field(default_factory=list)
    compact: "CompactPlan | None" = None
    compaction_threshold: float = 0.5
    compact_min_length: int = 0
    live: torch.Tensor | None = None
    router_biases: dict[int, torch.Tensor] = field(default_factory=dict)
    threshold: float = 0.5


class LazyGraph:
    """A graph compiled on its first call: from that call's inputs, or from
    :attr:`example_inputs` when set (:meth:`for_symbolic_sizes`)."""

    def __init__(self, gm: fx.GraphModule, compiler: Compiler, name: str) -> None:
        self.gm = gm
        self.compiler = compiler
        self.name = name
        self.fn: Callable[..., Any] | None = None
        #: compile from these (symbolic fake values) instead of the first call's inputs
        self.example_inputs: list[Any] | None = None
        #: inputs made contiguous at each call (compiled for contiguous fake inputs)
        self.contiguous_inputs: frozenset[int] = frozenset()

    def for_symbolic_sizes(self) -> "LazyGraph":
        """Compile from the placeholders' fake values (one graph for every size).

        Inputs are compiled as contiguous and made contiguous at each call: Dynamo's fake
        values and the runtime tensors may disagree on the strides of broadcast
        (stride-0) dimensions, which compiled code asserts. Inputs the graph writes in
        place stay as they are.
        """
        mutated = mutated_placeholders(self.gm)
        fakes = [example_value(p) for p in self.gm.graph.nodes if p.op == "placeholder"]
        self.contiguous_inputs = frozenset(
            i for i, ev in enumerate(fakes) if isinstance(ev, torch.Tensor) and i not in mutated)
        self.example_inputs = [_contiguous_fake(ev) if i in self.contiguous_inputs else ev
                               for i, ev in enumerate(fakes)]
        return self

    def __call__(self, *args: Any) -> Any:
        if self.contiguous_inputs:
            args = tuple(a.contiguous() if i in self.contiguous_inputs else a
                         for i, a in enumerate(args))
        if self.fn is None:
            example = self.example_inputs if self.example_inputs is not None else list(args)
            self.fn = self.compiler(self.gm, example)
        return self.fn(*args)


def static_fakes(example_inputs: Sequence[Any], tensors: Sequence[Any]) -> list[Any]:
    """Fake copies, with static sizes, of ``tensors`` (the router weights and other inputs
    Dynamo has no source for), in the fake mode of Dynamo's ``example_inputs``.

    A graph compiled inside Dynamo's tracing context shares its shape environment: given
    the real tensors, Inductor fakeifies them with symbolic sizes that no Dynamo source
    names, and building the guards then fails ("sources must not be empty for symbol",
    "__meta_utils_unknown_tensor", seen on CUDA).
    """
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(list(example_inputs))
    if mode is None:
        return list(tensors)
    return [mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
            for t in tensors]


def _logit(p: float) -> float:
    import math

    return math.log(p) - math.log1p(-p)


def _contiguous_fake(ev: torch.Tensor) -> torch.Tensor:
    mode = getattr(ev, "fake_mode", None)
    if mode is None:
        return ev.contiguous()
    with mode:
        return torch.empty(ev.shape, dtype=ev.dtype, device=ev.device)


def strip_exit_layer(outs: Any, user_outputs: int | None) -> tuple[Any, torch.Tensor]:
    """``(the model's outputs, exit_layer)`` from the inserted graph's outputs."""
    outs = tuple(outs)
    exit_layer = outs[-1]
    if user_outputs is None:
        return outs[0], exit_layer
    return outs[:user_outputs], exit_layer


def exit_outputs(layout: Sequence[str | None], exit_layer: torch.Tensor,
                 override: dict[int, Any], env: dict[str, Any]) -> list[Any]:
    """The graph's outputs after an exit at a checkpoint: the KV-fill's and the head's
    outputs by position (``override``), the rest from the segments that ran (``env``),
    and the exit layers last."""
    outs: list[Any] = []
    for i, name in enumerate(layout):
        if i == len(layout) - 1:
            outs.append(exit_layer)
        elif i in override:
            outs.append(override[i])
        elif name is None:
            outs.append(None)
        elif name in env:
            outs.append(env[name])
        else:
            raise RuntimeError(
                f"output {i} ({name!r}) of the graph is computed only by skipped segments "
                "and by neither the KV-fill nor the head graph"
            )
    return outs


class FrozenRunner:
    """Run the inserted whole graph (the frozen strategy).

    With static sizes the graph compiles at the first call, outside Dynamo's tracing
    context, like the skip strategy's pieces (inside it, Inductor would trace the router
    inputs, which Dynamo has no source for, in Dynamo's shape environment, and a guard on
    one of their sizes cannot be built). With symbolic sizes it compiles now, inside that
    context, from Dynamo's example inputs.
    """

    strategy = "frozen"

    def __init__(self, art: RunnerArtifacts) -> None:
        if art.whole is None or art.whole_compiler is None:
            raise ValueError("the frozen runner needs the whole inserted graph and its compiler")
        self.user_outputs = art.user_outputs
        self.num_layers = art.stats.num_layers
        self.stats = art.stats
        self.extra = list(art.extra_inputs)
        self.fn = (art.whole_compiler(art.whole, list(art.example_inputs)
                                      + static_fakes(art.example_inputs, self.extra))
                   if art.symbolic else LazyGraph(art.whole, art.whole_compiler, "frozen"))

    def __call__(self, *args: Any) -> Any:
        outs, exit_layer = strip_exit_layer(self.fn(*args, *self.extra), self.user_outputs)
        self.stats.record(exit_layer, layers_executed=exit_layer.numel() * self.num_layers,
                          strategy=self.strategy)
        return outs


class SkipRunner:
    """Run segments, skipping the rest of the model once every token has exited.

    With no checkpoint cut (``split`` of one segment) it runs the whole inserted graph as
    one piece: the frozen strategy in the form :mod:`.cudagraphs` captures.

    A deferred step (``live`` set, no KV-fill graphs) stops when every live token has
    exited and reads the exit head; the caller sets :attr:`live` (which tokens may exit)
    and :attr:`force_deep` (run every segment whatever the flags say) before a call, and
    reads :attr:`reached_end` after it.
    """

    def __init__(self, art: RunnerArtifacts) -> None:
        if art.split is None:
            raise ValueError("the skip runner needs the split graph (the segment pass)")
        self.split = art.split
        self.extra = list(art.extra_inputs)
        self.cuts = list(art.split.checkpoint_layers)
        self.segments = [LazyGraph(s.gm, art.compiler, f"segment{k}")
                         for k, s in enumerate(art.split.segments)]
        self.kv_fills = {c: LazyGraph(g.gm, art.compiler, f"kv_fill{c}")
                         for c, g in art.kv_fills.items()}
        self.kv_meta = art.kv_fills
        self.head = LazyGraph(art.head.gm, art.compiler, "head") if art.head is not None else None
        self.head_meta = art.head
        self.state_names = art.state_names
        self.projections = list(art.projections)
        self.user_outputs = art.user_outputs
        self.stats = art.stats
        self.num_layers = art.stats.num_layers
        #: segments run per call, for tests and benchmarks: index of the last one run.
        self.last_segments_run = 0
        #: deferred steps: the ``tide_live`` input (written in place by the decode loop)
        self.live = art.live
        #: deferred steps: run every segment, whatever the exit flags say (a full buffer)
        self.force_deep = False
        self.router_biases = dict(art.router_biases)
        self._biases0 = {c: b.clone() for c, b in self.router_biases.items()}
        self.compiled_threshold = float(art.threshold)
        self.threshold = float(art.threshold)
        if self.cuts and self.head is None:
            raise ValueError("the skip runner needs the head graph to exit at a checkpoint")
        if self.cuts and not self.kv_fills and self.live is None:
            raise ValueError("the skip runner needs KV-fill graphs (propagate) or the live "
                             "input (a deferred step)")

    @property
    def strategy(self) -> str:
        """``"skip"``, ``"deferred"``, or ``"frozen"`` for a runner without cuts (one piece)."""
        if not self.cuts:
            return "frozen"
        return "deferred" if self.live is not None else "skip"

    @property
    def reached_end(self) -> bool:
        """The last call ran every segment (no exit stopped it)."""
        return self.last_segments_run == len(self.segments)

    def set_threshold(self, threshold: float) -> None:
        """Exit at ``threshold`` from the next call on, without compiling again: the
        routers' output biases the graph reads are shifted in place by
        ``logit(compiled) - logit(threshold)`` (``score > compiled`` after the shift is
        ``score > threshold`` before it). Deferred steps only (their biases are copies)."""
        if not self.router_biases:
            raise ValueError("set_threshold needs a deferred decode step's runner")
        if not 0.0 < self.compiled_threshold < 1.0 or not 0.0 < threshold < 1.0:
            raise ValueError(f"set_threshold shifts thresholds inside (0, 1); compiled at "
                             f"{self.compiled_threshold}, asked {threshold}")
        shift = _logit(self.compiled_threshold) - _logit(threshold)
        for c, b in self.router_biases.items():
            b.copy_(self._biases0[c] + shift)
        self.threshold = float(threshold)

    def pieces(self) -> list[LazyGraph]:
        """Every lazily compiled piece."""
        return [*self.segments, *self.kv_fills.values(),
                *([self.head] if self.head is not None else [])]

    def for_symbolic_sizes(self) -> "SkipRunner":
        """Compile every piece once for symbolic sizes (:meth:`LazyGraph.for_symbolic_sizes`)."""
        for piece in self.pieces():
            piece.for_symbolic_sizes()
        return self

    def __call__(self, *args: Any) -> Any:
        env = self.split.env(*args, *self.extra)
        segs = self.split.segments
        for k, seg in enumerate(segs):
            env.update(zip(seg.output_names, self.segments[k](*[env[n] for n in seg.input_names])))
            if k == len(self.cuts):
                break
            c = self.cuts[k]
            exited_name, frozen_name, exit_layer_name = self.state_names[c]
            if not self.force_deep and bool(env[exited_name].all()):  # one host sync
                self.last_segments_run = k + 1
                return self._exit_all(env, c, frozen_name, exit_layer_name)
        self.last_segments_run = len(segs)
        outs, exit_layer = strip_exit_layer(self.split.outputs(env), self.user_outputs)
        self._record(exit_layer, self.num_layers)
        return outs

    def _record(self, exit_layer: torch.Tensor, depth: int) -> None:
        self.stats.record(exit_layer, layers_executed=exit_layer.numel() * depth,
                          strategy=self.strategy)

    def _exit_all(self, env: dict[str, Any], c: int, frozen_name: str,
                  exit_layer_name: str) -> Any:
        assert self.head is not None and self.head_meta is not None
        frozen = env[frozen_name]
        exit_layer = env[exit_layer_name]
        override: dict[int, Any] = {}
        if c in self.kv_meta:  # propagate: the skipped layers' K/V from the frozen state
            kv = self.kv_meta[c]
            env["h_frozen"] = frozen
            kv_outs = self.kv_fills[c](*[env[n] for n in kv.input_names])
            override.update(zip(kv.output_positions, kv_outs))
        env["h"] = final_select(exit_layer, frozen, frozen, self.projections)
        head_outs = self.head(*[env[n] for n in self.head_meta.input_names])
        override.update(zip(self.head_meta.output_positions, head_outs))
        outs = exit_outputs(self.split.output_layout, exit_layer, override, env)
        result, exit_layer = strip_exit_layer(outs, self.user_outputs)
        self._record(exit_layer, c + 1)
        return result
