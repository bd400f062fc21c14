"""Labels: would a token leaving at checkpoint ``c`` be done?

``"agree"`` (default): the exit head ``lm_head(final_norm(E_c(h_c)))`` has the same top-1
token as the full model, ``lm_head(final_norm(h_final))``. This is exactly the quality a
user sees under greedy decoding.

``"cosine"``: ``cos(final_norm(h_c), final_norm(h_final)) > convergence_threshold``, both
states normalized by the model's own final norm (comparing an un-normalized state with a
normalized one measures nothing).

Heads run chunked on the model's device, in the model's dtype, without gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model_probe import ModelProbe

__all__ = ["LABEL_KINDS", "check_label_kind", "head_top1", "agree_labels", "cosine_labels"]

LABEL_KINDS = ("agree", "cosine")


def check_label_kind(kind: str) -> str:
    if kind not in LABEL_KINDS:
        raise ValueError(
            f"unknown calibration label kind {kind!r}: use 'agree' (exit head has the full "
            "model's top-1 token) or 'cosine' (normalized states closer than convergence_threshold)"
        )
    return kind


def _chunks(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _device_dtype(probe: ModelProbe) -> tuple[torch.device, torch.dtype]:
    w = next(probe.lm_head.parameters())
    return w.device, w.dtype


def _exit_states(probe: ModelProbe, states: torch.Tensor,
                 exit_state: Callable[[torch.Tensor], torch.Tensor] | None, chunk: int):
    """``(slice, E_c(h))`` per chunk, on the head's device and dtype."""
    device, dtype = _device_dtype(probe)
    for s in _chunks(states.shape[0], chunk):
        h = states[s].to(device=device, dtype=dtype)
        if exit_state is not None:
            h = exit_state(h).to(dtype)
        yield s, h


@torch.no_grad()
def head_top1(
    probe: ModelProbe,
    states: torch.Tensor,
    exit_state: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """Top-1 token of ``probe.head(exit_state(states))``, ``[n]`` int64 on the CPU."""
    out = torch.empty(states.shape[0], dtype=torch.int64)
    for s, h in _exit_states(probe, states, exit_state, chunk):
        out[s] = probe.head(h).argmax(-1).cpu()
    return out


def agree_labels(
    probe: ModelProbe,
    states: torch.Tensor,
    final_top1: torch.Tensor,
    exit_state: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """``[n]`` bool: the exit head's top-1 equals ``final_top1``."""
    return head_top1(probe, states, exit_state, chunk=chunk) == final_top1


@torch.no_grad()
def cosine_labels(
    probe: ModelProbe,
    states: torch.Tensor,
    final: torch.Tensor,
    threshold: float,
    exit_state: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """``[n]`` bool: ``cos(final_norm(E_c(h_c)), final_norm(h_final)) > threshold``."""
    device, dtype = _device_dtype(probe)
    out = torch.empty(states.shape[0], dtype=torch.bool)
    for s, h in _exit_states(probe, states, exit_state, chunk):
        a = probe.final_norm(h).float()
        b = probe.final_norm(final[s].to(device=device, dtype=dtype)).float()
        out[s] = (torch.nn.functional.cosine_similarity(a, b, dim=-1) > threshold).cpu()
    return out
