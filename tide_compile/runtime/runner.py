"""Runners: execute a Dynamo graph with early exit, by one of two strategies.

* :class:`FrozenRunner` runs the whole graph with the exit state inserted
  (:mod:`..passes.insert`): every layer runs for every token, exited tokens' layer inputs
  are their frozen states. No savings; one graph; the in-graph oracle.
* :class:`SkipRunner` runs the same graph split at the checkpoints. After each
  checkpoint it reads one flag from the device (one host sync): if every token of the
  batch has exited, the remaining segments are not run; a KV-fill graph writes the
  skipped layers' K/V from the frozen states and the head reads the logits out.
  Otherwise the next segment runs, with exited rows frozen as in the frozen strategy.

Both count :class:`~..stats.ExitStats` from what actually ran and return the model's
outputs in the graph's own layout (the exit-layer output the insert pass appended is
stripped).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..passes.insert import EXIT_LAYER_OUTPUT, EXTRA_INPUTS, final_select
from ..stats import ExitStats

__all__ = ["FrozenRunner", "SkipRunner", "Compiler"]

#: ``compile(gm, example_inputs) -> callable``: Inductor's compile_fx, or ``gm.forward``.
Compiler = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def _token_count(exit_layer: torch.Tensor) -> int:
    return int(exit_layer.numel())


class _Lazy:
    """A graph compiled on its first call, with that call's inputs as example inputs."""

    def __init__(self, gm: fx.GraphModule, compiler: Compiler, name: str) -> None:
        self.gm = gm
        self.compiler = compiler
        self.name = name
        self.fn: Callable[..., Any] | None = None
        #: compile from these (e.g. symbolic fake values) instead of the first call's inputs
        self.example_inputs: list[Any] | None = None

        #: inputs made contiguous at each call (compiled for contiguous fake inputs)
        self.contiguous_inputs: frozenset[int] = frozenset()

    def __call__(self, *args: Any) -> Any:
        if self.contiguous_inputs:
            args = tuple(a.contiguous() if i in self.contiguous_inputs else a
                         for i, a in enumerate(args))
        if self.fn is None:
            example = self.example_inputs if self.example_inputs is not None else list(args)
            self.fn = self.compiler(self.gm, example)
        return self.fn(*args)


def _strip(outs: Any, user_outputs: int | None) -> tuple[Any, Any]:
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
    """Run the inserted whole graph (the frozen strategy)."""

    strategy = "frozen"

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: Compiler,
                 stats: ExitStats, lazy: bool = False) -> None:
        self.user_outputs = gm.meta.get(EXIT_LAYER_OUTPUT)
        self.num_layers = stats.num_layers
        self.stats = stats
        self.extra = list(gm.meta.get(EXTRA_INPUTS, []))
        # lazy (static shapes): compile at the first call, outside Dynamo's tracing
        # context, like the skip strategy's pieces. Inside it, Inductor would trace the
        # router inputs (which Dynamo has no source for) in Dynamo's shape environment,
        # and a guard on one of their sizes (seen: CUDA's pad_mm) cannot be built.
        self.fn = (_Lazy(gm, compiler, "frozen") if lazy
                   else compiler(gm, list(example_inputs) + self.extra))

    def __call__(self, *args: Any) -> Any:
        outs, exit_layer = _strip(self.fn(*args, *self.extra), self.user_outputs)
        self.stats.record(exit_layer, layers_executed=_token_count(exit_layer) * self.num_layers)
        return outs


class SkipRunner:
    """Run segments, skipping the rest of the model once every token has exited.

    Args:
        split: the inserted graph split at the checkpoints (:mod:`..passes.segment`).
        kv_fills: per checkpoint ``c``, the graph writing layers ``c+1 ..`` K/V from a
            frozen state (derived from the graph before insertion, :mod:`..passes.kv_fill`).
        head: ``h -> logits`` from the graph's tail.
        state_names: per checkpoint, the names of ``(exited, frozen, exit_layer)`` after it.
        projections: ``(c, down_w, up_w, up_b)`` of the exit projections.
        user_outputs: outputs of the graph before insertion (None: a single output).
    """

    strategy = "skip"

    def __init__(self, split: Any, kv_fills: dict[int, Any], head: Any,
                 state_names: dict[int, tuple[str, str, str]],
                 projections: Sequence[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
                 user_outputs: int | None, compiler: Compiler, stats: ExitStats,
                 extra_inputs: Sequence[torch.Tensor] = ()) -> None:
        self.split = split
        self.extra = list(extra_inputs)
        self.cuts = list(split.checkpoint_layers)
        self.segments = [_Lazy(s.gm, compiler, f"segment{k}") for k, s in enumerate(split.segments)]
        self.kv_fills = {c: _Lazy(g.gm, compiler, f"kv_fill{c}") for c, g in kv_fills.items()}
        self.kv_meta = kv_fills
        self.head = _Lazy(head.gm, compiler, "head")
        self.head_meta = head
        self.state_names = state_names
        self.projections = list(projections)
        self.user_outputs = user_outputs
        self.stats = stats
        self.num_layers = stats.num_layers
        #: segments run per call, for tests and benchmarks: index of the last one run.
        self.last_segments_run = 0

    def __call__(self, *args: Any) -> Any:
        env = self.split.env(*args, *self.extra)
        segs = self.split.segments
        for k, seg in enumerate(segs):
            env.update(zip(seg.output_names, self.segments[k](*[env[n] for n in seg.input_names])))
            if k == len(self.cuts):
                break
            c = self.cuts[k]
            exited_name, frozen_name, exit_layer_name = self.state_names[c]
            if bool(env[exited_name].all()):  # the one host sync per checkpoint
                self.last_segments_run = k + 1
                return self._exit_all(env, c, frozen_name, exit_layer_name)
        self.last_segments_run = len(segs)
        outs, exit_layer = _strip(self.split.outputs(env), self.user_outputs)
        self._record(exit_layer, self.num_layers)
        return outs

    def _record(self, exit_layer: torch.Tensor, depth: int) -> None:
        self.stats.record(exit_layer, layers_executed=_token_count(exit_layer) * depth)

    def _exit_all(self, env: dict[str, Any], c: int, frozen_name: str,
                  exit_layer_name: str) -> Any:
        frozen = env[frozen_name]
        exit_layer = env[exit_layer_name]
        override: dict[int, Any] = {}
        kv = self.kv_meta[c]
        env["h_frozen"] = frozen
        kv_outs = self.kv_fills[c](*[env[n] for n in kv.input_names])
        override.update(zip(kv.output_positions, kv_outs))
        env["h"] = final_select(exit_layer, frozen, frozen, self.projections)
        head_outs = self.head(*[env[n] for n in self.head_meta.input_names])
        override.update(zip(self.head_meta.output_positions, head_outs))
        outs = exit_outputs(self.split.output_layout, exit_layer, override, env)
        result, exit_layer = _strip(outs, self.user_outputs)
        self._record(exit_layer, c + 1)
        return result
