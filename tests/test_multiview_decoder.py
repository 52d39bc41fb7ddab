"""MultiViewRandomResizedCropDecoder: one decode, V views, each equal to what FFCV's own decoder makes."""
import numpy as np
import pytest

from conftest import make_cfg
from multiview_decoder import MultiViewRandomResizedCropDecoder, bilinear_resize_crop
from write_ffcv import write_split

H = 30  # side of the square images of the fixed-size betons


def _beton(tmp_path, mode, n=16, min_size=None, max_size=None):
    cfg = make_cfg(tmp_path / mode, data__source="synthetic", data__synthetic_images=n, writer__write_mode=mode,
                   data__synthetic_min_size=min_size or H, data__synthetic_max_size=max_size or H)
    return write_split(cfg, "train", log=lambda *_: None)["path"]


def _load_all(path, decoder, batch_size=8):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    loader = Loader(path, batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    return np.concatenate([images.numpy().copy() for images, _ in loader])  # FFCV reuses its buffers


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["raw", "jpg"])
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_views_equal_ffcv_single_view_decoder(tmp_path, mode, flip_prob):
    """With a crop that must cover the whole image, every view equals FFCV's RandomResizedCrop (flipped or not)."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    path = _beton(tmp_path, mode)
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))  # square images: scale 1 and ratio 1 crop everything
    multi = _load_all(path, MultiViewRandomResizedCropDecoder((13, 11), num_views=3, flip_prob=flip_prob, **whole))
    single = _load_all(path, RandomResizedCropRGBImageDecoder((13, 11), **whole))
    assert multi.shape == (16, 3, 13, 11, 3) and single.shape == (16, 13, 11, 3)
    expected = single[:, :, ::-1] if flip_prob == 1.0 else single
    for v in range(3):
        np.testing.assert_array_equal(multi[:, v], expected)


@pytest.mark.timeout(180)
def test_views_are_independent_per_sample(tmp_path):
    path = _beton(tmp_path, "raw", n=64, min_size=24, max_size=64)
    views = _load_all(path, MultiViewRandomResizedCropDecoder((16, 16), num_views=2, scale=(0.08, 1.0)), 16)
    assert views.shape == (64, 2, 16, 16, 3)
    same = [np.array_equal(v[0], v[1]) for v in views]
    assert sum(same) <= 2  # two random crops of one image almost never coincide
    # per-sample draws: the first views of one batch are not all cut from the same relative window
    firsts = views[:16, 0].reshape(16, -1).astype(np.float64)
    assert len({tuple(np.round(f[:6])) for f in firsts}) > 8


@pytest.mark.timeout(180)
def test_seeded_views_repeat_across_runs_and_differ_across_seeds(tmp_path):
    path = _beton(tmp_path, "raw", n=32, min_size=24, max_size=48)

    def run(seed):
        return _load_all(path, MultiViewRandomResizedCropDecoder((12, 12), num_views=2, seed=seed), 8)
    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sum(np.array_equal(v[0], v[1]) for v in a) <= 1  # the two views still differ


@pytest.mark.timeout(180)
def test_flip_probability_is_respected(tmp_path):
    """Square whole-image crops of symmetric-free images: count flipped views against p=0.5."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    path = _beton(tmp_path, "raw", n=100)
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    multi = _load_all(path, MultiViewRandomResizedCropDecoder((8, 8), num_views=2, flip_prob=0.5, **whole), 20)
    single = _load_all(path, RandomResizedCropRGBImageDecoder((8, 8), **whole), 20)
    flipped = [np.array_equal(multi[i, v], single[i, :, ::-1]) for i in range(100) for v in range(2)]
    plain = [np.array_equal(multi[i, v], single[i]) for i in range(100) for v in range(2)]
    assert all(a != b for a, b in zip(flipped, plain))  # each view is exactly one of the two
    assert 70 <= sum(flipped) <= 130  # 200 draws of p=0.5: mean 100, sd ~7


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_bilinear_views_equal_the_bilinear_resize_of_the_image(tmp_path, mode):
    path = _beton(tmp_path, mode)
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    full = _load_all(path, MultiViewRandomResizedCropDecoder((H, H), num_views=1, **whole))[:, 0]  # the images
    views = _load_all(path, MultiViewRandomResizedCropDecoder((13, 11), num_views=2, interpolation="bilinear",
                                                              **whole))
    for img, pair in zip(full, views):
        expected = np.zeros((13, 11, 3), np.uint8)
        bilinear_resize_crop(img, 0, H, 0, H, expected)
        np.testing.assert_array_equal(pair[0], expected)
        np.testing.assert_array_equal(pair[1], expected)


