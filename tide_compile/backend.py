"""The ``tide`` torch.compile backend: options -> passes -> runner.

``torch.compile(model.forward, backend="tide", options={"routers": routers, ...})``.
The backend is registered when ``tide_compile`` is imported and, when the package is
installed, through the ``torch_dynamo_backends`` entry point.

Pipeline, per Dynamo graph:

1. ``passes.layers``: tag nodes with decoder layers; find each layer's input state.
2. ``passes.insert``: ``tide::route`` at checkpoints, ``tide::exit_select`` at later
   layer inputs, the exit read-out before the final norm, ``exit_layer`` as an output.
3. frozen strategy: compile the whole inserted graph.
   skip strategy: ``passes.segment`` splits the inserted graph at the checkpoints,
   ``passes.kv_fill`` derives per checkpoint the graph writing the skipped layers'
   K/V, ``passes.segment.head_graph`` the read-out; each piece compiled on first use
   (``passes.kv_stack`` batches the KV-fill's projections with ``stack_kv``).
   compact strategy: the same split with one more cut before the head, and
   ``passes.compact`` the later segments' variants for a subset of the tokens.
4. a runner (:mod:`.runtime.runner`, :mod:`.runtime.compact`) that executes them and
   counts stats.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from .config import TIDEConfig
from .passes import PassContext, PassError
from .passes import compact as compact_pass
from .passes import insert as insert_pass
from .passes import kv_fill as kv_fill_pass
from .passes import kv_stack as kv_stack_pass
from .passes import layers as layers_pass
from .passes import segment as segment_pass
from .passes._fx import example_value, mutated_args, storage_key
from .routers import RouterSet
from .runtime.compact import CompactRunner
from .runtime.cudagraphs import GraphedSkipRunner
from .runtime.runner import FrozenRunner, SkipRunner
from .stats import ExitStats

__all__ = ["BackendOptions", "parse_options", "tide_backend", "attach", "detach", "OPTION_KEYS"]

Strategy = Literal["auto", "frozen", "skip", "compact"]


@dataclass
class BackendOptions:
    """Options of the ``tide`` backend (``options={...}`` of ``torch.compile``).

    Attributes:
        routers: the routers, or a path to a router file; None: routers attached to the
            model with :func:`attach`.
        exit_threshold: overrides the routers' config threshold.
        min_layers: overrides the routers' config ``min_layers``.
        strategy: ``"frozen"`` (all layers run, exits selected in-graph), ``"skip"``
            (stop after a checkpoint when every token has exited), ``"compact"`` (a
            dynamic-length StaticCache step, e.g. a prefill compiled with
            ``mark_dynamic``: the layers after a checkpoint run only the continuing
            tokens once their fraction falls below ``compaction_threshold``; other
            graphs fall back to frozen with a one-time warning), ``"auto"`` (skip for
            one-token steps with static shapes, compact for dynamic-length StaticCache
            steps of at least ``compact_min_length`` positions, frozen otherwise).
        compaction_threshold: overrides the routers' config ``compaction_threshold``.
        compact_min_length: ``auto`` only: a dynamic-length step with fewer positions than
            this runs the frozen graph (one graph, no host reads) instead of the
            compaction runner. Measured on the H200 (8B shape, bf16, batch 1): compaction
            lost to frozen by 4-10% at 512 tokens whatever the exit fraction, and won by
            up to 1.5x at 2048 (benchmarks/RESULTS.md); hence 2048. 0: always the
            compaction runner (as ``strategy="compact"``, which ignores this option).
        inductor: compile the graphs with Inductor (else run the FX graphs as they are).
        inductor_config: Inductor config patches (as ``torch.compile(options=...)``).
        mode: Inductor mode (``"default"``, ``"max-autotune-no-cudagraphs"``, ...).
        stats: the ExitStats to count into (a new one if None; see :func:`last_stats`).
        cuda_graphs: skip strategy: capture each compiled piece into its own CUDA graph
            and replay them (one host flag read per checkpoint); frozen strategy, one-token
            steps with static shapes: capture the whole step as one CUDA graph. None: on
            when compiling with Inductor for a CUDA model.
        stack_kv: stack the K/V projection weights of the layers after the first
            checkpoint into one buffer at compile time, so each KV-fill graph runs one
            batched matmul instead of two small ones per skipped layer
            (:mod:`.passes.kv_stack`; a copy of those weights, taken at compile time:
            weights changed afterwards are not seen). None: on for the skip strategy of
            a CUDA model compiled with Inductor (decode steps; measured on the H200, 8B
            shape: an exit tail after layer 8 took 0.42 ms instead of 0.70, the step
            2.10 ms instead of 2.52; it costs 0.8 GB there), off otherwise.
        kernels: ``"inductor"``: the route and exit-select ops are torch composites that
            Inductor fuses with their neighbours; ``"triton"``: the hand Triton kernels
            (``tide::route_fused``, ``tide::exit_select_fused``; their references off
            CUDA); ``"auto"``: triton for a CUDA model compiled with Inductor (measured
            on the H200, 8B shape, never-exit routers: 6.107 ms/token against Inductor's
            6.040, where the fused composites gave 6.566), else inductor.
    """

    routers: RouterSet | None = None
    exit_threshold: float | None = None
    min_layers: int | None = None
    strategy: Strategy = "auto"
    compaction_threshold: float | None = None
    compact_min_length: int = 2048
    inductor: bool = True
    inductor_config: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None
    stats: ExitStats | None = None
    cuda_graphs: bool | None = None
    kernels: Literal["auto", "inductor", "triton"] = "auto"
    stack_kv: bool | None = None


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(BackendOptions))


def parse_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate ``options``; unknown keys and bad values raise with the fix named."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown tide backend option(s) {unknown}; known options: {list(OPTION_KEYS)}"
        )
    opts = BackendOptions(**options)
    if isinstance(opts.routers, (str, os.PathLike)):
        opts.routers = RouterSet.load(opts.routers)
    if opts.routers is not None and not isinstance(opts.routers, RouterSet):
        raise TypeError(
            f"options['routers'] must be a RouterSet or a router file path, got "
            f"{type(opts.routers).__name__}"
        )
    if opts.exit_threshold is not None:
        TIDEConfig(exit_threshold=opts.exit_threshold)  # validates the range
    if opts.min_layers is not None:
        TIDEConfig(min_layers=opts.min_layers)
    if opts.strategy not in ("auto", "frozen", "skip", "compact"):
        raise ValueError(
            f"strategy must be 'auto', 'frozen', 'skip' or 'compact', got {opts.strategy!r}")
    if opts.compaction_threshold is not None:
        TIDEConfig(compaction_threshold=opts.compaction_threshold)
    if (isinstance(opts.compact_min_length, bool) or not isinstance(opts.compact_min_length, int)
            or opts.compact_min_length < 0):
        raise ValueError("compact_min_length must be an int >= 0 (positions), got "
                         f"{opts.compact_min_length!r}")
    if opts.kernels not in ("auto", "inductor", "triton"):
        raise ValueError(f"kernels must be 'auto', 'inductor' or 'triton', got {opts.kernels!r}")
    if opts.stack_kv is not None and not isinstance(opts.stack_kv, bool):
        raise TypeError(f"options['stack_kv'] must be True, False or None, got {opts.stack_kv!r}")
    if not isinstance(opts.inductor_config, dict):
        raise TypeError("options['inductor_config'] must be a dict of Inductor config patches")
    return opts


# ---------------------------------------------------------------------- attach
# Routers attached to a model, found again from the graph's parameter placeholders.
_ATTACHED: dict[int, tuple[weakref.ref, RouterSet, dict[str, Any]]] = {}


def _param_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def attach(model: nn.Module, routers: RouterSet, **options: Any) -> nn.Module:
    """Attach routers (and backend options) so ``torch.compile(model, backend="tide")``
    needs no ``options``. Returns ``model``."""
    routers.check_model(model)
    parse_options({**options, "routers": routers})
    for p in model.parameters():
        _ATTACHED[_param_key(p)] = (weakref.ref(model), routers, dict(options))
    model._tide_routers = routers  # type: ignore[attr-defined]
    return model


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`."""
    for p in model.parameters():
        _ATTACHED.pop(_param_key(p), None)
    if hasattr(model, "_tide_routers"):
        del model._tide_routers


