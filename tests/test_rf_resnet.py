"""rf_resnet.py: torchvision equivalence, receptive fields proved by gradients, shapes, bad layouts."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import REPO
from rf_resnet import (PRESETS, Layout, RFResNet, build_backbone, count_flops, export_torchvision_state_dict,
                       get_layout, output_stride, rf_size)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_standard_layout_equals_torchvision(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None).eval()
    for m in tv.modules():  # non-trivial BN statistics, so that a misplaced BN would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = build_backbone(name, num_classes=1000).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 67, 61)  # odd sizes exercise padding and pooling
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(x), tv(x), rtol=1e-5, atol=1e-5)
        back = getattr(torchvision.models, name)(weights=None).eval()
        back.load_state_dict(export_torchvision_state_dict(ours), strict=True)
        torch.testing.assert_close(back(x), tv(x), rtol=1e-5, atol=1e-5)


def _positive_linear_copy(model):
    """Same geometry, no cancellation: positive weights (scaled by fan-in), BN as identity, max-pool -> avg-pool
    (a max-pool passes gradient to one input per window; its footprint is what the RF counts)."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = (torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5) / fan_in
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
    if isinstance(model.maxpool, nn.MaxPool2d):
        model.maxpool = nn.AvgPool2d(3, 2, padding=1, count_include_pad=True)
    return model


def gradient_support(layout, size):
    """The input pixels that the central location of the final map depends on (non-zero gradient)."""
    model = _positive_linear_copy(RFResNet(layout))
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    fmap, _ = model(x)
    h, w = fmap.shape[-2:]
    fmap[0, :, h // 2, w // 2].sum().backward()
    return (x.grad[0].abs().sum(0) > 0).numpy()


def _check_square(support, rf):
    rows, cols = np.nonzero(support)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    size = support.shape[0]
    assert top > 0 and left > 0 and bottom < size - 1 and right < size - 1, "RF clipped by the image border"
    assert (bottom - top + 1, right - left + 1) == (rf, rf)
    assert support[top:bottom + 1, left:right + 1].all(), "holes inside the RF square"
    assert support.sum() == rf * rf


def _random_layouts(n, seed=0):
    """Random RF-ResNet layouts in the paper's spirit: in each stage, the blocks with 3x3 kernels come first,
    and once a stage has a 1x1-only block every later stage is 1x1-only (so the RF is a solid square)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layers = tuple(int(v) for v in rng.integers(1, 4, size=4))
        spatial, open_ = [], True
        for blocks in layers:
            k = int(rng.integers(0, blocks + 1)) if open_ else 0
            spatial.append(k)
            open_ = open_ and k == blocks
        out.append(Layout(block=str(rng.choice(["basic", "bottleneck"])), layers=layers, width=4,
                          stem=str(rng.choice(["7x7", "3x3"])), maxpool=bool(rng.integers(0, 2)),
                          strides=(1,) + tuple(int(v) for v in rng.integers(1, 3, size=3)), spatial=tuple(spatial)))
    return out


CASES = [(name, layout) for name, layout in PRESETS.items()] + \
        [(f"random{i}", layout) for i, layout in enumerate(_random_layouts(6))]


@pytest.mark.parametrize("name,layout", CASES, ids=[c[0] for c in CASES])
def test_receptive_field_equals_gradient_footprint(name, layout):
    from dataclasses import replace
    layout = replace(layout, width=4)  # the RF does not depend on width; keep the test cheap
    rf, stride = rf_size(layout), output_stride(layout)
    size = rf + 4 * stride + 3  # the central location's RF lies strictly inside
    _check_square(gradient_support(layout, size), rf)


def test_named_receptive_fields():
    assert rf_size(PRESETS["resnet18"]) == 435
    assert rf_size(PRESETS["resnet50"]) == 427
    assert rf_size(PRESETS["rf99_resnet50"]) == 99
    assert rf_size(PRESETS["bagnet33"]) == 33
    for name, layout in PRESETS.items():  # presets named rfN_* / bagnetN have RF N
        for prefix in ("rf", "bagnet"):
            if name.startswith(prefix) and name[len(prefix)].isdigit():
                assert rf_size(layout) == int(name[len(prefix):].split("_")[0])


@pytest.mark.parametrize("name,size,expected", [("resnet50", 224, (2048, 7, 7)), ("resnet18", 224, (512, 7, 7)),
                                                 ("resnet18_w16_cifar", 32, (128, 4, 4)),
                                                 ("bagnet33", 64, (2048, 4, 4))])  # 64-2=62 ->30 ->14 ->6 ->4 (valid 3x3)
def test_feature_map_and_pooled_shapes(name, size, expected):
    model = build_backbone(name).eval()
    with torch.no_grad():
        fmap, pooled = model(torch.randn(2, 3, size, size))
    assert fmap.shape == (2, *expected) and pooled.shape == (2, expected[0])
    torch.testing.assert_close(pooled, fmap.mean((2, 3)))
    assert model.num_features == expected[0]


def test_flops_and_params_match_known_values():
    r50 = build_backbone("resnet50")
    assert abs(sum(p.numel() for p in r50.parameters()) - 23_508_032) == 0  # torchvision resnet50 minus fc
    assert abs(count_flops(r50) / 1e9 - 4.09) < 0.02  # the usual "4.1 GFLOPs" (multiply-adds)


def test_width_override():
    model = build_backbone("resnet18", width=16)
    assert model.num_features == 128 and model.layout.width == 16


@pytest.mark.parametrize("kwargs,match", [(dict(block="wide"), "block"), (dict(stem="5x5"), "stem"),
                                          (dict(padding="reflect"), "padding"), (dict(layers=(2, 0, 2, 2)), "block"),
                                          (dict(strides=(1, 2, 2)), "strides"), (dict(spatial=(1, 2)), "spatial"),
                                          (dict(spatial=(3, 0, 0, 0)), "spatial"), (dict(width=0), "width")])
def test_bad_layouts_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_layout("resnet18", **kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        build_backbone("resnet19")


def test_list_prints_every_preset():
    res = subprocess.run([sys.executable, os.path.join(REPO, "rf_resnet.py"), "--list"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(PRESETS) + 1
    for name, line in zip(PRESETS, lines[1:]):
        assert line.split()[0] == name and int(line.split()[1]) == rf_size(PRESETS[name])
