"""Routers: the only new parameters early exit adds to a model.

A :class:`TokenRouter` at checkpoint layer ``c`` scores a residual-stream state
``h_c``: ``score = sigmoid(W2 silu(W1 rms(h_c)))``, where ``rms`` is a parameter-free
RMS normalization (the same transform in calibration and inference, recorded in the
file). An optional :class:`ExitProjection` ``E_c`` maps ``h_c`` before the model's
final norm and lm_head. A :class:`RouterSet` holds one router per checkpoint plus the
metadata that ties it to one model, and is saved as safetensors with JSON metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import TIDEConfig
from .model_probe import ModelProbe, probe

__all__ = ["TokenRouter", "ExitProjection", "RouterSet", "FORMAT_VERSION"]

#: Version of the router file layout; bumped on any incompatible change.
FORMAT_VERSION = 1
_METADATA_KEY = "tide_compile"

# Forced routers push the logit this far: sigmoid gives exactly 0.0 or 1.0 in every dtype.
_FORCE_LOGIT = 1.0e4


class TokenRouter(nn.Module):
    """``score = sigmoid(W2 silu(W1 rms(h)))`` for each token's residual state ``h``.

    Computed in the router's own dtype (float32 unless moved), whatever the model's
    dtype, so scores and thresholds mean the same across model precisions.

    Args:
        hidden_size: width of the residual stream.
        bottleneck_dim: hidden width of the MLP.
        eps: epsilon of the parameter-free RMS normalization of the input.
    """

    def __init__(self, hidden_size: int, bottleneck_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.bottleneck_dim = bottleneck_dim
        self.eps = eps
        self.down = nn.Linear(hidden_size, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, 1)

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router's input transform: parameter-free RMS normalization, in fp32."""
        x = hidden.to(self.down.weight.dtype)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores, shape ``hidden.shape[:-1]``."""
        return self.up(nn.functional.silu(self.down(self.normalize(hidden)))).squeeze(-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exit scores in [0, 1], shape ``hidden.shape[:-1]``."""
        return torch.sigmoid(self.logits(hidden))


class ExitProjection(nn.Module):
    """Low-rank affine map applied to an exiting state: ``E(h) = h + up(down(h)) + b``.

    Initialized to the identity (``up`` and ``b`` zero).
    """

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)
        return (x + self.up(self.down(x))).to(hidden.dtype)


def _fingerprint(p: ModelProbe) -> dict[str, Any]:
    return {
        "model_class": p.architecture,
        "num_layers": p.num_layers,
        "hidden_size": p.hidden_size,
        "vocab_size": p.vocab_size,
        "norm_kind": p.norm_kind,
    }


