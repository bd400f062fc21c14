"""Which route / exit-select op the insert pass emits: Inductor's fusion or the hand kernels.

``tide::route`` / ``tide::exit_select`` (:mod:`.ops`) are composites that Inductor traces
through and fuses itself (backend option ``kernels="inductor"``, the default).
``tide::route_fused`` / ``tide::exit_select_fused`` (:mod:`.route_triton`,
:mod:`.select_triton`) take the same arguments and run the hand Triton kernels on CUDA,
the references elsewhere (``kernels="triton"``).
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (tide::route, tide::exit_select)
from . import route_triton, select_triton  # noqa: F401  (the *_fused ops)

__all__ = ["route_op", "exit_select_op"]


def route_op(kernels: str = "inductor") -> torch._ops.OpOverload:
    """``tide::route_fused`` for ``"triton"``, else ``tide::route`` (same signature)."""
    return torch.ops.tide.route_fused.default if kernels == "triton" else torch.ops.tide.route.default


def exit_select_op(kernels: str = "inductor") -> torch._ops.OpOverload:
    """``tide::exit_select_fused`` for ``"triton"``, else ``tide::exit_select``."""
    return (torch.ops.tide.exit_select_fused.default if kernels == "triton"
            else torch.ops.tide.exit_select.default)
