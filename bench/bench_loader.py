"""Benchmark (not a test): beton write throughput and two-view read throughput, FFCV vs torchvision, in one run.

    python bench/bench_loader.py                       # 2000 ImageNet-sized JPEGs, workers = all cores
    python bench/bench_loader.py --images 500 --workers 2 --json out.json

What it does, on one set of synthetic ImageNet-like JPEGs (330-500 px a side, ~75 KB at quality 90, made once and cached
under bench/_data):
  (a) writes a JPEG beton (write_mode=jpg, q=90) and a raw-pixel beton with write_ffcv.py, timing img/s;
  (b) reads the views of each image, for three kinds: 2 views (RandomResizedCrop to --res + flip, uint8 out),
      LoGo's 2 global + 2 local crops (--local-res) and multi-crop 2 global + --local-views local crops (DINO's
      scales), each with
      - torchvision: ImageFolder + PIL + DataLoader (one decode per image, every view cropped from the PIL image)
      - plain FFCV: one pipeline per view on one field (FFCV's way to several views: it decodes each image again
        for every view)
      - ours: MultiViewRandomResizedCropDecoder, every view of both sizes from one decode, with FFCV's INTER_AREA
        resize and with our bilinear one
      on the JPEG beton and on the raw-pixel beton, with the same number of workers and batch size;
    - with CUDA (or --gpu 1): the data.decode=gpu path for each kind, FFCV handing over the stored bytes, nvJPEG
      decoding each image once and kernels/crop.py cutting the views (crop, flip, colour jitter, gray, blur,
      solarize, normalise: the CPU readers above stop at uint8 crops, so this one does more work).
Each reader runs one untimed warm-up epoch (numba compilation, page cache), then --epochs timed epochs; the
median epoch gives img/s (one image = all its views). Ratios are against the torchvision loader of the same kind.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

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


class Views(NamedTuple):
    """What a reader cuts from each image: n_global crops at res (scale g_scale) and n_local at local_res."""
    name: str
    n_global: int
    res: int
    g_scale: tuple
    n_local: int = 0
    local_res: int = 0
    l_scale: tuple = (0.05, 0.14)

    def sides(self):
        return [(self.res, self.g_scale)] * self.n_global + [(self.local_res, self.l_scale)] * self.n_local


def torchvision_reader(tree, views, workers, batch):
    """ImageFolder + PIL + DataLoader: each image decoded once by PIL, every view cropped from it."""
    import torch
    from torchvision import datasets, transforms

    def crop(side, scale):
        return transforms.Compose([transforms.RandomResizedCrop(side, scale=scale, antialias=True),
                                   transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    global_view, local_view = crop(views.res, views.g_scale), crop(views.local_res or views.res, views.l_scale)

    class MultiView:
        def __call__(self, img):
            out = torch.stack([global_view(img) for _ in range(views.n_global)])
            if views.n_local:
                return out, torch.stack([local_view(img) for _ in range(views.n_local)])
            return out

    ds = datasets.ImageFolder(os.path.join(tree, "train"), transform=MultiView())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True, drop_last=False)

    def run():
        for out, _ in loader:
            first = out[0] if views.n_local else out
            assert first.shape[1:] == (views.n_global, 3, views.res, views.res) and first.dtype == torch.uint8
            yield first.shape[0]
    return run, len(ds)


def ffcv_reader(path, views, workers, batch, decode_once, interpolation="area"):
    """decode_once: MultiViewRandomResizedCropDecoder (every view from one decode); otherwise plain FFCV, one
    pipeline per view on the same field (RandomResizedCrop + flip), each decoding the image again."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    from multiview_decoder import MultiViewRandomResizedCropDecoder
    if decode_once:
        decoder = MultiViewRandomResizedCropDecoder(
            (views.res, views.res), num_views=views.n_global, scale=views.g_scale, interpolation=interpolation,
            local_size=(views.local_res, views.local_res), local_views=views.n_local, local_scale=views.l_scale)
        pipelines = {"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]}
    else:
        pipelines = {"label": [IntDecoder(), ToTensor()]}
        for v, (side, scale) in enumerate(views.sides()):
            steps = [RandomResizedCropRGBImageDecoder((side, side), scale=scale), RandomHorizontalFlip(), ToTensor()]
            pipelines["image" if v == 0 else f"image{v}"] = steps if v == 0 else \
                PipelineSpec("image", decoder=steps[0], transforms=steps[1:])
    loader = Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=False, pipelines=pipelines)
    n_views = views.n_global + views.n_local

    def run():
        for out in loader:
            if decode_once:
                assert out[0].shape[0] == out[1].shape[0]
            else:
                assert len(out) == n_views + 1  # every view's pipeline, and the label
            yield out[0].shape[0]
    return run, len(loader.indices)


