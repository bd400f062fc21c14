"""Compaction helpers (compact strategy): indices of continuing tokens, gather, scatter back.

All three keep static shapes (so they can live in CUDA graphs): the index has one slot
per row, the first ``count`` slots valid and the rest ``-1``.

* :func:`continuing_index_triton`: ``pos = cumsum(~exited) - 1``; ``index[pos[m]] = m``
  for each continuing row ``m``; ``count = sum(~exited)`` (int32, on the device, so no
  host sync). One program; a sequential loop over ``BLOCK`` row chunks carries the
  running count (the row counts of decode and prefill are small for a scan).
* :func:`gather_rows_triton`: ``out[j] = x[index[j]]`` (zeros where ``index[j] < 0``).
* :func:`scatter_rows_triton`: ``out[index[j]] = rows[j]`` in place, for ``index[j] >= 0``.

Each has its ``*_reference`` beside it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["continuing_index_triton", "continuing_index_reference", "gather_rows_triton",
           "gather_rows_reference", "scatter_rows_triton", "scatter_rows_reference"]

_BLOCK_H = 1024


def continuing_index_reference(exited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, count)``: rows with ``exited`` false in order, padded with -1; ``count``
    int32 of shape ``[1]``. ``exited`` is flattened."""
    keep = ~exited.reshape(-1)
    rows = torch.nonzero(keep).squeeze(-1)
    index = torch.full((keep.numel(),), -1, dtype=torch.int64, device=exited.device)
    index[: rows.numel()] = rows
    return index, keep.sum().to(torch.int32).reshape(1)


def gather_rows_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[j] = x[index[j]]`` for ``x`` ``[N, H]``; zero rows where ``index[j] < 0``."""
    valid = index >= 0
    out = x.index_select(0, index.clamp(min=0))
    return torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))


def scatter_rows_reference(out: torch.Tensor, rows: torch.Tensor,
                           index: torch.Tensor) -> torch.Tensor:
    """``out[index[j]] = rows[j]`` in place for ``index[j] >= 0``; returns ``out``."""
    valid = index >= 0
    out.index_copy_(0, index[valid], rows[valid].to(out.dtype))
    return out


if HAS_TRITON:

    @triton.jit
    def _continuing_index_kernel(exited_ptr, index_ptr, count_ptr, M, BLOCK: tl.constexpr):
        carry = tl.zeros([], dtype=tl.int32)
        for start in range(0, M, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            ok = rows < M
            keep = ((tl.load(exited_ptr + rows, mask=ok, other=1) != 0) == 0).to(tl.int32)
            pos = carry + tl.cumsum(keep, axis=0) - 1
            tl.store(index_ptr + pos, rows.to(tl.int64), mask=ok & (keep != 0))
            carry += tl.sum(keep, axis=0)
        # Pad: slots >= count get -1 (disjoint from the slots written above).
        for start in range(0, M, BLOCK):
            slots = start + tl.arange(0, BLOCK)
            tl.store(index_ptr + slots, tl.full([BLOCK], -1, tl.int64),
                     mask=(slots < M) & (slots >= (tl.zeros([BLOCK], tl.int32) + carry)))
        tl.store(count_ptr, carry)

    @triton.jit
    def _gather_rows_kernel(x_ptr, index_ptr, out_ptr, H, stride_x, stride_o,
                            BLOCK_H: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        src = tl.zeros([BLOCK_H], dtype=tl.int64) + tl.load(index_ptr + j)  # broadcast
        v = tl.load(x_ptr + src * stride_x + cols, mask=ok & (src >= 0), other=0.0)
        tl.store(out_ptr + j * stride_o + cols, v, mask=ok)

    @triton.jit
    def _scatter_rows_kernel(rows_ptr, index_ptr, out_ptr, H, stride_r, stride_o,
                             BLOCK_H: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        dst = tl.load(index_ptr + j)
        if dst >= 0:
            cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            ok = cols < H
            v = tl.load(rows_ptr + j * stride_r + cols, mask=ok)
            tl.store(out_ptr + dst * stride_o + cols, v, mask=ok)


def _block(n: int, cap: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), cap)


def continuing_index_triton(exited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of :func:`continuing_index_reference`."""
    ex = exited.reshape(-1).contiguous()
    M = ex.numel()
    index = torch.empty((M,), dtype=torch.int64, device=ex.device)
    count = torch.empty((1,), dtype=torch.int32, device=ex.device)
    if M == 0:
        return index, count.zero_()
    _continuing_index_kernel[(1,)](ex, index, count, M, BLOCK=_block(M, 1024), num_warps=4)
    return index, count


def gather_rows_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`gather_rows_reference` (``x``: ``[N, H]``, unit last stride)."""
    H = x.shape[-1]
    idx = index.contiguous()
    out = torch.empty((idx.numel(), H), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = _block(H, _BLOCK_H)
    _gather_rows_kernel[(idx.numel(), triton.cdiv(H, block))](
        x, idx, out, H, x.stride(0), out.stride(0), BLOCK_H=block, num_warps=4)
    return out


def scatter_rows_triton(out: torch.Tensor, rows: torch.Tensor,
                        index: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`scatter_rows_reference` (in place; returns ``out``)."""
    H = out.shape[-1]
    idx = index.contiguous()
    if idx.numel() == 0 or H == 0:
        return out
    block = _block(H, _BLOCK_H)
    _scatter_rows_kernel[(idx.numel(), triton.cdiv(H, block))](
        rows, idx, out, H, rows.stride(0), out.stride(0), BLOCK_H=block, num_warps=4)
    return out
