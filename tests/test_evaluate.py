"""The evaluation suite: evaluate.py (linear evaluation, CLI, reports), robustness.py, analyses.py."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from analyses import (effective_receptive_fields, erf_box, global_local_similarity, pearson, plot_curves, plot_erf,
                      plot_robustness, plot_similarity)
from conftest import REPO, quiet, tiny_cfg
from evaluate import compare, evaluate_checkpoint, topk, train_linear
from rf_resnet import build_backbone, get_layout, rf_size, PRESETS
from test_rf_resnet import positive_linear_copy
from robustness import CORRUPTIONS, corrupt, fgsm_attack, mask_patches, pgd_attack
from train_coss import train


def images(n=6, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth images with texture: every corruption has something to change
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(side, side), mode="bilinear")
    return (0.7 * low + 0.3 * torch.rand(n, 3, side, side, generator=g)).clamp(0, 1)


def test_linear_head_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 4
    y = torch.randint(0, 5, (600,), generator=g)
    f = centres[y] + torch.randn(600, 16, generator=g) * 0.5 + 10  # offset: the head must standardise
    head = train_linear(f[:400], y[:400], 5, epochs=30, batch_size=64, lr=0.1, weight_decay=0.0)
    with torch.no_grad():
        acc = topk(head(f[400:]), y[400:])
    assert acc["top1"] >= 0.99 and acc["top5"] == 1.0


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_identity_at_0_and_grow_with_severity(name):
    x = images(side=64)  # blur sigma scales with the side: severity 1 is sigma 0.29 px at 64 px
    assert torch.equal(corrupt(x, name, 0), x)
    change = []
    for s in range(1, 6):
        y = corrupt(x, name, s, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        change.append(float((y - x).abs().mean()))
    assert change[0] > 0
    assert all(b > a for a, b in zip(change, change[1:])), change


def test_corruption_bad_input_raises():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images(), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images(), "contrast", 6)
    with pytest.raises(ValueError, match="float images"):
        corrupt(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), "contrast", 1)


def test_masking_covers_the_asked_fraction_of_cells():
    x = images(4, 32)
    assert torch.equal(mask_patches(x, 0.0), x)
    full = mask_patches(x, 1.0, patch=4)
    assert torch.allclose(full, x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    half = mask_patches(x, 0.5, patch=4, generator=torch.Generator().manual_seed(0))
    changed = (half != x).any(1).float().view(4, 8, 4, 8, 4).amax((2, 4))   # [B, 8, 8] cells
    assert torch.allclose(changed.mean((1, 2)), torch.full((4,), 0.5))
    noisy = mask_patches(x, 0.25, fill="noise", generator=torch.Generator().manual_seed(0))
    assert 0.2 < float((noisy != x).float().mean()) < 0.3


def small_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 4)).eval()


def test_pgd_with_zero_eps_changes_nothing_and_stays_in_its_box():
    model, x = small_classifier(), images(8, 16)
    y = model(x).argmax(1)
    assert torch.equal(pgd_attack(model, x, y, 0.0), x)
    adv = pgd_attack(model, x, y, 2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 2 / 255 + 1e-7 and adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("eps", [0.5 / 255, 2 / 255, 8 / 255])
def test_pgd_raises_the_loss_at_least_as_much_as_fgsm(eps):
    model, x = small_classifier(), images(16, 16, seed=2)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
        fgsm = F.cross_entropy(model(fgsm_attack(model, x, y, eps)), y).item()
        pgd = F.cross_entropy(model(pgd_attack(model, x, y, eps, steps=10, random_start=False)), y).item()
    assert fgsm > clean
    assert pgd >= fgsm - 1e-6


def test_global_local_similarity_and_redundancy():
    backbone = build_backbone("resnet18_w16_cifar").eval()
    x = images(12, 32)
    glob, local, r, red = global_local_similarity(backbone, x, 40, torch.Generator().manual_seed(0))
    assert glob.shape == local.shape == (40,) and -1 <= r <= 1 and -1 <= red <= 1
    assert pearson(glob, glob) == pytest.approx(1.0)
    assert pearson(glob, -glob) == pytest.approx(-1.0)


@pytest.mark.parametrize("preset", ["rf27_resnet18", "bagnet33"])
def test_effective_receptive_field_stays_inside_the_analytic_rf(preset):
    torch.manual_seed(0)
    backbone = build_backbone(preset).eval()
    side = 96
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        h, w = backbone(x)[0].shape[-2:]
    loc = (h // 2, w // 2)
    erf = effective_receptive_fields(backbone, x, [loc])[0]
    ys, xs = torch.nonzero(erf > 0, as_tuple=True)
    rf = rf_size(PRESETS[preset])
    assert len(ys) > 0
    assert int(ys.max() - ys.min()) + 1 <= rf and int(xs.max() - xs.min()) + 1 <= rf


@pytest.mark.parametrize("preset, side", [("resnet18_w16_cifar", 65), ("rf27_resnet18", 161), ("resnet18", 129)])
def test_the_erf_centroid_lies_at_the_centre_of_its_drawn_box(preset, side):
    """The ERF figure's box is centred where the location's receptive field is: the centroid of a symmetric
    network's ERF (odd image sides keep border padding symmetric around the central location)."""
    backbone = positive_linear_copy(build_backbone(preset), symmetric=True)
    x = torch.ones(1, 3, side, side, dtype=torch.float64)
    with torch.no_grad():
        h, w = backbone(x)[0].shape[-2:]
    for loc in [(h // 2, w // 2)] + ([(h // 2 - 1, w // 2 + 1)] if preset == "rf27_resnet18" else []):
        erf = effective_receptive_fields(backbone, x, [loc])[0]
        ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
        centroid = (float((erf * xs).sum() / erf.sum()), float((erf * ys).sum() / erf.sum()))
        x0, y0, box = erf_box(PRESETS[preset], *loc)
        assert centroid == pytest.approx((x0 + box / 2, y0 + box / 2), abs=1e-6), loc


def test_plots_are_written(tmp_path):
    g = torch.rand(50)
    plot_similarity(g, g * 0.5 + 0.1, 0.9, tmp_path / "s.png", "t")
    plot_erf(np.zeros((32, 32, 3), np.uint8), torch.rand(2, 32, 32), [(1, 1), (2, 3)],
             get_layout("resnet18_w16_cifar"), tmp_path / "e.png", "t")
    rows = [{"epoch": 0, "step": 4, "loss": 1.0}, {"epoch": 1, "step": 8, "loss": 0.5}, {"epoch": 1, "knn": 0.5}]
    plot_curves({"a": rows, "b": rows}, tmp_path / "c.png", {"a": {"method": {"name": "byol"}}, "b": {"method": {"name": "simclr"}}})
    rob = {"robustness": {"corruptions": {"jpeg": {"1": 0.5, "2": 0.4}}, "masking": {"0": 0.5}, "pgd": {"1": 0.3}}}
    plot_robustness({"a": rob}, tmp_path / "r.png")
    for f in ("s.png", "e.png", "c.png", "r.png"):
        assert os.path.getsize(tmp_path / f) > 2000


SMALL = ["--linear.epochs=3", "--robust.images=24", "--robust.severities=2", "--robust.pgd_eps=1,4",
         "--robust.pgd_steps=2", "--analysis.pairs=20", "--robust.mask_fractions=0,0.5"]


@pytest.mark.timeout(600)
def test_evaluate_and_compare_two_runs(betons, tmp_path):
    runs = {}
    for method in ("byol", "co_byol"):
        runs[method] = train(tiny_cfg(betons, tmp_path, f"--method.name={method}", "--optim.epochs=1",
                                      f"--training.run_name={method}"), log=quiet)["run_dir"]
    out = evaluate_checkpoint(runs["co_byol"], str(tmp_path / "eval"), SMALL, log=quiet)
    for value in [*out["knn"].values(), *out["linear"].values(), out["robustness"]["clean"],
                  *out["robustness"]["pgd"].values(), *out["robustness"]["masking"].values()]:
        assert 0 <= value <= 1
    assert set(out["robustness"]["corruptions"]) == set(CORRUPTIONS)
    assert out["robustness"]["pgd"]["4"] <= out["robustness"]["clean"]
    saved = json.load(open(tmp_path / "eval" / "eval.json"))
    assert saved["linear"] == out["linear"]
    report = tmp_path / "report"
    compare([runs["byol"], runs["co_byol"]], ["BYOL", "CO-BYOL"], str(report), SMALL, log=quiet,
            command="python evaluate.py --compare a b")
    text = open(report / "report.md").read()
    assert "| linear top-1 |" in text and "BYOL" in text and "PGD eps 4/255" in text
    assert "Made by `python evaluate.py --compare a b`." in text
    for png in ("curves.png", "robustness.png", "BYOL_erf.png", "CO-BYOL_similarity.png"):
        assert os.path.getsize(report / png) > 2000
    stored = json.load(open(os.path.join(runs["byol"], "eval", "eval.json")))
    assert stored["settings"]["linear"]["epochs"] == 3 and stored["settings"]["robust"]["images"] == 24
    # the same settings again: the stored evaluations answer; other settings: evaluated again, and said so
    lines = []
    compare([runs["byol"], runs["co_byol"]], ["BYOL", "CO-BYOL"], str(report), SMALL, log=lines.append)
    assert sum("reusing" in line for line in lines) == 2 and not any("other settings" in line for line in lines)
    lines.clear()
    compare([runs["byol"], runs["co_byol"]], ["BYOL", "CO-BYOL"], str(report), SMALL + ["--linear.epochs=2"],
            log=lines.append)
    changed = [line for line in lines if "other settings" in line]
    assert len(changed) == 2 and "linear.epochs: 3 stored, 2 asked" in changed[0]
    assert json.load(open(os.path.join(runs["byol"], "eval", "eval.json")))["settings"]["linear"]["epochs"] == 2
    # the run trains on (here: its checkpoint is replaced by another run's): same settings, other weights, so its
    # stored evaluation no longer answers and is made again, and said so
    shutil.copy(os.path.join(runs["co_byol"], "checkpoint.pt"), os.path.join(runs["byol"], "checkpoint.pt"))
    lines.clear()
    compare([runs["byol"], runs["co_byol"]], ["BYOL", "CO-BYOL"], str(report), SMALL + ["--linear.epochs=2"],
            log=lines.append)
    again = [line for line in lines if "made from another checkpoint" in line]
    assert len(again) == 1 and runs["byol"] in again[0]
    assert sum("reusing" in line for line in lines) == 1


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--ckpt", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "checkpoint not found" in r.stderr
