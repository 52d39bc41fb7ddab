"""DINO and CO-DINO on ResNets: the losses against the DINO paper's Algorithm 1 written out here (values,
gradients, stop-gradient on the teacher, symmetry, multi-crop pairs), the teacher centre and temperature schedules
exactly as DINO defines them, the weight-normalised last layer and its frozen first epoch."""
import numpy as np
import pytest
import torch

from conftest import TINY
from config import load_config
from losses import dino_center_update, dino_local_loss, dino_loss, dino_teacher_temp

B, L, K, TS, TT = 4, 3, 9, 0.1, 0.04


def _rand(*shape, seed, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                       requires_grad=grad)


def _H(t, s, c):
    """Algorithm 1's H: t <- softmax((t - C) / tpt) (teacher, no gradient), s <- softmax(s / tps); -(t log s)."""
    t = torch.softmax((t.detach() - c) / TT, dim=-1)
    s = torch.softmax(s / TS, dim=-1)
    return -(t * torch.log(s)).sum(dim=-1).mean()


def test_dino_loss_is_algorithm_1():
    s1, s2, t1, t2 = (_rand(B, K, seed=i) for i in range(4))
    c = _rand(1, K, seed=9, grad=False)
    got = dino_loss([s1, s2], [t1, t2], c, TS, TT)
    ref = _H(t1, s2, c) / 2 + _H(t2, s1, c) / 2
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(got, [s1, s2]), torch.autograd.grad(ref, [s1, s2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch.autograd.grad(dino_loss([s1, s2], [t1, t2], c, TS, TT), [t1, t2], allow_unused=True) == (None, None)
    torch.testing.assert_close(dino_loss([s2, s1], [t2, t1], c, TS, TT), got)  # symmetric in the views


def test_dino_multicrop_pairs_every_student_view_with_every_other_teacher_view():
    students = [_rand(B, K, seed=i) for i in range(6)]      # 2 global + 4 local views
    teachers = [_rand(B, K, seed=10 + g) for g in range(2)]
    c = _rand(1, K, seed=9, grad=False)
    terms = [_H(teachers[g], students[v], c) for g in range(2) for v in range(6) if v != g]  # DINO's loop
    torch.testing.assert_close(dino_loss(students, teachers, c, TS, TT), sum(terms) / len(terms), rtol=1e-10, atol=0)


def test_co_dino_local_term_is_h_at_every_location():
    S1, S2 = _rand(B, L, K, seed=1), _rand(B, L, K, seed=2)
    t1, t2 = _rand(B, K, seed=3), _rand(B, K, seed=4)
    c = _rand(1, K, seed=9, grad=False)
    got = dino_local_loss([S1, S2], [t1, t2], c, TS, TT)
    ref = sum(_H(t1, S2[:, l], c) + _H(t2, S1[:, l], c) for l in range(L)) / (2 * L)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(got, [S1, S2]), torch.autograd.grad(ref, [S1, S2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 5, 30])
def test_teacher_temperature_follows_dinos_schedule(warmup_epochs):
    """DINO: np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(epochs - warmup_epochs) * temp))."""
    epochs = 40
    ref = np.concatenate((np.linspace(0.04, 0.07, warmup_epochs), np.ones(epochs - warmup_epochs) * 0.07))
    got = [dino_teacher_temp(e, 0.04, 0.07, warmup_epochs) for e in range(epochs)]
    np.testing.assert_allclose(got, ref, rtol=1e-15, atol=0)


def test_the_step_centres_the_teacher_with_momentum():
    """One loss of the trainer: the centre moves to m c + (1 - m) x the mean of the teacher's logits of both global
    views, and the loss used the centre from before the update."""
    import train_coss
    cfg = load_config(None, TINY + ["--method.name=co_dino", "--dino.out_dim=12",
                                    "--dino.center_momentum=0.8"])
    torch.manual_seed(0)
    online, target, _, _ = train_coss.build_model(cfg, 10, torch.device("cpu"))
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    center0 = torch.randn(1, 12)
    dino = (center0.clone(), torch.tensor(0.05))
    spec = train_coss.loss_spec(cfg)
    loss, _, terms, _, update = train_coss.method_loss(spec, online, target, (x1, x2), None, None, dino)
    train_coss.update_state(spec, dino, update)
    with torch.no_grad():
        t1, t2 = target(x1), target(x2)
        s1, s2 = online(x1)["z"], online(x2)["z"]
    torch.testing.assert_close(dino[0], 0.8 * center0 + 0.2 * torch.cat([t1, t2]).mean(0, keepdim=True))
    torch.testing.assert_close(terms["global"], dino_loss([s1, s2], [t1, t2], center0, 0.1, torch.tensor(0.05)))
    c = torch.zeros(1, 3)
    dino_center_update(c, torch.ones(1, 3), 0.9)
    torch.testing.assert_close(c, torch.full((1, 3), 0.1))


def test_last_layer_is_weight_normalised_and_frozen_in_the_first_epoch():
    import train_coss
    from models import NormedLinear
    cfg = load_config(None, TINY + ["--method.name=dino", "--dino.out_dim=12", "--optim.lars_eta=0",
                                    "--dino.freeze_last_layer=1"])
    torch.manual_seed(0)
    run = train_coss.build_run(cfg, torch.device("cpu"), num_classes=10)
    layer = run.online.projector.prototypes
    assert isinstance(layer, NormedLinear)
    x = torch.randn(5, cfg["method.proj_dim"])
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(12, 1) + 0.5)                # row norms do not matter (g fixed to 1)
    torch.testing.assert_close(layer(x), before)
    batch = (torch.randint(0, 256, (16, 2, 16, 16, 3), dtype=torch.uint8), torch.randint(0, 10, (16, 1)))
    w0, other0 = layer.weight.detach().clone(), run.online.projector.mlp[0].weight.detach().clone()
    run.set_epoch(0)
    run.step(batch)
    assert torch.equal(layer.weight, w0) and not torch.equal(run.online.projector.mlp[0].weight, other0)
    run.set_epoch(1)
    run.step(batch)
    assert not torch.equal(layer.weight, w0)


def test_head_bn_normalises_each_hidden_layer_over_the_batch():
    """dino.head_bn: a BatchNorm after each hidden Linear of the global and the local head (DINO's use_bn_in_head),
    placed before the GELU, none by default; the first one normalises with the batch's statistics."""
    import torch.nn as nn
    import train_coss
    from models import DINOHead
    for bn in (False, True):
        cfg = load_config(None, TINY + ["--method.name=co_dino", "--dino.out_dim=12", f"--dino.head_bn={bn}"])
        online, _, _, _ = train_coss.build_model(cfg, 10, torch.device("cpu"))
        for head, norm in ((online.projector, nn.BatchNorm1d), (online.local_projector, nn.BatchNorm2d)):
            got = [type(m) for m in head.mlp]
            assert got.count(norm) == (2 if bn else 0) and not any(t.__name__.startswith("BatchNorm") and t is not norm
                                                                   for t in got)
            if bn:
                assert got.index(norm) == 1 and got[got.index(norm) + 1] is nn.GELU
    head = DINOHead(5, 8, 4, 6, bn=True)
    x = torch.randn(7, 5)
    x[:, 0] += torch.arange(7.0)                                   # images differ in one input only
    out = head(x)
    assert out.shape == (7, 6) and out.std(0).min() > 0
    torch.testing.assert_close(head.mlp[1].running_mean, 0.1 * head.mlp[0](x).mean(0).detach())