def _find_attached(example_inputs: Sequence[Any]) -> tuple[RouterSet, dict[str, Any]] | None:
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
            try:
                hit = _ATTACHED.get(_param_key(t))
            except Exception:
                continue
            if hit is not None and hit[0]() is not None:
                return hit[1], hit[2]
    return None


_LAST_STATS: list[ExitStats] = []


def last_stats() -> ExitStats | None:
    """The stats of the most recently compiled tide graph (when options gave none)."""
    return _LAST_STATS[-1] if _LAST_STATS else None


# ---------------------------------------------------------------------- compile
def _compiler(opts: BackendOptions, pieces: bool = False, dynamic: bool = False):
    """``compile(gm, example_inputs)``. ``pieces``: for the skip strategy's segments,
    which the runner captures into CUDA graphs itself, so Inductor's own CUDA graphs
    (``mode="reduce-overhead"``) are left out. ``dynamic``: a graph with symbolic shapes,
    compiled at once inside Dynamo's tracing context (static ones compile at first call)."""
    if not opts.inductor:
        return lambda gm, example_inputs: gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(opts.inductor_config)
    if opts.mode is not None and opts.mode != "default":
        patches = {**torch._inductor.list_mode_options(opts.mode), **patches}
    if pieces:
        patches.pop("triton.cudagraphs", None)
    if dynamic:
        # Graphs compiled inside Dynamo's tracing context (dynamic shapes) share its shape
        # environment; Inductor's matmul padding guards on sizes there, and a guard on a
        # size of a router input (no Dynamo source) cannot be built (seen on CUDA).
        patches.setdefault("shape_padding", False)

    def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]):
        return compile_fx(gm, list(example_inputs), config_patches=patches)

    return compile_graph


