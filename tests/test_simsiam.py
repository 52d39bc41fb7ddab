"""SimSiam, the first method added through the registry (methods/simsiam.py): the trainer's loss and every
gradient equal the SimSiam paper's Algorithm 1 written out here, the heads are its public code's, LoGo on SimSiam
adds the local crops' predictions against both global projections, and the predictors can keep a fixed lr."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
import train_coss
from config import load_config
from conftest import TINY


def D(p, z):  # Algorithm 1 of Chen & He (2021): negative cosine similarity, stop-gradient on z
    z = z.detach()
    p = F.normalize(p, dim=1)
    z = F.normalize(z, dim=1)
    return -(p * z).sum(dim=1).mean()


def _net(*extra):
    cfg = load_config(None, TINY + ["--method.name=simsiam", *extra])
    torch.manual_seed(0)
    online, target, _, affinity = train_coss.build_model(cfg, 10, torch.device("cpu"))
    return cfg, online, target, affinity


def test_simsiam_is_registered_with_its_traits():
    m = methods.get("simsiam")
    assert "simsiam" in methods.NAMES and not m.ema_target and m.predictor and m.logo_base and not m.local
    with pytest.raises(methods.MethodError, match="unknown method 'simsiam2'"):
        methods.get("simsiam2")


def test_the_loss_and_every_gradient_equal_algorithm_1():
    """for x in loader: x1, x2 = aug(x), aug(x); z1, z2 = f(x1), f(x2); p1, p2 = h(z1), h(z2);
    L = D(p1, z2)/2 + D(p2, z1)/2; L.backward() -- with f = backbone + projector and h = the predictor."""
    cfg, online, target, _ = _net()
    assert target is None  # no momentum encoder
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    spec = train_coss.loss_spec(cfg)._replace(kernels="ref")
    loss, _, terms, _, update = train_coss.method_loss(spec, online, target, (x1, x2), None, None, None)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in online.named_parameters()}
    online.zero_grad(set_to_none=True)

    def f(x):
        return online.projector(online.backbone(x)[1])
    z1, z2 = f(x1), f(x2)
    p1, p2 = online.predictor(z1), online.predictor(z2)
    L = D(p1, z2) / 2 + D(p2, z1) / 2
    L.backward()
    assert update is None
    torch.testing.assert_close(loss, L, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["global"], L, rtol=1e-6, atol=1e-7)
    for n, p in online.named_parameters():
        assert (p.grad is None) == (ours[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in online.projector.parameters())


def test_the_heads_are_the_public_codes():
    """simsiam/builder.py: 3-layer projector, each Linear followed by BN (the last BN without affine, its Linear
    without bias); predictor Linear-BN-ReLU-Linear (a bottleneck, no output BN)."""
    cfg, online, _, _ = _net("--method.proj_hidden=24", "--method.proj_dim=20", "--method.pred_hidden=8")
    kinds = [(type(m).__name__, getattr(m, "affine", None), getattr(m, "bias", 0) is not None)
             for m in online.projector]
    assert kinds == [("Linear", None, False), ("BatchNorm1d", True, True), ("ReLU", None, True),
                     ("Linear", None, False), ("BatchNorm1d", True, True), ("ReLU", None, True),
                     ("Linear", None, False), ("BatchNorm1d", False, False)]
    assert [m.out_features for m in online.projector if isinstance(m, nn.Linear)] == [24, 24, 20]
    pred = [type(m).__name__ for m in online.predictor]
    assert pred == ["Linear", "BatchNorm1d", "ReLU", "Linear"] and online.predictor[0].out_features == 8
    assert online.predictor[-1].out_features == 20 and online.predictor[-1].bias is not None


def test_logo_on_simsiam_adds_each_local_crop_against_both_global_projections():
    """L = L_gg + L_lg + lambda L_ll with L_gg = Algorithm 1 on the global crops and L_lg = sum over the 2 local x
    2 global crops of D(p_local, z_global)."""
    cfg, online, target, affinity = _net("--logo.enabled=1", "--logo.lambda=1e-4")
    g1, g2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    l1, l2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    spec = train_coss.loss_spec(cfg)
    noise = (torch.zeros(6, cfg["method.proj_dim"]), torch.zeros(6, cfg["method.proj_dim"]))
    loss, aff, terms, _, _ = train_coss.method_loss(spec, online, target, (g1, g2), (l1, l2), affinity, None, noise)
    with torch.no_grad():
        outs = [online(x) for x in (g1, g2)]
        locs = [online(x, local=False) for x in (l1, l2)]
        gg = D(outs[0]["p"], outs[1]["z"]) / 2 + D(outs[1]["p"], outs[0]["z"]) / 2
        lg = sum(D(l["p"], o["z"]) for l in locs for o in outs)
    torch.testing.assert_close(terms["global"], gg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["local_global"], lg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, gg + lg + 1e-4 * terms["local_local"], rtol=1e-5, atol=1e-6)


def test_fix_pred_lr_keeps_the_predictors_at_the_peak_lr_after_the_warm_up():
    cfg = load_config(None, TINY + ["--method.name=simsiam", "--optim.fix_pred_lr=1", "--optim.warmup_epochs=0"])
    run = train_coss.build_run(cfg, torch.device("cpu"), num_classes=10)
    run.total_steps, run.warmup_steps = 10, 2
    seen = []
    for s in range(10):
        run.set_lr(s)  # what run.step does first
        seen.append([g["lr"] for g in run.opt.param_groups])
    preds = [i for i, g in enumerate(run.opt.param_groups) if g["fixed"]]
    others = [i for i, g in enumerate(run.opt.param_groups) if not g["fixed"]]
    assert preds and others
    assert all(seen[s][i] == run.peak_lr for s in range(2, 10) for i in preds)
    assert seen[0][preds[0]] == seen[0][others[0]] < run.peak_lr  # the warm-up is everyone's
    assert seen[9][others[0]] < 0.1 * run.peak_lr
