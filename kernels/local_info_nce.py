"""Fused local-to-global InfoNCE: CO-SimCLR's local term, and CO-MoCo v3's (against momentum keys, at the end).

Every location of a view is an anchor against the K = 2N global embeddings of the batch (both views, all ranks);
its positive is the other view's global embedding of the same image, the same view's global embedding of the same
image is masked out (local_info_nce_ref below is the reference; losses.local_global_info_nce calls this file).
Per view, with rows r = (b, l) of P [B, L, D],
candidates C = normalise(cat(z1_all, z2_all)) [K, D] and temperature T:

    â_r = P_r / max(|P_r|, eps),   s_rj = <â_r, C_j> / T   (s_r,self(b) = -inf),   lse_r = logsumexp_j s_rj
    loss_r = lse_r - s_r,pos(b);   output: mean over r (the two views averaged by the public function)

Eager PyTorch writes the [BL, K] logits, reads them for the softmax, writes the log-probabilities, and backward
reads and writes them again. Here:
  forward   one kernel: each program normalises BLOCK_M anchors in registers and sweeps C in BLOCK_N column blocks
            (tl.dot), keeping a running max and sum (online logsumexp) and the positive logit; it writes
            loss_r, lse_r and |P_r| (fp32 [BL] each). The logits never reach memory.
  backward  one kernel recomputes each logit block, forms dS_rj = g_r (softmax_rj - [j = pos]) and
            accumulates dâ_r = sum_j dS_rj C_j / T, then dP_r = (dâ_r - <dâ_r, â_r> â_r) / max(|P_r|, eps);
            it also writes dS_rj / (T max(|P_r|, eps)) once, so dC = that^T @ P is one cuBLAS GEMM
            (a reduction over all B·L rows, which one kernel's programs cannot share without atomics).
            The normalisation of C and its gradient to z stay in autograd (K x D, small).
dS is written once and read once: the only pass of a [BL, K] matrix through memory. Needs D <= 1024 (a row of P
sits in registers); larger D falls back to the reference.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels import use_triton

EPS = 1e-12
MAX_D = 1024


def check_local(fn, P1, P2, z1, z2):
    """Local terms take P1, P2 [B, L, D] and global z1, z2 [B, D] of the same B and D."""
    for name, t, ndim in (("P1", P1, 3), ("P2", P2, 3), ("z1", z1, 2), ("z2", z2, 2)):
        if not isinstance(t, torch.Tensor) or t.ndim != ndim:
            raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
        if t.shape[-1] != P1.shape[-1]:
            raise ValueError(f"{name} has embedding dim {t.shape[-1]}, expected {P1.shape[-1]}")
    if P1.shape != P2.shape or z1.shape != z2.shape or P1.shape[0] != z1.shape[0]:
        raise ValueError(f"{fn} shapes: P {tuple(P1.shape)}/{tuple(P2.shape)}, z {tuple(z1.shape)}/{tuple(z2.shape)}")


def all_or_local(z1, z2, z1_all, z2_all, offset):
    """The candidates' sources: every rank's [N, D] rows (gathered with gradient) and this rank's offset in them,
    or this rank's own [B, D] rows and offset 0."""
    if (z1_all is None) != (z2_all is None):
        raise ValueError("give both z1_all and z2_all, or neither")
    if z1_all is None:
        return z1, z2, 0
    for name, t in (("z1_all", z1_all), ("z2_all", z2_all)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[-1] != z1.shape[-1]:
            raise ValueError(f"{name} must be [N, {z1.shape[-1]}], got shape {tuple(getattr(t, 'shape', ()))}")
    if z1_all.shape != z2_all.shape or not 0 <= offset <= z1_all.shape[0] - z1.shape[0]:
        raise ValueError(f"gathered shapes {tuple(z1_all.shape)}/{tuple(z2_all.shape)} do not hold this rank's "
                         f"{z1.shape[0]} rows at offset {offset}")
    return z1_all, z2_all, offset


def local_info_nce_ref(P1, P2, z1, z2, temperature, z1_all=None, z2_all=None, offset=0):
    """Plain PyTorch: every location of view a is an anchor against the 2N global embeddings; mean over the
    2·B·L anchors (the logits [B, L, 2N] are materialised)."""
    check_local("local_info_nce", P1, P2, z1, z2)
    c1, c2, offset = all_or_local(z1, z2, z1_all, z2_all, offset)
    B, L, N = P1.shape[0], P1.shape[1], c1.shape[0]
    candidates = F.normalize(torch.cat([c1, c2]), dim=1)                  # [2N, D]
    own = torch.arange(B, device=P1.device) + offset
    loss = 0.0
    for P, same_view, other_view in ((P1, own, own + N), (P2, own + N, own)):
        logits = F.normalize(P, dim=-1) @ candidates.T / temperature      # [B, L, 2N]
        masked = F.one_hot(same_view, 2 * N).bool()[:, None, :]           # the same view's own global embedding
        logits = logits.masked_fill(masked, float("-inf"))
        target = other_view[:, None].expand(B, L)
        loss = loss + F.cross_entropy(logits.reshape(B * L, 2 * N), target.reshape(-1))
    return loss / 2


@triton.jit
def _row_block(BLOCK: tl.constexpr, R, L):
    # this program's rows r = b * L + l of the [B, L, D] input: (r, r < R, b, l), b and l as int64 for addressing
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return rows, rows < R, (rows // L).to(tl.int64), (rows % L).to(tl.int64)


@triton.jit
def _local_info_nce_fwd_kernel(p_ptr, c_ptr, pos_ptr, self_ptr, loss_ptr, lse_ptr, norm_ptr, R, L, K, D,
                               stride_p_b, stride_p_l, stride_p_d, stride_c_k, stride_c_d, inv_t, eps,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               DOT_BF16: tl.constexpr):
    rows, row_ok, b, l = _row_block(BLOCK_M, R, L)
    d = tl.arange(0, BLOCK_D)
    a = tl.load(p_ptr + (b * stride_p_b + l * stride_p_l)[:, None] + d[None, :] * stride_p_d,
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)          # [BLOCK_M, BLOCK_D]
    norm = tl.sqrt(tl.sum(a * a, axis=1))
    a = a / tl.maximum(norm, eps)[:, None]                                                  # â
    pos = tl.load(pos_ptr + b, mask=row_ok, other=-1)
    own = tl.load(self_ptr + b, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        c = tl.load(c_ptr + cols[:, None] * stride_c_k + d[None, :] * stride_c_d,
                    mask=(cols < K)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)   # [BLOCK_N, BLOCK_D]
        if DOT_BF16:
            s = tl.dot(a.to(tl.bfloat16), tl.trans(c.to(tl.bfloat16))) * inv_t
        else:
            s = tl.dot(a, tl.trans(c), input_precision="ieee") * inv_t                        # [BLOCK_M, BLOCK_N]
        pos_logit += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), axis=1)
        s = tl.where((cols[None, :] < K) & (cols[None, :] != own[:, None]), s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(loss_ptr + rows, lse - pos_logit, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(norm_ptr + rows, norm, mask=row_ok)


@triton.jit
def _local_info_nce_bwd_kernel(p_ptr, c_ptr, pos_ptr, self_ptr, lse_ptr, norm_ptr, grad_ptr, dp_ptr, ds_ptr,
                               R, L, K, D, stride_p_b, stride_p_l, stride_p_d, stride_c_k, stride_c_d,
                               stride_g_b, stride_g_l, stride_dp_b, stride_dp_l, stride_dp_d, inv_t, eps,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               DOT_BF16: tl.constexpr):
    rows, row_ok, b, l = _row_block(BLOCK_M, R, L)
    d = tl.arange(0, BLOCK_D)
    dmask = row_ok[:, None] & (d < D)[None, :]
    a = tl.load(p_ptr + (b * stride_p_b + l * stride_p_l)[:, None] + d[None, :] * stride_p_d,
                mask=dmask, other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    m = tl.maximum(norm, eps)
    a = a / m[:, None]                                                                      # â
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + b * stride_g_b + l * stride_g_l, mask=row_ok, other=0.0)
    pos = tl.load(pos_ptr + b, mask=row_ok, other=-1)
    own = tl.load(self_ptr + b, mask=row_ok, other=-1)
    da = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                                    # sum_j dS_rj C_j
    for k0 in range(0, K, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        c = tl.load(c_ptr + cols[:, None] * stride_c_k + d[None, :] * stride_c_d,
                    mask=(cols < K)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        if DOT_BF16:
            s = tl.dot(a.to(tl.bfloat16), tl.trans(c.to(tl.bfloat16))) * inv_t
        else:
            s = tl.dot(a, tl.trans(c), input_precision="ieee") * inv_t
        live = (cols[None, :] < K) & (cols[None, :] != own[:, None]) & row_ok[:, None]
        prob = tl.where(live, tl.exp(s - lse[:, None]), 0.0)
        ds = g[:, None] * (prob - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0))      # [BLOCK_M, BLOCK_N]
        ds = tl.where(live, ds, 0.0)
        if DOT_BF16:
            da += tl.dot(ds.to(tl.bfloat16), c.to(tl.bfloat16))
        else:
            da += tl.dot(ds, c, input_precision="ieee")
        # dS / (T m): dC = (that)^T @ P, one GEMM outside
        tl.store(ds_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                 (ds * inv_t / m[:, None]).to(ds_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])
    da = da * inv_t                                                                         # dL/dâ
    radial = tl.sum(da * a, axis=1)
    dp = tl.where((norm > eps)[:, None], (da - radial[:, None] * a) / m[:, None], da / m[:, None])
    tl.store(dp_ptr + (b * stride_dp_b + l * stride_dp_l)[:, None] + d[None, :] * stride_dp_d,
             dp.to(dp_ptr.dtype.element_ty), mask=dmask)


CONFIG = {"block_m": 0, "block_n": 0, "num_warps": 4}  # 0 = the defaults below; bench_kernels.py sweeps these


def _blocks(D, K):
    # defaults from the H100 sweep at B=256, L=49, D=256 (BENCHMARKS.md): 64 x 32 x 4 warps, 0.218 ms fwd+bwd
    block_d = max(16, triton.next_power_of_2(D))
    block_m = CONFIG["block_m"] or max(16, min(64, 16384 // block_d))
    block_n = CONFIG["block_n"] or max(16, min(32, triton.next_power_of_2(K)))
    return block_m, block_n, block_d


class LocalInfoNCE(torch.autograd.Function):
    """Rows loss_r of one view's anchors P [B, L, D] against normalised candidates C [K, D]; gradients to P and C."""

    @staticmethod
    def forward(ctx, P, C, pos, own, temperature, eps):
        B, L, D = P.shape
        K = C.shape[0]
        loss, lse, norm = (kernels.empty(B, L, device=P.device, dtype=torch.float32) for _ in range(3))
        R = B * L
        bm, bn, bd = _blocks(D, K)
        dot_bf16 = P.dtype == torch.bfloat16 or C.dtype == torch.bfloat16
        _local_info_nce_fwd_kernel[(triton.cdiv(R, bm),)](
            P, C, pos, own, loss, lse, norm, R, L, K, D, *P.stride(), *C.stride(), 1.0 / temperature, eps,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_BF16=dot_bf16, num_warps=CONFIG["num_warps"])
        ctx.save_for_backward(P, C, pos, own, lse, norm)
        ctx.temperature, ctx.eps, ctx.dot_bf16 = temperature, eps, dot_bf16
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        P, C, pos, own, lse, norm = ctx.saved_tensors
        B, L, D = P.shape
        K = C.shape[0]
        R = B * L
        dP = torch.empty_like(P)
        ds = kernels.empty(R, K, device=P.device, dtype=P.dtype if ctx.dot_bf16 else torch.float32)
        if kernels.POISON:
            dP.fill_(float("nan"))
        bm, bn, bd = _blocks(D, K)
        _local_info_nce_bwd_kernel[(triton.cdiv(R, bm),)](
            P, C, pos, own, lse, norm, grad_rows.float(), dP, ds, R, L, K, D, *P.stride(), *C.stride(),
            *grad_rows.stride(), *dP.stride(), 1.0 / ctx.temperature, ctx.eps,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_BF16=ctx.dot_bf16, num_warps=CONFIG["num_warps"])
        # the candidates' gradient (one GEMM), unless they are constants (CO-MoCo v3's momentum keys)
        dC = (ds.T @ P.reshape(R, D).to(ds.dtype)).to(C.dtype) if ctx.needs_input_grad[1] else None   # [K, D]
        return dP, dC, None, None, None, None


def local_info_nce(P1, P2, z1, z2, temperature, z1_all=None, z2_all=None, offset=0, backend="auto", eps=EPS):
    """Same arguments and value as local_info_nce_ref: mean over the 2·B·L anchors.
    backend: auto (Triton on CUDA, else the reference), triton, or ref."""
    check_local("local_info_nce", P1, P2, z1, z2)
    if not use_triton(backend, P1, P2) or P1.shape[-1] > MAX_D:
        return local_info_nce_ref(P1, P2, z1, z2, temperature, z1_all, z2_all, offset)
    c1, c2, offset = all_or_local(z1, z2, z1_all, z2_all, offset)
    B, N = P1.shape[0], c1.shape[0]
    C = F.normalize(torch.cat([c1, c2]), dim=1, eps=eps)                                  # [2N, D]
    if P1.dtype == torch.bfloat16:
        C = C.to(torch.bfloat16)
    own = torch.arange(B, device=P1.device, dtype=torch.int32) + offset
    loss1 = LocalInfoNCE.apply(P1, C, own + N, own, float(temperature), eps).mean()         # view 1: positive in view 2
    loss2 = LocalInfoNCE.apply(P2, C, own, own + N, float(temperature), eps).mean()
    return (loss1 + loss2) / 2


# ---------------------------------------------------------------------------------------------------------------
# Against momentum keys (CO-MoCo v3's local term): the same kernel with the keys of the other view as the
# candidates, the positive the same image's key, nothing masked (own = -1) and no gradient to the keys.

def local_key_info_nce_ref(P, keys, temperature, keys_all=None, offset=0):
    """Plain PyTorch: every location of P [B, L, D] is a query against the N momentum keys (keys_all [N, D], or
    this rank's keys [B, D]), detached; positive: the same image's key. Mean over the B·L queries."""
    _check_keys(P, keys, keys_all, offset)
    C = keys_all if keys_all is not None else keys
    B, L = P.shape[0], P.shape[1]
    logits = F.normalize(P, dim=-1) @ F.normalize(C.detach(), dim=1).T / temperature       # [B, L, N]
    target = (torch.arange(B, device=P.device) + offset)[:, None].expand(B, L)
    return F.cross_entropy(logits.reshape(B * L, -1), target.reshape(-1))


def _check_keys(P, keys, keys_all, offset):
    if not isinstance(P, torch.Tensor) or P.ndim != 3:
        raise ValueError(f"P must be a 3-D tensor [B, L, D], got shape {tuple(getattr(P, 'shape', ()))}")
    if not isinstance(keys, torch.Tensor) or keys.shape != (P.shape[0], P.shape[2]):
        raise ValueError(f"keys must be [{P.shape[0]}, {P.shape[2]}], got {tuple(getattr(keys, 'shape', ()))}")
    if keys_all is not None and (keys_all.ndim != 2 or keys_all.shape[1] != P.shape[2] or
                                 not 0 <= offset <= keys_all.shape[0] - P.shape[0]):
        raise ValueError(f"keys_all {tuple(keys_all.shape)} does not hold this rank's {P.shape[0]} keys at offset "
                         f"{offset}")


def local_key_info_nce(P, keys, temperature, keys_all=None, offset=0, backend="auto", eps=EPS):
    """Same arguments and value as local_key_info_nce_ref (the fused kernel above on CUDA with backend auto)."""
    _check_keys(P, keys, keys_all, offset)
    if not use_triton(backend, P) or P.shape[-1] > MAX_D:
        return local_key_info_nce_ref(P, keys, temperature, keys_all, offset)
    C = F.normalize((keys_all if keys_all is not None else keys).detach(), dim=1, eps=eps)
    if P.dtype == torch.bfloat16:
        C = C.to(torch.bfloat16)
    own = torch.arange(P.shape[0], device=P.device, dtype=torch.int32) + offset
    return LocalInfoNCE.apply(P, C, own, torch.full_like(own, -1), float(temperature), eps).mean()