def _is_static(gm: fx.GraphModule) -> bool:
    return not any(
        isinstance(example_value(n), torch.SymInt)
        or (isinstance(example_value(n), torch.Tensor)
            and any(isinstance(s, torch.SymInt) for s in example_value(n).shape))
        for n in gm.graph.nodes if n.op == "placeholder"
    )


#: Graphs compiled by the backend so far, by strategy ("frozen", "skip", "plain").
COMPILE_COUNTS: collections.Counter[str] = collections.Counter()


def tide_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | None = None, mode: str | None = None):
    """The ``tide`` backend: early exit compiled into the Dynamo graph.

    ``mode`` is ``torch.compile``'s (HF's ``CompileConfig`` passes ``"reduce-overhead"``):
    it sets the Inductor mode unless ``options["mode"]`` does.
    """
    opts = parse_options(options)
    if mode is not None and opts.mode is None:
        opts.mode = mode
    if opts.routers is None:
        found = _find_attached(example_inputs)
        if found is None:
            raise RuntimeError(
                "the tide backend has no routers: pass them as "
                "torch.compile(..., backend='tide', options={'routers': routers}) "
                "(a RouterSet or a router file path), or call "
                "tide_compile.attach(model, routers) before torch.compile(model, backend='tide'). "
                "Make routers with tide_compile.calibrate(model, tokenizer, dataset=...)."
            )
        # Options given to torch.compile win over those given to attach().
        defaults = BackendOptions()
        given = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
                 if f.name != "routers" and getattr(opts, f.name) != getattr(defaults, f.name)}
        opts = parse_options({**found[1], **given, "routers": found[0]})
    routers = opts.routers
    assert routers is not None
    config = routers.config
    if opts.min_layers is not None:
        config = config.replace(min_layers=opts.min_layers)
    threshold = config.exit_threshold if opts.exit_threshold is None else opts.exit_threshold
    checkpoints = [c for c in routers.checkpoint_layers if c + 1 >= config.min_layers]
    num_layers = routers.num_layers
    stats = opts.stats if opts.stats is not None else ExitStats(num_layers=num_layers)
    if opts.stats is None:
        _LAST_STATS[:] = [stats]
    if stats.num_layers != num_layers:
        raise ValueError(f"options['stats'] counts a {stats.num_layers}-layer model, routers "
                         f"are for {num_layers} layers")
    static = _is_static(gm)
    compiler = _compiler(opts, dynamic=not static)
    if not checkpoints:
        # No checkpoint at or after min_layers: the plain model.
        COMPILE_COUNTS["plain"] += 1
        return compiler(gm, example_inputs)

    ctx = PassContext(num_layers=num_layers, checkpoint_layers=tuple(checkpoints),
                      hidden_size=routers.hidden_size)
    # Work on copies: Dynamo reads its own graph again after the backend returns. Without
    # Dynamo's compile id, AOT treats the copies as plain graphs (it would otherwise map
    # every placeholder back to a Dynamo source, and the router inputs have none).
    original = copy.deepcopy(gm)
    gm = copy.deepcopy(gm)
    for g in (original, gm):
        g.meta.pop("dynamo_compile_id", None)
    info = layers_pass.run(gm, ctx)
    state = info.state_after(checkpoints[0])
    ev = example_value(state)
    one_token_step = (isinstance(ev, torch.Tensor) and ev.dim() >= 2
                      and not isinstance(ev.shape[-2], torch.SymInt) and ev.shape[-2] == 1)
    strategy = opts.strategy
    if strategy == "auto":
        strategy = ("skip" if (one_token_step and static)
                    else "compact" if not static and not one_token_step else "frozen")

    on_cuda = _on_cuda(example_inputs)
    kernels = opts.kernels
    if kernels == "auto":
        kernels = "triton" if opts.inductor and on_cuda else "inductor"
    insert_pass.run(gm, info, routers, checkpoints, threshold, kernels=kernels)
    if strategy == "compact" and one_token_step:
        strategy = "skip"  # a one-token step: compaction along the batch is not built
    if strategy == "compact":
        comp_threshold = (config.compaction_threshold if opts.compaction_threshold is None
                          else opts.compaction_threshold)
        try:
            split = segment_pass.split(gm, info, checkpoints, with_head=False,
                                       cut_before_head=True)
            plan = compact_pass.plan(gm, info, split)
        except PassError as e:
            if opts.strategy == "compact":
                _warn_once(f"tide: strategy 'compact' falls back to 'frozen' for this graph: {e}")
            strategy = "frozen"
        else:
            COMPILE_COUNTS[strategy] += 1
            min_length = opts.compact_min_length if opts.strategy == "auto" else 0
            # Steps shorter than min_length run the frozen strategy's own runner, compiled
            # here inside Dynamo's context as strategy="frozen" compiles it. (Compiled at
            # first use from symbolic fakes instead, like the compaction pieces, the whole
            # graph ran 30.4 ms against the frozen strategy's 17.1 on the H200's 512-token
            # 8B prefill; the cause is not known.)
            frozen = (FrozenRunner(gm, example_inputs, compiler, stats)
                      if min_length > 0 else None)
            return _compact_runner(gm, original, layers_pass.run(original, ctx), info, split,
                                   plan, checkpoints, routers, stats, comp_threshold,
                                   _compiler(opts, pieces=True, dynamic=True), bool(opts.stack_kv),
                                   example_inputs, frozen, min_length)
    COMPILE_COUNTS[strategy] += 1
    use_graphs = _use_cuda_graphs(opts, on_cuda)
    if strategy == "frozen" and not (static and one_token_step and use_graphs):
        return FrozenRunner(gm, example_inputs, compiler, stats, lazy=static)

    info_orig = layers_pass.run(original, ctx)
    if strategy == "frozen":
        # A static one-token step on CUDA: the whole inserted graph as one piece that the
        # runner captures into a CUDA graph itself. Inductor's own CUDA graphs do not
        # apply here: compiled outside Dynamo, the cache writes count as mutations of
        # non-static inputs and Inductor skips its graphs (measured on the H200: the
        # frozen decode step took 10.9-17.2 ms on the 8B shape, Inductor's 6.5-7.5).
        whole = SkipRunner(segment_pass.split(gm, info, [], with_head=False), {},
                           segment_pass.head_graph(original, info_orig),
                           gm.meta[insert_pass.STATE_NAMES], _projections(routers, checkpoints),
                           gm.meta.get(insert_pass.EXIT_LAYER_OUTPUT),
                           _compiler(opts, pieces=True), stats,
                           gm.meta.get(insert_pass.EXTRA_INPUTS, []))
        whole.strategy = "frozen"
        return GraphedSkipRunner(whole, _mutated_inputs(original))
    split = segment_pass.split(gm, info, checkpoints, with_head=False)
    kv_fills = {c: kv_fill_pass.kv_fill_graph(original, info_orig, c + 1, num_layers - 1)
                for c in checkpoints}
    stack_kv = opts.inductor and on_cuda if opts.stack_kv is None else opts.stack_kv
    if stack_kv:
        _stack_kv(original, kv_fills, example_inputs)
    head = segment_pass.head_graph(original, info_orig)
    state_names = gm.meta[insert_pass.STATE_NAMES]
    runner = SkipRunner(split, kv_fills, head, state_names, _projections(routers, checkpoints),
                        gm.meta.get(insert_pass.EXIT_LAYER_OUTPUT), _compiler(opts, pieces=True),
                        stats,
                        gm.meta.get(insert_pass.EXTRA_INPUTS, []))
    if not use_graphs:
        return runner
    return GraphedSkipRunner(runner, _mutated_inputs(original))


