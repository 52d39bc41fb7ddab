"""kernels/local_info_nce.py: the fused CO-SimCLR local term (Triton interpreter on CPU, fp32; compiled on CUDA,
bf16 too) against its reference local_info_nce_ref: value and the gradients of P1, P2, z1, z2, with and without
candidates gathered from other ranks."""
import pytest
import torch

from conftest import CUDA, needs_cuda
from kernels.local_info_nce import MAX_D, local_info_nce
from kernels.local_info_nce import local_info_nce_ref as local_global_info_nce

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def make(B, L, D, dtype, seed=0, gathered=False):
    g = torch.Generator().manual_seed(seed)
    P1 = torch.randn(B, L, D, generator=g)
    P2 = torch.randn(B, D, L, generator=g).transpose(1, 2)      # the NCHW-map layout: stride L along D
    z1, z2 = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (P1, P2, z1, z2)]
    extra = {}
    if gathered:  # this rank holds rows B..2B-1 of a 3-rank batch
        other = [torch.randn(B, D, generator=g).to(DEVICE, dtype) for _ in range(4)]
        extra = {"z1_all": torch.cat([other[0], leaves[2], other[1]]),
                 "z2_all": torch.cat([other[2], leaves[3], other[3]]), "offset": B}
    return leaves, extra


def check(B, L, D, dtype, gathered=False):
    leaves, extra = make(B, L, D, dtype, gathered=gathered)
    out = local_info_nce(*leaves, 0.2, **extra, backend="triton")
    out.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = local_global_info_nce(*[t.float() if dtype != torch.float32 else t for t in leaves], 0.2,
                                **({k: (v.float() if torch.is_tensor(v) else v) for k, v in extra.items()}))
    ref.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    for name, got, t in zip(("P1", "P2", "z1", "z2"), grads, leaves):
        assert torch.isfinite(got).all(), name
        scale = t.grad.abs().max().item()  # (D = 1: the true gradient of P is 0, both sides give rounding noise)
        torch.testing.assert_close(got.float(), t.grad.float(), atol=tol * scale + 1e-6, rtol=tol, msg=name)


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("L", [1, 7, 49, 196])
@pytest.mark.parametrize("D", [1, 33, 256])
def test_value_and_gradients_match_the_reference_fp32(B, L, D, poison):
    # the interpreter runs tl.dot in numpy and each program instance in Python: keep the CPU cases small (L = 196
    # still runs on CPU at B = 1 and 3; B = 64 with L = 196 takes 20 s there)
    if (B * L * D > 64 * 49 * 33 or B * L > 64 * 49) and not CUDA:
        pytest.skip("large shape: runs on CUDA")
    check(B, L, D, torch.float32)


@pytest.mark.parametrize("B,L,D", [(3, 7, 33), (4, 49, 16)])
def test_gathered_candidates_from_other_ranks(B, L, D, poison):
    check(B, L, D, torch.float32, gathered=True)


@needs_cuda
@pytest.mark.parametrize("B,L,D", [(3, 7, 33), (64, 49, 256), (256, 49, 256), (128, 196, 128), (7, 5, 1000)])
def test_bf16_on_the_gpu(B, L, D, poison):
    check(B, L, D, torch.bfloat16)
    check(B, L, D, torch.bfloat16, gathered=True)


def test_auto_is_the_reference_on_cpu_and_wide_embeddings_fall_back():
    leaves, _ = make(3, 7, 33, torch.float32)
    cpu = [t.detach().cpu() for t in leaves]
    assert local_info_nce(*cpu, 0.2).item() == pytest.approx(local_global_info_nce(*cpu, 0.2).item(), rel=1e-6)
    wide = [torch.randn(2, 3, MAX_D + 1), torch.randn(2, 3, MAX_D + 1), torch.randn(2, MAX_D + 1),
            torch.randn(2, MAX_D + 1)]
    assert local_info_nce(*wide, 0.2, backend="triton").item() == pytest.approx(
        local_global_info_nce(*wide, 0.2).item(), rel=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        local_info_nce(torch.randn(3, 7, 5), torch.randn(3, 7, 5), torch.randn(4, 5), torch.randn(4, 5), 0.2,
                       backend="triton")


def test_every_kernel_file_is_a_leaf():
    """kernels/*.py import only the standard library, torch, triton and kernels itself: nothing else of ours."""
    import ast
    import glob
    import os
    import sys
    from conftest import REPO
    ours = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "*.py"))}
    allowed = {"torch", "torchvision", "triton", "kernels", "numpy"} | set(sys.stdlib_module_names)
    files = sorted(glob.glob(os.path.join(REPO, "kernels", "*.py")))
    assert len(files) >= 4
    for path in files:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top not in ours and top in allowed, f"{os.path.basename(path)} imports {name}"
