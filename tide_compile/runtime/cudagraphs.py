"""The skip strategy with each piece captured into its own CUDA graph.

After every segment the runner reads a flag on the host. Behind a compiled wrapper
(``torch.compile(mode="reduce-overhead")``) each read exposes the wrapper's Python work;
behind a raw ``torch.cuda.CUDAGraph`` replay it costs a replay, a flag read and a branch
(the measurements: benchmarks/RESULTS.md). So: compile each piece with Inductor (no CUDA
graphs of its own), capture

* one graph per segment, ending with a copy of ``exited.all()`` into pinned host memory,
* one graph per checkpoint ``c`` for the exit tail: KV-fill of layers ``c+1 ..``, the
  exit read-out and the head,

all in one memory pool, each reading the previous graph's outputs at their fixed
addresses. A call then is: copy the changing inputs into static buffers, replay
segment 0, read the flag, branch (replay the next segment, or the exit tail and stop).

With no cuts (the frozen strategy's one-token steps) the one segment is the whole
inserted graph: one graph, no host read.

Inputs whose address changes between calls (token ids, positions, masks) are copied
into static buffers; inputs whose address stays (parameters, cache tensors, counters)
are used in place. If one of the latter moves (a new cache), the graphs are captured
again after a fresh warm-up.

If capturing fails (an op that cannot be captured, a collective that refuses capture),
the caches and counters the warm-up wrote are restored, one ``RuntimeWarning`` says why,
and the runner's pieces run uncaptured from then on (``capture_error`` keeps the reason).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..passes.insert import final_select
from .runner import SkipRunner, exit_outputs, strip_exit_layer

__all__ = ["GraphedSkipRunner"]


class GraphedSkipRunner:
    """Wraps a :class:`SkipRunner` (CUDA, static shapes) and replays captured graphs."""

    def __init__(self, runner: SkipRunner, mutated_inputs: set[int],
                 warmup_calls: int = 3) -> None:
        self.runner = runner
        #: "skip", or "frozen" for a runner with no checkpoint cuts (one graph, no reads)
        self.strategy = runner.strategy
        self.mutated_inputs = set(mutated_inputs)
        self.warmup_calls = max(3, warmup_calls)
        self.stats = runner.stats
        self._reset()

    # ------------------------------------------------------------------ deferred steps
    @property
    def live(self) -> torch.Tensor | None:
        return self.runner.live

    @property
    def force_deep(self) -> bool:
        return self.runner.force_deep

    @force_deep.setter
    def force_deep(self, value: bool) -> None:
        self.runner.force_deep = value

    @property
    def reached_end(self) -> bool:
        return self.runner.reached_end

    def set_threshold(self, threshold: float) -> None:
        self.runner.set_threshold(threshold)

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        #: why capture failed (the pieces then run uncaptured), or None
        self.capture_error: str | None = None
        self.calls = 0
        self.ptr_history: list[list[int | None]] = []
        self.captured = False
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.exit_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.env: dict[str, Any] = {}
        self.exit_env: dict[int, dict[int, Any]] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.static_ptrs: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ call
    def __call__(self, *args: Any) -> Any:
        if self.capture_error is not None:
            return self.runner(*args)
        if self.captured:
            if all(args[i].data_ptr() == p for i, p in self.static_ptrs):
                return self._replay(args)
            self._reset()  # a static input moved (e.g. a new cache): warm up and capture again
        out = self.runner(*args)
        self.ptr_history.append([a.data_ptr() if isinstance(a, torch.Tensor) else None
                                 for a in args])
        self.calls += 1
        if self.calls >= self.warmup_calls:
            try:
                self._capture(args)
            except Exception as e:  # noqa: BLE001 - any capture failure: run uncaptured
                self._give_up(e)
        return out

    def _give_up(self, error: Exception) -> None:
        """Capture failed: say why (one warning) and run the pieces uncaptured from now on
        (the runner's own loop: the same outputs, a host read per checkpoint without the
        graphs' savings). The caches and counters were restored by :meth:`_capture`."""
        self._reset()  # drop whatever the failed capture left (graphs, buffers, pointers)
        self.capture_error = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"tide_compile: capturing the {self.strategy} runner's CUDA graphs failed "
            f"({self.capture_error.splitlines()[0]}); running its pieces without CUDA graphs "
            "(slower; pass cuda_graphs=False to skip the attempt)", RuntimeWarning,
            stacklevel=3)

    # ------------------------------------------------------------------ capture
    def _capture(self, args: tuple) -> None:
        # Parameters, tensors marked static (HF marks its StaticCache tensors and write
        # counters with torch._dynamo.mark_static_address, except when the cache was
        # created inside a compiled prefill) and inputs the graph writes in place are used
        # in place; every other tensor input is copied into a static buffer per replay.
        # Also in place: tensors that stayed at one address over the warm-up calls (model
        # buffers such as rotary tables). If one of them moves later, the check at the
        # top of __call__ sees it and the graphs are captured again.
        stayed = {i for i, ptrs in enumerate(zip(*self.ptr_history))
                  if ptrs[0] is not None and len(set(ptrs)) == 1}
        dynamic = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                   and not _is_static(a) and i not in self.mutated_inputs and i not in stayed}
        for i in dynamic:
            self.buffers[i] = args[i].clone()
        self.static_ptrs = [
            (i, a.data_ptr()) for i, a in enumerate(args)
            if isinstance(a, torch.Tensor) and i not in dynamic
            and not isinstance(a, torch.nn.Parameter)
        ]
        static_args = [self.buffers.get(i, a) for i, a in enumerate(args)]
        self.input_ptrs = {a.data_ptr() for a in static_args if isinstance(a, torch.Tensor)}
        mutable = [a for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                   and i not in dynamic and not isinstance(a, torch.nn.Parameter)]
        snapshot = [a.clone() for a in mutable]
        try:
            self._record(static_args, mutable, snapshot)
        except BaseException:
            # The warm-up may have written caches and counters: put them back, so that
            # the caller can run the pieces uncaptured from the state it had.
            torch.cuda.synchronize()
            for a, s in zip(mutable, snapshot):
                a.copy_(s)
            raise

    def _record(self, static_args: list, mutable: list[torch.Tensor],
                snapshot: list[torch.Tensor]) -> None:
        """Warm every piece up on a side stream, then capture the graphs (``_capture``)."""
        r = self.runner
        segs = r.split.segments
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())

        def run_segment(env: dict[str, Any], k: int) -> None:
            seg = segs[k]
            env.update(zip(seg.output_names, r.segments[k](*[env[n] for n in seg.input_names])))

        def run_exit(env: dict[str, Any], c: int) -> dict[int, Any]:
            _, frozen_name, exit_layer_name = r.state_names[c]
            local = dict(env)
            frozen, exit_layer = env[frozen_name], env[exit_layer_name]
            local["h_frozen"] = frozen
            outs: dict[int, Any] = {}
            if c in r.kv_meta:  # propagate; a deferred step has no KV-fill
                kv = r.kv_meta[c]
                outs.update(zip(kv.output_positions,
                                r.kv_fills[c](*[local[n] for n in kv.input_names])))
            local["h"] = final_select(exit_layer, frozen, frozen, r.projections)
            outs.update(zip(r.head_meta.output_positions,
                            r.head(*[local[n] for n in r.head_meta.input_names])))
            return outs

        # Warm-up of every piece on the side stream (loads kernels, compiles pieces not
        # run yet). It writes caches and counters: restore them afterwards.
        with torch.cuda.stream(side):
            for _ in range(2):
                env = r.split.env(*static_args, *r.extra)
                for k in range(len(segs)):
                    run_segment(env, k)
                    if k < len(r.cuts):
                        # The exit tail advances the skipped layers' write counters:
                        # undo it before the next segment writes those layers.
                        before = [a.clone() for a in mutable]
                        run_exit(env, r.cuts[k])
                        for a, s in zip(mutable, before):
                            a.copy_(s)
                for a, s in zip(mutable, snapshot):
                    a.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        pool = torch.cuda.graph_pool_handle()
        self.host_flags = torch.zeros(max(1, len(r.cuts)), dtype=torch.bool, pin_memory=True)
        env = r.split.env(*static_args, *r.extra)
        graphs = []
        for k in range(len(segs)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=side):
                run_segment(env, k)
                if k < len(r.cuts):
                    exited_name = r.state_names[r.cuts[k]][0]
                    self.host_flags[k].copy_(env[exited_name].all(), non_blocking=True)
            graphs.append(g)
            if k < len(r.cuts):
                c = r.cuts[k]
                ge = torch.cuda.CUDAGraph()
                with torch.cuda.graph(ge, pool=pool, stream=side):
                    self.exit_env[c] = run_exit(env, c)
                self.exit_graphs[c] = ge
        torch.cuda.synchronize()
        for a, s in zip(mutable, snapshot):  # capture ran nothing, but be exact
            a.copy_(s)
        self.graphs = graphs
        self.env = env
        self.captured = True

    # ------------------------------------------------------------------ replay
    def _replay(self, args: tuple) -> Any:
        r = self.runner
        for i, buf in self.buffers.items():
            buf.copy_(args[i], non_blocking=True)
        env = self.env
        for k, g in enumerate(self.graphs):
            g.replay()
            if k == len(r.cuts) or r.force_deep:
                continue
            torch.cuda.current_stream().synchronize()  # the one host sync per checkpoint
            if bool(self.host_flags[k]):
                c = r.cuts[k]
                exit_layer = env[r.state_names[c][2]]
                self.exit_graphs[c].replay()
                outs = exit_outputs(r.split.output_layout, exit_layer, self.exit_env[c], env)
                result, exit_layer = strip_exit_layer(outs, r.user_outputs)
                ntok = exit_layer.numel()
                if ntok == 1:
                    self.stats.record_uniform(c, 1, c + 1, strategy=self.strategy)
                else:  # rows may have exited at earlier checkpoints (counted later, no sync)
                    self.stats.record(exit_layer, layers_executed=(c + 1) * ntok,
                                      strategy=self.strategy)
                r.last_segments_run = k + 1
                return _clone(result, self.input_ptrs)
        r.last_segments_run = len(self.graphs)
        result, exit_layer = strip_exit_layer(r.split.outputs(env), r.user_outputs)
        ntok = exit_layer.numel()
        if ntok == 1 and r.cuts and not r.force_deep:
            # One token that did not exit at any checkpoint (else a flag was set; a forced
            # deep step runs on whatever the flags say).
            self.stats.record_uniform(-1, 1, r.num_layers, strategy=self.strategy)
        else:
            self.stats.record(exit_layer, layers_executed=ntok * r.num_layers,
                              strategy=self.strategy)
        return _clone(result, self.input_ptrs)


def _is_static(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or hasattr(t, "_dynamo_static_input_type")


def _clone(result: Any, inputs: set[int]) -> Any:
    """Fresh outputs: the graphs' own are overwritten by the next replay. Outputs that
    are inputs themselves (aliases of cache tensors or counters) are returned as they are."""

    def fresh(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.data_ptr() not in inputs:
            return x.clone()
        return x

    if isinstance(result, tuple):
        return tuple(fresh(x) for x in result)
    return fresh(result)
