"""Benchmark (not a test): beton write throughput and two-view read throughput, FFCV vs torchvision, in one run.

    python bench/bench_loader.py                       # 2000 ImageNet-sized JPEGs, workers = all cores
    python bench/bench_loader.py --images 500 --workers 2 --json out.json

What it does, on one set of synthetic ImageNet-like JPEGs (330-500 px a side, ~75 KB at quality 90, made once and cached
under bench/_data):
  (a) writes a JPEG beton (write_mode=jpg, q=90) and a raw-pixel beton with write_ffcv.py, timing img/s;
  (b) reads two independent views per image (RandomResizedCrop to --res + horizontal flip, uint8 out) with
      - torchvision: ImageFolder + PIL + DataLoader (one decode per image, two crops of the PIL image)
      - FFCV, two pipelines on one field (how plain FFCV makes two views: it decodes each image twice)
      - FFCV, MultiViewRandomResizedCropDecoder (decodes each image once, cuts both views), with FFCV's INTER_AREA
        resize and with our bilinear one
      on the JPEG beton and on the raw-pixel beton, with the same number of workers and batch size;
    - with CUDA (or --gpu 1): the data.decode=gpu path, FFCV handing over the stored bytes, nvJPEG decoding each
      image once and kernels/crop.py cutting the views (crop, flip, colour jitter, gray, blur, solarize, normalise:
      the CPU readers above stop at uint8 crops, so this one does more work), for two views and for LoGo's
      2 global + 2 local (--local-res) crops; and the CPU path's LoGo crops (a second pipeline for the local pair).
Each reader runs one untimed warm-up epoch (numba compilation, page cache), then --epochs timed epochs; the
median epoch gives img/s (one image = two views). Ratios are against the torchvision loader.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import load_config  # noqa: E402
from write_ffcv import write_split  # noqa: E402


def _make_jpeg(args):
    import cv2
    path, seed = args
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(330, 501)), int(rng.integers(350, 501))
    low = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    mid = cv2.resize(rng.normal(0, 30, (h // 4, w // 4, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    img = np.clip(low + mid + rng.normal(0, 9, (h, w, 3)), 0, 255).astype(np.uint8)
    cv2.imwrite(path, img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])


def make_jpeg_tree(root, n_images, workers, n_classes=10):
    """ImageNet-like JPEGs: smooth random scenes with texture and sensor-like noise, 330-500 px, quality 90."""
    import multiprocessing
    marker = os.path.join(root, f".complete-{n_images}")
    if os.path.exists(marker):
        return
    jobs = []
    for split, n in (("train", n_images), ("val", max(n_classes, n_images // 10))):
        for i in range(n):
            folder = os.path.join(root, split, f"n{i % n_classes:08d}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{i:07d}.JPEG"), (split == "val", i)))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_make_jpeg, jobs, chunksize=64)
    open(marker, "w").close()


def tree_stats(root):
    sizes, pixels = [], []
    from PIL import Image
    train = os.path.join(root, "train")
    for d in sorted(os.listdir(train)):
        for f in sorted(os.listdir(os.path.join(train, d)))[:20]:
            p = os.path.join(train, d, f)
            sizes.append(os.path.getsize(p))
            with Image.open(p) as im:
                pixels.append(im.size)
    return {"mean_kb": float(np.mean(sizes) / 1024), "mean_wh": np.mean(pixels, axis=0).round().tolist()}


def write_betons(tree, out_dir, workers):
    import ffcv  # noqa: F401  (import torch/numba/ffcv before the clock starts)
    results = {}
    for mode in ("jpg", "raw"):
        cfg = load_config(None, ["--data.source=imagefolder", f"--data.root={tree}", f"--data.beton_dir={out_dir}",
                                 f"--data.name=bench_{mode}", f"--writer.write_mode={mode}", "--writer.jpeg_quality=90",
                                 f"--writer.workers={workers}", "--writer.overwrite=1", "--writer.max_resolution=512"])
        results[mode] = write_split(cfg, "train", log=lambda *a: None)
        print(f"write {mode:3s}: {results[mode]['img_per_s']:8.0f} img/s  "
              f"({results[mode]['bytes'] / 2**20:.0f} MiB, {results[mode]['seconds']:.1f} s, of which "
              f"{results[mode]['verify_seconds']:.1f} s verifying)")
    return results


def time_epochs(make_iter, n_images, epochs):
    times = []
    for epoch in range(epochs + 1):  # epoch 0: warm-up, not timed
        t0 = time.perf_counter()
        seen = 0
        for batch in make_iter():
            seen += batch
        dt = time.perf_counter() - t0
        assert seen == n_images, (seen, n_images)
        if epoch:
            times.append(dt)
    return n_images / statistics.median(times)


def torchvision_reader(tree, res, workers, batch):
    import torch
    from torchvision import datasets, transforms

    one_view = transforms.Compose([transforms.RandomResizedCrop(res, antialias=True),
                                   transforms.RandomHorizontalFlip(), transforms.PILToTensor()])

    class TwoViews:
        def __call__(self, img):  # the PIL image is decoded once, cropped twice
            return torch.stack([one_view(img), one_view(img)])

    ds = datasets.ImageFolder(os.path.join(tree, "train"), transform=TwoViews())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True, drop_last=False)

    def run():
        for views, _ in loader:
            assert views.shape[1:] == (2, 3, res, res) and views.dtype == torch.uint8
            yield views.shape[0]
    return run, len(ds)


def ffcv_reader(path, res, workers, batch, decode_once, interpolation="area"):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    from multiview_decoder import MultiViewRandomResizedCropDecoder
    if decode_once:
        pipelines = {"image": [MultiViewRandomResizedCropDecoder((res, res), num_views=2, interpolation=interpolation),
                               ToTensor()],
                     "label": [IntDecoder(), ToTensor()]}
    else:
        pipelines = {"image": [RandomResizedCropRGBImageDecoder((res, res)), RandomHorizontalFlip(), ToTensor()],
                     "image2": PipelineSpec("image", decoder=RandomResizedCropRGBImageDecoder((res, res)),
                                            transforms=[RandomHorizontalFlip(), ToTensor()]),
                     "label": [IntDecoder(), ToTensor()]}
    loader = Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=False, pipelines=pipelines)

    def run():
        for out in loader:
            if decode_once:
                assert out[0].shape[1:] == (2, res, res, 3)
            else:
                assert sum(t.shape[1:] == (res, res, 3) for t in out) == 2  # image, label, image2
            yield out[0].shape[0]
    return run, len(loader.indices)


def ffcv_logo_reader(path, res, local_res, workers, batch):
    """The CPU path of train_coss.py for LoGo: two global views from one decode, two local from a second."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor
    from multiview_decoder import MultiViewRandomResizedCropDecoder
    pipelines = {"image": [MultiViewRandomResizedCropDecoder((res, res), 2, scale=(0.4, 1.0),
                                                             interpolation="bilinear"), ToTensor()],
                 "local": PipelineSpec("image", decoder=MultiViewRandomResizedCropDecoder(
                     (local_res, local_res), 2, scale=(0.05, 0.4), interpolation="bilinear"), transforms=[ToTensor()]),
                 "label": [IntDecoder(), ToTensor()]}
    loader = Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=False, pipelines=pipelines)

    def run():
        for out in loader:
            yield out[0].shape[0]
    return run, len(loader.indices)


