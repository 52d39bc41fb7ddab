"""Robustness probes as pure functions of image tensors (float [B, 3, H, W] in [0, 1], before normalisation).

Common corruptions, computed on the fly, ImageNet-C style (Hendrycks & Dietterich 2019): severity 0 is the image
itself, 1-5 follow ImageNet-C's parameter tables; spatial parameters (blur sigma) are given for 224 px and scaled
to the image side, so a 32 px image gets the same relative blur.
    gaussian_noise   x + N(0, c^2)                       c = .08 .12 .18 .26 .38
    shot_noise       Poisson(x c) / c                    c = 60 25 12 5 3
    impulse_noise    salt and pepper on a fraction c     c = .03 .06 .09 .17 .27
    gaussian_blur    sigma c (at 224 px)                 c = 1 2 3 4 6
    contrast         (x - mean) c + mean                 c = .4 .3 .2 .1 .05
    jpeg             JPEG at quality c                   c = 25 18 15 10 7
Internal corruption: a fraction of the cells of a square grid masked to the image's mean colour or to noise.
Attacks: L-inf PGD (Madry et al. 2018) on any classifier of [0, 1] images; FGSM is its one-step case.
"""
import torch
import torch.nn.functional as F

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "jpeg")
_PARAMS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "jpeg": (25, 18, 15, 10, 7),
}


def _check_images(x):
    if not (torch.is_tensor(x) and x.ndim == 4 and x.shape[1] == 3 and x.is_floating_point()):
        raise ValueError(f"expected float images [B, 3, H, W] in [0, 1], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def corrupt(x, name, severity, generator=None):
    """One corruption at severity 0-5 (0 = identity)."""
    _check_images(x)
    if name not in _PARAMS:
        raise ValueError(f"unknown corruption '{name}' (known: {', '.join(CORRUPTIONS)})")
    if not 0 <= severity <= 5 or int(severity) != severity:
        raise ValueError(f"severity must be an integer 0-5, got {severity}")
    if severity == 0:
        return x.clone()
    c = _PARAMS[name][int(severity) - 1]
    if name == "gaussian_noise":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + c * noise).clamp(0, 1)
    if name == "shot_noise":
        return (torch.poisson(x * c, generator=generator) / c).clamp(0, 1)
    if name == "impulse_noise":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        salt = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < 0.5
        hit = u < c
        return torch.where(hit & salt, torch.ones_like(x), torch.where(hit, torch.zeros_like(x), x))
    if name == "gaussian_blur":
        return _blur(x, c * min(x.shape[-2:]) / 224)
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * c + mean).clamp(0, 1)
    return _jpeg(x, c)


def _blur(x, sigma):
    radius = max(1, int(round(3 * sigma)))
    radius = min(radius, min(x.shape[-2:]) - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)                                                  # [3, 2r+1]
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(y, k.view(3, 1, -1, 1), groups=3)


def _jpeg(x, quality):
    from torchvision.io import decode_jpeg, encode_jpeg
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    out = [decode_jpeg(encode_jpeg(img, quality=int(quality))) for img in u8]
    return (torch.stack(out).float() / 255).to(x.device, x.dtype)


def mask_patches(x, fraction, patch=0, fill="mean", generator=None):
    """Mask round(fraction x cells) random cells of a grid of `patch`-px squares (0 = side / 8) per image, to the
    image's mean colour or to uniform noise."""
    _check_images(x)
    if not 0 <= fraction <= 1:
        raise ValueError(f"mask fraction must be in [0, 1], got {fraction}")
    if fill not in ("mean", "noise"):
        raise ValueError(f"mask fill must be 'mean' or 'noise', got {fill!r}")
    B, _, H, W = x.shape
    patch = patch or max(1, min(H, W) // 8)
    gh, gw = -(-H // patch), -(-W // patch)
    n = int(round(fraction * gh * gw))
    if n == 0:
        return x.clone()
    order = torch.rand(B, gh * gw, generator=generator, device=x.device).argsort(dim=1)
    cells = torch.zeros(B, gh * gw, device=x.device, dtype=torch.bool)
    cells.scatter_(1, order[:, :n], True)
    mask = cells.view(B, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :H, :W]
    if fill == "mean":
        value = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        value = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(mask, value, x)


def pgd_attack(model, x, y, eps, steps=10, step_size=None, random_start=True, generator=None):
    """L-inf PGD: maximise cross-entropy of model(x + delta) over |delta| <= eps, x + delta in [0, 1].
    model: float [B, 3, H, W] in [0, 1] -> logits. step_size defaults to 2.5 eps / steps. Returns x + delta."""
    _check_images(x)
    if eps < 0 or steps < 1:
        raise ValueError(f"PGD needs eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
    if eps == 0:
        return x.clone()
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
        delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():  # also inside a caller's no_grad block
            loss = F.cross_entropy(model(x + delta), y)
            grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def fgsm_attack(model, x, y, eps):
    """One signed-gradient step of size eps from x (PGD with one step, no random start)."""
    return pgd_attack(model, x, y, eps, steps=1, step_size=eps, random_start=False)
