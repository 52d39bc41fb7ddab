"""The multi-crop rule (losses.py's table) against a loop over the pairs written here from the formula (values and
every gradient, including the gathered candidates of other ranks); with 2 global views and no local views each
multi-crop loss is today's loss, bit for bit."""
import pytest
import torch

from losses import (byol_loss, crop_pairs, local_global_info_nce, local_global_regression, multicrop_byol,
                    multicrop_local_info_nce, multicrop_local_regression, multicrop_nt_xent, nt_xent)

B, L, D, T = 3, 4, 5, 0.3
SHAPES = [(2, 0), (2, 3), (3, 0), (3, 2), (4, 1)]  # (global views, local views)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                       requires_grad=True)


def _pairs(G, V):
    """(v, g) for every view v and every global view g other than v, written out."""
    out = []
    for v in range(V):
        for g in range(G):
            if g != v:
                out.append((v, g))
    return out


def _cos(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def _info_nce(anchor, candidates, positive, masked):
    """-log( exp(<a, c_pos>/T) / sum over the candidates but the masked one of exp(<a, c>/T) ), a and c unit."""
    a = anchor / anchor.norm()
    logits = {k: (a * c / c.norm()).sum() / T for k, c in candidates.items() if k != masked}
    return -(logits[positive] - torch.logsumexp(torch.stack(list(logits.values())), 0))


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True)


