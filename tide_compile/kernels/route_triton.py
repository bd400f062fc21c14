"""Fused router + exit-state update: ``tide::route_fused``, one Triton launch per checkpoint.

Maths (the reference is :func:`.ops.route_reference`; this kernel computes the same
function, always in float32 whatever the dtype of ``h``)::

    x      = h[m, :]                                   (upcast to fp32)
    r      = rsqrt(mean_k x_k^2 + eps)                 parameter-free RMS norm
    z_b    = r * sum_k W1[b, k] x_k + b1[b]            down projection (rstd factored out)
    logit  = b2 + sum_b w2[b] * silu(z_b)              up projection
    new    = sigmoid(logit) > threshold  and  not exited[m]
    exited'     = exited | new
    frozen'[m]  = h[m]     if new else frozen[m]       (cast to frozen's dtype)
    exit_layer' = layer    if new else exit_layer[m]

Parallel layout: program ``(pm, pb)`` owns ``BLOCK_M`` rows and ``BLOCK_B`` bottleneck
units, loops over the hidden size in ``BLOCK_K`` chunks (any ``H``, any ``B``: no table
of sizes) and accumulates both ``sum x^2`` and ``W1 x`` in the same pass. ``logit`` is
linear in ``silu(z_b)``, so each program writes its partial sum over its ``b``-block
to a scratch row; the *last* program of a row block to arrive (an atomic ticket per row
block) adds the partials in a fixed order (deterministic, no float atomics) and does the
threshold and the state update. At batch-1 decode the grid is ``B / BLOCK_B`` programs,
each reading a slice of ``W1`` (the 2 MB of a 4096 x 128 fp32 router): the read is spread
over many SMs instead of one. The ticket counters need a zeroed int32 per row block
(``torch.zeros``, a 4-byte fill beside the launch).

On CUDA the op is a ``torch.library.triton_op``: Inductor sees the kernel in the compiled
graph (no graph break). On other devices the same op runs :func:`route_reference`
(traced through by AOT/Inductor like the composite ``tide::route``).
"""

from __future__ import annotations

import torch

import inspect
import math

from ..confidence import confidence_features
from .ops import route_features_reference, route_reference

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton
    HAS_TRITON = False

__all__ = ["route_fused", "route_conf_fused", "route_triton", "route_reference",
           "route_conf_reference", "route_score_reference", "MAX_CONF_CANDIDATES", "HAS_TRITON"]

#: The most candidates per token the fused kernel reads in registers (``BLOCK_C``); routers
#: with more take the composite route.
MAX_CONF_CANDIDATES = 256


