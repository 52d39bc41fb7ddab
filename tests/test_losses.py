"""losses.py against independent, loop-based formulations; symmetry; stop-gradients; bad shapes."""
import math

import pytest
import torch
import torch.nn as nn

from losses import (byol_loss, cosine_distance, ema_update, local_global_info_nce, local_global_regression,
                    logo_affinity_losses, mix, nt_xent)



def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _rand(*shape, grad=False, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


# ------------------------------------------------------------------------------------------------- BYOL family

def test_byol_loss_equals_loop():
    p1, p2, z1, z2 = (_rand(5, 7, seed=i) for i in range(4))
    ref = sum(2 - 2 * _cos(p1[b], z2[b]) for b in range(5)) / 5 + sum(2 - 2 * _cos(p2[b], z1[b]) for b in range(5)) / 5
    assert math.isclose(float(byol_loss(p1, p2, z1, z2)), ref, rel_tol=1e-12)
    assert float(byol_loss(p1, p2, z1, z2)) == pytest.approx(float(byol_loss(p2, p1, z2, z1)))  # view symmetry
    assert float(byol_loss(z2, z1, z1, z2)) == pytest.approx(0.0, abs=1e-12)  # perfect prediction


def test_local_global_regression_equals_loop():
    B, L, D = 3, 7, 5
    P1, P2, z1, z2 = _rand(B, L, D, seed=1), _rand(B, L, D, seed=2), _rand(B, D, seed=3), _rand(B, D, seed=4)
    ref = 0.0
    for P, z in ((P1, z2), (P2, z1)):
        ref += sum(2 - 2 * _cos(P[b, l], z[b]) for b in range(B) for l in range(L)) / (B * L)
    assert math.isclose(float(local_global_regression(P1, P2, z1, z2)), ref, rel_tol=1e-12)
    assert float(local_global_regression(P2, P1, z2, z1)) == pytest.approx(ref)


def test_targets_get_no_gradient():
    p1, p2 = _rand(4, 6, grad=True), _rand(4, 6, grad=True)
    z1, z2 = _rand(4, 6, grad=True), _rand(4, 6, grad=True)
    P1, P2 = _rand(4, 9, 6, grad=True), _rand(4, 9, 6, grad=True)
    (byol_loss(p1, p2, z1, z2) + local_global_regression(P1, P2, z1, z2)).backward()
    assert z1.grad is None and z2.grad is None
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (p1, p2, P1, P2))


def test_cosine_distance_is_scale_invariant():
    p, z = _rand(3, 4, seed=0), _rand(3, 4, seed=1)
    torch.testing.assert_close(cosine_distance(p * 7.0, z * 0.1), cosine_distance(p, z))


@pytest.mark.parametrize("args", [
    (torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(4, 5), torch.zeros(4, 6)),
    (torch.zeros(4, 6), torch.zeros(3, 6), torch.zeros(4, 6), torch.zeros(4, 6)),
    (torch.zeros(4, 2, 6), torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(4, 6)),
])
def test_byol_bad_shapes_raise(args):
    with pytest.raises(ValueError):
        byol_loss(*args)


@pytest.mark.parametrize("args", [
    (torch.zeros(4, 9, 6), torch.zeros(4, 9, 6), torch.zeros(4, 5), torch.zeros(4, 5)),
    (torch.zeros(4, 9, 6), torch.zeros(4, 8, 6), torch.zeros(4, 6), torch.zeros(4, 6)),
    (torch.zeros(4, 9, 6), torch.zeros(4, 9, 6), torch.zeros(3, 6), torch.zeros(3, 6)),
    (torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(4, 6)),
])
def test_local_bad_shapes_raise(args):
    with pytest.raises(ValueError):
        local_global_regression(*args)
    with pytest.raises(ValueError):
        local_global_info_nce(*args, temperature=0.2)


def test_mix():
    assert mix(2.0, 4.0, 0.25) == pytest.approx(2.5)
    assert mix(2.0, 4.0, 0.25, "additive") == pytest.approx(3.0)
    with pytest.raises(ValueError):
        mix(1.0, 1.0, 1.5)
    with pytest.raises(ValueError):
        mix(1.0, 1.0, 0.5, "product")


# ------------------------------------------------------------------------------------------------- SimCLR family

