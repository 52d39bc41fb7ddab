"""Fused local-to-global cosine loss: CO-BYOL's local term for one view pair.

    loss[b, l] = 2 - 2 cos(P[b, l], Z[b])            P: local predictions [B, L, D] (grad), Z: global targets [B, D]
    output: mean over b, l of loss[b, l]; optionally the per-image means over l ([B]).

Eager PyTorch normalises P (a full read and write of [B, L, D]), multiplies, reduces, and keeps the normalised copy
for backward. Here the forward kernel reads P once and writes two fp32 numbers per row (c = cos and n = |p|);
the backward kernel reads P once more and writes dP once. Accumulation is fp32 whatever P's dtype; any strides
(the [B, L, D] view of a channels-last 1x1-conv output has stride 1 along D, an NCHW one stride L) without a copy.

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
    cos = (F.normalize(P.float(), dim=-1, eps=eps) * F.normalize(Z.detach().float(), dim=-1, eps=eps)[:, None]).sum(-1)
    rows = 2 - 2 * cos                                                           # [B, L]
    return (rows.mean(), rows.mean(1)) if per_image else rows.mean()


@triton.jit
def _local_global_cosine_fwd_kernel(p_ptr, zhat_ptr, cos_ptr, norm_ptr, R, L, D,
                                    stride_p_b, stride_p_l, stride_p_d, eps,
                                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program: BLOCK_R rows r = b * L + l of P; loops over D; writes cos[r] and |P[r]| in fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    b = rows // L
    l = rows % L
    p_row = p_ptr + b.to(tl.int64) * stride_p_b + l.to(tl.int64) * stride_p_l          # [BLOCK_R] pointers
    z_row = zhat_ptr + b.to(tl.int64) * D
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < D)[None, :]
        p = tl.load(p_row[:, None] + d[None, :] * stride_p_d, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        z = tl.load(z_row[:, None] + d[None, :], mask=mask, other=0.0)
        dot += tl.sum(p * z, axis=1)
        sq += tl.sum(p * p, axis=1)
    norm = tl.sqrt(sq)
    tl.store(cos_ptr + rows, dot / tl.maximum(norm, eps), mask=row_ok)
    tl.store(norm_ptr + rows, norm, mask=row_ok)


@triton.jit
def _local_global_cosine_bwd_kernel(p_ptr, zhat_ptr, cos_ptr, norm_ptr, grad_ptr, dp_ptr, R, L, D,
                                    stride_p_b, stride_p_l, stride_p_d,
                                    stride_dp_b, stride_dp_l, stride_dp_d, eps,
                                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # dP[r] = -2 g[r] (ẑ / m - [n > eps] c p / m²), m = max(n, eps): one read of P, one write of dP
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    b = rows // L
    l = rows % L
    c = tl.load(cos_ptr + rows, mask=row_ok, other=0.0)
    n = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    m = tl.maximum(n, eps)
    coef_z = -2.0 * g / m                                                            # [BLOCK_R]
    coef_p = tl.where(n > eps, 2.0 * g * c / (m * m), 0.0)
    p_row = p_ptr + b.to(tl.int64) * stride_p_b + l.to(tl.int64) * stride_p_l
    dp_row = dp_ptr + b.to(tl.int64) * stride_dp_b + l.to(tl.int64) * stride_dp_l
    z_row = zhat_ptr + b.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < D)[None, :]
        p = tl.load(p_row[:, None] + d[None, :] * stride_p_d, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_row[:, None] + d[None, :], mask=mask, other=0.0)
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
        zhat = F.normalize(Z.detach().float(), dim=-1, eps=eps).contiguous()        # [B, D], tiny
        cos = kernels.empty(B, L, device=P.device, dtype=torch.float32)
        norm = kernels.empty(B, L, device=P.device, dtype=torch.float32)
        R = B * L
        block_r, block_d = _blocks(D)
        _local_global_cosine_fwd_kernel[(triton.cdiv(R, block_r),)](
            P, zhat, cos, norm, R, L, D, *P.stride(), eps, BLOCK_R=block_r, BLOCK_D=block_d)
        ctx.save_for_backward(P, zhat, cos, norm)
        ctx.eps = eps
        return 2 - 2 * cos

    @staticmethod
    def backward(ctx, grad_rows):
        P, zhat, cos, norm = ctx.saved_tensors
        B, L, D = P.shape
        grad_rows = grad_rows.float().contiguous()
        dP = torch.empty_like(P)  # same strides as P (empty_like keeps a dense layout's strides)
        if kernels.POISON:
            dP.fill_(float("nan"))
        R = B * L
        block_r, block_d = _blocks(D)
        _local_global_cosine_bwd_kernel[(triton.cdiv(R, block_r),)](
            P, zhat, cos, norm, grad_rows, dP, R, L, D, *P.stride(), *dP.stride(), ctx.eps,
            BLOCK_R=block_r, BLOCK_D=block_d)
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
