"""The deferred decode loop: exact K/V, with the skipped layers run later, batched.

``optimize(model, routers, kv="deferred").generate(...)`` runs :func:`generate_deferred`.
Every decode step runs one compiled graph (the ``deferred`` strategy: the skip runner with
no KV-fill) over ``w`` token slots per row at the cache positions ``start .. start + w -
1``, where ``start`` is the first position whose K/V is not yet complete at every layer,
and ``w`` is the narrowest of the widths 1, 2, 4, .. ``max_pending + 1``
(:func:`step_widths`) that holds the step's tokens (each width compiles on its first use;
a width's very first call runs with every slot live and is thrown away, then the step
runs again: it wrote only exact K/V):

* slots ``0 .. m-1`` hold the *pending* tokens: they exited at a checkpoint and emitted
  their exit head's token, but their K/V at the layers after it were never written;
* slot ``m`` holds the current token, the only one that may exit (:attr:`live`);
* the slots after it are dead: they repeat the current token at later positions; what
  they write there is overwritten before any token reads it (causal mask).

The step runs segment after segment over all ``W`` slots. At each checkpoint the runner
reads one flag (as the skip strategy does): if every row's current token has exited, the
step stops; the current token's logits are its exit head's and it becomes pending. A
pending token's state is recomputed from its id in every later step, up to where that
step goes, so its K/V at those layers are written again from exact inputs. A step whose
current token does not exit runs every layer for every slot: the pending tokens' skipped
layers run there, their exact K/V reach the cache before any later token reads them, and
their full-depth logits come out of the same head (exit regret, counted in
``tide_stats`` at no extra cost). When ``max_pending`` tokens wait, the next step runs
every layer whatever the routers say (``force_deep``); its token's output is still its
exit head's if it exited.

Every K/V the model reads is the full model's own; only the exited tokens' own logits
are approximate. Teacher-forced this is each token's own exit with all K/V exact
(``reference.forward(..., kv="deferred")``). The cost: a step is ``w`` tokens wide, which
on a GPU at batch 1 reads the same weights as one token (decode is bound by weight
reads); on a CPU it is ``w`` times the arithmetic. A step with nothing pending is one
token wide.

Write counters: a transformers 5.x ``StaticLayer`` writes at its ``cumulative_length``
and advances it in place; each step sets every layer's counter to ``start`` first (the
step rewrites the pending positions), so the layers a stopped step skipped need no
bookkeeping.

The optional :class:`RegretController` (``target_agreement``) raises the exit threshold
when the measured regret rate exceeds ``1 - target_agreement``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..sampling import sample_next

if TYPE_CHECKING:
    from .model import TIDEModel

__all__ = ["generate_deferred", "RegretController", "set_write_counters", "step_widths",
           "StepWidth"]


def step_widths(max_width: int) -> list[int]:
    """The decode step's widths: powers of two below ``max_width``, and ``max_width``. A step
    with ``m`` pending tokens runs the narrowest width of at least ``m + 1`` slots."""
    widths = [1 << i for i in range(max(max_width - 1, 0).bit_length()) if 1 << i < max_width]
    return widths + [max_width]


@dataclass
class StepWidth:
    """One width of a bucket's decode step: its input buffers (written in place, so the
    compiled step sees the same tensors every call), its runner, its direct call."""

    width: int
    ids: torch.Tensor
    positions: torch.Tensor
    runner: Any = None
    direct: Any = None
    seen_args: tuple | None = None

    @property
    def kind(self) -> str:
        """The graph's name in the bucket's compile bookkeeping."""
        return f"step{self.width}"


def set_write_counters(counters: list[torch.Tensor], start: int) -> None:
    """Every layer's write counter to ``start``, in place (compiled graphs hold their
    addresses): two multi-tensor kernels for all layers."""
    if counters:
        torch._foreach_mul_(counters, 0)
        torch._foreach_add_(counters, start)


def write_counters(cache: Any) -> list[torch.Tensor]:
    """The ``StaticCache``'s per-layer write counters; an error naming the problem for a
    cache whose layers cannot be rewound (no tensor counter, sliding windows)."""
    counters = []
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                f"cache layer {i} ({type(layer).__name__}) is a sliding-window layer: its "
                "rolling buffer cannot be rewound to rewrite pending tokens, so kv='deferred' "
                "does not support sliding-window attention; use kv='propagate'")
        counter = getattr(layer, "cumulative_length", None)
        if not isinstance(counter, torch.Tensor):
            raise NotImplementedError(
                f"cache layer {i} ({type(layer).__name__}) has no tensor write counter "
                "(cumulative_length): kv='deferred' needs a transformers 5.x StaticCache")
        counters.append(counter)
    return counters


@dataclass
class RegretController:
    """Raises the exit threshold while the measured exit regret is too high.

    Every ``window`` checked exits (exited tokens whose full-depth top-1 a deep step
    computed), if the regret rate over that window exceeds ``1 - target_agreement``, the
    threshold's logit grows by ``step`` (up to ``max_threshold``). It never lowers the
    threshold. Reading the window's regret count is one host read per window.

    Attributes:
        target_agreement: the top-1 agreement with the full model wanted from exited
            tokens, in (0, 1).
        window: checked exits per decision.
        step: the rise of ``logit(threshold)`` per decision.
        max_threshold: the highest threshold it sets.
        raised: thresholds it set, in order.
        threshold: the last of ``raised`` (None: none yet); the model's deferred steps
            use it from then on (``TIDEModel.decode_threshold``).
    """

    target_agreement: float
    window: int = 32
    step: float = 1.0
    max_threshold: float = 0.99999
    raised: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_agreement < 1.0:
            raise ValueError(f"target_agreement must be in (0, 1), got {self.target_agreement!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window!r}")
        self._regrets: torch.Tensor | int = 0
        self._checked = 0

    def update(self, regrets: torch.Tensor | int, checked: int, threshold: float) -> float | None:
        """Add a deep step's checks; the new threshold when it decides to raise it."""
        self._regrets = regrets + self._regrets
        self._checked += checked
        if self._checked < self.window:
            return None
        rate = int(self._regrets) / self._checked
        self._regrets, self._checked = 0, 0
        if rate <= 1.0 - self.target_agreement or threshold >= self.max_threshold:
            return None
        t = min(max(threshold, 1e-6), 1 - 1e-6)
        new = 1.0 / (1.0 + math.exp(-(math.log(t) - math.log1p(-t) + self.step)))
        new = min(new, self.max_threshold)
        self.raised.append(new)
        return new

    @property
    def threshold(self) -> float | None:
        """The last threshold it set (None: none yet)."""
        return self.raised[-1] if self.raised else None