def _nt_xent_loop(z1, z2, T):
    z = torch.cat([z1, z2])
    n = z.shape[0]
    B = z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + B) % n
        sims = [_cos(z[i], z[k]) / T for k in range(n)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -(sims[pos] - math.log(denom))
    return total / n


def test_nt_xent_equals_loop_and_is_symmetric():
    z1, z2 = _rand(6, 5, seed=0), _rand(6, 5, seed=1)
    assert math.isclose(float(nt_xent(z1, z2, 0.2)), _nt_xent_loop(z1, z2, 0.2), rel_tol=1e-10)
    assert float(nt_xent(z2, z1, 0.2)) == pytest.approx(float(nt_xent(z1, z2, 0.2)))


def test_nt_xent_gathered_ranks_average_to_the_full_batch():
    """Rank r sees its rows plus everybody's gathered rows: the mean over ranks is the one-rank loss."""
    z1, z2 = _rand(8, 5, seed=2), _rand(8, 5, seed=3)
    full = nt_xent(z1, z2, 0.3)
    per_rank = [nt_xent(z1[r * 2:(r + 1) * 2], z2[r * 2:(r + 1) * 2], 0.3, z1, z2, offset=2 * r) for r in range(4)]
    assert float(sum(per_rank) / 4) == pytest.approx(float(full), rel=1e-10)


def _local_info_nce_loop(P1, P2, z1, z2, T):
    B, L, _ = P1.shape
    cands = torch.cat([z1, z2])
    total = 0.0
    for view, P in ((0, P1), (1, P2)):
        for b in range(B):
            for l in range(L):
                same = b + view * B
                pos = b + (1 - view) * B
                sims = {k: _cos(P[b, l], cands[k]) / T for k in range(2 * B) if k != same}
                total += -(sims[pos] - math.log(sum(math.exp(s) for s in sims.values())))
    return total / (2 * B * L)


def test_local_global_info_nce_equals_loop():
    B, L, D = 3, 4, 6
    P1, P2, z1, z2 = _rand(B, L, D, seed=4), _rand(B, L, D, seed=5), _rand(B, D, seed=6), _rand(B, D, seed=7)
    ours = float(local_global_info_nce(P1, P2, z1, z2, 0.2))
    assert math.isclose(ours, _local_info_nce_loop(P1, P2, z1, z2, 0.2), rel_tol=1e-10)
    assert float(local_global_info_nce(P2, P1, z2, z1, 0.2)) == pytest.approx(ours)


def test_local_global_info_nce_gathered():
    B, L, D = 6, 3, 4
    P1, P2, z1, z2 = _rand(B, L, D, seed=8), _rand(B, L, D, seed=9), _rand(B, D, seed=10), _rand(B, D, seed=11)
    full = local_global_info_nce(P1, P2, z1, z2, 0.5)
    parts = [local_global_info_nce(P1[r * 3:(r + 1) * 3], P2[r * 3:(r + 1) * 3], z1[r * 3:(r + 1) * 3],
                                   z2[r * 3:(r + 1) * 3], 0.5, z1, z2, offset=3 * r) for r in range(2)]
    assert float(sum(parts) / 2) == pytest.approx(float(full), rel=1e-10)


def test_gathered_arguments_are_checked():
    z = _rand(4, 5)
    with pytest.raises(ValueError, match="both"):
        nt_xent(z, z, 0.2, z1_all=z)
    with pytest.raises(ValueError, match="offset"):
        nt_xent(z, z, 0.2, z, z, offset=2)


# ------------------------------------------------------------------------------------------------- LoGo, EMA

def test_logo_affinity_losses_route_gradients():
    """LoGo's public code, written out: f_d sees unit embeddings; the encoder minimises softplus(f_d(u1, u2)); f_d
    learns positives (both orderings, noise added) against negatives from the flipped batch (both orderings)."""
    torch.manual_seed(0)
    f_d = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    zl1, zl2 = _rand(5, 4, grad=True, seed=1), _rand(5, 4, grad=True, seed=2)
    noise = (0.1 * _rand(5, 4, seed=3), 0.1 * _rand(5, 4, seed=4))
    enc, aff = logo_affinity_losses(f_d, zl1, zl2, noise)
    with torch.no_grad():
        u1, u2 = zl1 / zl1.norm(dim=1, keepdim=True), zl2 / zl2.norm(dim=1, keepdim=True)
        ref_enc = torch.log1p(torch.exp(f_d(torch.cat([u1, u2], 1)))).mean()
        p1, p2 = u1 + noise[0], u2 + noise[1]
        pos = f_d(torch.cat([torch.cat([p1, p2], 1), torch.cat([p2, p1], 1)]))
        flip = [4, 3, 2, 1, 0]
        neg = f_d(torch.cat([torch.cat([u1, u2[flip]], 1), torch.cat([u2, u1[flip]], 1)]))
        ref_aff = torch.log1p(torch.exp(-pos)).mean() + torch.log1p(torch.exp(neg)).mean()
    assert enc.item() == pytest.approx(ref_enc.item()) and aff.item() == pytest.approx(ref_aff.item())
    enc.backward()  # the encoder term moves the embeddings, not f_d
    assert zl1.grad is not None and all(p.grad is None for p in f_d.parameters())
    zl1.grad = None
    aff.backward()  # the affinity loss trains f_d only
    assert zl1.grad is None and all(p.grad is not None for p in f_d.parameters())
    assert all(p.requires_grad for p in f_d.parameters())  # flags restored
    scaled = logo_affinity_losses(f_d, 3 * zl1.detach(), 5 * zl2.detach(), noise)  # only directions count
    assert scaled[0].item() == pytest.approx(enc.item()) and scaled[1].item() == pytest.approx(aff.item())


def test_ema_update_is_exact():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    target[1].running_mean.fill_(5.0)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o, rtol=0, atol=1e-15)
    assert float(target[1].running_mean[0]) == 5.0  # buffers are the target's own
    ema_update(target, online, 0.0)
    for t, o in zip(target.parameters(), online.parameters()):
        assert torch.equal(t, o)
    with pytest.raises(ValueError):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 5), online, 0.5)
