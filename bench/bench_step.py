"""Benchmark (not a test): training-step throughput of train_coss.py's Run on synthetic views (no data loading).

    python bench/bench_step.py --method co_byol --backbone resnet50 --res 224 --batch 256        # on a GPU
    python bench/bench_step.py --method byol co_byol --backbone resnet18 --res 32 --batch 32 --device cpu

For each (method, backbone, res): the Run train_coss.build_run makes (no loader), stepped on random uint8 views
already on the device, in the CPU loader's format (so the step's view augmentation runs as in training: crop done,
colour/blur/solarize/normalise per sample), with the config's bf16 autocast, channels-last, and the --compile /
--fuse-views switches; untimed warm-up steps (compilation), then the median of --iters timed steps (CUDA-synchronised
wall clock). Reports img/s (images, two views each), step ms, the augmentations alone (ms per batch, both views) and
peak GPU memory.
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_coss  # noqa: E402
from config import load_config  # noqa: E402


def bench_one(method, backbone, res, batch, device, compile_, fuse, iters, warmup, local_hidden):
    cfg = load_config(None, [f"--method.name={method}", f"--model.backbone={backbone}", f"--augment.res={res}",
                             f"--optim.batch_size={batch}", "--method.proj_hidden=4096", "--method.proj_dim=256",
                             "--method.pred_hidden=4096", f"--co.local_hidden={local_hidden}",
                             "--optim.lars_eta=0.001", "--optim.lr=0.1", "--optim.weight_decay=1e-6",
                             "--augment.p_blur1=1.0", "--augment.p_blur2=0.1",  # BYOL's ImageNet views
                             f"--training.compile={compile_}", f"--training.fuse_views={fuse}",
                             f"--training.device={device.type}"])
    run = train_coss.build_run(cfg, device, num_classes=100)
    gen = torch.Generator(device=device).manual_seed(0)
    views_u8 = torch.randint(0, 256, (batch, 2, res, res, 3), dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, 100, (batch,), device=device, generator=gen)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        run.step((views_u8, labels))
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run.step((views_u8, labels))
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    aug_times = []
    for i in range(iters):
        t0 = time.perf_counter()
        run.make_views((views_u8, labels), res, run.generator(i))
        sync()
        aug_times.append(time.perf_counter() - t0)
    return {"method": method, "backbone": backbone, "res": res, "batch": batch, "compile": compile_, "fuse": fuse,
            "img_per_s": batch / med, "step_ms": med * 1e3, "peak_gib": mem,
            "augment_ms": statistics.median(aug_times) * 1e3}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", nargs="+", default=["co_byol"])
    p.add_argument("--backbone", nargs="+", default=["resnet50"])
    p.add_argument("--res", nargs="+", type=int, default=[224])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--local-hidden", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--fuse-views", type=int, default=0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| method | backbone | res | batch | compile | fuse views | img/s | step ms | augment alone ms | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backbone in args.backbone:
        for res in args.res:
            for method in args.method:
                r = bench_one(method, backbone, res, args.batch, device, args.compile, args.fuse_views, args.iters,
                              args.warmup, args.local_hidden)
                print(f"| {r['method']} | {r['backbone']} | {r['res']} | {r['batch']} | {r['compile']} | {r['fuse']} "
                      f"| {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['augment_ms']:.1f} | {r['peak_gib']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
