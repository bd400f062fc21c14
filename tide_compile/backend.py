"""The ``tide`` torch.compile backend: options -> plan -> passes -> runner.

``torch.compile(model.forward, backend="tide", options={"routers": routers, ...})``.
The backend is registered when ``tide_compile`` is imported and, when the package is
installed, through the ``torch_dynamo_backends`` entry point.

Per Dynamo graph (:func:`tide_backend`):

1. the options, parsed once (:func:`.options.parse_options`; routers attached with
   :func:`attach` are found from the graph's parameters);
2. :data:`.passes.ANALYSIS` (the ``layers`` pass), then the graph's facts and
   :func:`.plan.plan`: which strategy, kernels, CUDA graphs;
3. the plan's pass list (:data:`.passes.PIPELINES`), run through one
   :class:`~.passes.PassContext`;
4. a runner (:mod:`.runtime.runner`, :mod:`.runtime.compact`, :mod:`.runtime.cudagraphs`)
   built from one :class:`~.runtime.runner.RunnerArtifacts`; it compiles its pieces
   (Inductor's ``compile_fx``, or the FX graphs as they are) and counts stats.
"""

from __future__ import annotations

import collections
import copy
import warnings
import weakref
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from .options import DEFERRED_DECODE, OPTION_KEYS, TideOptions, parse_options
from .passes import ANALYSIS, PIPELINES, PassContext, PassError, run_passes
from .passes._fx import example_value, mutated_placeholders
from .passes.insert import (EXIT_LAYER_OUTPUT, EXTRA_INPUTS, LIVE_INPUT, ROUTER_BIASES,
                            STATE_NAMES)
from .plan import GraphFacts, Plan, plan
from .routers import RouterSet
from .runtime.compact import CompactRunner
from .runtime.cudagraphs import GraphedSkipRunner
from .runtime.runner import Compiler, FrozenRunner, RunnerArtifacts, SkipRunner
from .stats import ExitStats
from .validation import check_graph_for_routers

__all__ = ["tide_backend", "attach", "detach", "parse_options", "OPTION_KEYS",
           "COMPILE_COUNTS", "graph_facts"]

#: Dynamo graphs compiled by the backend so far, by planned strategy ("plain", "frozen",
#: "skip", "compact"): the compile count that the README's bounds are stated in.
COMPILE_COUNTS: collections.Counter[str] = collections.Counter()


def tide_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | TideOptions | None = None,
                 mode: str | None = None) -> Any:
    """The ``tide`` backend: early exit compiled into the Dynamo graph.

    ``mode`` is ``torch.compile``'s (HF's ``CompileConfig`` passes ``"reduce-overhead"``):
    it sets the Inductor mode unless ``options["mode"]`` does.
    """
    opts = _options_for(parse_options(options), example_inputs, mode)
    check_graph_for_routers(gm, opts.routers)  # another model's routers: the optimize() error
    stats = opts.stats if opts.stats is not None else ExitStats(num_layers=opts.routers.num_layers)
    ctx, work = _context(gm, example_inputs, opts)
    facts = graph_facts(gm, example_inputs, ctx)
    the_plan = plan(facts, opts)
    if the_plan.strategy == "plain":
        COMPILE_COUNTS["plain"] += 1
        return _compiler(opts, dynamic=the_plan.symbolic)(gm, example_inputs)
    try:
        run_passes(work, _for_plan(ctx, the_plan), PIPELINES[the_plan.pipeline])
    except PassError as e:
        if the_plan.strategy != "compact":
            raise
        # The compact passes refused the graph (e.g. a DynamicCache): plan again.
        the_plan = plan(facts.without_compaction(str(e)), opts)
        ctx, work = _context(gm, example_inputs, opts)
        run_passes(work, _for_plan(ctx, the_plan), PIPELINES[the_plan.pipeline])
    if the_plan.warning:
        _warn_once(the_plan.warning)
    COMPILE_COUNTS[the_plan.strategy] += 1
    return _runner(the_plan, _artifacts(the_plan, ctx, work, opts, stats, example_inputs))


def _options_for(opts: TideOptions, example_inputs: Sequence[Any],
                 mode: str | None) -> TideOptions:
    """``opts`` with attached routers filled in (options given to torch.compile win over
    those given to :func:`attach`) and ``torch.compile``'s ``mode``."""
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
        routers, attached = found
        opts = parse_options({**attached.given(), **opts.given(), "routers": routers})
    if mode is not None and opts.mode is None:
        opts = opts.replace(mode=mode)
    return opts


def _context(gm: fx.GraphModule, example_inputs: Sequence[Any],
             opts: TideOptions) -> tuple[PassContext, fx.GraphModule]:
    """A context for ``gm``, and the working copy of ``gm`` the analysis passes ran on.

    A copy: Dynamo reads its own graph again after the backend returns. Without Dynamo's
    compile id, AOT treats the copy as a plain graph (it would otherwise map every
    placeholder back to a Dynamo source, and the router inputs have none).
    """
    routers = opts.routers
    assert routers is not None and opts.checkpoints is not None and opts.threshold is not None
    work = copy.deepcopy(gm)
    work.meta.pop("dynamo_compile_id", None)
    names = [n.name for n in work.graph.nodes if n.op == "placeholder"]
    ctx = PassContext(num_layers=routers.num_layers, checkpoint_layers=opts.checkpoints,
                   hidden_size=routers.hidden_size, routers=routers, threshold=opts.threshold,
                   input_values={name: t for name, t in zip(names, example_inputs)
                                 if isinstance(t, torch.Tensor)
                                 and not isinstance(t, torch._subclasses.FakeTensor)})
    if opts.checkpoints:
        run_passes(work, ctx, ANALYSIS)
    return ctx, work


