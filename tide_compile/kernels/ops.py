"""``tide::route`` and ``tide::exit_select``: the two ops the insert pass puts in graphs.

Both are ``torch.library`` ops whose (CompositeImplicitAutograd) body is the plain-torch
reference below, which stays their specification.

Shapes: ``h``, ``frozen``: ``[..., H]`` (any leading dims: batch, or batch x seq);
``exited``: bool ``[...]``; ``exit_layer``: int64 ``[...]`` (-1 = not exited).
"""

from __future__ import annotations

import torch

__all__ = ["route", "route_reference", "route_features_reference", "exit_select",
           "exit_select_reference"]


def route_reference(
    h: torch.Tensor,
    exited: torch.Tensor,
    frozen: torch.Tensor,
    exit_layer: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    threshold: float,
    layer: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the tokens at checkpoint ``layer`` and update the exit state.

    ``score = sigmoid(w2 . silu(w1 @ rms(h) + b1) + b2)`` computed in the router
    weights' dtype (float32); a token that has not exited exits when
    ``score > threshold``: its state is frozen to ``h`` and its exit layer set.

    Returns:
        (exited, frozen, exit_layer), new tensors.
    """
    return _exit_update(_score(h, w1, b1, w2, b2, eps), threshold, layer, h, exited, frozen,
                        exit_layer)


def _score(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
           b2: torch.Tensor, eps: float, features: torch.Tensor | None = None,
           wf: torch.Tensor | None = None) -> torch.Tensor:
    """``sigmoid(w2 . silu(w1 @ rms(h) + b1 [+ wf @ features]) + b2)`` in ``w1``'s dtype."""
    x = h.to(w1.dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    a = torch.nn.functional.linear(x, w1, b1)
    if features is not None:
        # F (5) columns: a broadcast product and a sum, which Inductor fuses into one
        # reduction, where a linear would be one more GEMM launch per checkpoint.
        a = a + (features.to(w1.dtype).unsqueeze(-2) * wf).sum(-1)
    return torch.sigmoid(torch.nn.functional.linear(torch.nn.functional.silu(a), w2, b2).squeeze(-1))


def _exit_update(score: torch.Tensor, threshold: float, layer: int, h: torch.Tensor,
                 exited: torch.Tensor, frozen: torch.Tensor, exit_layer: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A token that has not exited exits where ``score > threshold``: its state is frozen
    to ``h`` and its exit layer set to ``layer``."""
    new = (score > threshold) & ~exited
    frozen_out = torch.where(new.unsqueeze(-1), h.to(frozen.dtype), frozen)
    exit_layer_out = torch.where(new, torch.full_like(exit_layer, layer), exit_layer)
    return exited | new, frozen_out, exit_layer_out


def route_features_reference(
    h: torch.Tensor,
    features: torch.Tensor,
    exited: torch.Tensor,
    frozen: torch.Tensor,
    exit_layer: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    wf: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    threshold: float,
    layer: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route_reference` for a router that also reads ``features`` (``[..., F]``,
    the exit head's confidence): ``score = sigmoid(w2 . silu(w1 @ rms(h) + b1 + wf @ f) + b2)``."""
    return _exit_update(_score(h, w1, b1, w2, b2, eps, features, wf), threshold, layer, h,
                        exited, frozen, exit_layer)


def exit_select_reference(
    exited: torch.Tensor, frozen: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """``where(exited, frozen, h)`` per token: an exited token's layer input is its frozen state."""
    return torch.where(exited.unsqueeze(-1), frozen.to(h.dtype), h)


# The ops are CompositeImplicitAutograd: AOT/Inductor trace through their torch bodies,
# so Inductor fuses them with their neighbours (exit_select into the next layer's input
# norm, the router MLP into a few kernels) and autograd comes for free; in the FX graph
# the insert pass builds they are single named nodes, ``tide::route`` and
# ``tide::exit_select``. A device-specific kernel registered for these names later
# takes precedence over the composite on that device.
_LIB = torch.library.Library("tide", "DEF")
_LIB.define(
    "route(Tensor h, Tensor exited, Tensor frozen, Tensor exit_layer, Tensor w1, Tensor b1, "
    "Tensor w2, Tensor b2, float threshold, int layer, float eps) -> (Tensor, Tensor, Tensor)"
)
_LIB.impl("route", route_reference, "CompositeImplicitAutograd")
_LIB.define("exit_select(Tensor exited, Tensor frozen, Tensor h) -> Tensor")
_LIB.impl("exit_select", exit_select_reference, "CompositeImplicitAutograd")

route = torch.ops.tide.route.default
exit_select = torch.ops.tide.exit_select.default
