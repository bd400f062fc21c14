"""ExitStats: where tokens left the model, and how many layers really ran."""

from __future__ import annotations

import torch

__all__ = ["ExitStats"]


class ExitStats:
    """Counters of early exits.

    A token's *depth* is the number of decoder layers its output was computed from:
    ``c + 1`` if it exited at checkpoint ``c``, else ``num_layers``. ``layers_executed``
    counts the token-layers that actually ran (a strategy that runs all layers and then
    selects counts every layer), so ``layers_executed / total_tokens`` against
    ``mean_depth`` shows what a strategy saved.

    Exit layers recorded from an accelerator are kept there (a copy) and counted when
    ``exits_per_layer`` (or anything derived from it) is read, so a decode step does not
    wait for the device to count its exits.

    Attributes:
        num_layers: decoder layers in the model.
        total_tokens: tokens whose outputs were produced.
        exits_per_layer: checkpoint layer -> tokens that exited there.
        layers_executed: token-layers that ran (full layers; KV-fill not included).
        steps_by_strategy: strategy -> steps (calls) that ran it (``"skip"``, ``"frozen"``,
            ``"compact"``); steps recorded without a strategy are not in it.
        last_exit_layers / last_layers_executed / last_strategy: of the latest
            :meth:`record` call.
        regret_checked: exited tokens whose full-depth top-1 was computed afterwards
            (``kv="deferred"``: the deep step that runs a pending token's skipped layers
            yields its full-depth logits at no extra cost).
        regret_rate: of those, the fraction whose exit top-1 differed (exit regret);
            None before any was checked.
    """

    #: pending device tensors are counted once this many have accumulated
    _FLUSH_EVERY = 256

    def __init__(self, num_layers: int, total_tokens: int = 0,
                 exits_per_layer: dict[int, int] | None = None,
                 layers_executed: int = 0,
                 steps_by_strategy: dict[str, int] | None = None) -> None:
        self.num_layers = num_layers
        self.total_tokens = total_tokens
        self.layers_executed = layers_executed
        self.steps_by_strategy: dict[str, int] = dict(steps_by_strategy or {})
        self._exits: dict[int, int] = dict(exits_per_layer or {})
        self._pending: list[torch.Tensor] = []
        self.last_exit_layers: torch.Tensor | None = None
        self.last_layers_executed = 0
        self.last_strategy: str | None = None
        self.regret_checked = 0
        self._regrets: int | torch.Tensor = 0

    @property
    def exits_per_layer(self) -> dict[int, int]:
        self._flush()
        return self._exits

    @exits_per_layer.setter
    def exits_per_layer(self, value: dict[int, int]) -> None:
        self._pending = []
        self._exits = dict(value)

    def record(self, exit_layers: torch.Tensor, layers_executed: int | None = None,
               strategy: str | None = None) -> None:
        """Add a step's tokens.

        Args:
            exit_layers: per token, the checkpoint it exited at, or -1 for no exit
                (any shape; padding must already be removed).
            layers_executed: token-layers that ran in this step; defaults to the sum
                of the tokens' depths (a path that really skipped every exited layer;
                this reads the device at once).
            strategy: the strategy the step ran (counted in ``steps_by_strategy``).
        """
        t = exit_layers.detach()
        n = int(t.numel())
        if layers_executed is None or t.device.type == "cpu":
            flat = t.reshape(-1).to("cpu", torch.int64)
            self._count(flat)
            if layers_executed is None:
                exited = flat[flat >= 0]
                layers_executed = (int((exited + 1).sum())
                                   + (n - int(exited.numel())) * self.num_layers)
        else:
            # A copy: the caller's tensor may be a CUDA-graph buffer the next step rewrites.
            self._pending.append(t.reshape(-1).clone())
            if len(self._pending) >= self._FLUSH_EVERY:
                self._flush()
        self.total_tokens += n
        self.layers_executed += int(layers_executed)
        self._step(strategy)
        self.last_exit_layers = t
        self.last_layers_executed = int(layers_executed)

    def _step(self, strategy: str | None, steps: int = 1) -> None:
        self.last_strategy = strategy
        if strategy is not None:
            self.steps_by_strategy[strategy] = self.steps_by_strategy.get(strategy, 0) + steps

    def _count(self, flat: torch.Tensor) -> None:
        exited = flat[flat >= 0]
        if exited.numel():
            layers, counts = torch.unique(exited, return_counts=True)
            for layer, count in zip(layers.tolist(), counts.tolist()):
                self._exits[layer] = self._exits.get(layer, 0) + count

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._count(torch.cat([p.to(torch.int64) for p in pending]).cpu())

    def record_uniform(self, exit_layer: int, tokens: int, layers_executed: int,
                       strategy: str | None = None, steps: int = 1) -> None:
        """Add ``tokens`` tokens that all exited at ``exit_layer`` (-1: none), without
        reading any device tensor (the runner already knows); ``steps``: how many steps
        of ``strategy`` they took (a run of steps counted at once)."""
        if exit_layer >= 0:
            self._exits[exit_layer] = self._exits.get(exit_layer, 0) + tokens
        self.total_tokens += tokens
        self.layers_executed += int(layers_executed)
        self._step(strategy, steps)
        self.last_exit_layers = torch.full((tokens,), exit_layer, dtype=torch.int64)
        self.last_layers_executed = int(layers_executed)

    def record_regret(self, regrets: torch.Tensor | int, checked: int) -> None:
        """Add ``checked`` exited tokens whose full-depth top-1 is now known, ``regrets``
        of them different from their exit top-1 (a device tensor is added on the
        device: no host read until :attr:`regrets` is)."""
        self.regret_checked += int(checked)
        if isinstance(regrets, torch.Tensor):
            regrets = regrets.detach().to(torch.int64)
            self._regrets = regrets + self._regrets if isinstance(self._regrets, torch.Tensor) \
                else regrets + int(self._regrets)
        else:
            self._regrets = self._regrets + int(regrets)

    @property
    def regrets(self) -> int:
        """Checked exited tokens whose exit top-1 differed from the full model's."""
        return int(self._regrets)

    @property
    def regret_rate(self) -> float | None:
        """``regrets / regret_checked``; None before any exited token was checked."""
        return self.regrets / self.regret_checked if self.regret_checked else None

    def merge(self, other: "ExitStats") -> None:
        """Add ``other``'s counts to these."""
        if other.num_layers != self.num_layers:
            raise ValueError(
                f"cannot merge stats of a {other.num_layers}-layer model into {self.num_layers}"
            )
        self.total_tokens += other.total_tokens
        self.layers_executed += other.layers_executed
        for strategy, steps in other.steps_by_strategy.items():
            self.steps_by_strategy[strategy] = self.steps_by_strategy.get(strategy, 0) + steps
        for layer, count in other.exits_per_layer.items():
            self._exits[layer] = self._exits.get(layer, 0) + count
        if other.regret_checked:
            self.record_regret(other.regrets, other.regret_checked)

    def reset(self) -> None:
        self.last_exit_layers = None
        self.last_layers_executed = 0
        self.last_strategy = None
        self.steps_by_strategy = {}
        self.total_tokens = 0
        self._exits = {}
        self._pending = []
        self.layers_executed = 0
        self.regret_checked = 0
        self._regrets = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExitStats):
            return NotImplemented
        return (self.num_layers, self.total_tokens, self.exits_per_layer, self.layers_executed) \
            == (other.num_layers, other.total_tokens, other.exits_per_layer, other.layers_executed)

    def __repr__(self) -> str:
        return (f"ExitStats(num_layers={self.num_layers}, total_tokens={self.total_tokens}, "
                f"exits_per_layer={self.exits_per_layer}, "
                f"layers_executed={self.layers_executed}, "
                f"steps_by_strategy={self.steps_by_strategy})")

    @property
    def exited_tokens(self) -> int:
        return sum(self.exits_per_layer.values())

    @property
    def ran_all_layers(self) -> int:
        """Tokens that did not exit."""
        return self.total_tokens - self.exited_tokens

    @property
    def exit_rate(self) -> float:
        """Fraction of tokens that exited early (0.0 when no tokens)."""
        return self.exited_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def mean_depth(self) -> float:
        """Mean number of layers each token's output was computed from."""
        if not self.total_tokens:
            return 0.0
        depth = sum((layer + 1) * n for layer, n in self.exits_per_layer.items())
        depth += self.ran_all_layers * self.num_layers
        return depth / self.total_tokens

    @property
    def mean_layers_executed(self) -> float:
        """Mean token-layers that ran per token."""
        return self.layers_executed / self.total_tokens if self.total_tokens else 0.0

    def summary(self) -> str:
        """Human-readable summary in the prior TIDE format, plus depth."""
        n = self.total_tokens

        def pct(k: int) -> str:
            return f"{100.0 * k / n:.1f}%" if n else "0.0%"

        lines = [f"Total tokens: {n}, Exited: {self.exited_tokens} ({pct(self.exited_tokens)})"]
        for layer in sorted(self.exits_per_layer):
            k = self.exits_per_layer[layer]
            lines.append(f"  Layer {layer}: {k} ({pct(k)})")
        lines.append(f"Ran all layers: {self.ran_all_layers}")
        lines.append(f"Mean depth: {self.mean_depth:.2f} / {self.num_layers} layers")
        lines.append(
            f"Layers executed per token: {self.mean_layers_executed:.2f} / {self.num_layers}"
        )
        if self.regret_checked:
            lines.append(f"Exit regret: {self.regrets} of {self.regret_checked} checked exits "
                         f"({100.0 * (self.regret_rate or 0.0):.1f}%) differ from the full "
                         "model's top-1")
        if self.steps_by_strategy:
            lines.append("Steps by strategy: " + ", ".join(
                f"{name} {steps}" for name, steps in sorted(self.steps_by_strategy.items())))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
