"""``calibrate``: text in, a :class:`RouterSet` with a held-out quality table out.

Steps (each in its own module): load and pack text (``data``), collect checkpoint and
final states with hooks (``collect``), optionally train exit projections (``train``),
label tokens (``labels``), train one router per checkpoint (``train``), and measure the
threshold table on held-out samples (``quality``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from ..config import TIDEConfig
from ..model_probe import probe
from ..outputs import check_output_file
from ..confidence import COLUMNS, exit_head_features, successor_table
from ..routers import ExitProjection, RouterSet
from ..validation import TIDEError
from . import quality
from .collect import collect_states
from .data import build_samples, find_text_files, load_rows
from .labels import agree_labels, check_label_kind, cosine_labels, head_top1
from .train import PROJECTION_LOSSES, split_by_sample, train_projection, train_router

__all__ = ["calibrate", "ROUTER_FEATURES"]

#: Values of ``calibrate(router_features=...)``.
ROUTER_FEATURES = ("rms", "rms+conf")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TIDEError(f"calibrate: {name} must be a positive integer, got {value!r}")


@torch.no_grad()
def _features(p: Any, proj: ExitProjection | None, states: torch.Tensor, token_ids: torch.Tensor,
              successor: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Confidence features of the exit head (``proj``: its exit projection) for every
    collected state of one checkpoint, on the CPU, in chunks."""
    device = next(p.model.parameters()).device
    dtype = next(p.model.parameters()).dtype

    def part(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = h.to(device, dtype)
        return exit_head_features(p, h if proj is None else proj(h), ids.to(device), successor).cpu()

    return torch.cat([part(states[i:i + chunk], token_ids[i:i + chunk])
                      for i in range(0, states.shape[0], chunk)
                      ]) if states.shape[0] else torch.empty(0, len(COLUMNS))


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any = None,
    config: TIDEConfig | None = None,
    save_path: str | os.PathLike[str] | None = None,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str | None = None,
    labels: str = "agree",
    max_length: int = 256,
    max_tokens_per_checkpoint: int = 100_000,
    batch_size: int = 8,
    projection_rank: int = 64,
    projection_loss: str = "kl",
    target_agreement: float | None = None,
    protect_first_token: bool = True,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    router_features: str = "rms",
    confidence_k: int = 64,
) -> RouterSet:
    """Calibrate early-exit routers for ``model`` on text (eager, once).

    Args:
        model: a HuggingFace causal LM (any device and dtype; it is not modified).
        tokenizer: its tokenizer (any callable returning ``{"input_ids": [...]}``).
        dataset: the text: a local file or folder, a HuggingFace dataset name, a list
            of strings, a list of ``pathlib.Path``, or a ``datasets.Dataset``
            (default: ``config.calibration_dataset``).
        config: checkpoints (``checkpoint_interval``, ``min_layers``), router width,
            ``calibration_samples``, ``exit_strategy``, ``convergence_threshold``.
        save_path: if given, the routers are also saved there (checked before any work:
            its folder exists and is writable, it is not a folder or one of the text
            files; written atomically).
        dataset_config, split, text_field: which hub configuration, split and column.
        labels: ``"agree"`` (exit head top-1 == full model top-1) or ``"cosine"``.
        max_length: tokens per sample (longer samples are truncated).
        max_tokens_per_checkpoint: token positions kept for training and evaluation (a
            seeded random subset; bounds memory to about this many states per
            checkpoint, in the model's dtype, on the CPU).
        batch_size: samples per forward pass.
        projection_rank: rank of each exit projection (``exit_strategy="projection"``).
        projection_loss: ``"kl"`` (match the full distribution) or ``"ce"`` (its top-1).
        target_agreement: if given, the returned routers' ``config.exit_threshold`` is
            :meth:`RouterSet.threshold_for` of it (1.0, with a warning, when the held-out
            evidence cannot support the target).
        protect_first_token: label the first token of every sample "do not exit" (in
            router training and in the quality table). Every later token attends to it
            (the attention sink), so K/V propagated from its early state cost more than
            its own next-token agreement shows.
        seed: seeds the sample choice, token subset, splits, initializations and batch order.
        progress: show tqdm progress bars.
        overwrite: replace an existing ``save_path`` (else an existing file is an error,
            raised before any work).
        router_features: ``"rms"`` (routers read ``rms(h_c)``) or ``"rms+conf"`` (also the
            exit head's confidence over ``confidence_k`` candidate tokens from a successor
            table built on the training split; :mod:`tide_compile.confidence`). The
            reference and the backend compute these features; compaction does not.
        confidence_k: candidates per token with ``"rms+conf"`` (2 .. vocabulary size).

    Returns:
        A :class:`RouterSet` on the model's device, with ``quality_table`` and
        ``calibration`` metadata (held-out agreement with and without projection).
    """
    t0 = time.perf_counter()
    config = config or TIDEConfig()
    check_label_kind(labels)
    for name, value in (
        ("max_length", max_length),
        ("max_tokens_per_checkpoint", max_tokens_per_checkpoint),
        ("batch_size", batch_size),
        ("projection_rank", projection_rank),
    ):
        _check_positive(name, value)
    if router_features not in ROUTER_FEATURES:
        raise TIDEError(f"calibrate: router_features must be one of {ROUTER_FEATURES}, got "
                        f"{router_features!r}")
    _check_positive("confidence_k", confidence_k)
    if projection_loss not in PROJECTION_LOSSES:
        raise TIDEError(f"calibrate: projection_loss must be 'kl' or 'ce', got {projection_loss!r}")
    if target_agreement is not None and not (
        isinstance(target_agreement, (int, float)) and not isinstance(target_agreement, bool)
        and 0.0 <= target_agreement <= 1.0
    ):
        raise TIDEError(f"calibrate: target_agreement must be in [0, 1], got {target_agreement!r}")
    if save_path is not None:  # before any work: a bad path must not cost a calibration
        source = dataset if dataset is not None else config.calibration_dataset
        inputs = [source] if isinstance(source, (str, os.PathLike)) else (
            [x for x in source if isinstance(x, os.PathLike)] if isinstance(source, (list, tuple)) else [])
        text_files = [f for x in inputs if os.path.exists(x) for f in find_text_files(x)]
        check_output_file(save_path, overwrite=overwrite, inputs=text_files, what="save_path")

    p = probe(model)
    layers = config.checkpoint_layers(p.num_layers)
    device = next(model.parameters()).device

    rows, source = load_rows(
        dataset if dataset is not None else config.calibration_dataset,
        dataset_config=dataset_config,
        split=split,
        text_field=text_field,
    )
    samples = build_samples(
        tokenizer, rows, num_samples=config.calibration_samples, max_length=max_length, seed=seed, source=source
    )
    collected = collect_states(
        model, p, samples, layers, max_tokens=max_tokens_per_checkpoint, batch_size=batch_size,
        seed=seed, progress=progress,
    )
    t_collect = time.perf_counter() - t0
    splits = split_by_sample(collected.sample_index, len(samples.input_ids), seed=seed)
    final_top1 = head_top1(p, collected.final)

    projections: dict[int, ExitProjection] = {}
    projection_info: dict[str, Any] = {}
    if config.exit_strategy == "projection":
        for c in layers:
            proj, info = train_projection(
                p, collected.states[c], collected.final, final_top1, splits,
                rank=projection_rank, device=device, seed=seed + 100 * c, loss=projection_loss,
            )
            projections[c] = proj
            projection_info[str(c)] = info

    successor = None
    if router_features == "rms+conf":
        vocab = int(RouterSet.describe(p)["vocab_size"])
        if not 2 <= confidence_k <= vocab:
            raise TIDEError(f"calibrate: confidence_k must be in [2, {vocab}] (the vocabulary), "
                            f"got {confidence_k}")
        token_ids = torch.tensor([samples.input_ids[int(i)][int(j)] for i, j in
                                  zip(collected.sample_index, collected.position)], dtype=torch.int64)
        successor = successor_table(token_ids[splits.train], final_top1[splits.train], vocab,
                                    confidence_k)

    held = splits.heldout
    routers = {}
    router_info: dict[str, Any] = {}
    exit_agreement: dict[str, dict[str, float | None]] = {}
    scores: dict[int, torch.Tensor] = {}
    agree_held: dict[int, torch.Tensor] = {}
    first = collected.position == 0
    for c in layers:
        states = collected.states[c]
        proj = projections.get(c)
        identity_agree = agree_labels(p, states, final_top1)
        agree = identity_agree if proj is None else agree_labels(p, states, final_top1, proj)
        if labels == "agree":
            target = agree
        else:
            target = cosine_labels(p, states, collected.final, config.convergence_threshold, proj)
        table_agree = agree
        if protect_first_token:
            # An exiting first token counts as a disagreement in the table too.
            target = target & ~first
            table_agree = agree & ~first
        features = (None if successor is None
                    else _features(p, projections.get(c), states, token_ids, successor))
        router, info = train_router(
            states, target, splits, bottleneck_dim=config.router_bottleneck_dim, device=device,
            seed=seed + 100 * c, features=features,
        )
        routers[c] = router
        router_info[str(c)] = info
        with torch.no_grad():
            scores[c] = router(states[held].to(device),
                               None if features is None else features[held].to(device)).cpu()
        agree_held[c] = table_agree[held]

        def rate(flags: torch.Tensor) -> float | None:
            return round(float(flags[held].float().mean()), 6) if held.numel() else None

        exit_agreement[str(c)] = {
            "identity": rate(identity_agree),
            "projection": rate(agree) if proj is not None else None,
        }

    table = quality.quality_table(scores, agree_held, p.num_layers)
    calibration = {
        "kind": "calibrated",
        "labels": labels,
        "exit_strategy": config.exit_strategy,
        "router_features": router_features,
        "source": source,
        "samples": len(samples.input_ids),
        "max_length": max_length,
        "tokens_seen": collected.total_tokens,
        "tokens_kept": collected.num_kept,
        "max_tokens_per_checkpoint": max_tokens_per_checkpoint,
        "split_tokens": splits.sizes(),
        "seed": seed,
        "protect_first_token": protect_first_token,
        "exit_agreement": exit_agreement,
        "router_training": router_info,
        "projection_training": projection_info or None,
        "collect_seconds": round(t_collect, 2),
    }
    if labels == "cosine":
        calibration["convergence_threshold"] = config.convergence_threshold
    if target_agreement is not None:
        chosen = quality.threshold_for(table, float(target_agreement))
        calibration["target_agreement"] = float(target_agreement)
        config = config.replace(exit_threshold=chosen)
    calibration["seconds"] = round(time.perf_counter() - t0, 2)
    result = RouterSet(
        routers,
        model_info=RouterSet.describe(p),
        config=config,
        exit_projections=projections or None,
        calibration=calibration,
        quality_table=table,
        successor=successor,
    ).to(device)
    if save_path is not None:
        result.save(save_path, overwrite=overwrite)
    return result