@pytest.mark.parametrize("jit", [False, True])
def test_bilinear_resize_crop_matches_opencv_inter_linear(jit):
    import cv2
    fn = bilinear_resize_crop
    if jit:
        from numba import njit
        fn = njit(bilinear_resize_crop)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (57, 43, 3), dtype=np.uint8)
    for (r0, r1, c0, c1, oh, ow) in [(0, 57, 0, 43, 17, 23), (5, 40, 3, 30, 61, 29), (10, 11, 7, 9, 5, 4),
                                     (0, 57, 0, 43, 57, 43)]:
        out = np.zeros((oh, ow, 3), np.uint8)
        fn(img, r0, r1, c0, c1, out)
        ref = cv2.resize(np.ascontiguousarray(img[r0:r1, c0:c1]), (ow, oh), interpolation=cv2.INTER_LINEAR)
        assert np.abs(out.astype(int) - ref).max() <= 1


@pytest.mark.parametrize("kwargs", [dict(interpolation="cubic"), dict(num_views=0), dict(scale=(0.5, 0.2)), dict(scale=(0.0, 1.0)),
                                    dict(ratio=(2.0, 1.0)), dict(flip_prob=1.5)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MultiViewRandomResizedCropDecoder((8, 8), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Multi-crop: global and local views of two sizes from one decode.

def _write_images(path, images, mode):
    """A beton of the given uint8 [h, w, 3] images (label = index) written with FFCV's own writer."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Images:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], i
    DatasetWriter(str(path), {"image": RGBImageField(write_mode=mode, jpeg_quality=95), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Images())
    return str(path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_every_view_of_a_sample_comes_from_its_own_image(tmp_path, mode):
    """One colour per image: every global and every local view of sample i is image i's colour, in a shuffled,
    seeded multi-crop epoch with several loader threads (the views are cut from that sample's one decode)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from multiview_decoder import split_views
    rng = np.random.default_rng(0)
    colours = rng.permutation(np.array([(r, g, b) for r in (20, 110, 200) for g in (30, 120, 210)
                                        for b in (40, 230)], np.uint8))                  # 18 colours, >= 90 apart
    sizes = rng.integers(20, 60, size=(len(colours), 2))
    images = [np.broadcast_to(c, (h, w, 3)).copy() for c, (h, w) in zip(colours, sizes)]
    path = _write_images(tmp_path / f"colours_{mode}.beton", images, mode)
    decoder = MultiViewRandomResizedCropDecoder((12, 12), num_views=2, seed=5, local_size=(6, 6), local_views=4)
    loader = Loader(path, batch_size=5, num_workers=2, order=OrderOption.RANDOM, seed=1, drop_last=False,
                    pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    seen = 0
    for rows, labels in loader:
        views, local = split_views(rows, 2, (12, 12), 4, (6, 6))
        assert views.shape[1:] == (2, 12, 12, 3) and local.shape[1:] == (4, 6, 6, 3)
        for b, i in enumerate(labels.view(-1).tolist()):
            for v in [*views[b], *local[b]]:
                assert np.abs(v.numpy().astype(int) - colours[i]).max() <= (0 if mode == "raw" else 3)
            seen += 1
    assert seen == len(colours)


def _crop_sides(views, channel):
    """Each view's crop side along rows (channel 0 encodes the row) or columns (channel 1 the column) of a
    coordinate image (value = 4 x position): the slope of the value between the interior output pixels."""
    n = views.shape[1]
    lines = views[..., channel].astype(np.float64)
    lines = lines.mean(2) if channel == 0 else np.sort(lines.mean(1), axis=1)           # per output row / column
    slope = (lines[:, n - 3] - lines[:, 2]) / (n - 5)
    return np.abs(slope) * n / 4


@pytest.mark.timeout(300)
def test_global_and_local_crop_areas_follow_their_scales(tmp_path):
    """The decoder's global crops follow scale (c_min, 1) and its local crops (local_cmin, local_cmax): the crop
    boxes read back from a coordinate image have the area law of FFCV's sampler at each scale (KS test)."""
    from ffcv.fields.rgb_image import get_random_crop
    from test_crop import _ks
    side, n_images = 64, 400
    y, x = np.mgrid[:side, :side]
    image = np.stack([4 * y, 4 * x, np.zeros_like(y)], -1).astype(np.uint8)
    path = _write_images(tmp_path / "coords.beton", [image] * n_images, "raw")
    g_scale, l_scale = (0.3, 1.0), (0.05, 0.14)
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from multiview_decoder import split_views
    decoder = MultiViewRandomResizedCropDecoder((32, 32), 2, scale=g_scale, seed=0, local_size=(16, 16),
                                                local_views=6, local_scale=l_scale)
    loader = Loader(path, batch_size=50, num_workers=2, order=OrderOption.RANDOM, seed=0,
                    pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    got = {"global": [], "local": []}
    for _ in range(3):  # three epochs: other batches, other crops
        rows = np.concatenate([r.numpy().copy() for r, _ in loader])
        views, local = split_views(rows, 2, (32, 32), 6, (16, 16))
        for name, v in (("global", views.reshape(-1, 32, 32, 3)), ("local", local.reshape(-1, 16, 16, 3))):
            got[name].append(np.round(_crop_sides(v, 0)) * np.round(_crop_sides(v, 1)))
    np.random.seed(0)
    ratio = np.array([3 / 4, 4 / 3])
    for name, scale in (("global", g_scale), ("local", l_scale)):
        ffcv = np.array([np.prod(get_random_crop(side, side, np.array(scale), ratio)[2:]) for _ in range(20000)])
        ours = np.concatenate(got[name])
        assert len(ours) >= 2400
        # 1 % critical value of the two-sample KS test at these sizes is about 0.035 (global) / 0.025 (local);
        # the areas read back carry a little rounding, hence the margin
        assert _ks(ffcv, ours) < 0.05, name
        assert scale[0] * side * side * 0.9 <= np.median(ours) <= scale[1] * side * side
    # the two laws are far apart: the test can tell one scale from the other
    assert _ks(np.concatenate(got["global"]), np.concatenate(got["local"])) > 0.9


@pytest.mark.timeout(300)
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_the_trainers_views_of_a_sample_all_show_its_image_on_both_data_paths(tmp_path, decode):
    """train_coss's loader and view maker with 3 global + 4 local views and the colour augmentations off: every
    view of every sample, global and local, is that sample's colour (data.decode=gpu: the crop kernels' reference on
    the CPU, from the one upload of the stored bytes)."""
    import torch
    import train_coss
    from config import load_config
    colours = np.array([(20 + 12 * i, 230 - 11 * i, (97 * i) % 256) for i in range(12)], np.uint8)
    images = [np.broadcast_to(c, (18 + i, 30 - i, 3)).copy() for i, c in enumerate(colours)]
    path = _write_images(tmp_path / "colours.beton", images, "raw")
    cfg = load_config(None, [f"--data.decode={decode}", "--augment.global_views=3", "--augment.local_views=4",
                             "--augment.res=12", "--augment.local_res=8", "--augment.p_jitter=0", "--augment.p_gray=0",
                             "--augment.p_blur1=0", "--augment.p_blur2=0", "--augment.p_blur_local=0",
                             "--augment.p_solarize2=0", "--optim.batch_size=4", "--augment.workers=1",
                             "--training.device=cpu"])
    loader, _ = train_coss.train_loader(cfg, path, None, 1, 12)
    make = train_coss.view_maker(cfg, torch.device("cpu"))
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    seen = 0
    for step, batch in enumerate(loader):
        views, local, labels = make(batch, 12, torch.Generator().manual_seed(step))
        assert [v.shape for v in views] == [(4, 3, 12, 12)] * 3 and [v.shape for v in local] == [(4, 3, 8, 8)] * 4
        for b, i in enumerate(labels.tolist()):
            for v in (*views, *local):
                pixels = (v[b].float() * std + mean) * 255
                assert (pixels - torch.tensor(colours[i], dtype=torch.float32).view(3, 1, 1)).abs().max() < 1.0
            seen += 1
    assert seen == len(colours)
