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

__all__ = ["generate_deferred", "RegretController", "set_write_counters", "counter_values",
           "step_widths", "StepWidth"]


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


def set_write_counters(counters: list[torch.Tensor], start: int,
                       values: torch.Tensor | None = None) -> None:
    """Every layer's write counter to ``start``, in place (compiled graphs hold their
    addresses). With ``values`` (:func:`counter_values`: ``values[i] == i``) one
    multi-tensor copy of ``values[start]`` into every counter; else two multi-tensor
    kernels (multiply by 0, add ``start``)."""
    if not counters:
        return
    if values is not None:
        torch._foreach_copy_(counters, [values[start]] * len(counters))
    else:
        torch._foreach_mul_(counters, 0)
        torch._foreach_add_(counters, start)


def counter_values(counters: list[torch.Tensor], length: int) -> torch.Tensor | None:
    """``0 .. length`` on the counters' device and in their dtype, for
    :func:`set_write_counters`; None when the counters are not all 0-d tensors of one
    device and dtype (the two-kernel form then)."""
    if not counters:
        return None
    first = counters[0]
    if any(c.dim() != 0 or c.device != first.device or c.dtype != first.dtype
           for c in counters):
        return None
    return torch.arange(length + 1, dtype=first.dtype, device=first.device)


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
    by the caller. Returns ``[batch, prompt + new]``.

    Host work per step (docs/deferred.md, "Host work per step"): the step's inputs are
    written in place, the current token's slots every step, the rest only when they
    changed since that width last ran (the pending tokens when the width grew, the
    positions when ``start`` moved, the live slot); the write counters take one copy
    kernel; the tokens go into a preallocated output; a batch-1 step that stopped is
    counted from its depth; the deep steps' regret counts reach ``tide_stats`` summed,
    when the loop ends.

    End of sequence at batch 1: whether the token a step emitted is EOS is copied into
    pinned host memory behind an event (:class:`~.model._LaggedFlag`) and read one step
    late, right after the next step's runner call returned: the host never waits for
    the GPU between two steps for it. A row that ended thus runs one more step (stopped
    or deep, forced or not). The loop leaves it at once: its token is dropped, and none
    of it reaches ``tide_stats`` (exits, layers, strategy steps, regret), the
    controller, or ``bucket.complete``; the runner's own record of it stays in the raw
    stats. Batches of more rows read ``unfinished`` after every step (they need it to
    mirror finished rows).
    """
    from .model import _LaggedFlag, cache_bucket, mirror_rows

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
    starts = counter_values(counters, cache_len)
    # Position of cache index j >= prompt_len - 1, per row: last_position + j - (prompt_len - 1);
    # base[r, i] + start is slot i's position in a step that starts at cache index start.
    base = prompt_positions[:, -1:] + (1 - prompt_len) + torch.arange(width, device=device)
    # live[:, m] only: one row of these per step (one copy instead of a fill and a write)
    one_hot = torch.eye(width, dtype=torch.bool, device=device)
    greedy = not sampling.get("do_sample", False)
    ids, positions = bucket.ids, bucket.positions
    # Greedy: a pending token's exit top-1 is the token it emitted, which the step holds in
    # the next slot; sampling keeps the exit heads' top-1 here.
    exit_top = None if greedy else torch.zeros(rows, width, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    # Batch 1: whether the last token was EOS is read one step late (_LaggedFlag), after
    # the next step was launched, so the host does not wait for the GPU between two steps.
    lagged = _LaggedFlag(device) if batch == 1 and eos else None
    # The tokens, written in place (no growing concatenation); the first `emitted` columns
    # after the prompt are returned.
    sequences = torch.empty(batch, prompt_len + max_new_tokens,
                            dtype=torch.promote_types(input_ids.dtype, torch.long), device=device)
    sequences[:, :prompt_len] = input_ids
    # Per deep step with pending tokens, its regret count (summed into tide_stats at the end).
    regret_counts = torch.zeros(max_new_tokens, dtype=torch.long, device=device)
    state: dict[str, Any] = {
        "live": [True] * batch, "index": index, "unfinished": unfinished, "emitted": 0,
        # bucket rows whose pending tokens are checked, while some row has finished
        "own": None,
        # index is the identity (no row mirrors another): no gather for the next tokens
        "identity": rows == batch,
        # the ids buffer of the last step (its pending tokens), for mirroring
        "ids": None,
    }
    # What each width's buffers hold in this generate (skip rewriting what is there).
    positions_at: dict[int, int] = {}   # width -> the start its positions were written for
    live_slot: dict[int, int] = {}      # width -> the slot its runner's live input holds

    def emit(next_ids: torch.Tensor) -> torch.Tensor | None:
        """Append the rows' tokens; the next current tokens (mirrors included), or None
        when every row has finished."""
        column = prompt_len + state["emitted"]
        state["emitted"] += 1
        if batch == 1:
            # The row is unfinished (the loop stops when it finishes), and rows == 1: its
            # token as it is, the next current token as it is. Whether it is EOS is read
            # after the next step (the loop's one flag read per step, one step late).
            sequences.select(1, column).copy_(next_ids)
            if lagged is not None:
                lagged.record(next_ids != eos[0] if len(eos) == 1
                              else torch.isin(next_ids, eos_t, invert=True))
            return next_ids
        unfinished = state["unfinished"]
        own = torch.where(unfinished, next_ids[:batch],
                          torch.full_like(next_ids[:batch], pad_token_id))
        sequences[:, column] = own
        if eos:
            unfinished = state["unfinished"] = unfinished & ~torch.isin(own, eos_t)
            now = unfinished.tolist()  # the loop's one host read per step
            if not any(now):
                return None
            if any(state["live"][i] and not now[i] for i in range(batch)):
                # A finished row, and every row mirroring one, mirrors a live row from now on.
                state["live"] = now
                src = now.index(True)
                dead = [i for i in range(rows) if i >= batch or not now[i]]
                mirror_rows(past, mask, base, dead, src)
                positions_at.clear()  # base moved
                dst = torch.tensor(dead, device=device)
                for t in (state["ids"], exit_top):
                    if t is not None:
                        t.index_copy_(0, dst, t[src:src + 1].expand(len(dead), -1))
                state["index"] = torch.tensor([src if i in dead else i for i in range(rows)],
                                              device=device)
                state["identity"] = False
                state["own"] = torch.tensor([i < batch and now[i] for i in range(rows)],
                                            device=device)
        return next_ids if state["identity"] else next_ids[state["index"]]

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
    previous: StepWidth | None = None
    deep_steps, checked_total = 0, 0
    try:
        while current is not None and produced < max_new_tokens:
            m = pending
            position = start + m
            step = _width(bucket, narrowest[m], width, ids, positions)
            if m and previous is not step:
                # The width grew: the pending tokens move over from the last step's buffer.
                step.ids[:, :m].copy_(previous.ids[:, :m])
            step.ids.narrow(1, m, step.width - m).copy_(current[:, None])
            state["ids"] = step.ids
            previous = step
            if positions_at.get(step.width) != start:
                torch.add(base[:, :step.width], start, out=step.positions)
                positions_at[step.width] = start
            mask.select(1, position).fill_(1)
            set_write_counters(counters, start, starts)
            runner = step.runner
            if runner is None and m:
                # This width's first call compiles it with every slot live (the input is made
                # there); a pending token must not exit again, so this call is thrown away. It
                # wrote only exact K/V (every slot's input is its real token), which the next
                # call writes again.
                fast._step(bucket, step.ids, step.positions, False, holder=step)
                runner = step.runner = _deferred_runner(fast)
                set_write_counters(counters, start, starts)
            if runner is not None:
                if live_slot.get(step.width) != m:
                    runner.live.copy_(one_hot[m, :step.width].expand_as(runner.live))
                    live_slot[step.width] = m
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
            if lagged is not None and lagged.done():
                # The last emitted token was EOS: this step ran after the row ended. Nothing
                # of it is kept: its token is dropped, its exits are not counted (what the
                # runner recorded stays in the raw stats only), and a deep step's regret,
                # controller update and completed positions are not recorded (start keeps
                # its value, so bucket.complete is what it is without this step).
                break
            logits = out[:, m]
            stopped = not runner.reached_end
            _count_step(fast, batch, rows, step.width, m,
                        None if state["own"] is None else state["unfinished"], stopped)
            next_ids = sample_next(logits, **sampling)
            if not stopped:
                if m:
                    top = step.ids[:, 1:m + 1] if greedy else exit_top[:, :m]
                    differ = out[:, :m].argmax(-1) != top
                    if batch > 1:
                        differ = differ[:batch] if state["own"] is None \
                            else differ & state["own"][:, None]
                    regrets = regret_counts[deep_steps]
                    torch.sum(differ, dim=(0, 1), out=regrets)
                    deep_steps += 1
                    checked = m * (sum(state["live"]) if batch > 1 else 1)
                    checked_total += checked
                    if controller is not None:
                        raised = controller.update(regrets, checked, runner.threshold)
                        if raised is not None:
                            fast.decode_threshold = raised
                start, pending = position + 1, 0
            else:
                if not greedy:
                    exit_top[:, m] = logits.argmax(-1)
                pending = m + 1
            current = emit(next_ids)
            produced += 1
    finally:
        if deep_steps:
            fast.tide_stats.record_regret(regret_counts[:deep_steps].sum(), checked_total)
    bucket.complete = start
    return sequences[:, :prompt_len + state["emitted"]].contiguous()


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
                unfinished: torch.Tensor | None, stopped: bool = False) -> None:
    """Count the step's current tokens of real, unfinished rows in ``fast.tide_stats``:
    their exit layer and the layers the step ran (its depth, shared by its slots).
    ``unfinished``: the rows to count, None while every row is unfinished.

    ``stopped``: the step stopped at a checkpoint. At batch 1 its one current token then
    exited at that checkpoint, the step's depth - 1 (a step stops at the first checkpoint
    where every live token has exited, and a forced deep step never stops): counted
    without the exit layers tensor (no device copy, nothing to count later), as is a
    batch-1 token whose exit layer the runner recorded on the host."""
    raw = fast._raw_stats
    exits = raw.last_exit_layers
    if exits is None:
        return
    depth = raw.last_layers_executed // max(1, exits.numel())
    if stopped and batch == 1:
        fast.tide_stats.record_uniform(depth - 1, 1, depth, strategy=raw.last_strategy)
        return
    if batch == 1 and exits.device.type == "cpu":  # a host record: one host value
        fast.tide_stats.record_uniform(int(exits.reshape(rows, width)[0, m]), 1, depth,
                                       strategy=raw.last_strategy)
        return
    current = exits.reshape(rows, width)[:batch, m]
    if unfinished is not None:  # a row has finished (a batch-1 loop stops then)
        current = current.to(unfinished.device)[unfinished]
    fast.tide_stats.record(current, layers_executed=depth * int(current.numel()),
                           strategy=raw.last_strategy)
