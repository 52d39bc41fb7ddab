"""kernels/crop.py: the fused view kernels (Triton interpreter on CPU in fp32; compiled on CUDA, bf16 too) against
the per-sample torchvision reference, and the vectorised crop sampler against FFCV's."""
import numpy as np
import pytest
import torch

from augment import ViewAugment
from conftest import CUDA, needs_cuda
from gpu_views import sample_views
from kernels.crop import Crops, crop_views, crop_views_ref, random_resized_crops, ragged_from_list

DEVICE = "cuda" if CUDA else "cpu"


def batch(sizes, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in sizes]
    if layout == "chw":
        images = [t.permute(2, 0, 1).contiguous() for t in images]
    return ragged_from_list([t.to(DEVICE) for t in images], layout)


def params(images, V, size, seed=0, p_blur=(1.0, 0.5), p_solarize=(0.5, 0.5), p_gray=0.3, scale=(0.08, 1.0)):
    augs = [ViewAugment(p_jitter=1.0, p_blur=p_blur[v % 2], p_solarize=p_solarize[v % 2], p_gray=p_gray)
            for v in range(V)]
    return sample_views(images.height, images.width, augs, size, scale,
                        generator=torch.Generator(device=DEVICE).manual_seed(seed))


SIZES = [(1, 1), (37, 50), (64, 31), (7, 300), (20, 20)]


@pytest.mark.parametrize("layout", ["hwc", "chw"])
@pytest.mark.parametrize("size", [1, 7, 33])
def test_views_match_torchvision_per_sample(layout, size, poison):
    images = batch(SIZES, layout)
    crops, color = params(images, 2, size)
    out = crop_views(images, crops, color, size, out_dtype=torch.float32, backend="triton")
    ref = crop_views_ref(images, crops, color, size)
    assert out.shape == (10, 3, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_every_op_is_exercised_and_the_views_differ():
    """The parity test above is only worth something if blur, gray, solarize, flip all occurred in it."""
    images = batch(SIZES, "hwc")
    crops, color = params(images, 2, 7)
    for key in ("blur", "gray", "solarize"):
        assert color[key].any() and not color[key].all(), key
    assert crops.flip.any() and not crops.flip.all()
    out = crop_views(images, crops, color, 7, out_dtype=torch.float32, backend="triton")
    assert not torch.allclose(out[:5], out[5:])


def test_identity_parameters_give_the_resized_image():
    """No jitter, no blur: a full-image crop at the image's own size is the image, normalised."""
    images = batch([(9, 9), (9, 9)], "hwc")
    crops = Crops(torch.arange(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                  torch.full((2,), 9), torch.full((2,), 9), torch.tensor([False, True]))
    one, zero = torch.ones(2), torch.zeros(2)
    color = {"brightness": one, "contrast": one, "saturation": one, "hue": zero, "gray": zero.bool(),
             "blur": zero.bool(), "sigma": one, "solarize": zero.bool(), "kernel_size": 3}
    out = crop_views(images, Crops(*(t.to(DEVICE) for t in crops)), {k: (v.to(DEVICE) if torch.is_tensor(v) else v)
                                                                     for k, v in color.items()},
                     9, mean=(0, 0, 0), std=(1, 1, 1), out_dtype=torch.float32, backend="triton")
    expect = images.image(0).float() / 255
    torch.testing.assert_close(out[0], expect, atol=2e-6, rtol=0)
    torch.testing.assert_close(out[1], images.image(1).float().flip(-1) / 255, atol=2e-6, rtol=0)


@needs_cuda
@pytest.mark.parametrize("size", [96, 224])
def test_bf16_views_on_the_gpu(size, poison):
    images = batch([(375, 500), (500, 333), (64, 64), (224, 224), (1, 1), (801, 603)], "chw", seed=3)
    crops, color = params(images, 2, size, seed=4)
    out = crop_views(images, crops, color, size, out_dtype=torch.bfloat16)
    ref = crop_views_ref(images, crops, color, size)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=1e-2)


def test_crop_sampler_boxes_fit_their_images():
    h = torch.tensor([1, 5, 37, 300, 1000, 20]).repeat(500)
    w = torch.tensor([1, 400, 50, 7, 1000, 20]).repeat(500)
    c = random_resized_crops(h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert (c.height >= 1).all() and (c.width >= 1).all()
    assert (c.top >= 0).all() and (c.left >= 0).all()
    assert (c.top + c.height <= h).all() and (c.left + c.width <= w).all()


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    return np.abs(cdf_a - np.searchsorted(b, grid, side="right") / len(b)).max()


@pytest.mark.parametrize("hw,scale", [((300, 400), (0.08, 1.0)), ((32, 32), (0.3, 1.0)), ((500, 60), (0.2, 1.0))])
def test_crop_sampler_has_ffcvs_distribution(hw, scale):
    """The GPU path's sampler against FFCV's get_random_crop (the CPU path): same law of area, aspect, position."""
    from ffcv.fields.rgb_image import get_random_crop
    n = 20000
    ratio = np.array([3 / 4, 4 / 3])
    np.random.seed(0)
    ffcv = np.array([get_random_crop(hw[0], hw[1], np.array(scale), ratio) for _ in range(n)], dtype=np.float64)
    c = random_resized_crops(torch.full((n,), hw[0]), torch.full((n,), hw[1]), scale, tuple(ratio),
                             torch.Generator().manual_seed(1))
    ours = torch.stack([c.top, c.left, c.height, c.width], 1).double().numpy()
    stats = {"area": lambda x: x[:, 2] * x[:, 3], "log aspect": lambda x: np.log(x[:, 3] / x[:, 2]),
             "centre y": lambda x: x[:, 0] + x[:, 2] / 2, "centre x": lambda x: x[:, 1] + x[:, 3] / 2}
    for name, f in stats.items():
        assert _ks(f(ffcv), f(ours)) < 0.025, name  # ~2x the 1 % critical value for n = 20,000
    assert abs(c.flip.float().mean().item() - 0.5) < 0.02


def test_bad_inputs_raise():
    images = batch([(9, 9)], "hwc")
    crops, color = params(images, 1, 5)
    with pytest.raises(ValueError, match="colour parameter"):
        crop_views(images, crops, {**color, "hue": color["hue"][:0]}, 5)
    with pytest.raises(ValueError, match="uint8"):
        ragged_from_list([torch.zeros(4, 4, 3)], "hwc")
    with pytest.raises(ValueError, match="layout"):
        ragged_from_list([torch.zeros(4, 4, 3, dtype=torch.uint8)], "nhwc")


def test_the_kernel_constants_are_the_cpu_paths():
    """kernels/crop.py restates augment.py's normalisation and luma weights (it imports nothing of the project)."""
    import augment
    import kernels.crop as crop
    assert (crop.IMAGENET_MEAN, crop.IMAGENET_STD, crop.GRAY_WEIGHTS) == (augment.IMAGENET_MEAN, augment.IMAGENET_STD,
                                                                          augment.GRAY_WEIGHTS)
