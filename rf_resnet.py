"""Backbones: the RF-ResNet family (bounded receptive field), BagNet-33, and torchvision-equivalent ResNets.

    python rf_resnet.py --list        # every preset with its receptive field, parameters and GFLOPs at 224 px

A layout (`Layout`) fixes: block type (BasicBlock / Bottleneck), blocks per stage, base width, stem, max-pool flag,
the stride of each stage's first block (the paper's s', s'', s''' are `strides[1:]`), which blocks keep 3x3
kernels (the others use 1x1 kernels only, so they add depth without growing the receptive field), and padding
('same', or 'valid' as in BagNet, where each block's shortcut is cropped to the block's output).

Receptive field (analytic, `rf_size`): along the deepest path, RF_l = RF_{l-1} + (k_l - 1) * J_{l-1} and
J_l = J_{l-1} * s_l, for every convolution and pooling of kernel k_l and stride s_l. A shortcut never has a larger
RF than its block's main path, so the main path gives the block's RF.

The standard layouts ('resnet18', 'resnet34', 'resnet50') have torchvision's module names and state_dict keys:
`model.load_state_dict(torchvision_model.state_dict())` works (with num_classes=1000) and gives the same outputs,
and `export_torchvision_state_dict(model)` goes the other way.

The network returns (feature_map [B, C, h, w], pooled [B, C]): the local branch of CO-SSL reads the map before
pooling, the global branch the pooled vector.
"""
import argparse
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Layout:
    block: str = "bottleneck"          # 'basic' (two convs) or 'bottleneck' (1x1, kxk, 1x1; expansion 4)
    layers: tuple = (3, 4, 6, 3)       # blocks per stage
    width: int = 64                    # channels of stage 1 (stages: w, 2w, 4w, 8w; x4 out for bottlenecks)
    stem: str = "7x7"                  # '7x7': conv 7x7/2; '3x3': conv 3x3/1; 'bagnet': conv 1x1 + conv 3x3 valid
    maxpool: bool = True               # 3x3/2 max-pool after the stem
    strides: tuple = (1, 2, 2, 2)      # stride of the first block of each stage
    spatial: tuple = None              # per stage: blocks that keep 3x3 kernels, as an int (the first k) or
                                       # a tuple of bools per block; None = every block (a plain ResNet)
    padding: str = "same"              # 'same' or 'valid' (BagNet)
    notes: str = field(default="", compare=False)

    def spatial_blocks(self):
        """Per stage, per block: does it keep 3x3 kernels? (normalised form of `spatial`)"""
        if self.spatial is None:
            return tuple((True,) * n for n in self.layers)
        if len(self.spatial) != len(self.layers):
            raise ValueError(f"spatial has {len(self.spatial)} stages, layers has {len(self.layers)}")
        out = []
        for n, s in zip(self.layers, self.spatial):
            if isinstance(s, bool) or not isinstance(s, (int, tuple, list)):
                raise ValueError(f"spatial entries are an int or a tuple of bools per block, got {s!r}")
            if isinstance(s, int):
                if not 0 <= s <= n:
                    raise ValueError(f"spatial={s} for a stage of {n} blocks")
                s = (True,) * s + (False,) * (n - s)
            if len(s) != n:
                raise ValueError(f"spatial {tuple(s)} does not have one entry per block ({n})")
            out.append(tuple(bool(b) for b in s))
        return tuple(out)

    def validate(self):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem not in ("7x7", "3x3", "bagnet"):
            raise ValueError(f"stem must be '7x7', '3x3' or 'bagnet', got {self.stem!r}")
        if self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {self.padding!r}")
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"every stage needs at least one block, got layers={self.layers}")
        if len(self.strides) != len(self.layers) or any(s < 1 for s in self.strides):
            raise ValueError(f"strides {self.strides} must give one stride >= 1 per stage ({len(self.layers)})")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        self.spatial_blocks()
        return self


def _stem_ops(layout):
    """The stem as (kernel, stride) pairs, in order."""
    ops = {"7x7": [(7, 2)], "3x3": [(3, 1)], "bagnet": [(1, 1), (3, 1)]}[layout.stem]
    return ops + ([(3, 2)] if layout.maxpool else [])


def _block_ops(layout, stride, spatial):
    """The main path of one block as (kernel, stride) pairs (torchvision puts the stride on the kxk conv)."""
    k = 3 if spatial else 1
    if layout.block == "basic":
        return [(k, stride), (k, 1)]
    return [(1, 1), (k, stride), (1, 1)]


def rf_size(layout):
    """Analytic receptive field (in input pixels) of one output location of the final feature map."""
    layout.validate()
    rf, jump = 1, 1
    ops = _stem_ops(layout)
    for stage, (stride, blocks) in enumerate(zip(layout.strides, layout.spatial_blocks())):
        for b, spatial in enumerate(blocks):
            ops += _block_ops(layout, stride if b == 0 else 1, spatial)
    for k, s in ops:
        rf += (k - 1) * jump
        jump *= s
    return rf


