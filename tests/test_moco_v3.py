"""MoCo v3 and CO-MoCo v3: the losses against formulas written here from the MoCo v3 paper (Chen, Xie, He 2021,
Algorithm 1: ctr(q, k) = CrossEntropy(q k^T / tau, labels) * 2 tau, loss = ctr(q1, k2) + ctr(q2, k1)), with
values, gradients, stop-gradients and symmetry; the fused local kernel (interpreter on CPU) against its reference;
the momentum heads' shape."""
import math

import pytest
import torch

from conftest import CUDA
from kernels.local_info_nce import local_key_info_nce, local_key_info_nce_ref
from losses import multicrop_local_key_info_nce, multicrop_moco_v3

B, L, D, T = 4, 5, 7, 0.5
DEVICE = "cuda" if CUDA else "cpu"


def _rand(*shape, seed, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                       requires_grad=grad)


def _ctr(q, k, offset=0):
    """The paper's ctr, one query at a time: -log softmax over the keys at the same image's key, times 2 tau."""
    total = 0.0
    for b in range(q.shape[0]):
        sims = torch.stack([(q[b] / q[b].norm()) @ (k[j] / k[j].norm()) / T for j in range(k.shape[0])])
        total = total - (sims[offset + b] - torch.logsumexp(sims, 0))
    return total / q.shape[0] * 2 * T


def test_moco_v3_loss_is_the_papers_symmetric_ctr():
    q1, q2, k1, k2 = (_rand(B, D, seed=i) for i in range(4))
    got = multicrop_moco_v3([q1, q2], [k1, k2], T)
    ref = _ctr(q1, k2.detach()) + _ctr(q2, k1.detach())
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    g = torch.autograd.grad(got, [q1, q2])
    r = torch.autograd.grad(ref, [q1, q2])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the keys are stop-gradient (the momentum encoder's outputs)
    assert torch.autograd.grad(multicrop_moco_v3([q1, q2], [k1, k2], T), [k1, k2], allow_unused=True) == (None, None)
    # symmetric in the two views; a perfect query with far-apart keys approaches 0
    torch.testing.assert_close(multicrop_moco_v3([q2, q1], [k2, k1], T), got)
    keys = torch.eye(B, D, dtype=torch.float64) * 50
    assert float(multicrop_moco_v3([keys, keys], [keys, keys], 0.05)) < 1e-6


def test_moco_v3_keys_gathered_from_other_ranks():
    """This rank's B queries against the 3B keys of 3 ranks (its own at offset B): the positive is its own key."""
    q1, q2, k1, k2 = (_rand(B, D, seed=i) for i in range(4))
    others = [_rand(B, D, seed=10 + i, grad=False) for i in range(4)]
    k1_all, k2_all = torch.cat([others[0], k1, others[1]]), torch.cat([others[2], k2, others[3]])
    got = multicrop_moco_v3([q1, q2], [k1, k2], T, [k1_all, k2_all], B)
    ref = _ctr(q1, k2_all.detach(), B) + _ctr(q2, k1_all.detach(), B)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_multicrop_moco_v3_averages_the_pairs():
    qs = [_rand(B, D, seed=i) for i in range(5)]       # 3 global + 2 local views
    ks = [_rand(B, D, seed=20 + i) for i in range(3)]
    pairs = [(v, g) for v in range(5) for g in range(3) if g != v]
    ref = 2 / len(pairs) * sum(_ctr(qs[v], ks[g].detach()) for v, g in pairs)
    torch.testing.assert_close(multicrop_moco_v3(qs, ks, T), ref, rtol=1e-12, atol=0)


def test_co_moco_v3_local_term_is_ctr_over_every_location():
    Q1, Q2 = _rand(B, L, D, seed=1), _rand(B, L, D, seed=2)
    k1, k2 = _rand(B, D, seed=3), _rand(B, D, seed=4)
    got = multicrop_local_key_info_nce([Q1, Q2], [k1, k2], T, backend="ref")
    # every location l of view 1 is a query of its own: ctr over the B images at that location, averaged over l
    ref = sum(_ctr(Q1[:, l], k2.detach()) + _ctr(Q2[:, l], k1.detach()) for l in range(L)) / L
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(got, [Q1, Q2]), torch.autograd.grad(ref, [Q1, Q2])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B_,L_,D_,gathered", [(3, 7, 33, False), (1, 1, 1, False), (5, 4, 16, True)])
def test_local_key_kernel_matches_its_reference(B_, L_, D_, gathered, poison):
    g = torch.Generator().manual_seed(0)
    P = torch.randn(B_, D_, L_, generator=g).transpose(1, 2).to(DEVICE).requires_grad_()   # the NCHW-map layout
    keys = torch.randn(B_, D_, generator=g).to(DEVICE)
    extra = {}
    if gathered:
        extra = {"keys_all": torch.cat([torch.randn(2, D_, generator=g).to(DEVICE), keys]), "offset": 2}
    out = local_key_info_nce(P, keys, 0.2, backend="triton", **extra)
    (grad,) = torch.autograd.grad(out, [P])
    ref = local_key_info_nce_ref(P, keys, 0.2, **extra)
    (ref_grad,) = torch.autograd.grad(ref, [P])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()) + 1e-7)


def test_moco_v3_heads_as_its_resnet_code():
    """MoCo v3's ResNet code: the projectors end in a BatchNorm without affine parameters after a bias-free layer;
    the predictors end in a plain layer (method.pred_out_bn=fixed brings back the pre-0.7.0 BatchNorm)."""
    import torch.nn as nn
    from methods import build_net
    from rf_resnet import build_backbone
    net = build_net(build_backbone("resnet18_w16_cifar", width=4), "co_moco_v3", 32, 16, 32, 16)
    for head in (net.projector, net.local_projector):
        last = head[-1]
        assert isinstance(last, nn.modules.batchnorm._BatchNorm) and not last.affine
        assert all(m.bias is None for m in head if isinstance(m, (nn.Linear, nn.Conv2d)))
    for head in (net.predictor, net.local_predictor):
        assert isinstance(head[-1], (nn.Linear, nn.Conv2d)) and head[-1].bias is not None
    old = build_net(build_backbone("resnet18_w16_cifar", width=4), "co_moco_v3", 32, 16, 32, 16, pred_out_bn="fixed")
    for head in (old.predictor, old.local_predictor):
        assert isinstance(head[-1], nn.modules.batchnorm._BatchNorm) and not head[-1].affine
    out = net(torch.randn(3, 3, 16, 16))
    assert out["p"].shape == (3, 16) and out["P"].shape == (3, 4, 16)
    assert math.isfinite(float(out["P"].detach().sum()))
