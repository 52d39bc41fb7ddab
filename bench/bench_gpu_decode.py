"""Benchmark (not a test), CUDA only: how fast can a GPU decode once and cut two views? A first probe for the
GPU data path (kernels issue). Reads the JPEG files that bench_loader.py made (ImageNet-like, ~430x415 px).

    python bench/bench_gpu_decode.py --tree bench/_data/jpegs_2000 [--batch 256]

Measures, per batch of `--batch` JPEGs already in host memory (file bytes, as FFCV would hand them over):
  decode      torchvision.io.decode_jpeg(list, device='cuda')  (nvJPEG, batched)
  decode+2v   the same, then both views of every image in one torchvision.ops.roi_align call over a padded batch
              (bilinear RandomResizedCrop to --res with per-sample boxes, plus per-sample flips), bf16 out
  raw+2v      no decode: a padded batch of raw pixels in pinned host memory (as a raw-pixel beton would give)
              copied to the GPU, then the same crops
  raw upload  the host-to-device copy alone
Median over --iters batches, after warm-up, timed with CUDA events; img/s counts images (two views each).
"""
import argparse
import glob
import math
import os
import statistics
import time

import numpy as np
import torch
import torchvision
from torchvision.io import decode_jpeg
from torchvision.ops import roi_align


def random_boxes(heights, widths, views, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), gen=None):
    """torchvision's RandomResizedCrop sampling, vectorised: [B*views, 4] boxes (x1, y1, x2, y2)."""
    n = len(heights) * views
    h = heights.repeat_interleave(views).float()
    w = widths.repeat_interleave(views).float()
    area = h * w
    out = torch.stack([torch.zeros(n), torch.zeros(n), w, h], 1)  # fallback: whole image
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(10):
        target = area * torch.empty(n).uniform_(*scale, generator=gen)
        logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
        cw = torch.sqrt(target * torch.exp(logr)).round()
        ch = torch.sqrt(target / torch.exp(logr)).round()
        ok = (~done) & (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
        x0 = torch.floor(torch.rand(n, generator=gen) * (w - cw + 1))
        y0 = torch.floor(torch.rand(n, generator=gen) * (h - ch + 1))
        out[ok] = torch.stack([x0, y0, x0 + cw, y0 + ch], 1)[ok]
        done |= ok
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default="bench/_data/jpegs_2000")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda", help="'cpu' only to smoke-test this script")
    args = p.parse_args()
    dev = torch.device(args.device)
    assert dev.type == "cpu" or torch.cuda.is_available(), "needs CUDA (or --device cpu for a smoke test)"
    files = sorted(glob.glob(os.path.join(args.tree, "train", "*", "*.JPEG")))
    assert len(files) >= args.batch, f"need >= {args.batch} JPEGs under {args.tree}"
    data = [torchvision.io.read_file(f) for f in files]
    batches = [data[i:i + args.batch] for i in range(0, len(data) - args.batch + 1, args.batch)]

    def decode(batch):
        return decode_jpeg(batch, device=dev)

    def crop_two_views(padded, hs, ws):
        boxes = random_boxes(hs, ws, 2)
        idx = torch.arange(len(hs)).repeat_interleave(2).float()[:, None]
        rois = torch.cat([idx, boxes], 1).to(dev)
        views = roi_align(padded.float(), rois, output_size=args.res, spatial_scale=1.0, sampling_ratio=2,
                          aligned=True)  # [2B, 3, res, res]
        flip = torch.rand(len(rois), device=dev) < 0.5
        views = torch.where(flip[:, None, None, None], views.flip(3), views)
        return views.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def decode_two_views(batch):
        images = decode(batch)  # list of [3, h, w] uint8 on the GPU
        hs = torch.tensor([im.shape[1] for im in images])
        ws = torch.tensor([im.shape[2] for im in images])
        padded = torch.zeros(len(images), 3, int(hs.max()), int(ws.max()), dtype=torch.uint8, device=dev)
        for k, im in enumerate(images):
            padded[k, :, :im.shape[1], :im.shape[2]] = im
        return crop_two_views(padded, hs, ws)

    # raw pixels, decoded once here on the host: [n_batches] padded pinned uint8 buffers with their sizes
    raw = []
    for b in batches[:4]:
        imgs = [torchvision.io.decode_jpeg(x) for x in b]
        hs = torch.tensor([im.shape[1] for im in imgs])
        ws = torch.tensor([im.shape[2] for im in imgs])
        host = torch.zeros(len(imgs), 3, int(hs.max()), int(ws.max()), dtype=torch.uint8)
        host = host.pin_memory() if dev.type == "cuda" else host
        for k, im in enumerate(imgs):
            host[k, :, :im.shape[1], :im.shape[2]] = im
        raw.append((host, hs, ws))

    def raw_two_views(item):
        host, hs, ws = item
        return crop_two_views(host.to(dev, non_blocking=True), hs, ws)

    def raw_upload(item):
        return item[0].to(dev, non_blocking=True)

    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
          f"{len(files)} JPEGs, mean {np.mean([d.numel() for d in data]) / 1024:.0f} KB; batch {args.batch}")
    for name, fn, inputs in (("decode", decode, batches), ("decode+2v", decode_two_views, batches),
                             ("raw+2v", raw_two_views, raw), ("raw upload", raw_upload, raw)):
        for b in inputs[:2]:
            fn(b)  # warm-up: nvJPEG handles, kernels
        times = []
        for it in range(args.iters):
            b = inputs[it % len(inputs)]
            if dev.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(b)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(b)
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{name:10s} {args.batch / med:9.0f} img/s  ({med * 1e3:.1f} ms per batch of {args.batch}, median of "
              f"{args.iters})")


if __name__ == "__main__":
    main()