def _size_ops(layout):
    """Every convolution and pooling along the main path as (kernel, stride, padding), in order."""
    layout.validate()
    if layout.stem == "bagnet":
        ops = [(1, 1, 0), (3, 1, 0)]
    else:
        k, s = _stem_ops(replace(layout, maxpool=False))[0]
        ops = [(k, s, k // 2)]
    if layout.maxpool:
        ops.append((3, 2, 1))
    for stride, blocks in zip(layout.strides, layout.spatial_blocks()):
        for b, spatial in enumerate(blocks):
            ops += [(k, s, k // 2 if layout.padding == "same" else 0)
                    for k, s in _block_ops(layout, stride if b == 0 else 1, spatial)]
    return ops


def rf_centre(layout):
    """(offset, stride): the input pixel at the centre of the receptive field of feature-map location i is
    offset + stride * i (pixel centres at integer coordinates). 'same' padding keeps every kernel centred on its
    output (offset 0: location i sits on pixel stride * i, the top-left corner of its stride-wide cell, not the
    cell's middle); each unpadded k x k kernel moves the centre by (k - 1) / 2 input steps of its layer."""
    offset, jump = 0.0, 1
    for k, s, pad in _size_ops(layout):
        offset += ((k - 1) / 2 - pad) * jump
        jump *= s
    return offset, jump


def feature_side(layout, side):
    """Side of the final feature map for a side x side input, or 0 when the input is too small for the network
    (an unpadded kernel larger than what is left of it: BagNet's 'valid' blocks)."""
    for k, s, pad in _size_ops(layout):
        if side + 2 * pad < k:
            return 0
        side = (side + 2 * pad - k) // s + 1
    return side


def min_input_side(layout):
    """The smallest input side the network accepts (1 for padded networks; BagNet-33 needs its receptive field)."""
    return next(n for n in range(1, 1 << 16) if feature_side(layout, n) >= 1)


def output_stride(layout):
    jump = 1
    for _, s in _stem_ops(layout):
        jump *= s
    for s in layout.strides:
        jump *= s
    return jump


# ---------------------------------------------------------------------------------------------------------------
# Modules (torchvision's names, so state_dicts are interchangeable for the standard layouts).

class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict names) that never reaches a broken CPU kernel.

    torch 2.14.1's oneDNN corrupts the heap (glibc aborts: "free(): invalid pointer", "double free") in the backward
    of a 1x1, stride > 1 convolution on channels-last CPU tensors with fewer than 8 input channels, on CPUs where
    oneDNN picks its AVX2 kernels (AMD Zen 3, or any CPU under ONEDNN_MAX_CPU_ISA=AVX2). Such a convolution equals
    a stride-1 1x1 convolution of the input subsampled with the same stride (no padding: exactly the same sums), so
    on the CPU that is what runs, whatever the memory format, the channel count or the CPU; CUDA is untouched."""

    def forward(self, x):
        if (x.device.type == "cpu" and self.kernel_size == (1, 1) and self.stride != (1, 1)
                and self.padding == (0, 0) and self.dilation == (1, 1)):
            sh, sw = self.stride
            return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, 1, 0, 1, self.groups)
        return super().forward(x)


def memory_format(channels_last=True):
    """training.channels_last -> the memory format of nets and views. Channels-last is the default everywhere: on
    CUDA for the tensor cores, and on the CPU it measured 1.05-1.2x faster for the demo than NCHW (BENCHMARKS.md)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _conv(cin, cout, k, stride, padding):
    return Conv2d(cin, cout, k, stride=stride, padding=(k // 2 if padding == "same" else 0), bias=False)


def _crop_like(x, ref):
    """'valid' padding: keep the top-left part of the shortcut (BagNet's choice; it stays inside the RF)."""
    if x.shape[-2:] != ref.shape[-2:]:
        x = x[..., :ref.shape[-2], :ref.shape[-1]]
    return x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, spatial, padding, downsample):
        super().__init__()
        k = 3 if spatial else 1
        self.conv1, self.bn1 = _conv(inplanes, planes, k, stride, padding), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, k, 1, padding), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + _crop_like(shortcut, out))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, spatial, padding, downsample):
        super().__init__()
        k = 3 if spatial else 1
        self.conv1, self.bn1 = _conv(inplanes, planes, 1, 1, padding), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, k, stride, padding), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1, 1, padding), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + _crop_like(shortcut, out))


