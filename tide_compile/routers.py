"""Routers: the only new parameters early exit adds to a model.

A :class:`TokenRouter` at checkpoint layer ``c`` scores a residual-stream state
``h_c``: ``score = sigmoid(W2 silu(W1 rms(h_c)))``, where ``rms`` is a parameter-free
RMS normalization (the same transform in calibration and inference, recorded in the
file). A router may also read the exit head's confidence over a few candidate tokens
(``score = sigmoid(W2 silu(W1 rms(h_c) + F f_c))``, :mod:`.confidence`); its
:class:`RouterSet` then holds the successor table the candidates come from. An optional :class:`ExitProjection` ``E_c`` maps ``h_c`` before the model's
final norm and lm_head. A :class:`RouterSet` holds one router per checkpoint plus the
metadata that ties it to one model, and is saved as safetensors with JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import TIDEConfig
from .confidence import COLUMNS, exit_head_features
from .model_probe import ModelProbe, probe
from .validation import TIDEError, routers_mismatch

__all__ = ["TokenRouter", "ExitProjection", "RouterSet", "FORMAT_VERSION", "RouterFileError",
           "FORCE_LOGIT"]

#: Version of the router file layout; bumped on any incompatible change.
FORMAT_VERSION = 1
_METADATA_KEY = "tide_compile"
#: Metadata key of the tensors' SHA-256 (files written before it existed load without).
_CHECKSUM_KEY = "tensors_sha256"

# Bounds of what RouterSet.load reads: memory stays within a small multiple of the
# file's size, and the file's size within this (an 8B-shaped model's routers with rank-64
# exit projections at 16 checkpoints take about 70 MB).
MAX_FILE_BYTES = 2 << 30
MAX_HEADER_BYTES = 16 << 20
_MAX_LAYERS = 1 << 16
_MAX_WIDTH = 1 << 20
_MAX_BOTTLENECK = 1 << 16
# safetensors dtype names read in router files.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32}


class RouterFileError(TIDEError):
    """A router file that cannot be used: damaged, not a router file, or inconsistent."""

#: Forced routers push the logit this far: sigmoid gives exactly 0.0 or 1.0 in every dtype.
FORCE_LOGIT = 1.0e4


class TokenRouter(nn.Module):
    """``score = sigmoid(W2 silu(W1 rms(h) [+ F f]))`` for each token's residual state ``h``.

    Computed in the router's own dtype (float32 unless moved), whatever the model's
    dtype, so scores and thresholds mean the same across model precisions.

    Args:
        hidden_size: width of the residual stream.
        bottleneck_dim: hidden width of the MLP.
        eps: epsilon of the parameter-free RMS normalization of the input.
        feature_dim: width of the extra feature input ``f`` (0: none). With features the
            router also reads :func:`~tide_compile.confidence.confidence_features` through
            ``feat`` (``F``, no bias), which calibration trains on standardized features
            and then folds the standardization into.
    """

    def __init__(self, hidden_size: int, bottleneck_dim: int, eps: float = 1e-6,
                 feature_dim: int = 0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.bottleneck_dim = bottleneck_dim
        self.eps = eps
        self.feature_dim = feature_dim
        self.down = nn.Linear(hidden_size, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, 1)
        self.feat = nn.Linear(feature_dim, bottleneck_dim, bias=False) if feature_dim else None

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router's input transform: parameter-free RMS normalization, in fp32."""
        x = hidden.to(self.down.weight.dtype)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def logits(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-sigmoid scores, shape ``hidden.shape[:-1]``; ``features`` (``[..., feature_dim]``)
        is required by a router with features and refused by one without."""
        a = self.down(self.normalize(hidden))
        if self.feat is not None:
            if features is None:
                raise TIDEError("this router reads confidence features: score it through "
                                "RouterSet.score(layer, hidden, features) with "
                                "RouterSet.confidence(...)")
            a = a + self.feat(features.to(a.dtype))
        elif features is not None:
            raise TIDEError("this router reads no features; pass features=None")
        return self.up(nn.functional.silu(a)).squeeze(-1)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Exit scores in [0, 1], shape ``hidden.shape[:-1]``."""
        return torch.sigmoid(self.logits(hidden, features))


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
        successor: ``[vocab_size, k]`` int64 candidate table
            (:func:`~tide_compile.confidence.successor_table`); required exactly when
            the routers read confidence features (``feature_dim`` 5).
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
        successor: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not routers:
            raise TIDEError("a RouterSet needs at least one router")
        num_layers = int(model_info["num_layers"])
        layers = sorted(int(c) for c in routers)
        for c in layers:
            if not 0 <= c < num_layers - 1:
                raise TIDEError(
                    f"router at layer {c} is not a valid checkpoint for a {num_layers}-layer "
                    f"model (checkpoints are 0 .. {num_layers - 2}; the final layer never is)"
                )
        extra = set(exit_projections or {}) - set(layers)
        if extra:
            raise TIDEError(f"exit projections at layers {sorted(extra)} have no router")
        dims = {routers[c].feature_dim for c in layers}
        if len(dims) > 1 or dims - {0, len(COLUMNS)}:
            raise TIDEError(f"routers read {sorted(dims)} feature columns; all read 0 or all "
                            f"read {len(COLUMNS)} ({', '.join(COLUMNS)})")
        if (successor is not None) != (dims == {len(COLUMNS)}):
            raise TIDEError("a successor table is given exactly when the routers read confidence "
                            "features" + (" (they do, and none is given)" if successor is None
                                          else " (they do not)"))
        if successor is not None:
            vocab = model_info.get("vocab_size")
            if (successor.dim() != 2 or successor.dtype != torch.int64 or successor.shape[1] < 2
                    or successor.shape[0] != vocab):
                raise TIDEError(f"the successor table must be int64 [vocab_size={vocab}, k >= 2], "
                                f"got {successor.dtype} {list(successor.shape)}")
            if successor.device.type != "meta" and successor.numel() and not (
                    0 <= int(successor.min()) and int(successor.max()) < successor.shape[0]):
                raise TIDEError("the successor table holds token ids outside the vocabulary")
        self.model_info: dict[str, Any] = dict(model_info)
        self.config = config
        self.routers = nn.ModuleDict({str(c): routers[c] for c in layers})
        self.exit_projections = nn.ModuleDict(
            {str(c): m for c, m in sorted((exit_projections or {}).items())}
        )
        self.calibration: dict[str, Any] = dict(calibration or {})
        self.quality_table: list[dict[str, Any]] = list(quality_table or [])
        self.successor: torch.Tensor | None
        self.register_buffer("successor", successor)

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

    @property
    def features(self) -> tuple[str, ...]:
        """What the routers read: ``("rms",)``, or ``("rms", "conf")`` with confidence features."""
        return ("rms",) if self.successor is None else ("rms", "conf")

    @property
    def confidence_k(self) -> int | None:
        """Candidates per token of the confidence features (None without them)."""
        return None if self.successor is None else int(self.successor.shape[1])

    def score(self, layer: int, hidden: torch.Tensor,
              features: torch.Tensor | None = None) -> torch.Tensor:
        """Exit scores of ``hidden`` (``[..., hidden_size]``) at checkpoint ``layer``;
        ``features`` from :meth:`confidence` when :attr:`features` holds ``"conf"``."""
        return self.router(layer)(hidden, features)

    def confidence(self, layer: int, hidden: torch.Tensor, input_ids: torch.Tensor,
                   model: ModelProbe) -> torch.Tensor:
        """Confidence features (``[..., 5]``, :data:`~tide_compile.confidence.COLUMNS`) of
        the exit head at checkpoint ``layer``: candidates ``successor[input_ids]``, logits
        ``lm_head`` over them read from ``final_norm(E_c(hidden))``.

        Args:
            layer: the checkpoint.
            hidden: ``h_c``, ``[..., hidden_size]``.
            input_ids: the input token of each position, ``hidden.shape[:-1]``.
            model: the probe of the model these routers were made for.
        """
        if self.successor is None:
            raise TIDEError("these routers read no confidence features (RouterSet.features "
                            f"is {self.features})")
        return exit_head_features(model, self.exit_state(layer, hidden), input_ids, self.successor)

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
        """Raise :class:`TIDEError` (a ``ValueError``) if these routers were not made for ``model``."""
        actual = self.describe(model)
        diffs = [
            f"{key}: routers {self.model_info.get(key)!r}, model {actual[key]!r}"
            for key in ("model_class", "num_layers", "hidden_size", "vocab_size")
            if self.model_info.get(key) != actual[key]
        ]
        if diffs:
            raise routers_mismatch(diffs)

    @classmethod
    def forced(
        cls,
        model: nn.Module,
        exit_at: int | None,
        config: TIDEConfig | None = None,
        *,
        confidence_k: int | None = None,
    ) -> "RouterSet":
        """Routers at the config's checkpoints that exit every token at ``exit_at``.

        Scores are exactly 1.0 at ``exit_at`` and exactly 0.0 elsewhere, so every token
        exits there for any ``exit_threshold < 1``. ``exit_at=None`` never exits. For
        tests and benchmarks.

        ``confidence_k``: the routers read the confidence features (``rms+conf``) over a
        successor table of that many candidates, so the compiled path computes them at
        every checkpoint (``k`` rows of ``lm_head`` per token) and the cost of the
        features can be measured. The feature weights are zero and the table holds
        ``(t + 1 + j) % vocab`` for token ``t``: the decisions stay the forced ones.
        """
        config = config or TIDEConfig()
        p = probe(model)
        layers = config.checkpoint_layers(p.num_layers)
        if exit_at is not None and exit_at not in layers:
            raise TIDEError(f"exit_at={exit_at} is not a checkpoint; checkpoints are {layers}")
        successor = None
        if confidence_k is not None:
            if not (isinstance(confidence_k, int) and 2 <= confidence_k <= p.vocab_size):
                raise TIDEError(f"confidence_k must be an int in [2, vocab_size={p.vocab_size}], "
                                f"got {confidence_k!r}")
            successor = (torch.arange(p.vocab_size)[:, None]
                         + torch.arange(1, confidence_k + 1)) % p.vocab_size
        routers: dict[int, TokenRouter] = {}
        for c in layers:
            r = TokenRouter(p.hidden_size, config.router_bottleneck_dim,
                            feature_dim=0 if successor is None else len(COLUMNS))
            with torch.no_grad():
                for param in r.parameters():
                    param.zero_()
                r.up.bias.fill_(FORCE_LOGIT if c == exit_at else -FORCE_LOGIT)
            routers[c] = r
        device = next(model.parameters()).device
        return cls(
            routers,
            model_info=_fingerprint(p),
            config=config,
            calibration={"kind": "forced", "exit_at": exit_at,
                         **({} if successor is None else {"confidence_k": confidence_k})},
            successor=successor,
        ).to(device)

    # ------------------------------------------------------------------ quality
    def threshold_for(self, target_agreement: float = 0.99, confidence: float = 0.9) -> float:
        """Smallest calibrated threshold whose held-out first-exit agreement meets the target.

        Agreement = fraction of exiting tokens whose exit-head top-1 equals the full
        model's, with the threshold applied at every checkpoint (first exit); it must
        hold as a lower confidence bound at ``confidence`` (0.5: the estimate itself),
        over at least ``quality.MIN_EXITS`` (50) exiting held-out tokens. 1.0 (never exit)
        with a warning when the calibration cannot support the target.
        See :func:`tide_compile.calibration.quality.threshold_for`.
        """
        from .calibration import quality

        return quality.threshold_for(self.quality_table, target_agreement, confidence)

    def report(self) -> Any:
        """The held-out quality table (prints as text; ``.rows`` has the numbers)."""
        from .calibration import quality

        return quality.report(self)

    def plot(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Draw the quality table to ``path`` (needs matplotlib: the ``bench`` extra); an
        existing file is replaced only with ``overwrite=True``."""
        from .calibration import quality

        quality.plot(self, os.fspath(path), overwrite=overwrite)

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
                "features": list(self.features),
                **({"conf": {"source": "succ", "k": self.confidence_k, "columns": list(COLUMNS)}}
                   if self.successor is not None else {}),
            },
            "exit_projection_rank": {
                str(c): m.rank for c, m in self.exit_projections.items()  # type: ignore[union-attr]
            },
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "quality_table": self.quality_table,
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the routers to ``path`` as safetensors with JSON metadata (no pickle).

        The metadata holds a SHA-256 of the tensors, which :meth:`load` verifies. The
        write is atomic (a temporary file, then ``os.replace``): an interrupted save
        leaves any old file as it was.

        Args:
            path: the file to write.
            overwrite: replace an existing file (else an existing file is an error).

        Raises:
            TIDEError: the path cannot be written (see :func:`tide_compile.outputs.check_output_file`).
        """
        from safetensors.torch import save_file

        from .outputs import atomic_write, check_output_file

        target = check_output_file(path, overwrite=overwrite, what="router file")
        tensors = {f"routers.{k}": v for k, v in self.routers.state_dict().items()}
        tensors.update(
            {f"exit_projections.{k}": v for k, v in self.exit_projections.state_dict().items()}
        )
        if self.successor is not None:
            # int32 on disk (half the bytes: 12.6 MB for SmolLM2 at k = 64); int64 in memory.
            tensors["candidates.successor"] = self.successor.to(torch.int32)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {**self.metadata(), _CHECKSUM_KEY: _tensors_digest(tensors)}
        atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(meta)}))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> "RouterSet":
        """Read routers written by :meth:`save`.

        The file is checked before anything is allocated from it: its size and header,
        the metadata against the router file schema (types, ranges, checkpoints below
        the layer count), and the tensors' names and shapes against the metadata. Then
        the tensors are read, checked against the metadata's SHA-256 (files written
        before it existed have none) and for NaN/Inf. Memory stays within a small
        multiple of the file's size, whatever the file holds.

        Args:
            path: the router file.
            model: if given, checked against the file's fingerprint (a mismatch raises
                :class:`TIDEError`), and the routers are placed on the model's device.
            device: where to put the routers (default: the model's device, else CPU).

        Raises:
            FileNotFoundError: no file at ``path``.
            RouterFileError: the file is not a valid router file (the message says what
                is wrong with it); a ``TIDEError``.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no router file at {path!r}")
        header, raw_meta, data = _read_safetensors(path)
        if _METADATA_KEY not in raw_meta:
            raise RouterFileError(f"{path!r} is a safetensors file but not a tide_compile router file")
        try:
            meta = json.loads(raw_meta[_METADATA_KEY])
        except (ValueError, RecursionError) as exc:
            raise RouterFileError(f"{path!r}: the router metadata is not valid JSON ({exc}); "
                                  "the file is damaged: recalibrate or restore it") from None
        spec = _check_metadata(meta, path)
        expected = _expected_tensors(spec)
        _check_tensor_headers(header, expected, path)
        for name, entry in header.items():
            integer = entry["dtype"] in ("I32", "I64")
            if integer != (name == "candidates.successor"):
                raise RouterFileError(
                    f"{path!r}: tensor {name} is {entry['dtype']}; "
                    + ("the candidate table holds token ids (I32 or I64)" if not integer
                       else "router weights are floats")
                    + ": the file is damaged or inconsistent; recalibrate or restore it")
        tensors = {
            name: torch.frombuffer(data, dtype=_DTYPES[entry["dtype"]],
                                   count=math.prod(entry["shape"]),
                                   offset=entry["data_offsets"][0]).reshape(entry["shape"])
            for name, entry in header.items()
        }
        stored = meta.get(_CHECKSUM_KEY)
        if stored is not None and stored != _tensors_digest(tensors):
            raise RouterFileError(f"{path!r}: the router weights do not match the checksum in the "
                                  "file's metadata: the file is damaged; recalibrate or restore it")
        for name, t in tensors.items():
            if name == "candidates.successor":
                if t.numel() and not (int(t.min()) >= 0 and int(t.max()) < t.shape[0]):
                    raise RouterFileError(f"{path!r}: the candidate table holds token ids outside the "
                                          "vocabulary: the file is damaged; recalibrate or restore it")
                continue
            if not bool(torch.isfinite(t).all()):
                kind, c = name.split(".")[:2]
                what = "router" if kind == "routers" else "exit projection"
                raise RouterFileError(f"{path!r}: the {what} weights at checkpoint {c} ({name}) hold "
                                      "NaN or Inf: recalibrate the routers (that checkpoint would never exit)")
        k = spec["conf_k"]
        with torch.device("meta"):
            routers = {c: TokenRouter(spec["hidden_size"], spec["bottleneck_dim"], spec["eps"],
                                      feature_dim=len(COLUMNS) if k else 0)
                       for c in spec["checkpoint_layers"]}
            projections = {c: ExitProjection(spec["hidden_size"], r) for c, r in spec["ranks"].items()}
            successor = (torch.empty(spec["model"]["vocab_size"], k, dtype=torch.int64)
                         if k else None)
        obj = cls(
            routers,
            model_info=spec["model"],
            config=spec["config"],
            exit_projections=projections,
            calibration=spec["calibration"],
            quality_table=spec["quality_table"],
            successor=successor,
        )
        # Routers compute in float32 whatever the file stores (see TokenRouter).
        state = {k: v.to(torch.float32) for k, v in tensors.items() if k != "candidates.successor"}
        if successor is not None:
            state["successor"] = tensors["candidates.successor"].to(torch.int64)
        obj.load_state_dict(state, assign=True)
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


# ---------------------------------------------------------------------------- file format
def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _read_safetensors(path: str) -> tuple[dict[str, dict[str, Any]], dict[str, str], bytearray]:
    """(tensor entries, ``__metadata__``, data bytes) of a safetensors file, checked: the
    size bounds, the header's JSON, every entry's dtype, shape and byte range."""

    def bad(why: str) -> RouterFileError:
        return RouterFileError(f"{path!r} is not a safetensors router file ({why}); "
                               "pass a file written by RouterSet.save or `tide-compile calibrate`")

    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise RouterFileError(f"{path!r} has {size} bytes, larger than any router file "
                              f"({MAX_FILE_BYTES} bytes at most): pass a router file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise bad(f"its header claims {n} bytes, the file has {size - 8} after the length")
        raw = f.read(n)
        data = bytearray(size - 8 - n)
        if f.readinto(data) != len(data):
            raise bad("it ended while being read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("its __metadata__ is not a map of strings")
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} has no dtype/shape/offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}; router weights are one of {sorted(_DTYPES)}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= len(data)):
            raise bad(f"tensor {name!r} has byte range {offsets!r} outside the file's {len(data)} data bytes")
        itemsize = _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize or offsets[0] % itemsize:
            raise bad(f"tensor {name!r}: shape {shape} does not fit its byte range {offsets}")
    return header, meta, data


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_int_in(x: Any, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _is_prob(x: Any, none_ok: bool = False) -> bool:
    if x is None:
        return none_ok
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _is_real(x: Any, none_ok: bool = False) -> bool:
    if x is None:
        return none_ok
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and math.isfinite(x))  # JSON ints may be huge


def _check_metadata(meta: Any, path: str) -> dict[str, Any]:
    """The router file's metadata checked against the schema; returns what load builds from."""

    def bad(field: str, why: str) -> RouterFileError:
        return RouterFileError(f"{path!r}: router metadata {field} {why}; the file is damaged or "
                               "not from this tide_compile: recalibrate or restore it")

    if not isinstance(meta, dict):
        raise bad("", f"is a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise RouterFileError(
            f"{path!r} has router format version {version!r}; this tide_compile reads "
            f"version {FORMAT_VERSION}. Recalibrate, or use the tide_compile that wrote it."
        )
    model = meta.get("model")
    if not isinstance(model, dict):
        raise bad("'model'", "is missing or not an object")
    if not (isinstance(model.get("model_class"), str) and 0 < len(model["model_class"]) <= 200):
        raise bad("model.model_class", f"is {model.get('model_class')!r}, not a class name")
    if not _is_int_in(model.get("num_layers"), 2, _MAX_LAYERS):
        raise bad("model.num_layers", f"is {model.get('num_layers')!r}, not an integer in [2, {_MAX_LAYERS}]")
    if not _is_int_in(model.get("hidden_size"), 1, _MAX_WIDTH):
        raise bad("model.hidden_size", f"is {model.get('hidden_size')!r}, not an integer in [1, {_MAX_WIDTH}]")
    if "vocab_size" in model and not _is_int_in(model["vocab_size"], 0, 1 << 30):
        raise bad("model.vocab_size", f"is {model['vocab_size']!r}, not an integer >= 0")
    if "norm_kind" in model and not isinstance(model["norm_kind"], (str, type(None))):
        raise bad("model.norm_kind", f"is {model['norm_kind']!r}, not a string")
    num_layers, hidden = model["num_layers"], model["hidden_size"]

    layers = meta.get("checkpoint_layers")
    if not (isinstance(layers, list) and layers and all(_is_int_in(c, 0, num_layers - 2) for c in layers)):
        raise bad("checkpoint_layers", f"is {str(layers)[:80]}, not a non-empty list of layers in "
                  f"[0, {num_layers - 2}] (the final layer is never a checkpoint)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise bad("checkpoint_layers", f"is {str(layers)[:80]}, not strictly increasing")

    router = meta.get("router")
    if not isinstance(router, dict):
        raise bad("'router'", "is missing or not an object")
    if router.get("input_transform", "rms") != "rms":
        raise bad("router.input_transform", f"is {router.get('input_transform')!r}; this tide_compile knows 'rms'")
    if not (_is_real(router.get("eps")) and 0.0 <= router["eps"] < 1.0):
        raise bad("router.eps", f"is {router.get('eps')!r}, not a number in [0, 1)")
    if not _is_int_in(router.get("bottleneck_dim"), 1, _MAX_BOTTLENECK):
        raise bad("router.bottleneck_dim", f"is {router.get('bottleneck_dim')!r}, not an integer in [1, {_MAX_BOTTLENECK}]")
    features = router.get("features", ["rms"])  # files before router features: rms only
    conf_k = 0
    if features == ["rms", "conf"]:
        conf = router.get("conf")
        vocab = model.get("vocab_size")
        if not (isinstance(conf, dict) and conf.get("source") == "succ"
                and conf.get("columns") == list(COLUMNS)):
            raise bad("router.conf", f"is {str(conf)[:120]}; this tide_compile reads source 'succ' "
                      f"with columns {list(COLUMNS)}")
        if not (_is_int_in(vocab, 2, 1 << 30) and _is_int_in(conf.get("k"), 2, vocab)):
            raise bad("router.conf.k", f"is {conf.get('k')!r}, not an integer in [2, vocab_size={vocab!r}]")
        conf_k = conf["k"]
    elif features != ["rms"]:
        raise bad("router.features", f"is {str(features)[:80]}; this tide_compile knows ['rms'] "
                  "and ['rms', 'conf']")

    ranks_raw = meta.get("exit_projection_rank", {})
    if not isinstance(ranks_raw, dict):
        raise bad("exit_projection_rank", "is not an object")
    ranks: dict[int, int] = {}
    for key, rank in ranks_raw.items():
        if not (re.fullmatch(r"[0-9]{1,6}", key) and int(key) in layers):
            raise bad("exit_projection_rank", f"names layer {key!r}, not one of the checkpoints {layers}")
        if not _is_int_in(rank, 1, hidden):
            raise bad("exit_projection_rank", f"at layer {key} is {rank!r}, not an integer in [1, {hidden}]")
        ranks[int(key)] = rank

    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise bad("config", "is not an object")
    try:
        cfg = TIDEConfig.from_dict(config)
    except (ValueError, TypeError) as exc:
        raise bad("config", f"is invalid ({exc})") from None

    calibration = meta.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise bad("calibration", "is not an object")
    table = meta.get("quality_table")
    if table is not None:
        _check_quality_table(table, bad)
    return {"model": model, "checkpoint_layers": layers, "hidden_size": hidden,
            "bottleneck_dim": router["bottleneck_dim"], "eps": float(router["eps"]), "ranks": ranks,
            "conf_k": conf_k,
            "config": cfg, "calibration": calibration, "quality_table": table}


def _check_quality_table(table: Any, bad: Any) -> None:
    """Rows of the views ``threshold_for``, ``report`` and ``plot`` read must have their fields."""
    if not isinstance(table, list) or not all(isinstance(r, dict) for r in table):
        raise bad("quality_table", "is not a list of objects")
    for i, r in enumerate(table):
        view = r.get("view")
        if view is None:
            continue
        if view not in ("first_exit", "checkpoint"):
            raise bad(f"quality_table row {i}", f"has view {view!r}")
        ok = _is_prob(r.get("threshold")) and _is_count(r.get("tokens"))
        if view == "first_exit":
            exits = r.get("exits")
            ok = ok and (_is_prob(r.get("agreement"), True) and _is_prob(r.get("token_agreement"), True)
                         and _is_prob(r.get("exit_rate"), True) and _is_real(r.get("mean_depth"), True)
                         and isinstance(exits, dict) and all(_is_count(v) for v in exits.values()))
        else:
            ok = ok and (_is_count(r.get("layer")) and _is_prob(r.get("precision"), True)
                         and _is_prob(r.get("exit_rate"), True) and _is_prob(r.get("recall"), True))
        if not ok:
            raise bad(f"quality_table row {i}", "has a missing or out-of-range field")


def _expected_tensors(spec: Mapping[str, Any]) -> dict[str, list[int]]:
    """Tensor name -> shape that the metadata implies (state_dict names of RouterSet)."""
    h, b = spec["hidden_size"], spec["bottleneck_dim"]
    out: dict[str, list[int]] = {}
    for c in spec["checkpoint_layers"]:
        out.update({f"routers.{c}.down.weight": [b, h], f"routers.{c}.down.bias": [b],
                    f"routers.{c}.up.weight": [1, b], f"routers.{c}.up.bias": [1]})
        if spec["conf_k"]:
            out[f"routers.{c}.feat.weight"] = [b, len(COLUMNS)]
    if spec["conf_k"]:
        out["candidates.successor"] = [spec["model"]["vocab_size"], spec["conf_k"]]
    for c, r in spec["ranks"].items():
        out.update({f"exit_projections.{c}.down.weight": [r, h],
                    f"exit_projections.{c}.up.weight": [h, r], f"exit_projections.{c}.up.bias": [h]})
    return out


def _check_tensor_headers(header: Mapping[str, Any], expected: Mapping[str, list[int]], path: str) -> None:
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        what = (f"lacks tensors {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + (
            f"has tensors the metadata does not describe {extra[:3]}" if extra else "")
        raise RouterFileError(f"{path!r} {what}: the file is damaged or inconsistent; recalibrate or restore it")
    for name, shape in expected.items():
        if header[name]["shape"] != shape:
            raise RouterFileError(f"{path!r}: tensor {name} has shape {header[name]['shape']}, its metadata "
                                  f"says {shape}: the file is damaged or inconsistent; recalibrate or restore it")
