"""augment.py: each per-sample op equals torchvision.transforms.v2.functional on one image; per-sample draws."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from augment import (ViewAugment, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                     apply_color_ops, blur_kernel_size, byol_view_augments, gaussian_blur, grayscale, solarize)


def _images(B=5, H=13, W=11, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ours,theirs,lo,hi", [
    (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_color_ops_equal_torchvision_per_sample(ours, theirs, lo, hi):
    x = _images()
    factors = torch.linspace(lo, hi, x.shape[0])
    out = ours(x.clone(), factors)
    for b in range(x.shape[0]):
        torch.testing.assert_close(out[b], theirs(x[b], float(factors[b])), rtol=0, atol=2e-5)


def test_hue_round_trip_is_identity_and_full_shift_wraps():
    x = _images(seed=1)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(5)), x, rtol=0, atol=2e-6)
    torch.testing.assert_close(adjust_hue(x, torch.full((5,), 0.5)), TF.adjust_hue(x, 0.5), rtol=0, atol=2e-5)


def test_grayscale_and_solarize_equal_torchvision():
    x = _images(seed=2)
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(solarize(x), TF.solarize(x, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("size", [3, 5, 9])
def test_per_sample_blur_equals_torchvision(size):
    x = _images(B=4, H=17, W=12, seed=3)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = gaussian_blur(x, sigmas, size)
    for b in range(4):
        ref = TF.gaussian_blur(x[b], [size, size], [float(sigmas[b])] * 2)
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-5)


def test_full_view_augment_equals_sequential_torchvision():
    aug = ViewAugment(p_jitter=0.5, p_gray=0.5, p_blur=0.5, p_solarize=0.5)
    u8 = (torch.rand(16, 20, 20, 3, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    params = aug.sample(16, 20, torch.Generator().manual_seed(5))
    out = aug(u8, params=params)
    assert out.shape == (16, 3, 20, 20) and out.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(aug.mean).view(3, 1, 1), torch.tensor(aug.std).view(3, 1, 1)
    for b in range(16):
        img = u8[b].permute(2, 0, 1).float() / 255
        img = TF.adjust_brightness(img, float(params["brightness"][b]))
        img = TF.adjust_contrast(img, float(params["contrast"][b]))
        img = TF.adjust_saturation(img, float(params["saturation"][b]))
        img = TF.adjust_hue(img, float(params["hue"][b]))
        if params["gray"][b]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params["blur"][b]:
            k = params["kernel_size"]
            img = TF.gaussian_blur(img, [k, k], [float(params["sigma"][b])] * 2)
        if params["solarize"][b]:
            img = TF.solarize(img, 0.5)
        torch.testing.assert_close(out[b], (img - mean) / std, rtol=0, atol=1e-4)


def test_parameters_are_drawn_per_sample_with_the_right_rates():
    aug = ViewAugment(p_jitter=0.8, p_gray=0.2, p_blur=0.1, p_solarize=0.2)
    p = aug.sample(4000, 224, torch.Generator().manual_seed(6))
    jittered = p["brightness"] != 1
    assert abs(jittered.float().mean() - 0.8) < 0.03
    assert abs(p["gray"].float().mean() - 0.2) < 0.03 and abs(p["blur"].float().mean() - 0.1) < 0.03
    assert abs(p["solarize"].float().mean() - 0.2) < 0.03
    assert p["brightness"][jittered].unique().numel() > 0.99 * int(jittered.sum())  # one draw per sample
    assert 0.6 <= float(p["brightness"].min()) and float(p["brightness"].max()) <= 1.4
    assert -0.1 <= float(p["hue"].min()) and float(p["hue"].max()) <= 0.1
    assert 0.1 <= float(p["sigma"].min()) and float(p["sigma"].max()) <= 2.0
    assert p["kernel_size"] == 23


def test_byol_views_are_asymmetric():
    v1, v2 = byol_view_augments()
    assert (v1.p_blur, v1.p_solarize, v2.p_blur, v2.p_solarize) == (1.0, 0.0, 0.1, 0.2)


def test_identity_parameters_leave_the_image():
    x = _images(seed=7)
    p = {"brightness": torch.ones(5), "contrast": torch.ones(5), "saturation": torch.ones(5), "hue": torch.zeros(5),
         "gray": torch.zeros(5, dtype=torch.bool), "blur": torch.zeros(5, dtype=torch.bool), "sigma": torch.ones(5),
         "solarize": torch.zeros(5, dtype=torch.bool), "kernel_size": 3}
    torch.testing.assert_close(apply_color_ops(x, p), x, rtol=0, atol=2e-6)


def test_kernel_size_and_bad_input():
    assert [blur_kernel_size(s) for s in (32, 96, 224)] == [3, 11, 23]
    with pytest.raises(ValueError):
        ViewAugment()(torch.zeros(2, 3, 8, 8))