if HAS_TRITON:

    @triton.jit(do_not_specialize=["layer"])
    def _route_fused_kernel(
        h_ptr, exited_ptr, frozen_ptr, exit_layer_ptr,
        w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        exited_out_ptr, frozen_out_ptr, exit_layer_out_ptr,
        partial_ptr, ticket_ptr, score_ptr,
        zc_ptr, wf_ptr,
        M, H, B, C,
        stride_h, stride_f, stride_fo, stride_w1, stride_zc,
        threshold, layer, eps, inv_log_c,
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr, WRITE_SCORE: tl.constexpr,
        HAS_CONF: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1)
        num_b = tl.num_programs(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bs < B
        rows64 = rows.to(tl.int64)

        acc = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            x = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w1_ptr + bs[:, None] * stride_w1 + ks[None, :],
                        mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
            if USE_DOT:
                # Many rows (prefill): matrix units, full fp32 precision.
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                # Few rows (decode): a broadcast product on the CUDA cores; the launch is
                # bound by reading W1, not by these FMAs.
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        rstd = 1.0 / tl.sqrt(sumsq / H + eps)
        b1 = tl.load(b1_ptr + bs, mask=b_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w2_ptr + bs, mask=b_ok, other=0.0).to(tl.float32)
        z = acc * rstd[:, None] + b1[None, :]
        if HAS_CONF:
            # The confidence columns of the candidate logits zc (C per row), computed by
            # every b-block for its rows (C floats a row), then wf @ f.
            cs = tl.arange(0, BLOCK_C)
            c_ok = cs < C
            zc = tl.load(zc_ptr + rows64[:, None] * stride_zc + cs[None, :],
                         mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            zc = tl.where(c_ok[None, :], zc, float("-inf"))
            z1 = tl.max(zc, axis=1)
            lse = z1 + tl.log(tl.sum(tl.exp(zc - z1[:, None]), axis=1))
            logp = zc - lse[:, None]
            ent = -tl.sum(tl.where(c_ok[None, :], tl.exp(logp) * logp, 0.0), axis=1) * inv_log_c
            first = tl.argmax(zc, axis=1)
            z2 = tl.max(tl.where(cs[None, :] == first[:, None], float("-inf"), zc), axis=1)
            p1 = tl.exp(z1 - lse)
            p2 = tl.exp(z2 - lse)
            wf = wf_ptr + bs * 5  # [B, 5] contiguous: confidence.COLUMNS
            z += p1[:, None] * tl.load(wf, mask=b_ok, other=0.0)[None, :]
            z += (p1 - p2)[:, None] * tl.load(wf + 1, mask=b_ok, other=0.0)[None, :]
            z += ent[:, None] * tl.load(wf + 2, mask=b_ok, other=0.0)[None, :]
            z += z1[:, None] * tl.load(wf + 3, mask=b_ok, other=0.0)[None, :]
            z += (z1 - z2)[:, None] * tl.load(wf + 4, mask=b_ok, other=0.0)[None, :]
        act = z * tl.sigmoid(z)  # silu; masked units contribute w2 = 0
        part = tl.sum(act * w2[None, :], axis=1)
        tl.store(partial_ptr + pid_b * M + rows64, part, mask=row_ok)

        # Release our partial, then take a ticket: the last program of this row block
        # finishes the row block (acq_rel atomics order the partial stores).
        ticket = tl.atomic_add(ticket_ptr + pid_m, 1, sem="acq_rel")
        if ticket == num_b - 1:
            logit = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(b2_ptr).to(tl.float32)
            for j in range(0, num_b):  # fixed order: deterministic
                logit += tl.load(partial_ptr + j * M + rows64, mask=row_ok, other=0.0,
                                 volatile=True)
            score = tl.sigmoid(logit)
            if WRITE_SCORE:
                tl.store(score_ptr + rows64, score, mask=row_ok)
            old = tl.load(exited_ptr + rows64, mask=row_ok, other=0) != 0
            new = (score > threshold) & (old == 0) & row_ok
            tl.store(exited_out_ptr + rows64, old | new, mask=row_ok)
            el = tl.load(exit_layer_ptr + rows64, mask=row_ok, other=0)
            tl.store(exit_layer_out_ptr + rows64, tl.where(new, layer, el), mask=row_ok)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                ok = row_ok[:, None] & (ks < H)[None, :]
                # Read h only for newly exited rows and frozen only for the others.
                hv = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                             mask=ok & new[:, None], other=0.0)
                fv = tl.load(frozen_ptr + rows64[:, None] * stride_f + ks[None, :],
                             mask=ok & (new == 0)[:, None], other=0.0)
                out = tl.where(new[:, None], hv.to(fv.dtype), fv)
                tl.store(frozen_out_ptr + rows64[:, None] * stride_fo + ks[None, :], out,
                         mask=ok)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _blocks(m: int | torch.SymInt, h: int, b: int) -> tuple[int, int, int, bool]:
    """Block sizes from the shape (a rule, not a table): few rows -> broadcast FMAs and
    small ``b``-blocks for many programs; many rows -> ``tl.dot`` tiles.

    A symbolic row count (a graph compiled once for every step length, e.g. a prefill
    marked dynamic) gets the many-rows tiles without reading it: comparing or converting
    it would specialize the compiled graph to the traced length (Dynamo then refuses a
    dimension marked dynamic). The tiles are correct for any row count (masked).
    """
    if isinstance(m, torch.SymInt) or m >= 16:
        # 32 x 32 x 64 tiles: ~190 registers, no spills (sm_90, ptxas).
        block_m, block_b = 32, min(max(_pow2(b), 16), 32)
        block_k = min(max(_pow2(h), 16), 64)
        return block_m, block_b, block_k, True
    block_m = min(_pow2(m), 8)
    block_b = min(_pow2(b), 4)
    # Keep the [BLOCK_M, BLOCK_B, BLOCK_K] product at <= 4096 elements (registers).
    block_k = min(_pow2(h), 4096 // (block_m * block_b), 1024)
    return block_m, block_b, max(block_k, 16), False


def _launch_route(kernel, h, exited, frozen, exit_layer, w1, b1, w2, b2,
                  threshold, layer, eps, score=None, zc=None, wf=None):
    H = h.shape[-1]
    lead = h.shape[:-1]
    h2 = h.reshape(-1, H)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    f2 = frozen.reshape(-1, H)
    if f2.stride(-1) != 1:
        f2 = f2.contiguous()
    M = h2.shape[0]
    B = w1.shape[0]
    w1c, b1c, w2c, b2c = (t.contiguous() for t in (w1, b1, w2.reshape(-1), b2.reshape(-1)))
    ex = exited.reshape(-1).contiguous()
    el = exit_layer.reshape(-1).contiguous()
    exited_out = torch.empty_like(ex)
    exit_layer_out = torch.empty_like(el)
    frozen_out = torch.empty((M, H), dtype=frozen.dtype, device=h.device)
    block_m, block_b, block_k, use_dot = _blocks(M, H, B)
    grid = (triton.cdiv(M, block_m), triton.cdiv(B, block_b))
    partial = torch.empty((grid[1], M), dtype=torch.float32, device=h.device)
    tickets = torch.zeros((grid[0],), dtype=torch.int32, device=h.device)
    if zc is None:
        z2, wfc, C = partial, partial, 2
    else:
        C = zc.shape[-1]
        z2 = zc.reshape(-1, C)
        if z2.stride(-1) != 1:
            z2 = z2.contiguous()
        wfc = wf.contiguous()
    kernel[grid](
        h2, ex, f2, el, w1c, b1c, w2c, b2c,
        exited_out, frozen_out, exit_layer_out, partial, tickets,
        partial if score is None else score.view(-1),
        z2, wfc,
        M, H, B, C, h2.stride(0), f2.stride(0), frozen_out.stride(0), w1c.stride(0),
        z2.stride(0), float(threshold), int(layer), float(eps), 1.0 / math.log(C),
        BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_K=block_k, USE_DOT=use_dot,
        WRITE_SCORE=score is not None, HAS_CONF=zc is not None,
        BLOCK_C=_pow2(C) if zc is not None else 2, num_warps=4,
    )
    return (exited_out.reshape(lead), frozen_out.reshape(frozen.shape),
            exit_layer_out.reshape(lead))


def route_triton(h, exited, frozen, exit_layer, w1, b1, w2, b2, threshold, layer, eps,
                 score=None, zc=None, wf=None):
    """Launch the fused route kernel directly (also under ``TRITON_INTERPRET=1``).

    Same arguments and results as :func:`route_reference`; ``h`` of any float dtype,
    router weights float32 (computed in float32 regardless). Launches on the current
    stream (Triton's default). ``score``: an optional float32 tensor shaped like
    ``exited`` that receives the scores (for tests and statistics). ``zc`` (candidate
    logits, ``[..., C]``) and ``wf`` (``[B, 5]``): a router that reads the confidence
    features, as :func:`route_conf_reference`.
    """
    if h.numel() == 0:
        if zc is not None:
            return route_conf_reference(h, zc, exited, frozen, exit_layer, w1, b1, wf, w2, b2,
                                        threshold, layer, eps)
        return route_reference(h, exited, frozen, exit_layer, w1, b1, w2, b2,
                               threshold, layer, eps)
    return _launch_route(_route_fused_kernel, h, exited, frozen, exit_layer, w1, b1, w2,
                         b2, threshold, layer, eps, score, zc, wf)


def route_conf_reference(h, zc, exited, frozen, exit_layer, w1, b1, wf, w2, b2, threshold,
                         layer, eps):
    """:func:`~.ops.route_features_reference` with the features computed from the candidate
    logits ``zc`` (:func:`~tide_compile.confidence.confidence_features`)."""
    return route_features_reference(h, confidence_features(zc), exited, frozen, exit_layer,
                                     w1, b1, wf, w2, b2, threshold, layer, eps)


def route_score_reference(h, w1, b1, w2, b2, eps):
    """The score of :func:`route_reference`, shape ``h.shape[:-1]`` (in ``w1``'s dtype)."""
    x = h.to(w1.dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    hidden = torch.nn.functional.silu(torch.nn.functional.linear(x, w1, b1))
    return torch.sigmoid(torch.nn.functional.linear(hidden, w2, b2).squeeze(-1))


def _route_fused_body(
    h: torch.Tensor, exited: torch.Tensor, frozen: torch.Tensor, exit_layer: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    threshold: float, layer: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if h.device.type != "cuda" or h.numel() == 0:
        # CPU (and empty inputs): the plain reference, traced through by AOT/Inductor.
        # (It returns new tensors, never its inputs: a custom op may not alias them.)
        return route_reference(h, exited, frozen, exit_layer, w1, b1, w2, b2,
                               threshold, layer, eps)
    from torch.library import wrap_triton

    return _launch_route(wrap_triton(_route_fused_kernel), h, exited, frozen, exit_layer,
                         w1, b1, w2, b2, threshold, layer, eps)


def _route_conf_fused_body(
    h: torch.Tensor, zc: torch.Tensor, exited: torch.Tensor, frozen: torch.Tensor,
    exit_layer: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, wf: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, threshold: float, layer: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if h.device.type != "cuda" or h.numel() == 0:
        return route_conf_reference(h, zc, exited, frozen, exit_layer, w1, b1, wf, w2, b2,
                                    threshold, layer, eps)
    from torch.library import wrap_triton

    return _launch_route(wrap_triton(_route_fused_kernel), h, exited, frozen, exit_layer,
                         w1, b1, w2, b2, threshold, layer, eps, None, zc, wf)


def _define_route_op(name: str, body, state_at: int):
    """``tide::<name>`` from ``body``: a ``triton_op`` where Triton is installed (Inductor sees
    the kernel), else a custom op with a fake. ``exited, frozen, exit_layer`` are inputs
    ``state_at ..`` (``h`` is input 0) and the three outputs.

    Autograd as the reference's for the states (frozen <- h where a token exits now); the
    exit decision itself is a threshold, so the router weights get no gradient.
    """
    if HAS_TRITON:
        op = torch.library.triton_op(f"tide::{name}", body, mutates_args=())
    else:  # pragma: no cover
        op = torch.library.custom_op(f"tide::{name}", body, mutates_args=())
        op.register_fake(lambda *a: tuple(torch.empty_like(t) for t in a[state_at:state_at + 3]))
    num_inputs = len(inspect.signature(body).parameters)

    def setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[state_at], output[0])
        ctx.dtypes = (inputs[0].dtype, inputs[state_at + 1].dtype)

    def backward(ctx, g_exited, g_frozen, g_exit_layer):
        old, new = ctx.saved_tensors
        h_dtype, frozen_dtype = ctx.dtypes
        grads: list = [None] * num_inputs
        if g_frozen is not None:
            mask = (new & ~old).unsqueeze(-1)
            zero = torch.zeros((), dtype=g_frozen.dtype, device=g_frozen.device)
            grads[0] = torch.where(mask, g_frozen, zero).to(h_dtype)
            grads[state_at + 1] = torch.where(mask, zero, g_frozen).to(frozen_dtype)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup)
    return op


route_fused = _define_route_op("route_fused", _route_fused_body, 1)
# ``tide::route_conf_fused``: the route of a router that reads the confidence features,
# from the candidate logits, in the same one launch (the features in registers).
route_conf_fused = _define_route_op("route_conf_fused", _route_conf_fused_body, 2)
