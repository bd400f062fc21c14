"""TIDEConfig: the validated settings shared by calibration, the reference and the backend.

Every field here is read by code in this package; a field is added only together with
the code that reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .validation import TIDEError

__all__ = ["TIDEConfig", "checkpoint_layers", "EXIT_STRATEGIES"]

#: Values of :attr:`TIDEConfig.exit_strategy`.
EXIT_STRATEGIES = ("identity", "projection")


def checkpoint_layers(num_layers: int, checkpoint_interval: int, min_layers: int) -> list[int]:
    """Checkpoint layers for a model with ``num_layers`` decoder layers.

    ``c = k * checkpoint_interval - 1`` for k = 1, 2, ..., keeping those with
    ``c + 1 >= min_layers`` and ``c < num_layers - 1``: the final layer is never a
    checkpoint, since leaving after the last layer is not an exit.

    Raises:
        TIDEError: if no layer qualifies, naming the setting to lower (a ``ValueError``).
    """
    if num_layers < 2:
        raise TIDEError(
            f"a model with {num_layers} decoder layer(s) has no layer to exit at: "
            "early exit needs at least 2 layers"
        )
    layers = [
        c
        for c in range(checkpoint_interval - 1, num_layers - 1, checkpoint_interval)
        if c + 1 >= min_layers
    ]
    if not layers:
        hints = []
        if min_layers > 1:
            hints.append(f"lower min_layers (now {min_layers}) below {num_layers}")
        if checkpoint_interval >= num_layers:
            hints.append(
                f"lower checkpoint_interval (now {checkpoint_interval}) below {num_layers}"
            )
        if not hints:
            hints.append("lower checkpoint_interval or min_layers")
        raise TIDEError(
            f"no checkpoint layer for a {num_layers}-layer model with "
            f"checkpoint_interval={checkpoint_interval}, min_layers={min_layers} "
            f"(the final layer {num_layers - 1} is never a checkpoint): " + " or ".join(hints)
        )
    return layers


def _check_range(name: str, value: Any, lo: float, hi: float, *, integer: bool) -> None:
    kind = "an integer" if integer else "a number"
    if integer:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise TIDEError(f"TIDEConfig.{name} must be {kind} in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise TIDEError(f"TIDEConfig.{name} must be in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class TIDEConfig:
    """Settings for early exit.

    Attributes:
        exit_threshold: a token exits at the first checkpoint whose router score is
            strictly greater than this, in [0, 1]. 1.0 never exits.
        min_layers: no exit before this many layers have run (>= 1).
        checkpoint_interval: a checkpoint every this many layers (>= 1); see
            :func:`checkpoint_layers`.
        router_bottleneck_dim: hidden width of each router MLP (>= 1).
        calibration_samples: number of text samples (each up to the calibration
            ``max_length`` tokens) that :func:`tide_compile.calibrate` runs through the
            model (>= 1).
        calibration_dataset: default calibration text source when ``calibrate`` gets
            no ``dataset``: a local text file or folder, or a HuggingFace dataset name
            (None: ``calibrate`` must be given one).
        convergence_threshold: with calibration labels ``"cosine"``, a token counts as
            done at a checkpoint when the cosine similarity of ``final_norm(h_c)`` and
            ``final_norm(h_final)`` exceeds this, in [0, 1]. Unused by the default
            ``"agree"`` labels.
        exit_strategy: ``"identity"`` reads an exiting token out as
            ``lm_head(final_norm(h_c))``; ``"projection"`` calibrates a low-rank exit
            projection ``E_c`` per checkpoint and reads out ``lm_head(final_norm(E_c(h_c)))``.
        compaction_threshold: the ``compact`` strategy (and ``auto`` on dynamic-length
            StaticCache steps, e.g. a prefill) runs the layers after a checkpoint only
            on the continuing tokens when their fraction of the step falls below this,
            in [0, 1] (0: never compact).
    """

    exit_threshold: float = 0.85
    min_layers: int = 1
    checkpoint_interval: int = 4
    router_bottleneck_dim: int = 128
    calibration_samples: int = 2000
    calibration_dataset: str | None = None
    convergence_threshold: float = 0.95
    exit_strategy: str = "identity"
    compaction_threshold: float = 0.5

    def __post_init__(self) -> None:
        _check_range("exit_threshold", self.exit_threshold, 0.0, 1.0, integer=False)
        _check_range("min_layers", self.min_layers, 1, 1 << 20, integer=True)
        _check_range("checkpoint_interval", self.checkpoint_interval, 1, 1 << 20, integer=True)
        _check_range("router_bottleneck_dim", self.router_bottleneck_dim, 1, 1 << 16, integer=True)
        object.__setattr__(self, "exit_threshold", float(self.exit_threshold))
        _check_range("calibration_samples", self.calibration_samples, 1, 1 << 30, integer=True)
        if self.calibration_dataset is not None and (
            not isinstance(self.calibration_dataset, str) or not self.calibration_dataset.strip()
        ):
            raise TIDEError(
                "TIDEConfig.calibration_dataset must be None or a non-empty string (a local "
                f"text file or folder, or a HuggingFace dataset name), got {self.calibration_dataset!r}"
            )
        _check_range("convergence_threshold", self.convergence_threshold, 0.0, 1.0, integer=False)
        object.__setattr__(self, "convergence_threshold", float(self.convergence_threshold))
        _check_range("compaction_threshold", self.compaction_threshold, 0.0, 1.0, integer=False)
        object.__setattr__(self, "compaction_threshold", float(self.compaction_threshold))
        if self.exit_strategy not in EXIT_STRATEGIES:
            raise TIDEError(
                f"TIDEConfig.exit_strategy must be one of {', '.join(map(repr, EXIT_STRATEGIES))}, "
                f"got {self.exit_strategy!r}"
            )

    def checkpoint_layers(self, num_layers: int) -> list[int]:
        """This config's checkpoint layers for a ``num_layers``-layer model."""
        if self.min_layers > num_layers:
            raise TIDEError(
                f"TIDEConfig.min_layers={self.min_layers} is beyond the model's "
                f"{num_layers} layers: set min_layers to at most {num_layers - 1}"
            )
        return checkpoint_layers(num_layers, self.checkpoint_interval, self.min_layers)

    def replace(self, **changes: Any) -> "TIDEConfig":
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown TIDEConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TIDEConfig":
        """A config from :meth:`to_dict`'s output; unknown keys are ignored (files from
        newer versions), bad values raise :class:`TIDEError`."""
        if not isinstance(data, dict):
            raise TIDEError(f"a TIDEConfig needs a dict of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