def generate_deferred(
    fast: "TIDEModel",
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor,
    eos: list[int],
    pad_token_id: int,
    sampling: dict[str, Any],
    max_cache_len: int | None,
    controller: RegretController | None = None,
) -> torch.Tensor:
    """``TIDEModel.generate`` under ``kv="deferred"`` (module docstring); arguments checked
    by the caller. Returns ``[batch, prompt + new]``."""
    from .model import cache_bucket, mirror_rows

    width = fast.options.max_pending + 1
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    # Dead slots of the last step write up to max_pending positions past its token.
    needed = prompt_len + max_new_tokens + width - 1
    cache_len = cache_bucket(needed) if max_cache_len is None else max_cache_len
    if cache_len < needed:
        raise ValueError(
            f"max_cache_len={cache_len} < prompt {prompt_len} + max_new_tokens "
            f"{max_new_tokens} + max_pending {width - 1} (kv='deferred' steps write "
            "max_pending positions ahead)")
    bucket, index, prompt_positions = fast._start(attention_mask, cache_len)
    rows = bucket.mask.shape[0]
    past, mask = bucket.cache, bucket.mask
    counters = write_counters(past)
    # Position of cache index j >= prompt_len - 1, per row: last_position + j - (prompt_len - 1);
    # base[r, i] + start is slot i's position in a step that starts at cache index start.
    base = prompt_positions[:, -1:] + (1 - prompt_len) + torch.arange(width, device=device)
    # live[:, m] only: one row of these per step (one copy instead of a fill and a write)
    one_hot = torch.eye(width, dtype=torch.bool, device=device)
    greedy = not sampling.get("do_sample", False)
    ids, positions = bucket.ids, bucket.positions
    exit_top = torch.zeros(rows, width, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    state = {"live": [True] * batch, "index": index, "sequences": input_ids,
             "unfinished": unfinished}

    def emit(next_ids: torch.Tensor) -> torch.Tensor | None:
        """Append the rows' tokens; the next current tokens (mirrors included), or None
        when every row has finished."""
        unfinished = state["unfinished"]
        own = torch.where(unfinished, next_ids[:batch],
                          torch.full_like(next_ids[:batch], pad_token_id))
        state["sequences"] = torch.cat([state["sequences"], own[:, None]], dim=-1)
        if eos:
            unfinished = state["unfinished"] = unfinished & ~torch.isin(own, eos_t)
        if batch == 1:
            if not bool(unfinished.any()):
                return None
        else:
            now = unfinished.tolist()  # the loop's one host read per step
            if not any(now):
                return None
            if any(state["live"][i] and not now[i] for i in range(batch)):
                # A finished row, and every row mirroring one, mirrors a live row from now on.
                state["live"] = now
                src = now.index(True)
                dead = [i for i in range(rows) if i >= batch or not now[i]]
                mirror_rows(past, mask, base, dead, src)
                dst = torch.tensor(dead, device=device)
                for t in (ids, exit_top):
                    t.index_copy_(0, dst, t[src:src + 1].expand(len(dead), -1))
                state["index"] = torch.tensor([src if i in dead else i for i in range(rows)],
                                              device=device)
        return next_ids[state["index"]]

    if prompt_len >= 2:
        step_ids = input_ids[index]
        torch._dynamo.mark_dynamic(step_ids, 1)
        torch._dynamo.mark_dynamic(prompt_positions, 1)
        logits = fast._step(bucket, step_ids, prompt_positions, True)
        fast._count(batch, prompt_len, mask, unfinished, prompt_len)
        current = emit(sample_next(logits[:, -1, :], **sampling))
        start, produced = prompt_len, 1
    else:  # a one-token prompt is the first decode step's current token
        current = input_ids[index][:, 0]
        start, produced = 0, 0
    pending = 0
    widths = step_widths(width)
    narrowest = {m: next(w for w in widths if w > m) for m in range(width)}
    while current is not None and produced < max_new_tokens:
        m = pending
        position = start + m
        ids[:, m:] = current[:, None]
        step = _width(bucket, narrowest[m], width, ids, positions)
        if step.width != width:
            step.ids.copy_(ids[:, :step.width])
        torch.add(base[:, :step.width], start, out=step.positions)
        mask[:, position] = 1
        set_write_counters(counters, start)
        runner = step.runner
        if runner is None and m:
            # This width's first call compiles it with every slot live (the input is made
            # there); a pending token must not exit again, so this call is thrown away. It
            # wrote only exact K/V (every slot's input is its real token), which the next
            # call writes again.
            fast._step(bucket, step.ids, step.positions, False, holder=step)
            runner = step.runner = _deferred_runner(fast)
            set_write_counters(counters, start)
        if runner is not None:
            runner.live.copy_(one_hot[m, :step.width].expand_as(runner.live))
            runner.force_deep = m == width - 1
            wanted = fast.decode_threshold
            if wanted is not None and runner.threshold != wanted:
                runner.set_threshold(wanted)
        out = fast._step(bucket, step.ids, step.positions, False, holder=step)
        if runner is None:
            # The first step of width 1 (m == 0): its one slot was live; right as it is.
            runner = step.runner = _deferred_runner(fast)
        if step.width == width:
            bucket.runner = runner
        logits = out[:, m]
        _count_step(fast, batch, rows, step.width, m, state["unfinished"])
        next_ids = sample_next(logits, **sampling)
        if runner.reached_end:
            if m:
                own_rows = torch.zeros(rows, dtype=torch.bool, device=device)
                own_rows[:batch] = state["unfinished"]
                regrets = ((out[:, :m].argmax(-1) != exit_top[:, :m]) & own_rows[:, None]).sum()
                checked = m * (sum(state["live"]) if batch > 1 else 1)
                fast.tide_stats.record_regret(regrets, checked)
                if controller is not None:
                    raised = controller.update(regrets, checked, runner.threshold)
                    if raised is not None:
                        fast.decode_threshold = raised
            start, pending = position + 1, 0
        else:
            exit_top[:, m] = next_ids if greedy else logits.argmax(-1)
            pending = m + 1
        current = emit(next_ids)
        produced += 1
    bucket.complete = start
    return state["sequences"]


def _width(bucket: Any, w: int, width: int, ids: torch.Tensor,
           positions: torch.Tensor) -> StepWidth:
    """The bucket's decode step of width ``w``, made at its first use (the widest one reads
    the bucket's own buffers)."""
    step = bucket.widths.get(w)
    if step is None:
        if w == width:
            step = StepWidth(w, ids, positions)
        else:
            step = StepWidth(w, torch.zeros_like(ids[:, :w]), torch.zeros_like(positions[:, :w]))
        bucket.widths[w] = step
    return step


def _deferred_runner(fast: "TIDEModel") -> Any:
    runner = fast._deferred_backend.last.runner
    if getattr(runner, "live", None) is None:
        raise RuntimeError("the deferred decode step did not compile to a deferred runner "
                           "(see tide_compile.plan.plan)")
    return runner


def _count_step(fast: "TIDEModel", batch: int, rows: int, width: int, m: int,
                unfinished: torch.Tensor) -> None:
    """Count the step's current tokens of real, unfinished rows in ``fast.tide_stats``:
    their exit layer and the layers the step ran (its depth, shared by its slots)."""
    raw = fast._raw_stats
    exits = raw.last_exit_layers
    if exits is None:
        return
    depth = raw.last_layers_executed // max(1, exits.numel())
    current = exits.reshape(rows, width)[:batch, m]
    if batch > 1:  # a batch-1 loop stops when its row finishes: no mask (no device read)
        current = current.to(unfinished.device)[unfinished]
    fast.tide_stats.record(current, layers_executed=depth * int(current.numel()),
                           strategy=raw.last_strategy)
