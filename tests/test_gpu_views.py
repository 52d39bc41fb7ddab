"""gpu_views.py, the data.decode=gpu path: FFCV hands over the stored bytes, upload() decodes each image once
(nvJPEG on CUDA; the same torchvision call on CPU) and GPUViews cuts the views. Runs on CPU with the reference ops."""
import numpy as np
import pytest
import torch

from augment import ViewAugment
from conftest import CUDA, make_cfg, needs_cuda, read_beton
from gpu_views import GPUViews, ImageBytesDecoder, max_image_bytes, upload
from write_ffcv import write_split

DEVICE = torch.device("cuda" if CUDA else "cpu")


def _beton(tmp_path, mode, n=24, lo=20, hi=48):
    cfg = make_cfg(tmp_path / mode, data__source="synthetic", data__synthetic_images=n, writer__write_mode=mode,
                   data__synthetic_min_size=lo, data__synthetic_max_size=hi, writer__compress_probability=0.5)
    return write_split(cfg, "train", log=lambda *_: None)["path"]


def _loader(path, pipelines, batch_size=8):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    return Loader(path, batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL,
                  pipelines={**pipelines, "label": [IntDecoder()]})


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["raw", "jpg", "proportion"])
def test_uploaded_images_are_the_stored_images(tmp_path, mode):
    from ffcv.transforms import ToTensor
    path = _beton(tmp_path, mode)
    stored, _ = read_beton(path)
    got = []
    for batch, _ in _loader(path, {"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()]}):
        images = upload(batch, DEVICE)
        got += [images.image(i).permute(1, 2, 0).cpu().numpy() for i in range(batch.shape[0])]
    assert len(got) == len(stored)
    for a, b in zip(got, stored):
        assert a.shape == b.shape
        diff = np.abs(a.astype(int) - b.astype(int))
        if mode == "raw":
            assert diff.max() == 0  # raw pixels are exact
        else:  # JPEGs: libjpeg-turbo (torchvision on CPU) or nvJPEG vs OpenCV: IDCT and chroma upsampling differ
            assert diff.mean() < (4.0 if CUDA else 2.0) and (CUDA or diff.max() <= 8)  # nvJPEG: 2.7 seen


@pytest.mark.timeout(180)
def test_gpu_path_views_have_the_cpu_paths_distribution(tmp_path):
    """Same augmentation law on both paths: per-channel mean and spread of many views of the same images agree."""
    from ffcv.transforms import ToTensor
    from multiview_decoder import MultiViewRandomResizedCropDecoder
    path = _beton(tmp_path, "raw", n=64, lo=24, hi=64)
    augs = (ViewAugment(p_blur=1.0), ViewAugment(p_blur=0.1, p_solarize=0.2))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    gpu, cpu = [], []
    make = GPUViews(augs, (0.2, 1.0), out_dtype=torch.float32)
    for epoch in range(30):  # a seeded decoder repeats its crops in a sequential epoch: a new seed each epoch
        dec = MultiViewRandomResizedCropDecoder((16, 16), 2, scale=(0.2, 1.0), interpolation="bilinear", seed=epoch)
        for batch, _ in _loader(path, {"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()]}, 64):
            gpu.append(torch.stack(make(upload(batch, DEVICE), 16, gen), 1).cpu())
        for batch, _ in _loader(path, {"image": [dec, ToTensor()]}, 64):
            views = batch.to(DEVICE)
            cpu.append(torch.stack([a(views[:, v], gen) for v, a in enumerate(augs)], 1).cpu())
    gpu, cpu = torch.cat(gpu), torch.cat(cpu)                                 # [1920, 2, 3, 16, 16]
    assert gpu.shape == cpu.shape == (1920, 2, 3, 16, 16)
    for v in range(2):
        g, c = gpu[:, v].transpose(0, 1).reshape(3, -1), cpu[:, v].transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(g.mean(1), c.mean(1), atol=0.05, rtol=0)
        torch.testing.assert_close(g.std(1), c.std(1), atol=0.05, rtol=0.05)
        # per-view statistics (crop scale, jitter) spread alike: the std over views of each view's mean
        gm, cm = gpu[:, v].mean((1, 2, 3)), cpu[:, v].mean((1, 2, 3))
        assert abs(gm.std() - cm.std()) < 0.1 * cm.std()


def test_cut_bytes_are_refused():
    batch = torch.zeros(2, 16 + 4, dtype=torch.uint8)
    batch[0, 0] = 200  # claims 200 bytes in a 4-byte slot
    with pytest.raises(ValueError, match="max_bytes"):
        upload(batch, DEVICE)


@needs_cuda
@pytest.mark.timeout(180)
def test_bf16_views_from_jpegs_on_the_gpu(tmp_path):
    from ffcv.transforms import ToTensor
    path = _beton(tmp_path, "proportion", n=32, lo=64, hi=300)
    make = GPUViews((ViewAugment(), ViewAugment(p_blur=0.1, p_solarize=0.2)), (0.08, 1.0))
    for batch, _ in _loader(path, {"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()]}, 16):
        v1, v2 = make(upload(batch, DEVICE), 96, torch.Generator(device=DEVICE).manual_seed(0))
        assert v1.shape == v2.shape == (16, 3, 96, 96) and v1.dtype == torch.bfloat16 and v1.is_cuda
        assert v1.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(v1.float()).all()