def gpu_reader(path, res, workers, batch, local_res=0):
    """data.decode=gpu: bytes from FFCV -> upload / nvJPEG -> crop_views (all views, augmented, bf16)."""
    import torch
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from augment import byol_view_augments
    from gpu_views import GPUViews, ImageBytesDecoder, max_image_bytes, upload
    device = torch.device("cuda")
    loader = Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=False, pipelines={"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()],
                                                "label": [IntDecoder(), ToTensor()]})
    augments = byol_view_augments()
    global_views = GPUViews(augments, (0.4 if local_res else 0.08, 1.0))
    local_views = GPUViews(augments, (0.05, 0.4))
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        for images_bytes, _ in loader:
            images = upload(images_bytes, device)
            views = global_views(images, res, gen)
            if local_res:
                views += local_views(images, local_res, gen)
            yield images_bytes.shape[0]
        torch.cuda.synchronize()  # sync: the epoch ends when the GPU has cut every view
    return run, len(loader.indices)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="train images in the synthetic JPEG tree")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader and writer workers (all readers)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--res", type=int, default=224, help="output side of each view, px")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per reader (after one warm-up epoch)")
    p.add_argument("--data", default=os.path.join(REPO, "bench", "_data"), help="cache for JPEGs and betons")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--local-res", type=int, default=96, help="LoGo readers: side of the two local crops, px")
    p.add_argument("--gpu", type=int, default=-1, help="1: add the data.decode=gpu readers (default: if CUDA)")
    p.add_argument("--skip-baselines", type=int, default=0, help="1: only the decode-once and GPU readers")
    args = p.parse_args()

    tree = os.path.join(args.data, f"jpegs_{args.images}")
    t0 = time.perf_counter()
    make_jpeg_tree(tree, args.images, args.workers)
    stats = tree_stats(tree)
    print(f"{args.images} JPEGs, mean {stats['mean_wh'][0]:.0f}x{stats['mean_wh'][1]:.0f} px, "
          f"{stats['mean_kb']:.0f} KB ({time.perf_counter() - t0:.0f} s to make or find); "
          f"{args.workers} workers, batch {args.batch}, two views at {args.res} px")
    written = write_betons(tree, args.data, args.workers)

    readers = [("torchvision ImageFolder+PIL+DataLoader", lambda: torchvision_reader(tree, args.res, args.workers,
                                                                                       args.batch))]
    import torch
    gpu = torch.cuda.is_available() if args.gpu < 0 else bool(args.gpu)
    for mode in ("jpg", "raw"):
        for once, interp in ((False, "area"), (True, "area"), (True, "bilinear")):
            if args.skip_baselines and not (once and interp == "bilinear"):
                continue
            name = f"FFCV {mode} beton, " + (f"decode once, {interp}" if once else "two pipelines (plain FFCV)")
            readers.append((name, lambda m=mode, o=once, i=interp: ffcv_reader(written[m]["path"], args.res,
                                                                               args.workers, args.batch, o, i)))
        readers.append((f"FFCV {mode} beton, LoGo 2+2 crops ({args.local_res} px local), CPU path",
                        lambda m=mode: ffcv_logo_reader(written[m]["path"], args.res, args.local_res, args.workers,
                                                        args.batch)))
        if gpu:
            readers.append((f"FFCV {mode} beton, data.decode=gpu, 2 views augmented",
                            lambda m=mode: gpu_reader(written[m]["path"], args.res, args.workers, args.batch)))
            readers.append((f"FFCV {mode} beton, data.decode=gpu, LoGo 2+2 augmented",
                            lambda m=mode: gpu_reader(written[m]["path"], args.res, args.workers, args.batch,
                                                      args.local_res)))
    results = []
    for name, build in readers:
        run, n = build()
        rate = time_epochs(run, n, args.epochs)
        results.append({"reader": name, "img_per_s": rate, "img_per_s_per_core": rate / args.workers})
        print(f"read  {name:55s} {rate:8.0f} img/s (two views each)")
    base = results[0]["img_per_s"]
    print(f"\n| reader (two views / image, {args.res} px, {args.workers} workers) | img/s | img/s per core | vs torchvision |")
    print("|---|---:|---:|---:|")
    for r in results:
        r["ratio"] = r["img_per_s"] / base
        print(f"| {r['reader']} | {r['img_per_s']:.0f} | {r['img_per_s_per_core']:.0f} | {r['ratio']:.2f}x |")
    print(f"\nwrite: jpg {written['jpg']['img_per_s']:.0f} img/s, raw {written['raw']['img_per_s']:.0f} img/s "
          f"({args.workers} workers, including the verification decode of every file)")
    if args.json:
        import torch
        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "torch": torch.__version__, "args": vars(args),
                "jpegs": stats, "write": {m: {k: v for k, v in w.items() if k != "path"} for m, w in written.items()},
                "read": results}
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)


if __name__ == "__main__":
    code = main()
    # numba's dispatcher finalisers (compiled FFCV pipelines) raise KeyErrors at interpreter shutdown and would
    # bury the last line; everything is written and closed by now, so leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
