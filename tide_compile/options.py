"""Options of the ``tide`` backend, validated once into one resolved object.

``torch.compile(..., backend="tide", options={...})``, :func:`tide_compile.optimize` and
:func:`tide_compile.attach` all take these keywords. :func:`parse_options` is the one place
where they are checked: unknown keys and bad values raise a clear error naming the fix.
It returns a :class:`TideOptions`, which also carries what follows from the routers (the
threshold, the checkpoints at or after ``min_layers``, the compaction threshold), so the
backend, the runners and lossless mode never resolve them again.

This module sits below the backend and the runtime: both import it, it imports neither.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from .config import TIDEConfig
from .routers import RouterSet
from .stats import ExitStats
from .validation import TIDEError

__all__ = ["TideOptions", "parse_options", "resolve_exits", "OPTION_KEYS", "STRATEGIES",
           "KERNELS", "KV_MODES", "DEFAULT_MAX_PENDING", "DEFERRED_DECODE"]

Strategy = Literal["auto", "frozen", "skip", "compact"]
Kernels = Literal["auto", "inductor", "triton"]
KV = Literal["propagate", "deferred"]

#: Values of the option ``strategy``.
STRATEGIES = ("auto", "frozen", "skip", "compact")
#: Values of the option ``kernels``.
KERNELS = ("auto", "inductor", "triton")
#: Values of the option ``kv``: the K/V of an exited token at the layers it skipped.
KV_MODES = ("propagate", "deferred")
#: Default of ``max_pending``. A deferred decode step is ``max_pending + 1`` tokens wide
#: (docs/deferred.md): on a GPU a batch-1 step that wide reads the same weights as a
#: one-token step, and 7 pending tokens hold runs of exits up to 7 long (at an exit rate of
#: 0.5 a run that long has probability 1/128).
DEFAULT_MAX_PENDING = 7
#: ``optimize``'s default ``kv``: exact K/V. On SmolLM2 it delivers the quality table's
#: predicted agreement where propagation misses it by up to 26 points, and on the H200 its
#: decode steps measured within 3% of propagate's at exit depths 8, 16 and 24
#: (benchmarks/RESULTS.md). The backend used directly keeps ``"propagate"``: only
#: ``TIDEModel.generate``'s decode loop feeds pending tokens back, so a user's own loop
#: under ``"deferred"`` would run every layer.
DEFAULT_OPTIMIZE_KV: KV = "deferred"

#: True while ``TIDEModel.generate`` runs a deferred decode step through Dynamo: a graph
#: compiled then runs the ``deferred`` strategy, whose pending tokens the decode loop
#: feeds back. Any other graph under ``kv="deferred"`` runs every layer (exact K/V).
DEFERRED_DECODE: ContextVar[bool] = ContextVar("tide_deferred_decode", default=False)


@dataclass(frozen=True)
class TideOptions:
    """The ``tide`` backend's options, validated (:func:`parse_options`).

    Attributes (the user's keywords):
        routers: the routers, or None: routers attached to the model with
            :func:`tide_compile.attach` (the backend finds them from the graph's parameters).
        exit_threshold: overrides the routers' config threshold.
        min_layers: overrides the routers' config ``min_layers``.
        strategy: ``"auto"`` (default: :func:`tide_compile.plan.plan` picks per graph),
            ``"frozen"`` (every layer runs; exits selected in-graph), ``"skip"`` (stop
            after a checkpoint once every row has exited), ``"compact"`` (dynamic-length
            StaticCache steps: the layers after a checkpoint run only the continuing tokens).
        compaction_threshold: overrides the routers' config ``compaction_threshold``.
        compact_min_length: ``auto`` only: a step of a dynamic-length graph with fewer
            positions than this (and more than one) runs the frozen graph; 0: always the
            compaction runner. The default is measured (benchmarks/RESULTS.md).
        inductor: compile the graphs with Inductor (else run the FX graphs as they are).
        inductor_config: Inductor config patches (as ``torch.compile(options=...)``).
        mode: Inductor mode (``"default"``, ``"max-autotune-no-cudagraphs"``, ...).
        stats: the ExitStats to count into (a new one per graph if None).
        cuda_graphs: capture static one-token steps into CUDA graphs (the skip strategy
            each piece, the frozen strategy the whole step); None: on for a CUDA model
            compiled with Inductor.
        kernels: ``"inductor"`` (route / exit-select as torch composites Inductor fuses),
            ``"triton"`` (the hand Triton kernels on CUDA), ``"auto"``: triton for static
            graphs of a CUDA model compiled with Inductor, else inductor.
        stack_kv: stack the K/V projection weights of the layers after the first
            checkpoint into one buffer at compile time, so a KV-fill graph runs one
            batched matmul (:mod:`.passes.kv_stack`; a copy of those weights, taken at
            compile time). None: on for static one-token skip steps of a CUDA model
            compiled with Inductor, off otherwise.
        kv: the K/V an exited token leaves at the layers it skipped, which later tokens
            attend to. ``"propagate"`` (default): each skipped layer's K/V path applied to
            the frozen state (a KV-fill; cheap, approximate). ``"deferred"``: exact; the
            skipped layers run later, batched with the next step that runs them. Only
            :meth:`TIDEModel.generate <tide_compile.runtime.model.TIDEModel.generate>`
            defers (its decode loop feeds pending tokens back); every other graph runs
            every layer for every token and exits change only the exited tokens' logits
            (docs/deferred.md).
        max_pending: ``kv="deferred"``: tokens per row that may wait for their skipped
            layers; a deferred decode step is ``max_pending + 1`` tokens wide.

    Attributes (resolved from the routers; None while ``routers`` is None):
        threshold: the exit threshold in force.
        checkpoints: the checkpoint layers at or after ``min_layers``.
        compaction: the compaction threshold in force.
    """

    routers: RouterSet | None = None
    exit_threshold: float | None = None
    min_layers: int | None = None
    strategy: Strategy = "auto"
    compaction_threshold: float | None = None
    compact_min_length: int = 2048
    inductor: bool = True
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    mode: str | None = None
    stats: ExitStats | None = None
    cuda_graphs: bool | None = None
    kernels: Kernels = "auto"
    stack_kv: bool | None = None
    kv: KV = "propagate"
    max_pending: int = DEFAULT_MAX_PENDING
    # resolved
    threshold: float | None = field(default=None, init=False)
    checkpoints: tuple[int, ...] | None = field(default=None, init=False)
    compaction: float | None = field(default=None, init=False)

    def given(self) -> dict[str, Any]:
        """The user's keywords that differ from the defaults (routers excluded)."""
        defaults = TideOptions()
        return {k: getattr(self, k) for k in OPTION_KEYS
                if k != "routers" and getattr(self, k) != getattr(defaults, k)}

    def replace(self, **changes: Any) -> "TideOptions":
        """A copy with ``changes`` to the user's keywords, validated again."""
        return parse_options({**{k: getattr(self, k) for k in OPTION_KEYS}, **changes})


#: The user's keywords, in declaration order.
OPTION_KEYS = tuple(f.name for f in dataclasses.fields(TideOptions) if f.init)


def resolve_exits(routers: RouterSet, exit_threshold: float | None = None,
                  min_layers: int | None = None) -> tuple[float, tuple[int, ...]]:
    """The threshold in force and the checkpoints a token may exit at.

    ``exit_threshold`` / ``min_layers`` override the routers' config; the checkpoints are
    the routers' layers ``c`` with ``c + 1 >= min_layers`` (the final layer is never one).
    """
    config = routers.config
    if min_layers is not None:
        config = config.replace(min_layers=min_layers)
    if config.min_layers > routers.num_layers:
        raise ValueError(f"min_layers={config.min_layers} is beyond the model's "
                         f"{routers.num_layers} layers: set it to at most {routers.num_layers - 1}")
    threshold = config.exit_threshold if exit_threshold is None else float(exit_threshold)
    checkpoints = tuple(c for c in routers.checkpoint_layers if c + 1 >= config.min_layers)
    return threshold, checkpoints


def parse_options(options: Mapping[str, Any] | TideOptions | None) -> TideOptions:
    """Validate ``options`` into a :class:`TideOptions` (returned as is if it is one).

    A router file path is loaded. Unknown keys and bad values raise ``ValueError`` /
    ``TypeError`` naming the option and what it accepts.
    """
    if isinstance(options, TideOptions):
        return options
    from .validation import check_backend_options

    options = check_backend_options(options)  # TIDEError: inductor not a bool, min_layers past the model
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown tide backend option(s) {unknown}; known options: {list(OPTION_KEYS)}"
        )
    routers = options.get("routers")  # a router file path is loaded by check_backend_options
    if routers is not None and not isinstance(routers, RouterSet):
        raise TypeError(f"options['routers'] must be a RouterSet or a router file path, got "
                        f"{type(routers).__name__}")
    if routers is not None and routers.successor is not None and (
            options.get("strategy") == "compact" or options.get("compaction_threshold")):
        raise TIDEError(
            "routers with confidence features (RouterSet.features is "
            f"{routers.features}) never compact: drop strategy='compact' and "
            "compaction_threshold (auto, skip and frozen run them)")
    # Ranges are TIDEConfig's (one statement of them).
    for key in ("exit_threshold", "min_layers", "compaction_threshold"):
        if options.get(key) is not None:
            TIDEConfig(**{key: options[key]})
    if options.get("strategy", "auto") not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {options['strategy']!r}")
    length = options.get("compact_min_length", 2048)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"compact_min_length must be an int >= 0 (positions), got {length!r}")
    if options.get("kernels", "auto") not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {options['kernels']!r}")
    for key in ("stack_kv", "cuda_graphs"):
        if options.get(key) is not None and not isinstance(options[key], bool):
            raise TypeError(f"options[{key!r}] must be True, False or None, got {options[key]!r}")
    if options.get("kv", "propagate") not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}, got {options['kv']!r}")
    if options.get("kv") == "deferred":
        # kv="deferred" plans every graph itself (plan._plan_deferred): generate's decode
        # step skips, every other graph runs every layer. A propagate-only setting would
        # be ignored without a word.
        given = [k for k in ("compaction_threshold", "compact_min_length")
                 if options.get(k) is not None]
        if options.get("strategy", "auto") != "auto":
            given.insert(0, f"strategy={options['strategy']!r}")
        if given:
            raise ValueError(f"{', '.join(given)} applies to kv='propagate' only (kv='deferred' "
                             f"runs every layer of the prompt and skips only in generate's "
                             f"decode steps); pass kv='propagate' with it, or drop it")
    pending = options.get("max_pending", DEFAULT_MAX_PENDING)
    if isinstance(pending, bool) or not isinstance(pending, int) or not 1 <= pending <= 64:
        raise ValueError(f"max_pending must be an int in [1, 64] (tokens per row), got {pending!r}")
    if not isinstance(options.get("inductor_config", {}), Mapping):
        raise TypeError("options['inductor_config'] must be a dict of Inductor config patches")
    if options.get("mode") is not None and not isinstance(options["mode"], str):
        raise TypeError(f"options['mode'] must be an Inductor mode name, got {options['mode']!r}")
    stats = options.get("stats")
    if stats is not None and not isinstance(stats, ExitStats):
        raise TypeError(f"options['stats'] must be an ExitStats, got {type(stats).__name__}")
    if "inductor_config" in options:
        options["inductor_config"] = dict(options["inductor_config"])
    opts = TideOptions(**options)
    if routers is not None:
        threshold, checkpoints = resolve_exits(routers, opts.exit_threshold, opts.min_layers)
        if stats is not None and stats.num_layers != routers.num_layers:
            raise ValueError(f"options['stats'] counts a {stats.num_layers}-layer model, routers "
                             f"are for {routers.num_layers} layers")
        compaction = (routers.config.compaction_threshold if opts.compaction_threshold is None
                      else float(opts.compaction_threshold))
        if routers.successor is not None:
            compaction = 0.0  # confidence features are not gathered for compacted rows
        object.__setattr__(opts, "threshold", threshold)
        object.__setattr__(opts, "checkpoints", checkpoints)
        object.__setattr__(opts, "compaction", compaction)
    return opts