def _use_cuda_graphs(opts: BackendOptions, on_cuda: bool) -> bool:
    """Whether the skip runner (and the frozen strategy's one-token steps) capture their
    pieces into CUDA graphs: option ``cuda_graphs``, else on for CUDA with Inductor."""
    if opts.cuda_graphs is None:
        return opts.inductor and on_cuda
    if opts.cuda_graphs and not on_cuda:
        raise ValueError("options['cuda_graphs']=True needs the model on a CUDA device")
    return opts.cuda_graphs


_WARNED: set[str] = set()


def _stack_kv(original: fx.GraphModule, kv_fills: dict[int, Any],
              example_inputs: Sequence[Any]) -> None:
    """Stack each KV-fill graph's projections; later checkpoints view the first's stacks."""
    names = [n.name for n in original.graph.nodes if n.op == "placeholder"]
    values = {name: t for name, t in zip(names, example_inputs)
              if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)}
    cache = kv_stack_pass.StackCache()
    for c in sorted(kv_fills):
        kv = kv_fills[c]
        if kv_stack_pass.run(kv.gm, values.get, cache):
            kv.input_names = tuple(n.target for n in kv.gm.graph.nodes if n.op == "placeholder")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _projections(routers: RouterSet, checkpoints: Sequence[int]) -> list:
    return [
        (c, proj.down.weight.detach(), proj.up.weight.detach(), proj.up.bias.detach())
        for c in checkpoints if (proj := routers.exit_projection(c)) is not None
    ]


