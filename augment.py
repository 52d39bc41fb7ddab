"""BYOL's augmentations after the crop, batched on tensors with per-sample random parameters (CPU or GPU).

The data seam: a loader gives each view as uint8 [B, H, W, 3] that is already randomly resized-cropped and flipped
(FFCV + multiview_decoder.py on the CPU path; a fused GPU crop kernel on the GPU path). `ViewAugment` then does,
on whatever device the batch is on, in this order and with parameters drawn independently for every sample:
  colour jitter with probability p_jitter: brightness, contrast, saturation, hue (fixed order, our choice; the
      factors are drawn as in torchvision: U[1-b, 1+b], U[1-c, 1+c], U[1-s, 1+s], U[-h, h]);
  grayscale with probability p_gray;
  Gaussian blur with probability p_blur, sigma ~ U[0.1, 2.0], kernel side ~10 % of the image (odd), reflect padding;
  solarization with probability p_solarize (x -> 1 - x where x >= 0.5);
  mean/std normalisation; output float [B, 3, H, W] in channels-last memory.
Each step equals torchvision.transforms.v2.functional applied to one image with the same parameters (tested).
BYOL's asymmetry is two ViewAugments: blur p 1.0 / 0.1, solarize p 0.0 / 0.2.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision


@dataclass(frozen=True)
class ViewAugment:
    p_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    p_gray: float = 0.2
    p_blur: float = 1.0
    sigma: tuple = (0.1, 2.0)
    p_solarize: float = 0.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def sample(self, batch, image_size, generator=None, device="cpu"):
        """Per-sample parameters for a batch: a dict of [B] tensors (and the blur kernel size)."""
        def u(lo, hi):
            return torch.rand(batch, generator=generator, device=device) * (hi - lo) + lo

        def flag(p):
            return torch.rand(batch, generator=generator, device=device) < p

        jitter = flag(self.p_jitter)
        one = torch.ones(batch, device=device)
        return {
            "brightness": torch.where(jitter, u(1 - self.brightness, 1 + self.brightness), one),
            "contrast": torch.where(jitter, u(1 - self.contrast, 1 + self.contrast), one),
            "saturation": torch.where(jitter, u(1 - self.saturation, 1 + self.saturation), one),
            "hue": torch.where(jitter, u(-self.hue, self.hue), 0 * one),
            "gray": flag(self.p_gray),
            "blur": flag(self.p_blur),
            "sigma": u(*self.sigma),
            "solarize": flag(self.p_solarize),
            "kernel_size": blur_kernel_size(image_size),
        }

    def __call__(self, views_hwc_uint8, generator=None, params=None, memory_format=torch.channels_last):
        """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] (channels-last memory unless told otherwise)."""
        if views_hwc_uint8.ndim != 4 or views_hwc_uint8.shape[-1] != 3 or views_hwc_uint8.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [B, H, W, 3], got {views_hwc_uint8.dtype} {tuple(views_hwc_uint8.shape)}")
        B, H, W, _ = views_hwc_uint8.shape
        if params is None:
            params = self.sample(B, min(H, W), generator, views_hwc_uint8.device)
        x = views_hwc_uint8.permute(0, 3, 1, 2).float().div_(255)              # [B, 3, H, W] in [0, 1]
        return normalize(apply_color_ops(x, params), self.mean, self.std, memory_format)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD, memory_format=torch.channels_last):
    """float [B, 3, H, W] in [0, 1] -> (x - mean) / std, in `memory_format` (channels-last by default)."""
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


def uint8_hwc_to_normalized(x, memory_format=torch.channels_last):
    """uint8 [B, H, W, 3] (an eval batch) -> normalised float [B, 3, H, W], in `memory_format`."""
    return normalize(x.permute(0, 3, 1, 2).float().div_(255), memory_format=memory_format)


def byol_view_augments(p_blur=(1.0, 0.1), p_solarize=(0.0, 0.2), **common):
    """BYOL's two asymmetric views (docs/METHOD_NOTES.md §5)."""
    return tuple(ViewAugment(p_blur=b, p_solarize=s, **common) for b, s in zip(p_blur, p_solarize))


def blur_kernel_size(side):
    """About 10 % of the image side, odd, at least 3 (BYOL: 23 at 224 px)."""
    k = int(round(side * 0.1))
    return max(3, k + 1 - k % 2)


# ---------------------------------------------------------------------------------------------------------------
# The operations, each on float [B, 3, H, W] in [0, 1] with per-sample [B] parameters.

def _per_sample(v):
    return v.view(-1, 1, 1, 1)


def grayscale(x):
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)  # [B, 1, H, W]


def _blend(a, b, factor):
    return (factor * a + (1 - factor) * b).clamp_(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), _per_sample(factor))


def adjust_contrast(x, factor):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _per_sample(factor))


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), _per_sample(factor))


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    same = maxc == minc
    chroma = maxc - minc
    s = chroma / torch.where(same, torch.ones_like(maxc), maxc)
    safe = torch.where(same, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(same, torch.zeros_like(h), h)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """Closed form: channel n in (5, 3, 1) for (r, g, b) is v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6."""
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h * 6.0, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, 1)


def adjust_hue(x, shift):
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def gaussian_kernels(sigma, size):
    """[B, size] normalised 1-D Gaussian kernels, one per sample."""
    half = (size - 1) * 0.5
    xs = torch.linspace(-half, half, size, device=sigma.device)
    k = torch.exp(-0.5 * (xs[None] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x, sigma, size):
    """Separable blur with a different sigma per sample (one grouped convolution per direction)."""
    B, C, H, W = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), size).repeat_interleave(C, 0)      # [B*C, size]
    pad = size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, size), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, size, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1.0 - x, x)


def apply_color_ops(x, params):
    """The post-crop augmentations with per-sample parameters (see `ViewAugment.sample`)."""
    x = adjust_brightness(x, params["brightness"])
    x = adjust_contrast(x, params["contrast"])
    x = adjust_saturation(x, params["saturation"])
    x = adjust_hue(x, params["hue"])
    x = torch.where(_per_sample(params["gray"]), grayscale(x).expand_as(x), x)
    blur = params["blur"]
    # on the CPU, skip the convolutions when no sample in the batch is blurred; on a GPU always blur (reading the
    # flags would make the host wait for the device at every step)
    if blur.is_cuda or bool(blur.any()):
        size = params["kernel_size"]
        if size // 2 < min(x.shape[-2:]):
            x = torch.where(_per_sample(blur), gaussian_blur(x, params["sigma"], size), x)
    return torch.where(_per_sample(params["solarize"]), solarize(x), x)
