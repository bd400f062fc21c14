"""``tide::route`` and ``tide::exit_select``: the two ops the insert pass puts in graphs.

Both are ``torch.library.custom_op``s whose body is the plain-torch reference and whose
fake implementation gives shapes only, so they trace through Dynamo, AOT and Inductor
as single nodes (Inductor calls them as extern kernels). Triton kernels replace the
bodies on CUDA in a later step; the references below stay the specification.

Shapes: ``h``, ``frozen``: ``[..., H]`` (any leading dims: batch, or batch x seq);
``exited``: bool ``[...]``; ``exit_layer``: int64 ``[...]`` (-1 = not exited).
"""

from __future__ import annotations

import torch

__all__ = ["route", "route_reference", "exit_select", "exit_select_reference"]


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
    x = h.to(w1.dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    hidden = torch.nn.functional.silu(torch.nn.functional.linear(x, w1, b1))
    score = torch.sigmoid(torch.nn.functional.linear(hidden, w2, b2).squeeze(-1))
    new = (score > threshold) & ~exited
    frozen_out = torch.where(new.unsqueeze(-1), h.to(frozen.dtype), frozen)
    exit_layer_out = torch.where(new, torch.full_like(exit_layer, layer), exit_layer)
    return exited | new, frozen_out, exit_layer_out


def exit_select_reference(
    exited: torch.Tensor, frozen: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """``where(exited, frozen, h)`` per token: an exited token's layer input is its frozen state."""
    return torch.where(exited.unsqueeze(-1), frozen.to(h.dtype), h)


@torch.library.custom_op("tide::route", mutates_args=())
def route(
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
    return route_reference(h, exited, frozen, exit_layer, w1, b1, w2, b2, threshold, layer, eps)


@route.register_fake
def _route_fake(h, exited, frozen, exit_layer, w1, b1, w2, b2, threshold, layer, eps):
    return torch.empty_like(exited), torch.empty_like(frozen), torch.empty_like(exit_layer)


@torch.library.custom_op("tide::exit_select", mutates_args=())
def exit_select(exited: torch.Tensor, frozen: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return exit_select_reference(exited, frozen, h)


@exit_select.register_fake
def _exit_select_fake(exited, frozen, h):
    return torch.empty_like(h)


# Autograd. The compiled path is for inference, but AOT traces a joint graph whenever the
# model's parameters require grad (outside torch.no_grad), so both ops define gradients:
# exit_select routes the gradient to whichever input it selected; route is a hard
# decision and passes gradient to the frozen state only (none to h through the score).
def _exit_select_setup(ctx, inputs, output):
    exited, _frozen, _h = inputs
    ctx.save_for_backward(exited)


def _exit_select_backward(ctx, grad):
    (exited,) = ctx.saved_tensors
    sel = exited.unsqueeze(-1)
    return None, torch.where(sel, grad, 0.0), torch.where(sel, 0.0, grad)


exit_select.register_autograd(_exit_select_backward, setup_context=_exit_select_setup)


def _route_setup(ctx, inputs, output):
    h, exited, frozen, exit_layer, *_ = inputs
    ctx.save_for_backward(exited, output[0])


def _route_backward(ctx, grad_exited, grad_frozen, grad_exit_layer):
    exited_before, exited_after = ctx.saved_tensors
    new = (exited_after & ~exited_before).unsqueeze(-1)
    grad_h = None if grad_frozen is None else torch.where(new, grad_frozen, 0.0)
    grad_prev = None if grad_frozen is None else torch.where(new, 0.0, grad_frozen)
    return grad_h, None, grad_prev, None, None, None, None, None, None, None, None


route.register_autograd(_route_backward, setup_context=_route_setup)