def _compact_runner(gm: fx.GraphModule, original: fx.GraphModule, info_orig: Any,
                    info: Any, split: Any, plan: Any,
                    checkpoints: Sequence[int], routers: RouterSet, stats: ExitStats,
                    threshold: float, compiler: Any, stack_kv: bool,
                    example_inputs: Sequence[Any], frozen: FrozenRunner | None = None,
                    min_length: int = 0) -> CompactRunner:
    """The compaction runner, every piece compiled at first use for the symbolic length;
    with ``min_length``, steps shorter than it run ``frozen``."""
    num_layers = info.num_layers
    kv_fills = {c: kv_fill_pass.kv_fill_graph(original, info_orig, c + 1, num_layers - 1)
                for c in checkpoints}
    if stack_kv:
        _stack_kv(original, kv_fills, example_inputs)
    head = segment_pass.head_graph(original, info_orig)
    runner = CompactRunner(split, kv_fills, head, gm.meta[insert_pass.STATE_NAMES],
                           _projections(routers, checkpoints),
                           gm.meta.get(insert_pass.EXIT_LAYER_OUTPUT), compiler, stats,
                           gm.meta.get(insert_pass.EXTRA_INPUTS, []), plan, threshold,
                           frozen=frozen, min_length=min_length)
    # Each piece compiles at its first use (an 8B-shaped model's twelve pieces take minutes
    # to compile; a prefill that never compacts or never exits uses five), from the
    # placeholders' symbolic fake values: one graph per piece serves every length (the
    # first call's real inputs would specialize it to that length).
    # Inputs are compiled as contiguous and made contiguous at each call: Dynamo's fake
    # values and the runtime tensors may disagree on the strides of broadcast (stride-0)
    # dimensions, which compiled code asserts. Inputs written in place stay as they are.
    for piece in runner.pieces():
        mutated = _mutated_inputs(piece.gm)
        fakes = [example_value(p) for p in piece.gm.graph.nodes if p.op == "placeholder"]
        piece.contiguous_inputs = frozenset(
            i for i, ev in enumerate(fakes) if isinstance(ev, torch.Tensor) and i not in mutated)
        piece.example_inputs = [_contiguous_fake(ev) if i in piece.contiguous_inputs else ev
                                for i, ev in enumerate(fakes)]
    return runner


def _contiguous_fake(ev: torch.Tensor) -> torch.Tensor:
    mode = getattr(ev, "fake_mode", None)
    if mode is None:
        return ev.contiguous()
    with mode:
        return torch.empty(ev.shape, dtype=ev.dtype, device=ev.device)


def _on_cuda(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _mutated_inputs(gm: fx.GraphModule) -> set[int]:
    """Indices of the placeholders the graph writes in place (directly or through a view)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {storage_key(a) for n in gm.graph.nodes for a in mutated_args(n)}
    written.discard(None)
    return {i for i, p in enumerate(placeholders) if storage_key(p) in written}


def _register() -> None:
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "tide" in registry._COMPILER_FNS:
        return
    try:
        eps = entry_points(group="torch_dynamo_backends")
        if any(ep.name == "tide" and ep.value.startswith("tide_compile") for ep in eps):
            return  # Dynamo loads it through the entry point on first use
    except Exception:
        pass
    registry.register_backend(tide_backend, name="tide")


_register()
