"""Lossless mode on deferred K/V: the router drafts, the deep layers verify.

``fast = optimize(model, routers, mode="lossless")`` is a :class:`~.model.TIDEModel` built
with ``kv="deferred"`` whose ``generate`` runs :func:`generate_lossless` (batch 1). Its
output is the plain model's: token-identical under greedy decoding (up to floating-point
ties), distributed as plain sampling under sampling (docs/lossless.md).

The loop runs the deferred decode step (:mod:`.deferred`): ``W = max_pending + 1`` slots
at the cache positions ``start .. start + W - 1``, where ``start`` is the first position
whose K/V is not complete at every layer. Slot 0 holds the last *confirmed* token (the
full model's), slots ``1 .. m`` hold *drafts*, slot ``m`` is the current token and the
slots after it are dead.

* **Stopped step** (the current token exits at a checkpoint): its exit head's token is a
  draft: the argmax (greedy), or sampled from the exit head's processed distribution
  ``q`` (kept per slot for the sampling rule). It becomes the next slot's token and the
  current one stays pending. Only the current slot is ``live``.
* **Deep step** (the current token does not exit; or a verify is due: the buffer is full,
  the previous draft is EOS, or the next token is the last one allowed; then ``live`` is
  all False and ``force_deep`` is set so that every slot reads out at full depth): slots
  ``0 .. m`` yield the full model's logits. Greedy: accept drafts while the argmax at
  slot ``i`` equals the token in slot ``i + 1``; after ``k`` accepted drafts the next
  token is the argmax at slot ``k``. Sampling: :func:`~.speculative.speculative_accept`
  on the drafts, their ``q`` and the processed full-depth ``p`` (same temperature,
  top-k, top-p: :func:`..sampling.processed_probs`).
* **Rollback**: ``start`` moves to ``start + k + 1``, the drafts after the ``k``-th are
  dropped. Nothing is recomputed: the deep step already wrote exact K/V at every layer
  for slots ``0 .. k``; the positions after them hold stale K/V that no query reads
  before a later step rewrites them (every step sets the write counters to ``start``,
  :func:`.deferred.set_write_counters`, and a step writes all its slots at a layer
  before any of them attends there).

A draft never ends a generate unverified: a drafted EOS and the last allowed token are
verified by a deep step before ``generate`` returns. Whether a draft is EOS is read one
step late (:class:`~.model._LaggedFlag`: the host never waits for the GPU between two
steps), so the step after a drafted EOS drafts once more and the next one verifies. A
plain step's EOS is read one step late too: the plain step after it runs, and its token
is dropped and not counted (a run of plain steps never waits for the GPU, as the compiled
plain loop does not).

**Adaptive, never slower** (:class:`DraftController`). Drafting pays only if the tokens a
round yields (accepted drafts + 1) cost less than as many plain steps. The controller
keeps decayed counts of rounds, stopped steps and tokens, and the measured host wall time
of stopped, deep and plain steps (``time.perf_counter``; on CUDA a synchronize before and
after, only on the steps it samples: every step while a kind has too few samples, then
about one in ``sample_every``; the first ``warmup`` steps of each kind are compiles and
captures and are not used). A plain step's cost is its throughput: the time of a window
of consecutive plain steps between two synchronizes, over their number (``plain_window``
steps while the cost lacks samples; then, on CUDA, a whole run of plain steps that follows
a wide step, whose synchronizes are free: :meth:`DraftController.begin_run`).
Timed alone, a plain step would also pay the launch latency that a run of them hides
behind the GPU (the host queues the next step while the GPU runs this one), and drafting
would look better than it is: on the H200 the demo model's compiled plain step runs at
0.34 ms in a loop, and a controller that timed single steps kept drafting at 0.55x plain
(ninth device session). Stopped and deep steps read exit decisions on the host inside the
step, so the queue drains in every one of them anyway: timed one at a time. Expected gain = ``tokens * t_plain / (stopped * t_stopped +
rounds * t_deep)``. Below 1, drafting stops: every step is a plain one-token full-depth
step until ``probe_every`` of them ran (doubled after each failed probe, up to
``max_probe_every``); then drafting is probed again.

The fallback step is the plain model's own one-token forward, compiled as the compiled
plain baseline is (Inductor, ``reduce-overhead`` on CUDA unless ``cuda_graphs=False`` or
an Inductor ``mode`` is given; Dynamo's ``eager`` backend with ``inductor=False``), on the
bucket's ``StaticCache``, fed the token ids only (batch 1, no padding: its position is the
write counter's, its mask the causal one). It writes at ``start``: the write counters are
set before a step whenever another kind of step moved them, so it and the wide step share
the cache freely; a run of plain steps costs one small copy per step besides the graph,
as the baseline's loop does, and runs as one tight loop (its tokens, stats and counters
are written once per run: on a launch-bound model the host's time per step is the step's
time, and the demo model's fallback measured 0.91x plain interleaved with per-step
bookkeeping, ninth device session). Not the wide runner with every slot dead and ``force_deep``:
that runs ``W`` tokens through every segment graph and the head as separate pieces (and
on a CPU ``W`` times the arithmetic), slower than plain, while the fallback must run at
plain speed. The cost is one more compiled graph per cache bucket, compiled (and on CUDA
recorded) in the bucket's first adaptive generate, with its other graphs.

Guards: each call of a ``torch.compile``'d function evaluates Dynamo's guards (every
parameter, every cache tensor); on the H200's host that measured about 190 us per step
of the demo model, a third of its plain step (``benchmarks/diag_fallback.py``, tenth
device session). A run of plain steps passes the same objects every step (the ids
buffer, the bucket's cache), so after the run's first step, which Dynamo guards in full
(and which puts the plain graph's cache entry first), its steps run under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: Dynamo checks only the
guards that tell its cache entries apart (:func:`unguarded`). Left as it is when the
caller set a stance of their own (a non-default stance, or skipping guards already). The
stance is process-wide: other threads' compiled calls during such a run skip their full
guard evaluation too; ``optimize(..., mode="lossless", unguarded=False)`` turns it off.

The prompt: its last token is the first current token (so the first new token may be a
draft too, and is the full model's otherwise: under ``kv="deferred"`` the prompt graph
runs every layer, but a prompt token that exits reads out its exit head); the tokens
before it are prefilled by the bucket's prompt step (every layer, exact K/V), or, for a
two-token prompt, by the plain step.

``fast.tide_stats`` counts the prompt tokens, and per decode step its current token (its
exit layer, the layers the step ran; plain steps as ``"plain"`` in
``steps_by_strategy``); exit regret is the drafts' top-1 disagreement, checked by the deep
steps. ``fast.lossless_stats`` (:class:`LosslessStats`) counts drafts, acceptance and the
fallback.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..sampling import processed_probs
from .deferred import set_write_counters, write_counters
from .model import _LaggedFlag
from .speculative import verify_drafts

if TYPE_CHECKING:
    from ..routers import RouterSet
    from .model import TIDEModel

__all__ = ["LosslessStats", "DraftController", "LosslessDecoder", "build_lossless",
           "generate_lossless", "unguarded"]


def unguarded() -> contextlib.AbstractContextManager:
    """Dynamo's guard evaluation reduced to the guards that tell cache entries apart
    (``torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)``), for calls
    that pass exactly what the previous, fully guarded call passed. A no-op when the
    caller's stance is not the default one (theirs is kept), or on a torch without
    stances."""
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    state = tuple(getattr(stance, k, None)
                  for k in ("stance", "skip_guard_eval_unsafe", "backend"))
    if state != ("default", False, None) or not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ---------------------------------------------------------------------- stats
@dataclass
class LosslessStats:
    """Counters of lossless decoding, over every ``generate`` call (:meth:`reset`).

    Attributes:
        num_layers: decoder layers in the model.
        drafted: drafts made (one per stopped step).
        accepted: drafts the deep steps accepted and emitted (a draft after an EOS is not).
        tokens: new tokens emitted by decode steps (the prompt's are not counted).
        deep_steps: deep steps (each verifies the pending drafts: one round each).
        plain_steps: plain one-token steps (the adaptive fallback, and a two-token
            prompt's first token).
        fallbacks: times the controller stopped drafting (rounds of fallback).
        probes: times drafting resumed after a fallback.
        draft_depths: layers a stopped step computed (``c + 1`` for an exit at
            checkpoint ``c``) -> how many.
    """

    num_layers: int
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    deep_steps: int = 0
    plain_steps: int = 0
    fallbacks: int = 0
    probes: int = 0
    draft_depths: dict[int, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        """Drafts not accepted (the first mismatch and every draft after it)."""
        return self.drafted - self.accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_draft_depth(self) -> float:
        """Mean layers per stopped step (0.0 when none)."""
        n = sum(self.draft_depths.values())
        return sum(d * c for d, c in self.draft_depths.items()) / n if n else 0.0

    @property
    def tokens_per_deep_step(self) -> float:
        """Tokens emitted per deep step (0.0 when none)."""
        return self.tokens / self.deep_steps if self.deep_steps else 0.0

    def reset(self) -> None:
        self.drafted = self.accepted = self.tokens = self.deep_steps = 0
        self.plain_steps = self.fallbacks = self.probes = 0
        self.draft_depths = {}

    def summary(self) -> str:
        depths = ", ".join(f"{d}: {n}" for d, n in sorted(self.draft_depths.items()))
        return "\n".join([
            f"Tokens: {self.tokens}, deep steps: {self.deep_steps}, plain steps: "
            f"{self.plain_steps}",
            f"Drafted: {self.drafted}, accepted: {self.accepted} "
            f"({100.0 * self.acceptance_rate:.1f}%)",
            f"Mean draft depth: {self.mean_draft_depth:.2f} / {self.num_layers} layers"
            + (f" (depth: steps {{{depths}}})" if depths else ""),
            f"Adaptive fallback: {self.fallbacks} rounds, {self.probes} probes",
        ])

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------- controller
@dataclass
class DraftController:
    """Decides whether drafting pays, from measured step costs and acceptance.

    One per cache bucket (its costs are that bucket's). Phases: ``"draft"`` (the lossless
    loop) and ``"plain"`` (plain one-token steps, ``remaining`` of them). Decisions are
    made at the end of a round (a deep step) once ``min_rounds`` rounds ran in the
    current drafting phase and the costs it needs have samples.

    Attributes:
        probe_every: plain steps of a fallback before drafting is probed again.
        max_probe_every: the longest fallback (each failed probe doubles it).
        min_rounds: rounds of a drafting phase before a decision.
        decay: per round, the weight of the earlier rounds in the counts.
        sample_every: once the stopped and deep kinds have ``min_samples``, about one
            such step in this many is timed (CUDA; on a CPU every step is timed, timing
            needs no synchronize there).
        plain_window: consecutive plain steps timed together (one sample: their mean)
            while the plain cost lacks samples, and always on a CPU; later, on CUDA, a
            window spans a run of plain steps (:meth:`begin_run`).
        warmup: the first steps of each kind are not used (compiles, captures).
        min_samples: timed steps of a kind before its cost is used.
        history: the cost of a kind is the median of its last ``history`` samples.
    """

    probe_every: int = 64
    max_probe_every: int = 1024
    min_rounds: int = 3
    decay: float = 0.9
    sample_every: int = 16
    plain_window: int = 8
    warmup: int = 3
    min_samples: int = 3
    history: int = 15

    def __post_init__(self) -> None:
        if not 1 <= self.probe_every <= self.max_probe_every:
            raise ValueError(f"need 1 <= probe_every <= max_probe_every, got "
                             f"{self.probe_every}, {self.max_probe_every}")
        if not 0.0 <= self.decay < 1.0 or self.min_rounds < 1 or self.min_samples < 1:
            raise ValueError("need 0 <= decay < 1, min_rounds >= 1, min_samples >= 1")
        if self.plain_window < 1 or self.sample_every < 1:
            raise ValueError(f"need plain_window >= 1 and sample_every >= 1, got "
                             f"{self.plain_window}, {self.sample_every}")
        self.phase = "draft"
        self.remaining = 0
        self._interval = self.probe_every
        self._fallback = False  # the current plain phase is a fallback (not a calibration)
        self._tokens = self._stops = self._rounds = 0.0
        self._phase_rounds = 0
        self._seen: dict[str, int] = {"stop": 0, "deep": 0, "plain": 0}
        self._times: dict[str, collections.deque] = {
            k: collections.deque(maxlen=self.history) for k in self._seen}
        self._median: dict[str, float | None] = {}
        self._steps = 0
        self._probing = False  # the drafting phase is a probe after a fallback
        self._window_t0: float | None = None  # an open window of plain steps: its start
        self._window_n = 0
        self._run_window = False  # the open window spans a run (no plain_window cap)
        #: the last gain computed (None: none yet)
        self.gain: float | None = None

    # -------------------------------------------------------------- timing
    def cost(self, kind: str) -> float | None:
        """Median seconds of a step of ``kind`` (``stop``, ``deep``, ``plain``), or None
        while it has fewer than ``min_samples`` samples."""
        if kind not in self._median:
            t = self._times[kind]
            self._median[kind] = statistics.median(t) if len(t) >= self.min_samples else None
        return self._median[kind]

    def want_sample(self, cuda: bool) -> bool:
        """Time the next stopped or deep step? Every step on a CPU; on CUDA while a kind the
        next step may be lacks samples, else about one in ``sample_every`` (a
        low-discrepancy sequence: no aliasing with a periodic run of stopped and deep
        steps). Plain steps are timed in windows (:meth:`begin_plain_step`)."""
        self._steps += 1
        if not cuda:
            return True
        if self.cost("deep") is None or (self._seen["stop"] and self.cost("stop") is None):
            return True
        return (self._steps * _GOLDEN) % 1.0 < 1.0 / self.sample_every

    def observe(self, kind: str, seconds: float | None) -> None:
        """A step of ``kind`` ran; ``seconds`` if it was timed."""
        self._seen[kind] += 1
        if seconds is not None and self._seen[kind] > self.warmup:
            self._add_sample(kind, seconds)

    def _add_sample(self, kind: str, seconds: float) -> None:
        self._times[kind].append(seconds)
        self._median.pop(kind, None)

    # -------------------------------------------------------------- plain windows
    def begin_run(self, cuda: bool, drained: bool) -> None:
        """Before a run of plain steps (the lossless loop's tight loop). On CUDA, once the
        plain cost has its samples, one window spans the whole run (one sample: the run's
        throughput) and closes when the plain phase ends, or the generate does. It opens
        only when ``drained``: the run follows a wide step, which read exit decisions on
        the host, so the GPU's queue is empty and the synchronize before the clock starts
        costs nothing; so does the one at its end, which a wide step (or the end of the
        generate) would wait for anyway. A synchronize inside a run would not be free: the
        GPU idles while the host prepares the next step, and windows at one step in
        ``sample_every`` measured 2-6% of the plain step on the H200 (eleventh device
        session). A run that does not follow a wide step (the plain phase goes on in the
        next generate) is not timed."""
        if not cuda or not drained or self._window_t0 is not None \
                or self._seen["plain"] < self.warmup or self.cost("plain") is None:
            return
        torch.cuda.synchronize()
        self._window_t0 = time.perf_counter()
        self._window_n = 0
        self._run_window = True

    def begin_plain_step(self, cuda: bool) -> None:
        """Before a plain step of a plain phase: open a window of ``plain_window`` timed
        plain steps if one is due (after ``warmup`` plain steps; on a CPU whenever none is
        open; on CUDA only while the plain cost lacks samples, after a synchronize; later
        windows span runs, :meth:`begin_run`)."""
        if self._window_t0 is not None or self._seen["plain"] < self.warmup:
            return
        if cuda:
            if self.cost("plain") is not None:
                return
            torch.cuda.synchronize()
        self._window_t0 = time.perf_counter()
        self._window_n = 0

    def close_window(self, cuda: bool) -> None:
        """End the open window of plain steps, if any (on CUDA after a synchronize): one
        sample of the plain cost, its seconds over its steps. The lossless loop calls it
        when a generate ends; :meth:`end_plain_step` when the window is full or the plain
        phase ends."""
        if self._window_t0 is None:
            return
        if self._window_n:
            if cuda:
                torch.cuda.synchronize()
            self._add_sample("plain", (time.perf_counter() - self._window_t0) / self._window_n)
        self._window_t0 = None
        self._window_n = 0
        self._run_window = False

    # -------------------------------------------------------------- decisions
    def end_round(self, stops: int, tokens: int, stats: LosslessStats) -> None:
        """A deep step ended a round of ``stops`` stopped steps that yielded ``tokens``."""
        d = self.decay
        self._stops = d * self._stops + stops
        self._tokens = d * self._tokens + tokens
        self._rounds = d * self._rounds + 1
        self._phase_rounds += 1
        if self._phase_rounds < self.min_rounds:
            return
        deep, stop = self.cost("deep"), self.cost("stop")
        if deep is None or (self._stops > 0 and stop is None):
            return
        plain = self.cost("plain")
        if plain is None:
            # Measure the plain step first: a short plain phase, not a fallback.
            steps = (max(0, self.warmup - self._seen["plain"])
                     + (self.min_samples - len(self._times["plain"])) * self.plain_window)
            self._enter_plain(max(1, steps), fallback=False)
            return
        spent = self._stops * (stop or 0.0) + self._rounds * deep
        self.gain = self._tokens * plain / spent if spent > 0 else math.inf
        if self.gain < 1.0:
            stats.fallbacks += 1
            self._enter_plain(self._interval, fallback=True)
            self._interval = min(2 * self._interval, self.max_probe_every)
        elif self._probing:
            self._interval = self.probe_every  # a probe that paid: back to the base interval
            self._probing = False

    def end_plain_step(self, stats: LosslessStats, cuda: bool = False) -> None:
        """A plain step of a plain phase ran (counted; the open window, if any, closes when
        it holds ``plain_window`` steps or the phase ends)."""
        self._seen["plain"] += 1
        self.remaining -= 1
        if self._window_t0 is not None:
            self._window_n += 1
            if self.remaining <= 0 or (self._window_n >= self.plain_window
                                       and not self._run_window):
                self.close_window(cuda)
        if self.remaining <= 0:
            self.phase = "draft"
            if self._fallback:
                stats.probes += 1
                self._probing = True
                self._tokens = self._stops = self._rounds = 0.0
                self._phase_rounds = 0

    def _enter_plain(self, steps: int, fallback: bool) -> None:
        self.phase = "plain"
        self.remaining = steps
        self._fallback = fallback


# ---------------------------------------------------------------------- decoder
@dataclass
class _BucketState:
    """Per cache bucket: its controller and the lossless loop's own buffers."""

    controller: DraftController | None
    plain_ids: torch.Tensor
    slots: torch.Tensor
    exit_top: torch.Tensor
    q: torch.Tensor | None = None


class LosslessDecoder:
    """What ``mode="lossless"`` adds to a :class:`~.model.TIDEModel`: the adaptive
    controller template, the per-bucket state, the plain step and the stats.

    Attributes:
        stats: :class:`LosslessStats` (also ``fast.lossless_stats``).
        adaptive: the controller template (copied per bucket), or None: always draft.
        unguarded: runs of fallback steps skip Dynamo's full guard evaluation after their
            first step (:func:`unguarded`).
    """

    def __init__(self, fast: "TIDEModel", adaptive: bool | DraftController = True,
                 fullgraph: bool = True, unguarded: bool = True) -> None:
        if isinstance(adaptive, DraftController):
            self.adaptive: DraftController | None = adaptive
        elif adaptive is True:
            self.adaptive = DraftController()
        elif adaptive is False:
            self.adaptive = None
        else:
            raise TypeError(f"adaptive must be True, False or a DraftController, got "
                            f"{adaptive!r}")
        self.stats = LosslessStats(num_layers=fast.routers.num_layers)
        self.states: dict[tuple, _BucketState] = {}
        self._plain: dict[str, Any] = {}
        self._fullgraph = fullgraph
        if not isinstance(unguarded, bool):
            raise TypeError(f"unguarded must be True or False, got {unguarded!r}")
        self.unguarded = unguarded

    def controller(self, key: tuple) -> DraftController | None:
        """The bucket's controller (None: not adaptive, or no generate in it yet)."""
        state = self.states.get(key)
        return None if state is None else state.controller

    def _state(self, key: tuple, width: int, device: torch.device) -> _BucketState:
        state = self.states.get(key)
        if state is None:
            controller = (None if self.adaptive is None
                          else dataclasses.replace(self.adaptive))
            state = self.states[key] = _BucketState(
                controller,
                plain_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                slots=torch.arange(width, device=device)[None],
                exit_top=torch.zeros(width, dtype=torch.long, device=device))
        return state

    def plain_forward(self, fast: "TIDEModel", device: torch.device) -> tuple[Any, bool]:
        """The plain one-token step's compiled forward on ``device`` and whether it runs
        under CUDA graph trees (``cudagraph_mark_step_begin`` before each call)."""
        kind = device.type
        if kind not in self._plain:
            opts = fast.options
            graphs = False
            if not opts.inductor:
                fn = torch.compile(fast.model.forward, backend="eager",
                                   fullgraph=self._fullgraph, dynamic=False)
            else:
                mode = opts.mode
                if mode is None and kind == "cuda" and opts.cuda_graphs is not False:
                    mode = "reduce-overhead"
                graphs = kind == "cuda" and mode in ("reduce-overhead", "max-autotune")
                config = ({"options": dict(opts.inductor_config)}
                          if opts.inductor_config and mode is None else {"mode": mode})
                fn = torch.compile(fast.model.forward, fullgraph=self._fullgraph,
                                   dynamic=False, **config)
            self._plain[kind] = (fn, graphs)
        return self._plain[kind]


def build_lossless(model: torch.nn.Module, routers: "RouterSet", *, fullgraph: bool = True,
                   dynamic: bool | None = None, adaptive: bool | DraftController = True,
                   unguarded: bool = True, **options: Any) -> "TIDEModel":
    """``optimize(model, routers, mode="lossless", ...)``: a TIDEModel with ``kv="deferred"``
    whose ``generate`` is :func:`generate_lossless`. ``adaptive``: the fallback
    controller (:class:`LosslessDecoder`). ``unguarded``: runs of fallback steps skip
    Dynamo's full guard evaluation after their first step (:func:`unguarded`; the stance
    is process-wide, so pass False when other threads call compiled code while this
    model generates). ``options``: the ``tide`` backend options (``max_pending`` sets the
    draft buffer: ``W = max_pending + 1``)."""
    from ..options import parse_options
    from ..stats import ExitStats
    from .model import TIDEModel

    if options.get("kv", "deferred") != "deferred":
        raise ValueError(f"mode='lossless' runs on kv='deferred' (exact K/V); got "
                         f"kv={options['kv']!r}")
    if dynamic:
        raise ValueError("mode='lossless' compiles its decode steps with static sizes; drop "
                         "dynamic=True")
    if "routers" in options or "stats" in options:
        raise TypeError("pass routers positionally; optimize() keeps its own stats "
                        "(read fast.tide_stats and fast.lossless_stats)")
    options = {**options, "kv": "deferred", "routers": routers,
               "stats": ExitStats(num_layers=routers.num_layers)}
    fast = TIDEModel(model, parse_options(options), fullgraph=fullgraph, dynamic=dynamic)
    decoder = LosslessDecoder(fast, adaptive, fullgraph=fullgraph, unguarded=unguarded)
    fast.lossless = decoder
    fast.lossless_stats = decoder.stats
    return fast


# ---------------------------------------------------------------------- generate
def generate_lossless(
    fast: "TIDEModel",
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor,
    eos: list[int],
    sampling: dict[str, Any],
    max_cache_len: int | None,
) -> torch.Tensor:
    """``TIDEModel.generate`` under ``mode="lossless"`` (module docstring); arguments
    checked by the caller except the batch. Returns ``[1, prompt + new]``."""
    from .model import cache_bucket

    if input_ids.shape[0] != 1:
        raise ValueError(
            f"mode='lossless' decodes one sequence at a time (batch 1), got input_ids of "
            f"shape {tuple(input_ids.shape)}; loop over the rows, or use "
            "optimize(model, routers) (mode='exit') for batches")
    if not bool(attention_mask.bool().all()):
        raise ValueError("mode='lossless' takes unpadded input (batch 1): drop the padding")
    decoder: LosslessDecoder = fast.lossless
    stats = decoder.stats
    width = fast.options.max_pending + 1
    prompt_len = input_ids.shape[1]
    device = input_ids.device
    cuda = device.type == "cuda"
    eos = [e for e in eos if e >= 0]  # token ids are never negative
    eos_set = set(eos)
    do_sample = bool(sampling.get("do_sample"))
    generator = sampling.get("generator")
    kw = {k: sampling.get(k) for k in ("temperature", "top_k", "top_p")}
    if kw["temperature"] is None:
        kw["temperature"] = 1.0
    needed = prompt_len + max_new_tokens + width - 1
    cache_len = cache_bucket(needed) if max_cache_len is None else max_cache_len
    if cache_len < needed:
        raise ValueError(
            f"max_cache_len={cache_len} < prompt {prompt_len} + max_new_tokens "
            f"{max_new_tokens} + max_pending {width - 1} (mode='lossless' steps write "
            "max_pending positions ahead)")
    bucket = fast._bucket(1, cache_len, device)
    key = (1, cache_len, device)
    st = decoder._state(key, width, device)
    ctl = st.controller
    past, mask = bucket.cache, bucket.mask
    counters = write_counters(past)
    past.reset()
    mask.zero_()
    mask[:, :prompt_len] = 1
    ids, positions = bucket.ids, bucket.positions
    plain_fn, plain_graphs = decoder.plain_forward(fast, device)
    num_layers = fast.routers.num_layers
    unfinished = torch.ones(1, dtype=torch.bool, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        """The next token (0-d) from full-depth logits ``[vocab]``."""
        if not do_sample:
            return logits.argmax(-1)
        probs = processed_probs(logits, **kw)
        return torch.multinomial(probs, 1, generator=generator)[0]

    written = [0]  # where the write counters point (each step advances them in place)

    def plain_step(token: torch.Tensor, position: int) -> torch.Tensor:
        """The plain model's one-token forward of ``token`` at ``position``; its logits.
        As the compiled plain baseline runs it: token ids only (batch 1, no padding: the
        position is the write counter's, the mask the causal one), so a run of plain
        steps costs one small copy per step besides the graph (the counters are set only
        after another kind of step moved them)."""
        st.plain_ids.fill_(token)
        if written[0] != position:
            set_write_counters(counters, position)
        if plain_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with fast._may_compile(bucket, "plain"):
            out = plain_fn(input_ids=st.plain_ids, past_key_values=past, use_cache=True)
        written[0] = position + 1
        return out.logits[0, -1]

    # The prompt: every token but the last has its K/V written at every layer; the last
    # is the first current token.
    if prompt_len >= 3:
        step_ids = input_ids[:, :-1]
        prompt_positions = torch.arange(prompt_len - 1, device=device)[None]
        torch._dynamo.mark_dynamic(step_ids, 1)
        torch._dynamo.mark_dynamic(prompt_positions, 1)
        fast._step(bucket, step_ids, prompt_positions, True)
        fast._count(1, prompt_len - 1, mask, unfinished, prompt_len - 1)
        written[0] = prompt_len - 1
    elif prompt_len == 2:
        plain_step(input_ids[0, 0], 0)
        fast.tide_stats.record_uniform(-1, 1, num_layers, strategy="plain")
        stats.plain_steps += 1
    start = prompt_len - 1
    current = input_ids[0, -1]
    seq = torch.empty(1, prompt_len + max_new_tokens, dtype=input_ids.dtype, device=device)
    seq[:, :prompt_len] = input_ids
    produced = 0  # confirmed new tokens
    m = 0  # drafts pending in slots 1 .. m (slot 0: the last confirmed token)
    stops = 0  # stopped steps of the current round

    runner = bucket.runner
    if runner is None:
        # The runner (and its live input) is known after its first call: one call now,
        # whose writes at start .. start + W - 1 the first real step rewrites.
        ids.fill_(current)
        positions.copy_(st.slots + start)
        set_write_counters(counters, start)
        fast._step(bucket, ids, positions, False)
        written[0] = start + width
        runner = bucket.runner = fast._deferred_backend.last.runner
        if getattr(runner, "live", None) is None:
            raise RuntimeError("the deferred decode step did not compile to a deferred "
                               "runner (see tide_compile.plan.plan)")
    if ctl is not None and "plain" not in bucket.compiled:
        # The fallback's graph compiles (and, under CUDA graph trees, records) now, with
        # the bucket's other graphs, not in the middle of a later generate. Its write at
        # start is rewritten by the first step.
        for _ in range(3 if plain_graphs else 1):
            plain_step(current, start)
    raw = fast._raw_stats
    done = False
    last_draft_eos = False
    # Whether the latest draft is EOS, read one step late (the host does not wait for
    # the GPU between two steps): the step after a drafted EOS drafts once more, the one
    # after that verifies. True in the flag: the draft is not EOS.
    draft_flag = _LaggedFlag(device) if eos_set else None
    # Likewise whether the latest plain step's token is EOS: a run of plain steps never
    # waits for the GPU either (as the compiled plain loop does not). The step after an
    # EOS runs, and its token is dropped and not counted.
    plain_flag = _LaggedFlag(device) if eos_set else None
    eos_t = torch.tensor(sorted(eos_set), device=device, dtype=torch.long)
    while not done and produced < max_new_tokens:
        if ctl is not None and ctl.phase == "plain" and m == 0:
            # ------------------------------------------------------ a run of fallback steps
            # The plain phase's steps in one tight loop, as the compiled plain loop runs
            # them: the tokens reach ``seq`` and the counters once per run, not per step.
            run: list[torch.Tensor] = []
            steps = min(ctl.remaining, max_new_tokens - produced)
            # A run that is not the generate's first step follows a deep step (a run
            # ends the generate or the plain phase, and a deep step ends every draft
            # phase), which read on the host: the GPU's queue is drained.
            ctl.begin_run(cuda, drained=produced > 0)
            with contextlib.ExitStack() as guards:
                for i in range(steps):
                    if i == 1 and decoder.unguarded:  # the same call as the guarded first
                        guards.enter_context(unguarded())
                    ctl.begin_plain_step(cuda)
                    logits = plain_step(current, start + len(run))
                    if plain_flag is not None and plain_flag.armed:
                        ended = plain_flag.done()
                        plain_flag.armed = False
                        if ended:  # the previous token was EOS: this one is dropped
                            ctl.end_plain_step(stats, cuda)
                            done = True
                            break
                    current = pick(logits)
                    run.append(current)
                    if plain_flag is not None:
                        plain_flag.record(~torch.isin(current.reshape(1), eos_t))
                    ctl.end_plain_step(stats, cuda)
            k = len(run)
            if k:
                at = prompt_len + produced
                seq[0, at:at + k] = torch.stack(run)
                produced += k
                start += k
                stats.plain_steps += k
                stats.tokens += k
                fast.tide_stats.record_uniform(-1, k, k * num_layers, strategy="plain",
                                               steps=k)
            continue
        # ---------------------------------------------------------------- wide step
        if plain_flag is not None and plain_flag.armed:
            # A run of plain steps ends here: its last token's flag is read now.
            ended = plain_flag.done()
            plain_flag.armed = False
            if ended:
                break
        timed = ctl is not None and ctl.want_sample(cuda)
        if timed:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        verify = m == width - 1 or produced + m + 1 >= max_new_tokens or last_draft_eos
        if m == 0:
            ids.fill_(current)
        positions.copy_(st.slots + start)
        mask[:, :start + m + 1] = 1  # (plain steps since the last wide step set none)
        set_write_counters(counters, start)
        written[0] = start + width
        live = runner.live
        live.zero_()
        if not verify:
            live[:, m] = True
        runner.force_deep = verify
        wanted = fast.decode_threshold  # fast.set_threshold: the exits' threshold
        if wanted is not None and runner.threshold != wanted:
            runner.set_threshold(wanted)
        out = fast._step(bucket, ids, positions, False)
        if draft_flag is not None and draft_flag.armed:
            last_draft_eos = draft_flag.done()  # the previous step's draft
            draft_flag.armed = False
        exits = raw.last_exit_layers
        depth = raw.last_layers_executed // max(1, exits.numel()) if exits is not None \
            else num_layers
        if exits is not None:
            fast.tide_stats.record(exits.reshape(-1)[m:m + 1], layers_executed=depth,
                                   strategy=raw.last_strategy)
        if not verify and not runner.reached_end:
            # ------------------------------------------------------------ stopped: a draft
            logits = out[0, m]
            st.exit_top[m] = logits.argmax(-1)
            if do_sample:
                q = processed_probs(logits, **kw)
                if st.q is None or st.q.shape[-1] != q.shape[-1]:
                    st.q = torch.zeros(width, q.shape[-1], device=device)
                st.q[m] = q
                draft = torch.multinomial(q, 1, generator=generator)[0]
            else:
                draft = st.exit_top[m]
            ids[0, m + 1:].fill_(draft)
            m += 1
            stops += 1
            stats.drafted += 1
            stats.draft_depths[depth] = stats.draft_depths.get(depth, 0) + 1
            if draft_flag is not None:
                draft_flag.record(~torch.isin(draft.reshape(1), eos_t))
            kind = "stop"
        else:
            # ------------------------------------------------------------ deep: verify
            drafts = ids[0, 1:m + 1]
            verdict = verify_drafts(
                out[0, :m + 1], drafts, eos=eos_set, room=max_new_tokens - produced,
                sampling=kw if do_sample else None,
                draft_probs=st.q[:m] if do_sample and m else None,
                exit_tops=st.exit_top[:m] if do_sample and m else None,
                generator=generator)
            k, next_t, emitted = verdict.accepted, verdict.next_token, verdict.emitted
            done = done or verdict.ended
            if m:
                fast.tide_stats.record_regret(verdict.regrets, m)
            n = len(emitted)
            at = prompt_len + produced
            j = min(k, n)  # emitted = drafts[:j], then the verifier's token if n > k
            if j:
                seq[0, at:at + j] = drafts[:j]
            if n > k:
                seq[0, at + k] = next_t
            produced += n
            start += k + 1
            stats.accepted += j  # drafts emitted (none after an EOS)
            stats.deep_steps += 1
            stats.tokens += n
            rounds = (stops, n)
            m, stops = 0, 0
            last_draft_eos = False  # this step verified every draft
            current = next_t
            kind = "deep"
        if ctl is not None:
            if timed:
                if cuda:
                    torch.cuda.synchronize()
                ctl.observe(kind, time.perf_counter() - t0)
            else:
                ctl.observe(kind, None)
            if kind == "deep":
                ctl.end_round(*rounds, stats)
    if ctl is not None:
        ctl.close_window(cuda)
    runner.force_deep = False
    bucket.complete = start
    return seq[:, :prompt_len + produced]
