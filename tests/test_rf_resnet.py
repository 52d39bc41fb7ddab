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
                       feature_side, get_layout, min_input_side, output_stride, rf_size)


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
        # on the CPU our strided 1x1 convs sum in another order (rf_resnet.Conv2d): fp32 rounding of the logits' scale
        scale = float(tv(x).abs().max())
        torch.testing.assert_close(ours.logits(x), tv(x), rtol=1e-5, atol=1e-6 * scale)
        back = getattr(torchvision.models, name)(weights=None).eval()
        back.load_state_dict(export_torchvision_state_dict(ours), strict=True)
        torch.testing.assert_close(back(x), tv(x), rtol=1e-5, atol=1e-5)


def positive_linear_copy(model, symmetric=False):
    """Same geometry, no cancellation: positive weights (scaled by fan-in), BN as identity, max-pool -> avg-pool
    (a max-pool passes gradient to one input per window; its footprint is what the RF counts). symmetric: every
    kernel constant over its positions (per channel pair), so the footprint is mirror-symmetric about its centre."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            shape = m.weight.shape[:2] + (1, 1) if symmetric else m.weight.shape
            w = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5) / fan_in
            m.weight.data = w.expand_as(m.weight).clone()
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
    if isinstance(model.maxpool, nn.MaxPool2d):
        model.maxpool = nn.AvgPool2d(3, 2, padding=1, count_include_pad=True)
    return model


def gradient_support(layout, size):
    """The input pixels that the central location of the final map depends on (non-zero gradient)."""
    model = positive_linear_copy(RFResNet(layout))
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


@pytest.mark.parametrize("name,layout", CASES, ids=[c[0] for c in CASES])
def test_feature_side_and_min_input_side_equal_what_the_network_does(name, layout):
    """The analytic sizes the trainer's view-size check relies on, against forwards of the real module on either
    side of the smallest accepted input (a too small input makes the network raise)."""
    from dataclasses import replace
    layout = replace(layout, width=4)
    net = RFResNet(layout).eval()
    need = min_input_side(layout)
    for side in sorted({need - 1, need, need + 1, need + 5, 37}):
        if side < 1:
            continue
        try:
            with torch.no_grad():
                got = net(torch.zeros(1, 3, side, side))[0].shape[-1]
        except RuntimeError:
            got = 0
        assert got == feature_side(layout, side), (side, got)
    assert feature_side(layout, need) >= 1 and (need == 1 or feature_side(layout, need - 1) == 0)


def test_bagnet_needs_its_receptive_field_and_padded_networks_take_any_size():
    assert min_input_side(PRESETS["bagnet33"]) == 33 and feature_side(PRESETS["bagnet33"], 224) == 24
    assert min_input_side(PRESETS["resnet18"]) == 1 and feature_side(PRESETS["resnet50"], 224) == 7


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


# ------------------------------------------------------------------------ the AVX2 oneDNN crash (portable CPU paths)

_REDUCED_CASE = """
import sys, torch
sys.path.insert(0, {repo!r})
from rf_resnet import Conv2d, build_backbone
torch.set_num_threads(1)
conv = Conv2d(4, 8, 1, 2, bias=False).to(memory_format=torch.channels_last)   # the issue's reduced case
x = torch.randn(16, 4, 16, 16).to(memory_format=torch.channels_last).requires_grad_()
for _ in range(20):
    conv(x).sum().backward()
for cin in (3, 7):                                                              # any count below 8, odd sizes
    conv = Conv2d(cin, 8, 1, 2, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(5, cin, 15, 17).to(memory_format=torch.channels_last).requires_grad_()
    for _ in range(10):
        conv(x).sum().backward()
net = build_backbone("resnet18_w16_cifar", width=4).to(memory_format=torch.channels_last)  # the tests' nets
x = torch.randn(16, 3, 16, 16).to(memory_format=torch.channels_last).requires_grad_()
for _ in range(3):
    net(x)[1].sum().backward()                                                  # weights and input (PGD, ERF)
print("survived")
"""


@pytest.mark.parametrize("isa", ["AVX2", "native"])
def test_strided_pointwise_conv_backward_survives_on_avx2_and_native_cpus(isa):
    """torch 2.14.1's oneDNN corrupts the heap in this backward on AVX2 kernels; our Conv2d must never reach it.
    A subprocess (with glibc's heap checks on) so that an abort fails this test instead of killing the suite."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    if isa == "AVX2":
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    debug = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    if os.path.exists(debug):
        env.update(LD_PRELOAD=debug, MALLOC_CHECK_="3")
    res = subprocess.run([sys.executable, "-c", _REDUCED_CASE.format(repo=REPO)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "survived" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("stride,shape", [((2, 2), (3, 4, 15, 17)), ((3, 2), (2, 7, 16, 9)), ((2, 2), (1, 12, 8, 8))])
def test_cpu_strided_pointwise_conv_equals_nn_conv2d_in_values_and_gradients(stride, shape):
    from rf_resnet import Conv2d
    torch.manual_seed(0)
    ours = Conv2d(shape[1], 5, 1, stride, bias=True)
    ref = nn.Conv2d(shape[1], 5, 1, stride, bias=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    for layout in (torch.channels_last, torch.contiguous_format):
        xo = x.clone().to(memory_format=layout).requires_grad_()
        xr = x.clone().requires_grad_()          # the reference in NCHW: a kernel the bug does not touch
        go = torch.randn(ref(xr).shape)
        (ours(xo) * go).sum().backward()
        (ref(xr) * go).sum().backward()
        torch.testing.assert_close(ours(xo), ref(xr), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
        for m in (ours, ref):
            m.zero_grad()


def test_the_suite_runs_the_avx2_kernels_when_asked():
    """`make test` sets ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2; check that torch honours both."""
    code = ("import torch; print('aten', torch.backends.cpu.get_cpu_capability()); "
            "torch.nn.Conv2d(3, 8, 3)(torch.randn(2, 3, 8, 8))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_VERBOSE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "aten AVX2" in res.stdout
    isa = [line for line in res.stdout.splitlines() if ",info,cpu,isa:" in line]
    assert isa and isa[0].rstrip().endswith("isa:Intel AVX2"), res.stdout[:2000]
