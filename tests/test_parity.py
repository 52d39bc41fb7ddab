"""The parity harness's own arithmetic (bench/parity.py): its recipes reach our trainer as the keys they name, and
the lr it gives our side makes our update equal lightly's. lightly itself is optional (make parity-setup): these
tests write lightly's losses out instead of importing them."""

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_module
from losses import multicrop_byol, multicrop_nt_xent


parity = bench_module("parity")


def test_byol_recipe_reaches_our_config_key_by_key():
    recipe = parity.recipe_of("byol", [])
    cfg = parity.our_config("byol", recipe, 3)
    assert cfg["method.name"] == "byol" and cfg["training.seed"] == 3
    assert (cfg["optim.batch_size"], cfg["augment.res"], cfg["augment.c_min"]) == (256, 32, 0.08)
    # lightly's loss has a quarter of our gradient: our lr per 256 is 0.06 / 4 at batch 256
    assert cfg["optim.lr"] == pytest.approx(0.015)
    assert (cfg["optim.lr_schedule"], cfg["optim.warmup_epochs"], cfg["optim.weight_decay"]) == ("constant", 0, 0)
    assert (cfg["optim.tau"], cfg["optim.tau_schedule"], cfg["optim.lars_eta"]) == (0.99, "constant", 0)
    assert (cfg["augment.p_blur1"], cfg["augment.p_blur2"]) == (0, 0)
    assert (cfg["augment.p_solarize1"], cfg["augment.p_solarize2"]) == (0, 0.2)
    assert [cfg[f"augment.{k}"] for k in ("brightness", "contrast", "saturation", "hue")] == [0.4, 0.4, 0.2, 0.1]
    assert (cfg["method.proj_hidden"], cfg["method.proj_dim"], cfg["method.pred_hidden"]) == (1024, 128, 1024)


def test_recipe_overrides_and_bad_keys():
    r = parity.recipe_of("simclr", ["batch=128", "blur=0.5,0.5", "ref_lr=0.1"])
    assert (r["batch"], r["blur"], r["ref_lr"]) == (128, (0.5, 0.5), 0.1)
    cfg = parity.our_config("simclr", r, 0)
    assert cfg["optim.lr"] == pytest.approx(0.1 * 256 / 128)  # per 256: equal to lightly's absolute lr
    assert [cfg[f"augment.{k}"] for k in ("brightness", "contrast", "saturation", "hue")] == [0.8, 0.8, 0.8, 0.2]
    with pytest.raises(SystemExit, match="unknown recipe key"):
        parity.recipe_of("byol", ["lr=0.1"])


def _grads(loss_fn, *tensors):
    xs = [t.clone().requires_grad_(True) for t in tensors]
    loss_fn(*xs).backward()
    return [x.grad for x in xs]


def test_byol_lr_scale_makes_the_updates_equal():
    """Ours: sum over both pairs of mean(2 - 2 cos); lightly's example: 0.5 (mean(-cos(p0, z1)) + mean(-cos(p1,
    z0))). With SGD and no weight decay, lr x our gradient must equal lightly's lr x its gradient."""
    g = torch.Generator().manual_seed(0)
    p0, p1, z0, z1 = (torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(4))

    def lightly(p0, p1):
        return 0.5 * (-F.cosine_similarity(p0, z1).mean() - F.cosine_similarity(p1, z0).mean())
    ours = _grads(lambda a, b: multicrop_byol([a, b], [z0, z1]), p0, p1)
    ref = _grads(lightly, p0, p1)
    recipe = parity.recipe_of("byol", [])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(recipe["ours_lr_scale"] * recipe["ref_lr"] * a, recipe["ref_lr"] * b)


def test_simclr_lr_scale_makes_the_updates_equal():
    """lightly's NTXentLoss (no memory bank): cross-entropy over the 2B anchors, each against the other 2B - 1
    embeddings, positive the other view; the mean over the 2B anchors."""
    g = torch.Generator().manual_seed(1)
    z0, z1 = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    T = 0.1

    def lightly(a, b):
        z = F.normalize(torch.cat([a, b]), dim=1)
        logits = (z @ z.T / T).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
        return F.cross_entropy(logits, torch.cat([torch.arange(6, 12), torch.arange(6)]))
    ours = _grads(lambda a, b: multicrop_nt_xent([a, b], 2, T), z0, z1)
    ref = _grads(lightly, z0, z1)
    scale = parity.recipe_of("simclr", [])["ours_lr_scale"]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(scale * a, b)