class RFResNet(nn.Module):
    """forward(x) -> (feature_map [B, C, h, w], pooled [B, C]); `logits(x)` adds the classifier (if num_classes)."""

    def __init__(self, layout, num_classes=0):
        super().__init__()
        self.layout = layout.validate()
        block = BasicBlock if layout.block == "basic" else Bottleneck
        w = layout.width
        if layout.stem == "bagnet":
            self.conv1 = Conv2d(3, w, 1, bias=False)
            self.stem_conv2 = Conv2d(w, w, 3, padding=0, bias=False)
        else:
            k, s = _stem_ops(replace(layout, maxpool=False))[0]
            self.conv1 = Conv2d(3, w, k, stride=s, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1) if layout.maxpool else nn.Identity()
        inplanes = w
        for i, (n, stride, spatial) in enumerate(zip(layout.layers, layout.strides, layout.spatial_blocks())):
            planes = w * 2 ** i
            blocks = []
            for b in range(n):
                s = stride if b == 0 else 1
                downsample = None
                if b == 0 and (s != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(Conv2d(inplanes, planes * block.expansion, 1, stride=s, bias=False),
                                               nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(inplanes, planes, s, spatial[b], layout.padding, downsample))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layout.layers)
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_channels(self, stage):
        """Channels of stage `stage`'s output (1-based; the last is num_features)."""
        return getattr(self, f"layer{stage}")[-1].conv2.out_channels if self.layout.block == "basic" else \
            getattr(self, f"layer{stage}")[-1].conv3.out_channels

    def forward(self, x, map_stage=None):
        """(feature map, pooled features of the last stage). map_stage: return the map of that stage (1-based)
        instead of the last one's (CO methods' co.local_layer=previous)."""
        x = self.conv1(x)
        if self.layout.stem == "bagnet":
            x = self.stem_conv2(x)
        x = self.maxpool(self.relu(self.bn1(x)))
        fmap = None
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            if map_stage == i + 1:
                fmap = x
        return (x if fmap is None else fmap), torch.flatten(self.avgpool(x), 1)

    def logits(self, x):
        if self.fc is None:
            raise ValueError("this backbone was built with num_classes=0")
        return self.fc(self(x)[1])


# ---------------------------------------------------------------------------------------------------------------
# Presets, named by their true receptive field.

def _rf18_layout():
    # ResNet-18 layout with 3x3 kernels only in the first block of stage 1: RF 27. The paper's RF29 is not
    # reachable with whole-block 3x3/1x1 choices and the 7x7/2 stem + max-pool (every 3x3 adds a multiple of 8
    # after 11), so the nearest is 27 (next: 35).
    return Layout(block="basic", layers=(2, 2, 2, 2), spatial=(1, 0, 0, 0),
                  notes="nearest to the paper's RF29 (our layout)")


PRESETS = {
    "resnet18": Layout(block="basic", layers=(2, 2, 2, 2), notes="torchvision resnet18"),
    "resnet34": Layout(block="basic", layers=(3, 4, 6, 3), notes="torchvision resnet34"),
    "resnet50": Layout(block="bottleneck", layers=(3, 4, 6, 3), notes="torchvision resnet50"),
    "rf99_resnet50": Layout(block="bottleneck", layers=(3, 4, 6, 3), spatial=(2, 2, 2, 0),
                            notes="3x3 in the first two blocks of stages 1-3 (our layout for the paper's RF99)"),
    "rf27_resnet18": _rf18_layout(),
    "rf43_resnet18": Layout(block="basic", layers=(2, 2, 2, 2), spatial=(2, 0, 0, 0),
                            notes="3x3 only in stage 1"),
    "bagnet33": Layout(block="bottleneck", layers=(3, 4, 6, 3), stem="bagnet", maxpool=False, strides=(2, 2, 2, 1),
                       spatial=(1, 1, 1, 1), padding="valid", notes="Brendel & Bethge 2019"),
    # the CPU demo: a width-16 ResNet-18 with a 3x3/1 stem; 32 px in -> 4x4 feature map
    "resnet18_w16_cifar": Layout(block="basic", layers=(2, 2, 2, 2), width=16, stem="3x3", maxpool=False,
                                 notes="CPU demo (32 px -> 4x4 map)"),
}


def get_layout(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown backbone '{name}' (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides).validate()


def build_backbone(name, num_classes=0, **overrides):
    """A preset by name, with any Layout field overridden (e.g. width=16)."""
    return RFResNet(get_layout(name, **overrides), num_classes=num_classes)


def export_torchvision_state_dict(model):
    """The backbone's weights under torchvision's keys (fc left out unless the model has one)."""
    if model.layout.stem == "bagnet":
        raise ValueError("BagNet has no torchvision equivalent")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def count_flops(model, size=224):
    """Multiply-accumulates of one forward pass at size x size (the 'GFLOPs' convention of ResNet papers)."""
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append(output.numel() // output.shape[0] * k)
        elif isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    model.train(was_training)
    for h in handles:
        h.remove()
    return sum(macs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print every preset with RF, params and GFLOPs at 224 px")
    args = p.parse_args()
    if not args.list:
        p.print_help()
        return
    print(f"{'preset':20s} {'RF':>5s} {'stride':>6s} {'params (M)':>10s} {'GFLOPs@224':>10s}  notes")
    for name, layout in PRESETS.items():
        model = RFResNet(layout)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:20s} {rf_size(layout):5d} {output_stride(layout):6d} {params:10.2f} "
              f"{count_flops(model) / 1e9:10.2f}  {layout.notes}")


if __name__ == "__main__":
    main()
