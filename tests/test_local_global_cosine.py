"""kernels/local_global_cosine.py: the Triton kernels (interpreter on CPU, fp32; compiled on CUDA, bf16 too) against
the plain-PyTorch reference and an independent formulation: values, per-image values and the gradient."""
import math

import pytest
import torch

from conftest import CUDA, needs_cuda
from kernels.local_global_cosine import local_global_cosine, local_global_cosine_ref

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}  # (value, grad)


def independent(P, Z):
    """The loss written differently: explicit dot products over explicit norms, in float64."""
    P, Z = P.double(), Z.double()
    dots = torch.einsum("bld,bd->bl", P, Z)
    cos = dots / (P.pow(2).sum(-1).sqrt() * Z.pow(2).sum(-1).sqrt()[:, None])
    return (2 - 2 * cos).mean(1)  # per image


def make(B, L, D, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bld":  # the [B, L, D] view of a channels-last 1x1-conv output: stride 1 along D
        P = torch.randn(B, L, D, generator=g)
    else:  # the view of an NCHW map: [B, D, L] transposed, stride L along D
        P = torch.randn(B, D, L, generator=g).transpose(1, 2)
    Z = torch.randn(B, D, generator=g)
    return P.to(DEVICE, dtype).requires_grad_(), Z.to(DEVICE, dtype)


def check(B, L, D, dtype, layout):
    P, Z = make(B, L, D, dtype, layout)
    w = torch.rand(B, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # weights the per-image outputs
    mean, per_image = local_global_cosine(P, Z, per_image=True, backend="triton")
    assert mean.dtype == torch.float32 and per_image.shape == (B,)
    (mean + (w * per_image).sum()).backward()
    grad = P.grad.clone()
    P.grad = None
    ref_mean, ref_per_image = local_global_cosine_ref(P, Z, per_image=True)
    (ref_mean + (w * ref_per_image).sum()).backward()
    tol_v, tol_g = TOL[dtype]
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(mean, ref_mean, atol=tol_v, rtol=tol_v)
    torch.testing.assert_close(per_image, ref_per_image, atol=tol_v, rtol=tol_v)
    # every gradient element is at most 2 (1/(B L) + w_b / L) 2 / |p| in size: the scale of the tolerance
    bound = (4 * (1 / (B * L) + w[:, None] / L) / P.detach().float().norm(dim=-1)).max().item()
    torch.testing.assert_close(grad.float(), P.grad.float(), atol=tol_g * bound, rtol=tol_g)
    if dtype == torch.float32:
        torch.testing.assert_close(per_image.double(), independent(P.detach(), Z), atol=1e-5, rtol=1e-5)
    assert grad.dtype == P.dtype


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("L", [1, 7, 49, 196])
@pytest.mark.parametrize("D", [1, 33, 256])
def test_values_and_gradient_match_the_reference_fp32(B, L, D, poison):
    if B * L * D > 64 * 196 * 33 and not CUDA:  # B 64 at D 256: 2.5-10 s each in the interpreter on 2 cores
        pytest.skip("large shape: runs on CUDA")
    check(B, L, D, torch.float32, "bld" if (B + L + D) % 2 else "bdl")


@pytest.mark.parametrize("layout", ["bld", "bdl"])
def test_both_layouts_without_a_copy(layout, poison):
    check(3, 49, 33, torch.float32, layout)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,D", [(1, 1, 1), (3, 7, 33), (64, 49, 256), (256, 196, 256), (255, 50, 1000)])
def test_half_precision_on_the_gpu(dtype, B, L, D, poison):
    check(B, L, D, dtype, "bld")
    check(B, L, D, dtype, "bdl")


def test_target_gets_no_gradient_and_loss_is_in_range():
    P, Z = make(3, 7, 33, torch.float32, "bld")
    Z.requires_grad_()
    loss = local_global_cosine(P, Z, backend="triton")
    loss.backward()
    assert Z.grad is None and 0 <= loss.item() <= 4


def test_aligned_locations_give_zero_loss_and_opposite_ones_four():
    Z = torch.randn(3, 33, device=DEVICE)
    P = (Z[:, None] * torch.rand(3, 5, 1, device=DEVICE) + 0.1).detach() - 0.1 * torch.ones_like(Z)[:, None]
    P = P.requires_grad_()
    assert local_global_cosine(P, Z, backend="triton").item() == pytest.approx(0, abs=1e-5)
    assert local_global_cosine(-P, Z, backend="triton").item() == pytest.approx(4, abs=1e-5)


def test_auto_backend_uses_the_reference_on_cpu_and_matches():
    P, Z = make(3, 7, 33, torch.float32, "bld")
    a = local_global_cosine(P.cpu(), Z.cpu())            # auto on CPU: the reference
    b = local_global_cosine(P, Z, backend="triton")      # the kernels (compiled on CUDA, interpreted on CPU)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert math.isfinite(a.item())


@pytest.mark.parametrize("P_shape,Z_shape", [((3, 7), (3, 7)), ((3, 7, 5), (4, 5)), ((3, 7, 5), (3, 6)),
                                             ((0, 7, 5), (0, 5))])
def test_bad_shapes_raise(P_shape, Z_shape):
    with pytest.raises(ValueError):
        local_global_cosine(torch.randn(P_shape), torch.randn(Z_shape), backend="triton")


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        local_global_cosine(torch.randn(2, 3, 4), torch.randn(2, 4), backend="cuda")
