"""Exit selection: ``tide::exit_select_fused`` (every layer input after a checkpoint)::

    out[m] = frozen[m] (cast to h's dtype)  if exited[m]  else  h[m]

The reference is :func:`.ops.exit_select_reference`. Each row reads only the tensor it
takes (masked loads), so the kernel moves ``M * H`` elements in and out, not ``2 M H``
in. Grid: ``(rows, cdiv(H, BLOCK_H))``; any ``H``.
"""

from __future__ import annotations

import torch

from .ops import exit_select_reference

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["exit_select_fused", "exit_select_triton", "exit_select_reference"]

_BLOCK_H = 1024


if HAS_TRITON:

    @triton.jit
    def _exit_select_kernel(exited_ptr, frozen_ptr, h_ptr, out_ptr, H,
                            stride_f, stride_h, stride_o, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        # The row's flag, broadcast to the block (Triton's interpreter rejects a scalar
        # flag and-ed into a block mask).
        ex = (tl.zeros([BLOCK_H], dtype=tl.int32) + (tl.load(exited_ptr + row) != 0).to(tl.int32)) != 0
        fv = tl.load(frozen_ptr + row * stride_f + cols, mask=ok & ex, other=0.0)
        hv = tl.load(h_ptr + row * stride_h + cols, mask=ok & (ex == 0), other=0.0)
        tl.store(out_ptr + row * stride_o + cols, tl.where(ex, fv.to(hv.dtype), hv), mask=ok)


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    t2 = t.reshape(-1, H)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(H: int) -> int:
    return min(1 << max(H - 1, 0).bit_length(), _BLOCK_H)


def _launch_select(kernel, exited, frozen, h):
    H = h.shape[-1]
    h2, f2 = _rows(h, H), _rows(frozen, H)
    ex = exited.reshape(-1).contiguous()
    out = torch.empty((h2.shape[0], H), dtype=h.dtype, device=h.device)
    block = _block(H)
    grid = (h2.shape[0], triton.cdiv(H, block))
    kernel[grid](ex, f2, h2, out, H, f2.stride(0), h2.stride(0), out.stride(0),
                 BLOCK_H=block, num_warps=4)
    return out.reshape(h.shape)


def exit_select_triton(exited: torch.Tensor, frozen: torch.Tensor,
                       h: torch.Tensor) -> torch.Tensor:
    """Launch the select kernel directly (also under ``TRITON_INTERPRET=1``)."""
    if h.numel() == 0:
        return exit_select_reference(exited, frozen, h)
    return _launch_select(_exit_select_kernel, exited, frozen, h)


def _exit_select_body(exited: torch.Tensor, frozen: torch.Tensor,
                      h: torch.Tensor) -> torch.Tensor:
    if h.device.type != "cuda" or h.numel() == 0:
        return exit_select_reference(exited, frozen, h)
    from torch.library import wrap_triton

    return _launch_select(wrap_triton(_exit_select_kernel), exited, frozen, h)


if HAS_TRITON:
    exit_select_fused = torch.library.triton_op("tide::exit_select_fused", _exit_select_body,
                                                mutates_args=())
else:  # pragma: no cover
    exit_select_fused = torch.library.custom_op("tide::exit_select_fused", _exit_select_body,
                                                mutates_args=())
    exit_select_fused.register_fake(lambda exited, frozen, h: torch.empty_like(h))


def _select_setup(ctx, inputs, output) -> None:
    exited, frozen, _h = inputs
    ctx.save_for_backward(exited)
    ctx.frozen_dtype = frozen.dtype


def _select_backward(ctx, grad):
    (exited,) = ctx.saved_tensors
    mask = exited.unsqueeze(-1)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return None, torch.where(mask, grad, zero).to(ctx.frozen_dtype), torch.where(mask, zero, grad)


# Autograd as the reference's: an exited token's gradient flows to its frozen state, the
# others' to h (AOT traces a joint graph when a compiled call runs with grad enabled).
exit_select_fused.register_autograd(_select_backward, setup_context=_select_setup)
