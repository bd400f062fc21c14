"""Custom ops of the tide backend (torch.library), each with a plain-torch reference."""

from .fused import exit_select_op, route_op
from .ops import exit_select, exit_select_reference, route, route_reference

__all__ = ["route", "route_reference", "exit_select", "exit_select_reference",
           "route_op", "exit_select_op"]