def test_moco_v3_lr_scale_makes_the_updates_equal():
    """MoCo v3's Algorithm 1 written out: ctr(q, k) = 2T x cross-entropy of unit q against unit k (positive: the
    same row), loss ctr(q1, k2) + ctr(q2, k1)."""
    from losses import multicrop_moco_v3
    g = torch.Generator().manual_seed(2)
    q0, q1, k0, k1 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    T = parity.recipe_of("moco_v3", [])["temperature"]

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / T
        return 2 * T * F.cross_entropy(logits, torch.arange(5))
    ours = _grads(lambda a, b: multicrop_moco_v3([a, b], [k0, k1], T), q0, q1)
    ref = _grads(lambda a, b: ctr(a, k1) + ctr(b, k0), q0, q1)
    scale = parity.recipe_of("moco_v3", [])["ours_lr_scale"]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(scale * a, b)


def test_dino_lr_scale_makes_the_updates_equal():
    """lightly's DINOLoss with two global views: the mean over the 2 pairs (teacher view != student view) of the
    cross-entropy of softmax((t - c) / T_t) against log_softmax(s / T_s), mean over images."""
    from losses import dino_loss
    r = parity.recipe_of("dino", [])
    g = torch.Generator().manual_seed(3)
    s0, s1, t0, t1 = (torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(4))
    c = torch.randn(1, 9, generator=g, dtype=torch.float64)

    def lightly(a, b):
        targets = [F.softmax((t - c) / r["teacher_temp"], dim=-1) for t in (t0, t1)]
        logp = [F.log_softmax(s / r["student_temp"], dim=-1) for s in (a, b)]
        return (-(targets[0] * logp[1]).sum(-1).mean() - (targets[1] * logp[0]).sum(-1).mean()) / 2
    ours = _grads(lambda a, b: dino_loss([a, b], [t0, t1], c, r["student_temp"], r["teacher_temp"]), s0, s1)
    ref = _grads(lightly, s0, s1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(r["ours_lr_scale"] * a, b)


def test_moco_v3_and_dino_recipes_reach_our_config():
    cfg = parity.our_config("moco_v3", parity.recipe_of("moco_v3", []), 0)
    assert (cfg["method.name"], cfg["method.temperature"], cfg["optim.lr"]) == ("moco_v3", 0.2, pytest.approx(0.06))
    assert (cfg["method.proj_out_bn"], cfg["method.pred_out_bn"]) == ("auto", "auto")  # as MoCo v3's ResNet code
    cfg = parity.our_config("dino", parity.recipe_of("dino", []), 0)
    assert (cfg["dino.out_dim"], cfg["dino.student_temp"], cfg["dino.teacher_temp"],
            cfg["dino.warmup_teacher_temp"], cfg["dino.center_momentum"],
            cfg["dino.freeze_last_layer"]) == (4096, 0.1, 0.04, 0.04, 0.9, 0)
    assert (cfg["optim.tau"], cfg["optim.tau_schedule"]) == (0.99, "constant")


def test_moco_v2_lr_scale_makes_the_updates_equal():
    """lightly's NTXentLoss with a memory bank, per direction: cross-entropy over [<q, k>, <q, bank>] / T of unit
    vectors, label 0, mean over the queries; the reference averages the two directions, as ours does."""
    from losses import multicrop_moco_v2
    g = torch.Generator().manual_seed(4)
    q0, q1, k0, k1 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    bank = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)
    T = parity.recipe_of("moco_v2", [])["temperature"]

    def nce(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], dim=1) / T
        return F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    ours = _grads(lambda a, b: multicrop_moco_v2([a, b], [k0, k1], bank, T), q0, q1)
    ref = _grads(lambda a, b: 0.5 * (nce(a, k1) + nce(b, k0)), q0, q1)
    scale = parity.recipe_of("moco_v2", [])["ours_lr_scale"]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(scale * a, b)
    cfg = parity.our_config("moco_v2", parity.recipe_of("moco_v2", []), 0)
    assert (cfg["method.name"], cfg["moco.queue_size"], cfg["method.temperature"]) == ("moco_v2", 4096, 0.2)
