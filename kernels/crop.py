"""Fused GPU view making: every augmented view of every image of a batch, from decoded uint8 pixels.

Input: the batch's decoded images in one flat uint8 buffer (`Ragged`: per image an offset, height, width and the
strides of channel, row and column, so HWC raw pixels and nvJPEG's CHW output can sit in one buffer) and, per view
n (N = V x B views, view-major), the source image, a crop box, a flip flag and BYOL's colour parameters
(augment.ViewAugment.sample's, drawn by gpu_views.sample_views). Output: normalised float [N, 3, S, S] in
channels-last memory (bf16 or fp32).

Per view, in this order (the same as the CPU path in augment.py; each step as torchvision.transforms.v2.functional
on a float image, which `crop_views_ref` applies per sample):
    x  = resized_crop(img, top, left, h, w, S, bilinear, antialias=False)   (pixel centres aligned, edge clamped)
    x  = hflip(x) if flip
    x  = clamp(b x)                              brightness
    x  = clamp(c x + (1 - c) mean(gray(x)))      contrast: the mean is over the whole view (a reduction)
    x  = clamp(s x + (1 - s) gray(x))            saturation
    x  = hsv_to_rgb(h + hue, s, v)               hue
    x  = gray(x) if gray
    x  = gaussian_blur(x, k, sigma) if blur      separable, reflect padding, per-view sigma
    x  = 1 - x where x >= 0.5 if solarize
    out = (x - mean) / std

Kernels (grid: views x pixel tiles of BLOCK pixels):
    _crop_stats_kernel   sum of gray(brightness(crop)) per tile -> partial sums [N, T] (only when contrast != 1)
    _crop_color_kernel   the crop again (bilinear taps are cheap and cached), every colour op; views without blur
                         are solarised, normalised and written; blurred views go to an fp32 planar scratch
    _blur_rows_kernel    horizontal Gaussian pass over the blurred views (others exit at once)
    _blur_cols_kernel    vertical pass, then solarize and normalise into the output
The per-tile partial sums (not atomics) keep the contrast mean, and so the output, deterministic.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

import kernels
from kernels import use_triton

BLOCK = 1024  # pixels per program
# The CPU path's constants (augment.py), restated so that this file imports nothing of the project (a test checks
# they agree): ImageNet normalisation and ITU-R 601-2 luma, which the kernels hard-code (_gray).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


class Ragged(NamedTuple):
    """Decoded images of a batch in one flat uint8 buffer; pixel (c, y, x) of image i is
    data[offset[i] + c * stride_c[i] + y * stride_y[i] + x * stride_x[i]]. Index tensors: int64 [B]."""
    data: torch.Tensor
    offset: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    stride_c: torch.Tensor
    stride_y: torch.Tensor
    stride_x: torch.Tensor

    def image(self, i):
        """Image i as a uint8 [3, h, w] view."""
        return self.data.as_strided((3, int(self.height[i]), int(self.width[i])),
                                    (int(self.stride_c[i]), int(self.stride_y[i]), int(self.stride_x[i])),
                                    int(self.offset[i]))


def ragged_from_list(images, layout="hwc"):
    """uint8 images ([h, w, 3] for hwc, [3, h, w] for chw) -> Ragged (one copy into a flat buffer)."""
    if layout not in ("hwc", "chw"):
        raise ValueError(f"layout must be hwc or chw, got {layout!r}")
    if not images:
        raise ValueError("ragged_from_list needs at least one image")
    dev = images[0].device
    hw = [(t.shape[0], t.shape[1]) if layout == "hwc" else (t.shape[1], t.shape[2]) for t in images]
    for t in images:
        if t.dtype != torch.uint8 or t.ndim != 3 or (t.shape[2] if layout == "hwc" else t.shape[0]) != 3:
            raise ValueError(f"expected uint8 {'[h, w, 3]' if layout == 'hwc' else '[3, h, w]'} images, got "
                             f"{t.dtype} {tuple(t.shape)}")
    sizes = torch.tensor([3 * h * w for h, w in hw], dtype=torch.int64)
    offset = torch.cumsum(sizes, 0) - sizes
    h = torch.tensor([a for a, _ in hw], dtype=torch.int64)
    w = torch.tensor([b for _, b in hw], dtype=torch.int64)
    if layout == "hwc":
        strides = (torch.ones_like(w), 3 * w, torch.full_like(w, 3))
    else:
        strides = (h * w, w, torch.ones_like(w))
    data = torch.cat([t.reshape(-1) for t in images])
    return Ragged(data, *(t.to(dev) for t in (offset, h, w, *strides)))


class Crops(NamedTuple):
    """Per view n: source image index, crop box (top, left, height, width) in source pixels, flip. int64/bool [N]."""
    src: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def random_resized_crops(heights, widths, scale, ratio, generator=None, flip_prob=0.5, tries=10):
    """torchvision's RandomResizedCrop.get_params (= FFCV's get_random_crop), vectorised over images on any device:
    up to `tries` draws of area fraction ~ U(scale) and log aspect ~ U(log ratio); the first that fits wins; else a
    centre crop clamped to the ratio range. heights/widths: int64 [N]. Returns Crops with src = arange(N)."""
    dev = heights.device
    N = heights.shape[0]
    h_img, w_img = heights.double(), widths.double()
    area = h_img * w_img

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=dev, dtype=torch.float64)

    target = area[:, None] * (scale[0] + (scale[1] - scale[0]) * u(N, tries))
    lo, hi = (torch.log(torch.tensor(r, dtype=torch.float64)) for r in ratio)
    aspect = torch.exp(lo + (hi - lo) * u(N, tries))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])
    first = torch.argmax(ok.int(), dim=1)                                         # first fitting try (0 if none)
    any_ok = ok.any(dim=1)
    h_try, w_try = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    in_ratio = w_img / h_img                                                       # the centre-crop fallback
    w_fb = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    h_fb = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    h_c = torch.where(any_ok, h_try, h_fb).clamp(1, None)
    w_c = torch.where(any_ok, w_try, w_fb).clamp(1, None)
    r = u(N, 3)
    top = torch.where(any_ok, torch.floor(r[:, 0] * (h_img - h_c + 1)), torch.floor((h_img - h_c) / 2))
    left = torch.where(any_ok, torch.floor(r[:, 1] * (w_img - w_c + 1)), torch.floor((w_img - w_c) / 2))
    return Crops(torch.arange(N, device=dev), top.long(), left.long(), h_c.long(), w_c.long(), r[:, 2] < flip_prob)


# ---------------------------------------------------------------------------------------------------------------
# Reference: torchvision.transforms.v2.functional, one view at a time.

def crop_views_ref(images, crops, color, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=torch.float32):
    import torchvision.transforms.v2.functional as TF
    out = []
    for n in range(crops.src.shape[0]):
        img = images.image(int(crops.src[n])).float() / 255                       # [3, h, w]
        x = TF.resized_crop(img, int(crops.top[n]), int(crops.left[n]), int(crops.height[n]), int(crops.width[n]),
                            [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        if crops.flip[n]:
            x = TF.horizontal_flip(x)
        x = TF.adjust_brightness(x, float(color["brightness"][n]))
        x = TF.adjust_contrast(x, float(color["contrast"][n]))
        x = TF.adjust_saturation(x, float(color["saturation"][n]))
        x = TF.adjust_hue(x, float(color["hue"][n]))
        if color["gray"][n]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if color["blur"][n] and color["kernel_size"] // 2 < size:
            s = float(color["sigma"][n])
            x = TF.gaussian_blur(x, [color["kernel_size"]] * 2, [s, s])
        if color["solarize"][n]:
            x = TF.solarize(x, 0.5)
        out.append(TF.normalize(x, list(mean), list(std)))
    return torch.stack(out).to(out_dtype).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------------
# Kernels.

@triton.jit
def _gray(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _tap(base, sc, sy, sx, y0, y1, x0, x1, ly, lx, c, mask):
    # torch's bilinear: (1-ly) ((1-lx) v00 + lx v01) + ly ((1-lx) v10 + lx v11), on values / 255
    v00 = tl.load(base + c * sc + y0 * sy + x0 * sx, mask=mask, other=0).to(tl.float32)
    v01 = tl.load(base + c * sc + y0 * sy + x1 * sx, mask=mask, other=0).to(tl.float32)
    v10 = tl.load(base + c * sc + y1 * sy + x0 * sx, mask=mask, other=0).to(tl.float32)
    v11 = tl.load(base + c * sc + y1 * sy + x1 * sx, mask=mask, other=0).to(tl.float32)
    v = (1.0 - ly) * ((1.0 - lx) * (v00 / 255.0) + lx * (v01 / 255.0)) \
        + ly * ((1.0 - lx) * (v10 / 255.0) + lx * (v11 / 255.0))
    return v


@triton.jit
def _bright_crop(data_ptr, offset_ptr, sc_ptr, sy_ptr, sx_ptr, src_ptr, top_ptr, left_ptr, ch_ptr, cw_ptr, flip_ptr,
                 bright_ptr, n, pix, S):
    """Pixels `pix` of view n: bilinear crop, flip, brightness. Returns r, g, b (fp32 [BLOCK]) and the mask."""
    mask = pix < S * S
    i = pix // S
    j = pix % S
    flip = tl.load(flip_ptr + n)
    j = tl.where(flip != 0, S - 1 - j, j)
    img = tl.load(src_ptr + n)
    base = data_ptr + tl.load(offset_ptr + img)
    sc = tl.load(sc_ptr + img)
    sy = tl.load(sy_ptr + img)
    sx = tl.load(sx_ptr + img)
    top = tl.load(top_ptr + n)
    left = tl.load(left_ptr + n)
    ch = tl.load(ch_ptr + n)
    cw = tl.load(cw_ptr + n)
    fy = tl.maximum((i.to(tl.float32) + 0.5) * (ch.to(tl.float32) / S) - 0.5, 0.0)
    fx = tl.maximum((j.to(tl.float32) + 0.5) * (cw.to(tl.float32) / S) - 0.5, 0.0)
    y0 = fy.to(tl.int64)
    x0 = fx.to(tl.int64)
    ly = tl.minimum(tl.maximum(fy - y0.to(tl.float32), 0.0), 1.0)
    lx = tl.minimum(tl.maximum(fx - x0.to(tl.float32), 0.0), 1.0)
    y1 = top + y0 + tl.where(y0 < ch - 1, 1, 0)
    x1 = left + x0 + tl.where(x0 < cw - 1, 1, 0)
    y0 = top + y0
    x0 = left + x0
    b = tl.load(bright_ptr + n)
    r = tl.minimum(tl.maximum(b * _tap(base, sc, sy, sx, y0, y1, x0, x1, ly, lx, 0, mask), 0.0), 1.0)
    g = tl.minimum(tl.maximum(b * _tap(base, sc, sy, sx, y0, y1, x0, x1, ly, lx, 1, mask), 0.0), 1.0)
    bl = tl.minimum(tl.maximum(b * _tap(base, sc, sy, sx, y0, y1, x0, x1, ly, lx, 2, mask), 0.0), 1.0)
    return r, g, bl, mask


@triton.jit
def _crop_stats_kernel(data_ptr, offset_ptr, sc_ptr, sy_ptr, sx_ptr, src_ptr, top_ptr, left_ptr, ch_ptr, cw_ptr,
                       flip_ptr, bright_ptr, contrast_ptr, partial_ptr, S, T, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    t = tl.program_id(1)
    if tl.load(contrast_ptr + n) != 1.0:  # contrast 1 needs no mean
        pix = t * BLOCK + tl.arange(0, BLOCK)
        r, g, b, mask = _bright_crop(data_ptr, offset_ptr, sc_ptr, sy_ptr, sx_ptr, src_ptr, top_ptr, left_ptr, ch_ptr,
                                     cw_ptr, flip_ptr, bright_ptr, n, pix, S)
        tl.store(partial_ptr + n * T + t, tl.sum(tl.where(mask, _gray(r, g, b), 0.0), axis=0))


@triton.jit
def _crop_color_kernel(data_ptr, offset_ptr, sc_ptr, sy_ptr, sx_ptr, src_ptr, top_ptr, left_ptr, ch_ptr, cw_ptr,
                       flip_ptr, bright_ptr, contrast_ptr, partial_ptr, sat_ptr, hue_ptr, gray_ptr, blur_ptr, sol_ptr,
                       out_ptr, scratch_ptr, stride_out_n, stride_out_c, stride_out_y, stride_out_x,
                       m0, m1, m2, s0, s1, s2, S, T,
                       BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    n = tl.program_id(0)
    t = tl.program_id(1)
    pix = t * BLOCK + tl.arange(0, BLOCK)
    r, g, b, mask = _bright_crop(data_ptr, offset_ptr, sc_ptr, sy_ptr, sx_ptr, src_ptr, top_ptr, left_ptr, ch_ptr,
                                 cw_ptr, flip_ptr, bright_ptr, n, pix, S)
    # contrast: blend with the mean gray of the whole (brightened) view
    c = tl.load(contrast_ptr + n)
    if c != 1.0:
        tt = tl.arange(0, BLOCK_T)
        mean = tl.sum(tl.load(partial_ptr + n * T + tt, mask=tt < T, other=0.0), axis=0) / (S * S)
        r = tl.minimum(tl.maximum(c * r + (1.0 - c) * mean, 0.0), 1.0)
        g = tl.minimum(tl.maximum(c * g + (1.0 - c) * mean, 0.0), 1.0)
        b = tl.minimum(tl.maximum(c * b + (1.0 - c) * mean, 0.0), 1.0)
    # saturation
    s = tl.load(sat_ptr + n)
    gr = _gray(r, g, b)
    r = tl.minimum(tl.maximum(s * r + (1.0 - s) * gr, 0.0), 1.0)
    g = tl.minimum(tl.maximum(s * g + (1.0 - s) * gr, 0.0), 1.0)
    b = tl.minimum(tl.maximum(s * b + (1.0 - s) * gr, 0.0), 1.0)
    # hue: to HSV (torchvision's formulas), shift, back in closed form v - v s clamp(min(k, 4 - k), 0, 1)
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    sat = cr / tl.where(eqc, 1.0, maxc)
    div = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / div
    gc = (maxc - g) / div
    bc = (maxc - b) / div
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h / 6.0 + 1.0
    h = h - tl.floor(h)                                                  # fmod(h / 6 + 1, 1) for h / 6 + 1 > 0
    h = h + tl.load(hue_ptr + n)
    h = h - tl.floor(h)                                                  # remainder(., 1)
    k = 5.0 + 6.0 * h
    k = k - 6.0 * tl.floor(k / 6.0)
    r = maxc - maxc * sat * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
    k = 3.0 + 6.0 * h
    k = k - 6.0 * tl.floor(k / 6.0)
    g = maxc - maxc * sat * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
    k = 1.0 + 6.0 * h
    k = k - 6.0 * tl.floor(k / 6.0)
    b = maxc - maxc * sat * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
    # grayscale
    if tl.load(gray_ptr + n) != 0:
        gr = _gray(r, g, b)
        r = gr
        g = gr
        b = gr
    if tl.load(blur_ptr + n) != 0:  # to the fp32 planar scratch [N, 3, S, S]; the blur passes finish the view
        sbase = scratch_ptr + n.to(tl.int64) * 3 * S * S + pix
        tl.store(sbase, r, mask=mask)
        tl.store(sbase + S * S, g, mask=mask)
        tl.store(sbase + 2 * S * S, b, mask=mask)
    else:
        _solarize_normalize_store(out_ptr, n, pix, r, g, b, tl.load(sol_ptr + n), mask,
                                  stride_out_n, stride_out_c, stride_out_y, stride_out_x, m0, m1, m2, s0, s1, s2, S)


@triton.jit
def _solarize_normalize_store(out_ptr, n, pix, r, g, b, solarize, mask, stride_out_n, stride_out_c, stride_out_y,
                              stride_out_x, m0, m1, m2, s0, s1, s2, S):
    if solarize != 0:
        r = tl.where(r >= 0.5, 1.0 - r, r)
        g = tl.where(g >= 0.5, 1.0 - g, g)
        b = tl.where(b >= 0.5, 1.0 - b, b)
    obase = out_ptr + n.to(tl.int64) * stride_out_n + (pix // S) * stride_out_y + (pix % S) * stride_out_x
    tl.store(obase, ((r - m0) / s0).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + stride_out_c, ((g - m1) / s1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + 2 * stride_out_c, ((b - m2) / s2).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gauss_sum(sigma, K):
    half = (K - 1) * 0.5
    total = 0.0
    for k in range(0, K):
        d = (k - half) / sigma
        total += tl.exp(-0.5 * d * d)
    return total


@triton.jit
def _blur_line(base, pos, step, S, K, sigma, mask, BLOCK: tl.constexpr):
    # the three planes (S*S apart) at base + reflect(pos + k - K // 2) * step, weighted by the Gaussian taps
    norm = _gauss_sum(sigma, K)
    half = (K - 1) * 0.5
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, K):
        d = (k - half) / sigma
        w = tl.exp(-0.5 * d * d) / norm
        q = pos + k - K // 2
        q = tl.where(q < 0, -q, q)                                    # reflect padding (edge not repeated)
        q = tl.where(q > S - 1, 2 * (S - 1) - q, q)
        acc0 += w * tl.load(base + q * step, mask=mask, other=0.0)
        acc1 += w * tl.load(base + S * S + q * step, mask=mask, other=0.0)
        acc2 += w * tl.load(base + 2 * S * S + q * step, mask=mask, other=0.0)
    return acc0, acc1, acc2


@triton.jit
def _blur_rows_kernel(scratch_ptr, tmp_ptr, blur_ptr, sigma_ptr, S, K, BLOCK: tl.constexpr):
    # tmp[n, c, i, j] = sum_k w_k scratch[n, c, i, reflect(j + k - K // 2)]
    n = tl.program_id(0)
    if tl.load(blur_ptr + n) != 0:
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = pix < S * S
        r, g, b = _blur_line(scratch_ptr + n.to(tl.int64) * 3 * S * S + (pix // S) * S, pix % S, 1, S, K,
                             tl.load(sigma_ptr + n), mask, BLOCK)
        obase = tmp_ptr + n.to(tl.int64) * 3 * S * S + pix
        tl.store(obase, r, mask=mask)
        tl.store(obase + S * S, g, mask=mask)
        tl.store(obase + 2 * S * S, b, mask=mask)


@triton.jit
def _blur_cols_kernel(tmp_ptr, out_ptr, blur_ptr, sigma_ptr, sol_ptr,
                      stride_out_n, stride_out_c, stride_out_y, stride_out_x,
                      m0, m1, m2, s0, s1, s2, S, K, BLOCK: tl.constexpr):
    # vertical pass, then solarize and normalise into the output
    n = tl.program_id(0)
    if tl.load(blur_ptr + n) != 0:
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = pix < S * S
        r, g, b = _blur_line(tmp_ptr + n.to(tl.int64) * 3 * S * S + pix % S, pix // S, S, S, K,
                             tl.load(sigma_ptr + n), mask, BLOCK)
        _solarize_normalize_store(out_ptr, n, pix, r, g, b, tl.load(sol_ptr + n), mask,
                                  stride_out_n, stride_out_c, stride_out_y, stride_out_x, m0, m1, m2, s0, s1, s2, S)


def crop_views(images, crops, color, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=torch.bfloat16,
               backend="auto"):
    """Every view: [N, 3, size, size] normalised, channels-last, out_dtype. images: Ragged; crops: Crops (N views);
    color: ViewAugment.sample's dict with [N] tensors. backend: auto (Triton on CUDA, else the reference)."""
    N = crops.src.shape[0]
    for key in ("brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma", "solarize"):
        if color[key].shape != (N,):
            raise ValueError(f"colour parameter '{key}' has shape {tuple(color[key].shape)}, expected ({N},)")
    if size < 1 or N == 0:
        raise ValueError(f"crop_views needs size >= 1 and at least one view, got size {size} and {N} views")
    if not use_triton(backend, images.data):
        return crop_views_ref(images, crops, color, size, mean, std, out_dtype)
    dev = images.data.device
    S, T = int(size), triton.cdiv(int(size) * int(size), BLOCK)
    out = kernels.empty(N, 3, S, S, device=dev, dtype=out_dtype, memory_format=torch.channels_last)
    i64 = [t.to(dev, torch.int64).contiguous() for t in (images.offset, images.stride_c, images.stride_y,
                                                        images.stride_x)]
    cr = [t.to(dev, torch.int64).contiguous() for t in (crops.src, crops.top, crops.left, crops.height, crops.width)]
    flip = crops.flip.to(dev, torch.int32).contiguous()
    f32 = {k: color[k].to(dev, torch.float32).contiguous() for k in ("brightness", "contrast", "saturation", "hue",
                                                                       "sigma")}
    flags = {k: color[k].to(dev, torch.int32).contiguous() for k in ("gray", "blur", "solarize")}
    K = int(color["kernel_size"])
    if K // 2 >= S:  # reflect padding needs K // 2 < S (as augment.apply_color_ops, which then skips the blur)
        flags["blur"] = torch.zeros_like(flags["blur"])
    partial = torch.empty(N, T, device=dev, dtype=torch.float32)
    scratch = torch.empty(N, 3, S, S, device=dev, dtype=torch.float32)  # only blurred views are written/read
    crop_args = (images.data, i64[0], i64[1], i64[2], i64[3], *cr, flip, f32["brightness"], f32["contrast"], partial)
    _crop_stats_kernel[(N, T)](*crop_args, S, T, BLOCK=BLOCK)
    norm = (*mean, *std)
    _crop_color_kernel[(N, T)](*crop_args, f32["saturation"], f32["hue"], flags["gray"], flags["blur"],
                               flags["solarize"], out, scratch, *out.stride(), *norm, S, T,
                               BLOCK=BLOCK, BLOCK_T=max(2, triton.next_power_of_2(T)))
    tmp = torch.empty_like(scratch)
    _blur_rows_kernel[(N, T)](scratch, tmp, flags["blur"], f32["sigma"], S, K, BLOCK=BLOCK)
    _blur_cols_kernel[(N, T)](tmp, out, flags["blur"], f32["sigma"], flags["solarize"], *out.stride(), *norm, S, K,
                              BLOCK=BLOCK)
    return out


assert GRAY_WEIGHTS == (0.2989, 0.587, 0.114)  # the kernels hard-code them (_gray)