def _assert_same(a, b, inputs, exact=False):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(_grads(a, inputs), _grads(b, inputs)):
        if ga is None or gb is None:
            assert ga is None and gb is None
        elif exact:
            assert torch.equal(ga, gb)
        else:
            torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_pairs_are_every_view_against_every_other_global_view():
    assert crop_pairs(2, 2) == [(0, 1), (1, 0)]
    assert crop_pairs(2, 4) == [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert crop_pairs(3, 5) == _pairs(3, 5) and len(crop_pairs(3, 5)) == 3 * 2 + 2 * 3
    for bad in ((1, 3), (3, 2)):
        with pytest.raises(ValueError, match="at least 2 global"):
            crop_pairs(*bad)


@pytest.mark.parametrize("G,n_local", SHAPES)
def test_multicrop_byol_equals_the_loop_over_pairs(G, n_local):
    V = G + n_local
    preds = [_rand(B, D, seed=v) for v in range(V)]
    targets = [_rand(B, D, seed=100 + g) for g in range(G)]
    pairs = _pairs(G, V)
    ref = 2 / len(pairs) * sum(sum(2 - 2 * _cos(preds[v][b], targets[g][b].detach()) for b in range(B)) / B
                               for v, g in pairs)
    got = multicrop_byol(preds, targets)
    _assert_same(got, ref, preds + targets)
    assert all(g is None for g in _grads(multicrop_byol(preds, targets), targets))  # targets are stop-gradient


@pytest.mark.parametrize("G", [2, 3, 4])
def test_multicrop_local_regression_equals_the_loop_over_pairs(G):
    P = [_rand(B, L, D, seed=v) for v in range(G)]
    targets = [_rand(B, D, seed=100 + g) for g in range(G)]
    pairs = _pairs(G, G)
    ref = 2 / len(pairs) * sum(sum(2 - 2 * _cos(P[v][b, l], targets[g][b].detach()) for b in range(B) for l in range(L))
                               / (B * L) for v, g in pairs)
    _assert_same(multicrop_local_regression(P, targets, backend="ref"), ref, P + targets)


def _gathered(zs, G, other_rank_rows, seed):
    """Every rank's rows of each global view: this rank's at offset other_rank_rows, the other rank's random."""
    if not other_rank_rows:
        return None, 0, []
    others = [_rand(other_rank_rows, D, seed=seed + g) for g in range(G)]
    return [torch.cat([o, z]) for o, z in zip(others, zs[:G])], other_rank_rows, others


@pytest.mark.parametrize("G,n_local", SHAPES)
@pytest.mark.parametrize("other_rank_rows", [0, 2])
def test_multicrop_nt_xent_equals_the_loop_over_pairs(G, n_local, other_rank_rows):
    V = G + n_local
    zs = [_rand(B, D, seed=v) for v in range(V)]
    gathered, offset, others = _gathered(zs, G, other_rank_rows, 50)
    rows = [(g, n) for g in range(G) for n in range(B + other_rank_rows)]
    cands = {(g, n): (gathered[g][n] if gathered else zs[g][n]) for g, n in rows}
    pairs = _pairs(G, V)
    ref = sum(_info_nce(zs[v][b], cands, (g, offset + b), (v, offset + b)) for v, g in pairs for b in range(B))
    ref = ref / (len(pairs) * B)
    _assert_same(multicrop_nt_xent(zs, G, T, gathered, offset), ref, zs + others)


@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("other_rank_rows", [0, 2])
def test_multicrop_local_info_nce_equals_the_loop_over_pairs(G, other_rank_rows):
    P = [_rand(B, L, D, seed=v) for v in range(G)]
    zs = [_rand(B, D, seed=100 + v) for v in range(G)]
    gathered, offset, others = _gathered(zs, G, other_rank_rows, 50)
    cands = {(g, n): (gathered[g][n] if gathered else zs[g][n]) for g in range(G)
             for n in range(B + other_rank_rows)}
    pairs = _pairs(G, G)
    ref = sum(_info_nce(P[v][b, l], cands, (g, offset + b), (v, offset + b))
              for v, g in pairs for b in range(B) for l in range(L)) / (len(pairs) * B * L)
    got = multicrop_local_info_nce(P, zs, T, gathered, offset, backend="ref")
    _assert_same(got, ref, P + zs + others)


# --- 2 global views, no local views: today's losses exactly

def test_two_global_views_reproduce_todays_losses_bit_for_bit():
    p1, p2, z1, z2 = (_rand(B, D, seed=i) for i in range(4))
    P1, P2 = _rand(B, L, D, seed=5), _rand(B, L, D, seed=6)
    inputs = [p1, p2, z1, z2, P1, P2]
    _assert_same(multicrop_byol([p1, p2], [z1, z2]), byol_loss(p1, p2, z1, z2), inputs, exact=True)
    _assert_same(multicrop_local_regression([P1, P2], [z1, z2], backend="ref"),
                 local_global_regression(P1, P2, z1, z2, backend="ref"), inputs, exact=True)
    _assert_same(multicrop_nt_xent([z1, z2], 2, T), nt_xent(z1, z2, T), inputs, exact=True)
    _assert_same(multicrop_local_info_nce([P1, P2], [z1, z2], T, backend="ref"),
                 local_global_info_nce(P1, P2, z1, z2, T, backend="ref"), inputs, exact=True)
    # and the general rule at 2 + 0 (the loop above) is that same number: today's loss is its special case
    ref = sum(_info_nce([z1, z2][v][b], {(g, n): [z1, z2][g][n] for g in range(2) for n in range(B)},
                        (g, b), (v, b)) for v, g in _pairs(2, 2) for b in range(B)) / (2 * B)
    torch.testing.assert_close(nt_xent(z1, z2, T), ref, rtol=1e-10, atol=0)


def test_bad_multicrop_inputs_raise():
    z = [_rand(B, D, seed=i) for i in range(3)]
    with pytest.raises(ValueError, match="at least 2 global"):
        multicrop_byol(z[:1], z[:1])
    with pytest.raises(ValueError, match="images"):
        multicrop_byol([z[0], z[1][:2]], z[:2])
    with pytest.raises(ValueError, match="gathered"):
        multicrop_nt_xent(z, 3, T, [z[0], z[1]], 0)
    with pytest.raises(ValueError, match="local maps"):
        multicrop_local_info_nce([_rand(B, L, D, seed=0)] * 2, z, T)
    with pytest.raises(ValueError, match="embedding dim"):
        multicrop_nt_xent([z[0], z[1], _rand(B, D + 1, seed=9)], 2, T)
