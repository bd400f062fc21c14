"""Train routers (and optional exit projections) on collected states, reproducibly.

Everything trains in float32 on the model's device, in mini-batches, with a seeded
initialization and a seeded batch order; the best epoch on the validation split is kept
(early stopping). Train / validation / held-out splits are by sample, never by token,
so neighbouring tokens of one text do not leak across splits.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..model_probe import ModelProbe
from ..routers import ExitProjection, TokenRouter

__all__ = ["Split", "split_by_sample", "train_router", "fit_router", "constant_router",
           "train_projection", "PROJECTION_LOSSES"]

PROJECTION_LOSSES = ("kl", "ce")


@dataclass
class Split:
    """Token indices of the three splits (into the collected tokens)."""

    train: torch.Tensor
    val: torch.Tensor
    heldout: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": int(self.train.numel()), "val": int(self.val.numel()), "heldout": int(self.heldout.numel())}


def split_by_sample(
    sample_index: torch.Tensor,
    num_samples: int,
    *,
    seed: int,
    val_fraction: float = 0.1,
    heldout_fraction: float = 0.2,
) -> Split:
    """Assign whole samples to train / validation / held-out (seeded).

    With fewer than 5 samples the tokens themselves are split (there is no other way to
    hold anything out); the fractions are the same.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    if num_samples >= 5:
        perm = torch.randperm(num_samples, generator=gen)
        n_held = max(1, round(heldout_fraction * num_samples))
        n_val = max(1, round(val_fraction * num_samples))
        part = torch.zeros(num_samples, dtype=torch.int64)
        part[perm[:n_held]] = 2
        part[perm[n_held : n_held + n_val]] = 1
        token_part = part[sample_index]
    else:
        n = sample_index.numel()
        perm = torch.randperm(n, generator=gen)
        token_part = torch.zeros(n, dtype=torch.int64)
        n_held = max(1, round(heldout_fraction * n)) if n >= 3 else 0
        n_val = max(1, round(val_fraction * n)) if n >= 3 else 0
        token_part[perm[:n_held]] = 2
        token_part[perm[n_held : n_held + n_val]] = 1
    idx = torch.arange(token_part.numel())
    return Split(train=idx[token_part == 0], val=idx[token_part == 1], heldout=idx[token_part == 2])


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _router_logits(router: TokenRouter, x: torch.Tensor) -> torch.Tensor:
    # ``x`` is already ``router.normalize(h)`` (the same transform TokenRouter.logits
    # applies), followed by the standardized features for a router that reads them.
    if router.feat is None:
        return router.up(nn.functional.silu(router.down(x))).squeeze(-1)
    h, f = x[..., : router.hidden_size], x[..., router.hidden_size:]
    return router.up(nn.functional.silu(router.down(h) + router.feat(f))).squeeze(-1)


def _fold_standardization(router: TokenRouter, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``router.feat`` read raw features: ``F((f - mean) / std) = (F / std) f - F mean / std``."""
    with torch.no_grad():
        w = router.feat.weight / std  # type: ignore[union-attr]
        router.down.bias -= w @ mean
        router.feat.weight.copy_(w)  # type: ignore[union-attr]


def train_router(
    states: torch.Tensor,
    labels: torch.Tensor,
    split: Split,
    *,
    bottleneck_dim: int,
    device: torch.device | str,
    seed: int,
    batch_size: int = 512,
    max_epochs: int = 40,
    patience: int = 4,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    features: torch.Tensor | None = None,
) -> tuple[TokenRouter, dict[str, Any]]:
    """Train one :class:`TokenRouter` to predict ``labels`` from ``states`` (class-balanced BCE).

    Each class weighs half of the loss (weights from the training split), so a rare
    "done" class is not drowned by the common one. A training split with a single class
    gives a constant router (score = that class), with no training.

    ``features`` (``[n, F]``, e.g. :meth:`RouterSet.confidence` of each state) makes a
    router that reads them too: it trains on features standardized with the training
    split's mean and standard deviation, then folds them into its weights, so the
    returned router reads raw features.
    """
    hidden = states.shape[1]
    width = 0 if features is None else int(features.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = TokenRouter(hidden, bottleneck_dim, feature_dim=width)
    router = router.to(device=device, dtype=torch.float32)
    y_all = labels.to(torch.float32)
    y_train = y_all[split.train]
    n_pos = float(y_train.sum())
    n_train = int(y_train.numel())
    info: dict[str, Any] = {"train_tokens": n_train, "train_positive_rate": n_pos / n_train if n_train else None}
    if constant_router(router, n_train, n_pos):
        info.update(epochs=0, constant=True)
        return router.eval(), info

    if features is not None:
        f_train = features[split.train].to(device, torch.float32)
        mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)

    def inputs(idx: torch.Tensor) -> torch.Tensor:
        x = router.normalize(states[idx].to(device))
        if features is None:
            return x
        return torch.cat([x, (features[idx].to(device, torch.float32) - mean) / std], dim=-1)

    x_train, t_train = inputs(split.train), y_train.to(device)
    has_val = split.val.numel() > 0
    x_val = inputs(split.val) if has_val else x_train
    t_val = y_all[split.val].to(device) if has_val else t_train
    fit = fit_router(router, lambda x: _router_logits(router, x), x_train, t_train, x_val, t_val,
                     seed=seed, batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                     lr=lr, weight_decay=weight_decay)
    if features is not None:
        _fold_standardization(router, mean, std)
    info.update(epochs=fit["epochs"], best_epoch=fit["best_epoch"],
                val_loss=round(fit["val_loss"], 6), constant=False)
    return router.eval(), info


def constant_router(router: nn.Module, n_train: int, n_pos: float) -> bool:
    """A training split with a single class (or none): make ``router`` constant (every
    parameter 0, the output bias +-10: score that class) and return True."""
    if n_train and 0.0 < n_pos < n_train:
        return False
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        router.up.bias.fill_(10.0 if n_train and n_pos == n_train else -10.0)
    return True


def fit_router(router: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor],
               x_train: torch.Tensor, t_train: torch.Tensor, x_val: torch.Tensor,
               t_val: torch.Tensor, *, seed: int, batch_size: int = 512, max_epochs: int = 40,
               patience: int = 4, lr: float = 2e-3, weight_decay: float = 1e-2) -> dict[str, Any]:
    """The routers' training recipe on prepared inputs: class-balanced BCE (each class
    half of the loss, weights from the training targets, which hold both classes), AdamW,
    seeded shuffled batches, early stop after ``patience`` epochs without a better
    validation loss, and the best validation epoch's weights kept. ``logits(x)``: the
    router's scores for inputs ``x``. Returns ``epochs``, ``best_epoch``, ``val_loss``."""
    n_train, n_pos = int(t_train.numel()), float(t_train.sum())
    w_pos, w_neg = 0.5 * n_train / n_pos, 0.5 * n_train / (n_train - n_pos)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        weight = t * w_pos + (1.0 - t) * w_neg
        return nn.functional.binary_cross_entropy_with_logits(out, t, weight=weight)

    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 2)
    best = (math.inf, copy.deepcopy(router.state_dict()), 0)
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        router.train()
        for b in _batches(n_train, batch_size, gen):
            b = b.to(x_train.device)
            opt.zero_grad(set_to_none=True)
            loss_fn(logits(x_train[b]), t_train[b]).backward()
            opt.step()
        router.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(logits(x_val), t_val))
        if val_loss < best[0] - 1e-5:
            best = (val_loss, copy.deepcopy(router.state_dict()), epoch)
        elif epoch - best[2] >= patience:
            break
    router.load_state_dict(best[1])
    return {"epochs": epoch, "best_epoch": best[2], "val_loss": best[0]}


