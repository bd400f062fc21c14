"""Strategy ``auto`` for one-token steps on CUDA graphs: skip, or one graph, per step.

The skip runner reads a flag on the host after every checkpoint and stops when every row
of the step has exited. That pays when whole steps exit (batch-1 decode); in a batch
where some row almost always continues, the reads and the graph boundaries are cost
without return. Measured on the H200 (Llama-3.1-8B shape, bf16, a fraction ``f`` of each
row's tokens exiting at layer 16 of 32; ``benchmarks/RESULTS.md``): against Inductor,
1.34x at batch 1 and ``f`` = 0.5, 1.19x at batch 8 and ``f`` = 0.9, but 0.91x at batch
16 and ``f`` = 0.5, where no step skipped.

:class:`AdaptiveSkipRunner` holds two runners of the same step: the skip runner, and the
``through`` runner, the whole inserted graph as one piece (the frozen strategy's one
captured graph, no host read; identical outputs, as frozen equals skip). Per step it
runs the skip runner while the recent steps say skipping saves enough, else the through
runner. What a step could have saved is known from its exit layers whichever runner ran
it: a step whose rows all exited by checkpoint ``c`` skips the ``L - c - 1`` later layers,
a fraction ``(L - c - 1) / L`` of the step. The runner keeps an exponential average of
that fraction over steps (``decay``) and uses the skip runner while it is at least
``min_gain``. The through runner's exit layers are read one step late, from a
non-blocking copy, when that copy has arrived (no host sync of its own).

``min_gain`` 0.10 is set from the measurements above: with it, all eight batch/``f``
rows of that run would pick the faster path (skip where it won: batch 1 at ``f`` 0.5 and
0.9, batch 4 and 8 at 0.9; one graph where it lost or tied: batch 4, 8, 16 at 0.5 and 16
at 0.9), assuming the one graph costs what Inductor's step does. Not yet measured as such.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AdaptiveSkipRunner", "saved_fraction"]


def saved_fraction(exit_layer: torch.Tensor, num_layers: int) -> float:
    """The fraction of a step's layers the skip runner leaves out for these exit layers
    (a CPU tensor of checkpoint indices, -1 for a token that did not exit): ``(L - c -
    1) / L`` for the latest checkpoint ``c`` of any row when every row exited, else 0."""
    values = exit_layer.reshape(-1).tolist()
    if not values or min(values) < 0:
        return 0.0
    return (num_layers - max(values) - 1) / num_layers


class AdaptiveSkipRunner:
    """Run each one-token step with ``skip`` or ``through``; see the module docstring.

    Args:
        skip: the skip runner (a :class:`~.cudagraphs.GraphedSkipRunner`, or on CPU in
            tests a :class:`~.runner.SkipRunner`).
        through: the same step as one piece with no cuts (``strategy == "frozen"``).
        num_layers: decoder layers of the model.
        min_gain: use ``skip`` while the average saved fraction is at least this.
        decay: weight of the past in the average, per step.
    """

    strategy = "skip"

    def __init__(self, skip: Any, through: Any, num_layers: int, min_gain: float = 0.10,
                 decay: float = 0.9) -> None:
        self.skip = skip
        self.through = through
        self.num_layers = num_layers
        self.min_gain = float(min_gain)
        self.decay = float(decay)
        #: the average saved fraction; starts where the skip runner is tried first
        self.gain = 2 * self.min_gain
        #: "skip" or "through": the runner of the last call
        self.last_path: str | None = None
        #: calls per path
        self.calls = {"skip": 0, "through": 0}
        # CUDA: the last step's exit layers, copied to pinned memory without a sync;
        # observed at the next call once `_copied` has completed.
        self._host: torch.Tensor | None = None
        self._copied: Any = None
        self._pending = False

    def _observe(self, exit_layer: torch.Tensor) -> None:
        saved = saved_fraction(exit_layer, self.num_layers)
        self.gain = self.decay * self.gain + (1.0 - self.decay) * saved

    def _observe_pending(self) -> None:
        if not self._pending or not self._copied.query():
            return  # nothing new, or not arrived yet: this step's decision goes without it
        self._pending = False
        self._observe(self._host)

    def __call__(self, *args: Any) -> Any:
        self._observe_pending()
        path = "skip" if self.gain >= self.min_gain else "through"
        runner = self.skip if path == "skip" else self.through
        out = runner(*args)
        exit_layer = _inner(runner).last_exit_layer
        if exit_layer is not None:
            if exit_layer.is_cuda:
                if self._host is None or self._host.shape != exit_layer.shape:
                    self._host = torch.empty(exit_layer.shape, dtype=exit_layer.dtype,
                                             pin_memory=True)
                    self._copied = torch.cuda.Event()
                self._host.copy_(exit_layer, non_blocking=True)
                self._copied.record()
                self._pending = True
            else:
                self._observe(exit_layer)
        self.last_path = path
        self.calls[path] += 1
        return out


def _inner(runner: Any) -> Any:
    """The runner that records ``last_exit_layer`` (a graphed runner's wrapped one)."""
    return getattr(runner, "runner", runner)