def gpu_reader(path, views, workers, batch):
    """data.decode=gpu: bytes from FFCV -> upload / nvJPEG -> crop_views (all views, augmented, bf16)."""
    import torch
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from augment import ViewAugment, byol_view_augments
    from gpu_views import GPUViews, ImageBytesDecoder, max_image_bytes, upload
    device = torch.device("cuda")
    loader = Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=False, pipelines={"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()],
                                                "label": [IntDecoder(), ToTensor()]})
    pair = byol_view_augments()
    global_views = GPUViews([pair[i % 2] for i in range(views.n_global)], views.g_scale)
    local_views = GPUViews([ViewAugment(p_blur=0.5)] * views.n_local, views.l_scale) if views.n_local else None
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        for images_bytes, _ in loader:
            images = upload(images_bytes, device)
            out = global_views(images, views.res, gen)
            if local_views is not None:
                out += local_views(images, views.local_res, gen)
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
    p.add_argument("--local-res", type=int, default=96, help="LoGo and multi-crop readers: side of the local crops")
    p.add_argument("--local-views", type=int, default=6, help="multi-crop readers: local crops per image")
    p.add_argument("--gpu", type=int, default=-1, help="1: add the data.decode=gpu readers (default: if CUDA)")
    p.add_argument("--skip-baselines", type=int, default=0, help="1: only the decode-once and GPU readers")
    args = p.parse_args()

    tree = os.path.join(args.data, f"jpegs_{args.images}")
    t0 = time.perf_counter()
    make_jpeg_tree(tree, args.images, args.workers)
    stats = tree_stats(tree)
    print(f"{args.images} JPEGs, mean {stats['mean_wh'][0]:.0f}x{stats['mean_wh'][1]:.0f} px, "
          f"{stats['mean_kb']:.0f} KB ({time.perf_counter() - t0:.0f} s to make or find); "
          f"{args.workers} workers, batch {args.batch}, global views at {args.res} px")
    written = write_betons(tree, args.data, args.workers)

    import torch
    gpu = torch.cuda.is_available() if args.gpu < 0 else bool(args.gpu)
    kinds = [Views("2 views", 2, args.res, (0.08, 1.0)),
             Views(f"LoGo 2+2 ({args.local_res} px local)", 2, args.res, (0.4, 1.0), 2, args.local_res, (0.05, 0.4)),
             Views(f"multi-crop 2+{args.local_views} ({args.local_res} px local)", 2, args.res, (0.08, 1.0),
                   args.local_views, args.local_res, (0.05, 0.14))]
    readers = []  # (views, reader name, builder); the first of each kind is its torchvision baseline
    for kind in kinds:
        if not args.skip_baselines:
            readers.append((kind, "torchvision ImageFolder+PIL+DataLoader",
                            lambda k=kind: torchvision_reader(tree, k, args.workers, args.batch)))
        for mode in ("jpg", "raw"):
            cases = [(False, "area"), (True, "area"), (True, "bilinear")]
            for once, interp in cases:
                if args.skip_baselines and not (once and interp == "bilinear"):
                    continue
                name = f"FFCV {mode} beton, " + (f"decode once, {interp}" if once else
                                                 "one pipeline per view (plain FFCV)")
                readers.append((kind, name, lambda k=kind, m=mode, o=once, i=interp: ffcv_reader(
                    written[m]["path"], k, args.workers, args.batch, o, i)))
            if gpu:
                readers.append((kind, f"FFCV {mode} beton, data.decode=gpu, augmented",
                                lambda k=kind, m=mode: gpu_reader(written[m]["path"], k, args.workers, args.batch)))
    results = []
    for kind, name, build in readers:
        run, n = build()
        rate = time_epochs(run, n, args.epochs)
        results.append({"views": kind.name, "reader": name, "img_per_s": rate,
                        "img_per_s_per_core": rate / args.workers})
        print(f"read  {kind.name:28s} {name:50s} {rate:8.0f} img/s")
    print(f"\n| views ({args.res} px global, {args.workers} workers) | reader | img/s | img/s per core | "
          f"vs torchvision |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        base = next((b["img_per_s"] for b in results if b["views"] == r["views"] and
                     b["reader"].startswith("torchvision")), float("nan"))
        r["ratio"] = r["img_per_s"] / base
        print(f"| {r['views']} | {r['reader']} | {r['img_per_s']:.0f} | {r['img_per_s_per_core']:.0f} | "
              f"{r['ratio']:.2f}x |")
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