def train_projection(
    probe: ModelProbe,
    states: torch.Tensor,
    final: torch.Tensor,
    final_top1: torch.Tensor,
    split: Split,
    *,
    rank: int,
    device: torch.device | str,
    seed: int,
    loss: str = "kl",
    batch_size: int = 256,
    max_epochs: int = 20,
    patience: int = 3,
    lr: float = 1e-3,
) -> tuple[ExitProjection, dict[str, Any]]:
    """Train ``E_c`` so that ``head(E_c(h_c))`` matches the full model's output.

    ``loss="kl"``: KL(p_final || p_exit) over the vocabulary (the final distribution is
    recomputed per batch from the stored final states, never stored); ``loss="ce"``:
    cross-entropy to the full model's top-1 token. The model's head is frozen: only the
    projection's parameters get gradients (``torch.autograd.grad``), so the model's
    ``.grad`` fields are never touched. Starts from the identity and keeps the best
    validation epoch, so it is never worse than the identity on the validation split
    as measured by this loss.
    """
    if loss not in PROJECTION_LOSSES:
        raise ValueError(f"unknown projection loss {loss!r}: use 'kl' or 'ce'")
    hidden = states.shape[1]
    rank = max(1, min(rank, hidden))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = ExitProjection(hidden, rank)
    proj = proj.to(device=device, dtype=torch.float32)
    params = list(proj.parameters())
    head_dtype = next(probe.lm_head.parameters()).dtype

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        h = states[idx].to(device=device, dtype=head_dtype)
        logp = torch.log_softmax(probe.head(proj(h).to(head_dtype)).float(), -1)
        if loss == "ce":
            return nn.functional.nll_loss(logp, final_top1[idx].to(device))
        with torch.no_grad():
            target = torch.log_softmax(probe.head(final[idx].to(device=device, dtype=head_dtype)).float(), -1)
        return nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")

    def eval_loss(idx: torch.Tensor) -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, idx.numel(), batch_size):
                b = idx[i : i + batch_size]
                total += float(batch_loss(b)) * b.numel()
                n += b.numel()
        return total / max(n, 1)

    val_idx = split.val if split.val.numel() else split.train
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 3)
    best = (eval_loss(val_idx), copy.deepcopy(proj.state_dict()), 0)
    info: dict[str, Any] = {"rank": rank, "loss": loss, "identity_val_loss": round(best[0], 6)}
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        for b in _batches(int(split.train.numel()), batch_size, gen):
            idx = split.train[b]
            grads = torch.autograd.grad(batch_loss(idx), params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
        val_loss = eval_loss(val_idx)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, copy.deepcopy(proj.state_dict()), epoch)
        elif epoch - best[2] >= patience:
            break
    proj.load_state_dict(best[1])
    info.update(epochs=epoch, best_epoch=best[2], val_loss=round(best[0], 6))
    return proj.eval(), info