def _for_plan(ctx: PassContext, p: Plan) -> PassContext:
    """``ctx`` with the plan's settings for the passes."""
    ctx.kernels = p.kernels
    ctx.stack_kv = p.stack_kv
    ctx.kv = p.kv
    ctx.live_input = p.strategy == "deferred"
    return ctx


def graph_facts(gm: fx.GraphModule, example_inputs: Sequence[Any], ctx: PassContext) -> GraphFacts:
    """What :func:`.plan.plan` needs to know about ``gm`` (after the analysis passes)."""
    symbolic = any(
        isinstance(example_value(n), torch.SymInt)
        or (isinstance(example_value(n), torch.Tensor)
            and any(isinstance(s, torch.SymInt) for s in example_value(n).shape))
        for n in gm.graph.nodes if n.op == "placeholder"
    )
    step_length = None
    if ctx.layer_info is not None and ctx.checkpoint_layers:
        ev = example_value(ctx.layer_info.state_after(ctx.checkpoint_layers[0]))
        if (isinstance(ev, torch.Tensor) and ev.dim() >= 2
                and not isinstance(ev.shape[-2], torch.SymInt)):
            step_length = int(ev.shape[-2])
    return GraphFacts(
        step_length=step_length,
        symbolic=symbolic,
        writes_cache_in_place=bool(mutated_placeholders(gm)),
        on_cuda=any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs),
        deferred_decode=DEFERRED_DECODE.get(),
    )


def _artifacts(p: Plan, ctx: PassContext, work: fx.GraphModule, opts: TideOptions,
               stats: ExitStats, example_inputs: Sequence[Any]) -> RunnerArtifacts:
    """The runner's inputs from the passes' results (``work``: the inserted graph)."""
    routers = opts.routers
    assert routers is not None and opts.compaction is not None and opts.checkpoints is not None
    original = ctx.original if ctx.original is not None else work
    return RunnerArtifacts(
        stats=stats,
        compiler=_compiler(opts, pieces=True, dynamic=p.symbolic),
        user_outputs=work.meta.get(EXIT_LAYER_OUTPUT),
        extra_inputs=list(work.meta.get(EXTRA_INPUTS, [])),
        symbolic=p.symbolic,
        whole=work,
        whole_compiler=_compiler(opts, dynamic=p.symbolic),
        example_inputs=list(example_inputs),
        mutated_inputs=mutated_placeholders(original),
        split=ctx.split,
        kv_fills=ctx.kv_fills,
        head=ctx.head,
        state_names=work.meta.get(STATE_NAMES, {}),
        projections=[(c, proj.down.weight.detach(), proj.up.weight.detach(),
                      proj.up.bias.detach())
                     for c in opts.checkpoints if (proj := routers.exit_projection(c)) is not None],
        compact=ctx.compact,
        compaction_threshold=opts.compaction,
        compact_min_length=p.compact_min_length,
        live=work.meta.get(LIVE_INPUT),
        router_biases=dict(work.meta.get(ROUTER_BIASES, {})),
        threshold=opts.threshold if opts.threshold is not None else 0.5,
    )


def _runner(p: Plan, art: RunnerArtifacts):
    """The runner of plan ``p``."""
    if p.strategy == "compact":
        return CompactRunner(art)
    if p.strategy == "frozen" and not p.cuda_graphs:
        return FrozenRunner(art)
    # skip, deferred (skip without KV-fill), or a frozen one-token step captured as one
    # CUDA graph (a split without cuts)
    runner = SkipRunner(art)
    if p.symbolic:
        runner.for_symbolic_sizes()
    return GraphedSkipRunner(runner, art.mutated_inputs) if p.cuda_graphs else runner


# ---------------------------------------------------------------------- compile
def _compiler(opts: TideOptions, pieces: bool = False, dynamic: bool = False) -> Compiler:
    """``compile(gm, example_inputs)``. ``pieces``: for the pieces runners compile (and
    capture into CUDA graphs themselves), so Inductor's own CUDA graphs
    (``mode="reduce-overhead"``) are left out. ``dynamic``: a graph with symbolic shapes."""
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


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------- attach
# Routers attached to a model, found again from the graph's parameter placeholders.
_ATTACHED: dict[int, tuple[weakref.ref, RouterSet, TideOptions]] = {}


def _param_key(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):  # a DTensor parameter (tensor parallel): its shard's storage
        t = t.to_local()
    return t.untyped_storage().data_ptr()


def attach(model: nn.Module, routers: RouterSet, **options: Any) -> nn.Module:
    """Attach routers (and backend options) so ``torch.compile(model, backend="tide")``
    needs no ``options``. Returns ``model``."""
    routers.check_model(model)
    opts = parse_options({**options, "routers": routers})
    for p in model.parameters():
        _ATTACHED[_param_key(p)] = (weakref.ref(model), routers, opts)
    model._tide_routers = routers  # type: ignore[attr-defined]
    return model


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`."""
    for p in model.parameters():
        _ATTACHED.pop(_param_key(p), None)
    if hasattr(model, "_tide_routers"):
        del model._tide_routers


def _find_attached(example_inputs: Sequence[Any]) -> tuple[RouterSet, TideOptions] | None:
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
            try:
                hit = _ATTACHED.get(_param_key(t))
            except Exception:
                continue
            if hit is not None and hit[0]() is not None:
                return hit[1], hit[2]
    return None


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
