"""Fused local-to-global cosine loss: CO-BYOL's local term for one view pair.

    loss[b, l] = 2 - 2 cos(P[b, l], Z[b])            P: local predictions [B, L, D] (grad), Z: global targets [B, D]
    output: mean over b, l of loss[b, l]; optionally the per-image means over l ([B]).

Eager PyTorch normalises P (a full read and write of [B, L, D]), multiplies, reduces, and keeps the normalised copy
for backward. Here the forward kernel reads P once (and Z, normalised on the fly) and writes four fp32 numbers per
row (the loss, c = cos, |p|, |z|); the backward kernel reads P once more and writes dP once; the gradient of the
mean reaches it as a broadcast, read through its zero strides without being materialised. Accumulation is fp32
whatever P's dtype; any strides (the [B, L, D] view of a channels-last 1x1-conv output has stride 1 along D, an
NCHW one stride L) without a copy.

Backward, per row p with s = <p, ẑ>, ẑ = Z[b] / max(|Z[b]|, eps), n = |p|, m = max(n, eps), c = s / m:
    dc/dp = ẑ / m - [n > eps] · c · p / m²          (for n > eps: (ẑ - c p / n) / n; below eps the norm is the
                                                     constant eps, as in F.normalize)
    dL/dp = -2 · g[b, l] · dc/dp                   g: the incoming gradient of loss[b, l]
Z is a stop-gradient target: it gets no gradient (BYOL's sg).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels import use_triton

EPS = 1e-12  # F.normalize's default


def local_global_cosine_ref(P, Z, per_image=False, eps=EPS):
    """Plain PyTorch: the mean over b, l of 2 - 2 cos(P[b, l], sg Z[b]) (and the per-image means if asked)."""
    _check(P, Z)
    dt = torch.promote_types(P.dtype, torch.float32)  # at least fp32, as the kernels accumulate
    cos = (F.normalize(P.to(dt), dim=-1, eps=eps) * F.normalize(Z.detach().to(dt), dim=-1, eps=eps)[:, None]).sum(-1)
    rows = 2 - 2 * cos                                                           # [B, L]
    return (rows.mean(), rows.mean(1)) if per_image else rows.mean()


@triton.jit
def _row_block(BLOCK: tl.constexpr, R, L):
    # this program's rows r = b * L + l of the [B, L, D] input: (r, r < R, b, l), b and l as int64 for addressing
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return rows, rows < R, (rows // L).to(tl.int64), (rows % L).to(tl.int64)


@triton.jit
def _local_global_cosine_fwd_kernel(p_ptr, z_ptr, loss_ptr, cos_ptr, pnorm_ptr, znorm_ptr, R, L, D,
                                    stride_p_b, stride_p_l, stride_p_d, stride_z_b, stride_z_d, eps,
                                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program: BLOCK_R rows r = b * L + l of P; loops over D accumulating <p, z>, |p|^2, |z|^2 in fp32;
    # writes loss[r] = 2 - 2 cos and, for backward, cos[r], |p|, |z|
    rows, row_ok, b, l = _row_block(BLOCK_R, R, L)
    p_row = p_ptr + b * stride_p_b + l * stride_p_l          # [BLOCK_R] pointers
    z_row = z_ptr + b * stride_z_b
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    pp = tl.zeros([BLOCK_R], dtype=tl.float32)
    zz = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < D)[None, :]
        p = tl.load(p_row[:, None] + d[None, :] * stride_p_d, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        z = tl.load(z_row[:, None] + d[None, :] * stride_z_d, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(p * z, axis=1)
        pp += tl.sum(p * p, axis=1)
        zz += tl.sum(z * z, axis=1)
    pn = tl.sqrt(pp)
    zn = tl.sqrt(zz)
    cos = dot / (tl.maximum(pn, eps) * tl.maximum(zn, eps))
    tl.store(loss_ptr + rows, 2.0 - 2.0 * cos, mask=row_ok)
    tl.store(cos_ptr + rows, cos, mask=row_ok)
    tl.store(pnorm_ptr + rows, pn, mask=row_ok)
    tl.store(znorm_ptr + rows, zn, mask=row_ok)


@triton.jit
def _local_global_cosine_bwd_kernel(p_ptr, z_ptr, cos_ptr, pnorm_ptr, znorm_ptr, grad_ptr, dp_ptr, R, L, D,
                                    stride_p_b, stride_p_l, stride_p_d, stride_z_b, stride_z_d,
                                    stride_g_b, stride_g_l, stride_dp_b, stride_dp_l, stride_dp_d, eps,
                                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # dP[r] = -2 g[r] (ẑ / m - [n > eps] c p / m²), m = max(|p|, eps), ẑ = z / max(|z|, eps): one read of P, one
    # write of dP. g may be a broadcast (stride 0: the gradient of a mean), read through its strides, no copy.
    rows, row_ok, b, l = _row_block(BLOCK_R, R, L)
    c = tl.load(cos_ptr + rows, mask=row_ok, other=0.0)
    n = tl.load(pnorm_ptr + rows, mask=row_ok, other=1.0)
    zn = tl.load(znorm_ptr + rows, mask=row_ok, other=1.0)
    g = tl.load(grad_ptr + b * stride_g_b + l * stride_g_l, mask=row_ok, other=0.0)
    m = tl.maximum(n, eps)
    coef_z = -2.0 * g / (m * tl.maximum(zn, eps))                                  # [BLOCK_R]
    coef_p = tl.where(n > eps, 2.0 * g * c / (m * m), 0.0)
    p_row = p_ptr + b * stride_p_b + l * stride_p_l
    dp_row = dp_ptr + b * stride_dp_b + l * stride_dp_l
    z_row = z_ptr + b * stride_z_b
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < D)[None, :]
        p = tl.load(p_row[:, None] + d[None, :] * stride_p_d, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_row[:, None] + d[None, :] * stride_z_d, mask=mask, other=0.0).to(tl.float32)
        dp = coef_z[:, None] * z + coef_p[:, None] * p
        tl.store(dp_row[:, None] + d[None, :] * stride_dp_d, dp.to(dp_ptr.dtype.element_ty), mask=mask)


def _blocks(D):
    block_d = min(triton.next_power_of_2(D), 128)
    return max(16, 4096 // block_d), block_d  # ~4k elements per tile: BLOCK_R rows of BLOCK_D


class LocalGlobalCosine(torch.autograd.Function):
    """Rows loss[b, l] = 2 - 2 cos(P[b, l], Z[b]) as fp32 [B, L]; gradient to P only."""

    @staticmethod
    def forward(ctx, P, Z, eps):
        B, L, D = P.shape
        Z = Z.detach()
        loss, cos, pnorm, znorm = (kernels.empty(B, L, device=P.device, dtype=torch.float32) for _ in range(4))
        R = B * L
        block_r, block_d = _blocks(D)
        _local_global_cosine_fwd_kernel[(triton.cdiv(R, block_r),)](
            P, Z, loss, cos, pnorm, znorm, R, L, D, *P.stride(), *Z.stride(), eps, BLOCK_R=block_r, BLOCK_D=block_d)
        ctx.save_for_backward(P, Z, cos, pnorm, znorm)
        ctx.eps = eps
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        P, Z, cos, pnorm, znorm = ctx.saved_tensors
        B, L, D = P.shape
        dP = torch.empty_like(P)  # same strides as P (empty_like keeps a dense layout's strides)
        if kernels.POISON:
            dP.fill_(float("nan"))
        R = B * L
        block_r, block_d = _blocks(D)
        _local_global_cosine_bwd_kernel[(triton.cdiv(R, block_r),)](
            P, Z, cos, pnorm, znorm, grad_rows.float(), dP, R, L, D, *P.stride(), *Z.stride(), *grad_rows.stride(),
            *dP.stride(), ctx.eps, BLOCK_R=block_r, BLOCK_D=block_d)
        return dP, None, None


def local_global_cosine(P, Z, per_image=False, backend="auto", eps=EPS):
    """Mean over b, l of 2 - 2 cos(P[b, l], sg Z[b]); with per_image=True returns (mean, per-image means [B]).
    P: [B, L, D] any float dtype and strides; Z: [B, D]. backend: auto (Triton on CUDA, else the reference),
    triton, or ref."""
    _check(P, Z)
    if not use_triton(backend, P, Z):
        return local_global_cosine_ref(P, Z, per_image, eps)
    rows = LocalGlobalCosine.apply(P, Z, eps)                                       # [B, L] fp32
    return (rows.mean(), rows.mean(1)) if per_image else rows.mean()


def _check(P, Z):
    if P.ndim != 3 or Z.ndim != 2 or P.shape[0] != Z.shape[0] or P.shape[2] != Z.shape[1]:
        raise ValueError(f"local_global_cosine needs P [B, L, D] and Z [B, D], got {tuple(P.shape)} and "
                         f"{tuple(Z.shape)}")
    if P.numel() == 0:
        raise ValueError(f"local_global_cosine got an empty P {tuple(P.shape)}")
    if not (P.is_floating_point() and Z.is_floating_point()):
        raise ValueError(f"local_global_cosine needs float tensors, got {P.dtype} and {Z.dtype}")