class RouterSet(nn.Module):
    """One :class:`TokenRouter` per checkpoint layer, tied to one model.

    Args:
        routers: checkpoint layer -> router.
        model_info: the model fingerprint (``model_class``, ``num_layers``,
            ``hidden_size``, ``vocab_size``, ``norm_kind``), as from :meth:`describe`.
        config: the settings the routers were built or calibrated with.
        exit_projections: optional checkpoint layer -> :class:`ExitProjection`.
        calibration: free-form calibration settings, saved in the file.
        quality_table: per checkpoint and threshold quality rows, saved in the file.
    """

    def __init__(
        self,
        routers: Mapping[int, TokenRouter],
        *,
        model_info: Mapping[str, Any],
        config: TIDEConfig,
        exit_projections: Mapping[int, ExitProjection] | None = None,
        calibration: Mapping[str, Any] | None = None,
        quality_table: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if not routers:
            raise ValueError("a RouterSet needs at least one router")
        num_layers = int(model_info["num_layers"])
        layers = sorted(int(c) for c in routers)
        for c in layers:
            if not 0 <= c < num_layers - 1:
                raise ValueError(
                    f"router at layer {c} is not a valid checkpoint for a {num_layers}-layer "
                    f"model (checkpoints are 0 .. {num_layers - 2}; the final layer never is)"
                )
        extra = set(exit_projections or {}) - set(layers)
        if extra:
            raise ValueError(f"exit projections at layers {sorted(extra)} have no router")
        self.model_info: dict[str, Any] = dict(model_info)
        self.config = config
        self.routers = nn.ModuleDict({str(c): routers[c] for c in layers})
        self.exit_projections = nn.ModuleDict(
            {str(c): m for c, m in sorted((exit_projections or {}).items())}
        )
        self.calibration: dict[str, Any] = dict(calibration or {})
        self.quality_table: list[dict[str, Any]] = list(quality_table or [])

    # ------------------------------------------------------------------ access
    @property
    def checkpoint_layers(self) -> list[int]:
        """The checkpoint layers, ascending."""
        return [int(c) for c in self.routers]

    @property
    def num_layers(self) -> int:
        return int(self.model_info["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.model_info["hidden_size"])

    def router(self, layer: int) -> TokenRouter:
        """The router at checkpoint ``layer``."""
        try:
            return self.routers[str(layer)]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(
                f"no router at layer {layer}; checkpoints are {self.checkpoint_layers}"
            ) from None

    def exit_projection(self, layer: int) -> ExitProjection | None:
        """``E_c`` at checkpoint ``layer``, or None for the identity."""
        key = str(layer)
        return self.exit_projections[key] if key in self.exit_projections else None  # type: ignore[return-value]

    def score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Exit scores of ``hidden`` (``[..., hidden_size]``) at checkpoint ``layer``."""
        return self.router(layer)(hidden)

    def exit_state(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``E_c(h_c)``: the state an exiting token is read out from."""
        proj = self.exit_projection(layer)
        return hidden if proj is None else proj(hidden)

    # ------------------------------------------------------------------ model binding
    @staticmethod
    def describe(model: nn.Module | ModelProbe) -> dict[str, Any]:
        """The fingerprint a RouterSet records for ``model``."""
        return _fingerprint(model if isinstance(model, ModelProbe) else probe(model))

    def check_model(self, model: nn.Module | ModelProbe) -> None:
        """Raise ``ValueError`` if these routers were not made for ``model``."""
        actual = self.describe(model)
        diffs = [
            f"{key}: routers {self.model_info.get(key)!r}, model {actual[key]!r}"
            for key in ("model_class", "num_layers", "hidden_size", "vocab_size")
            if self.model_info.get(key) != actual[key]
        ]
        if diffs:
            raise ValueError(
                "these routers were made for another model (" + "; ".join(diffs) + "). "
                "Calibrate routers for this model with tide_compile.calibrate(model, ...)."
            )

    @classmethod
    def forced(
        cls,
        model: nn.Module,
        exit_at: int | None,
        config: TIDEConfig | None = None,
    ) -> "RouterSet":
        """Routers at the config's checkpoints that exit every token at ``exit_at``.

        Scores are exactly 1.0 at ``exit_at`` and exactly 0.0 elsewhere, so every token
        exits there for any ``exit_threshold < 1``. ``exit_at=None`` never exits. For
        tests and benchmarks.
        """
        config = config or TIDEConfig()
        p = probe(model)
        layers = config.checkpoint_layers(p.num_layers)
        if exit_at is not None and exit_at not in layers:
            raise ValueError(f"exit_at={exit_at} is not a checkpoint; checkpoints are {layers}")
        routers: dict[int, TokenRouter] = {}
        for c in layers:
            r = TokenRouter(p.hidden_size, config.router_bottleneck_dim)
            with torch.no_grad():
                for param in r.parameters():
                    param.zero_()
                r.up.bias.fill_(_FORCE_LOGIT if c == exit_at else -_FORCE_LOGIT)
            routers[c] = r
        device = next(model.parameters()).device
        return cls(
            routers,
            model_info=_fingerprint(p),
            config=config,
            calibration={"kind": "forced", "exit_at": exit_at},
        ).to(device)

    # ------------------------------------------------------------------ quality
    def threshold_for(self, target_agreement: float = 0.99, confidence: float = 0.9) -> float:
        """Smallest calibrated threshold whose held-out first-exit agreement meets the target.

        Agreement = fraction of exiting tokens whose exit-head top-1 equals the full
        model's, with the threshold applied at every checkpoint (first exit); it must
        hold as a lower confidence bound at ``confidence`` (0.5: the estimate itself).
        See :func:`tide_compile.calibration.quality.threshold_for`.
        """
        from .calibration import quality

        return quality.threshold_for(self.quality_table, target_agreement, confidence)

    def report(self) -> Any:
        """The held-out quality table (prints as text; ``.rows`` has the numbers)."""
        from .calibration import quality

        return quality.report(self)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw the quality table to ``path`` (needs matplotlib: the ``bench`` extra)."""
        from .calibration import quality

        quality.plot(self, os.fspath(path))

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored beside the tensors."""
        first = self.router(self.checkpoint_layers[0])
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model_info,
            "checkpoint_layers": self.checkpoint_layers,
            "router": {
                "input_transform": "rms",
                "eps": first.eps,
                "bottleneck_dim": first.bottleneck_dim,
            },
            "exit_projection_rank": {
                str(c): m.rank for c, m in self.exit_projections.items()  # type: ignore[union-attr]
            },
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "quality_table": self.quality_table,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the routers to ``path`` as safetensors with JSON metadata (no pickle)."""
        from safetensors.torch import save_file

        tensors = {
            f"routers.{k}": v.detach().to("cpu").contiguous()
            for k, v in self.routers.state_dict().items()
        }
        tensors.update(
            {
                f"exit_projections.{k}": v.detach().to("cpu").contiguous()
                for k, v in self.exit_projections.state_dict().items()
            }
        )
        save_file(tensors, os.fspath(path), metadata={_METADATA_KEY: json.dumps(self.metadata())})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> "RouterSet":
        """Read routers written by :meth:`save`.

        Args:
            path: the router file.
            model: if given, checked against the file's fingerprint (a mismatch raises
                ``ValueError``), and the routers are placed on the model's device.
            device: where to put the routers (default: the model's device, else CPU).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no router file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path!r} is not a safetensors router file: {exc}") from exc
        if _METADATA_KEY not in raw_meta:
            raise ValueError(f"{path!r} is a safetensors file but not a tide_compile router file")
        meta = json.loads(raw_meta[_METADATA_KEY])
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path!r} has router format version {version}; this tide_compile reads "
                f"version {FORMAT_VERSION}. Recalibrate, or use the tide_compile that wrote it."
            )
        info = meta["model"]
        rcfg = meta["router"]
        routers = {
            c: TokenRouter(int(info["hidden_size"]), int(rcfg["bottleneck_dim"]), float(rcfg["eps"]))
            for c in meta["checkpoint_layers"]
        }
        projections = {
            int(c): ExitProjection(int(info["hidden_size"]), int(rank))
            for c, rank in meta.get("exit_projection_rank", {}).items()
        }
        obj = cls(
            routers,
            model_info=info,
            config=TIDEConfig.from_dict(meta.get("config", {})),
            exit_projections=projections,
            calibration=meta.get("calibration"),
            quality_table=meta.get("quality_table"),
        )
        obj.routers.load_state_dict(
            {k[len("routers.") :]: v for k, v in tensors.items() if k.startswith("routers.")}
        )
        obj.exit_projections.load_state_dict(
            {
                k[len("exit_projections.") :]: v
                for k, v in tensors.items()
                if k.startswith("exit_projections.")
            }
        )
        if model is not None:
            obj.check_model(model)
            if device is None:
                device = next(model.parameters()).device
        return obj.to(device or "cpu")

    def extra_repr(self) -> str:
        return (
            f"model={self.model_info.get('model_class')}, layers={self.num_layers}, "
            f"checkpoints={self.checkpoint_layers}"
        )
