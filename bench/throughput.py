"""Benchmark (not a test): end-to-end training throughput of train_coss.py's own loader, view maker and step, on a
synthetic ImageNet-like JPEG beton (no real dataset needed).

    python bench/throughput.py --images 20000 --method byol co_byol --backbone resnet18 resnet50 \
        --res 160 224 --decode cpu gpu                                  # on one GPU
    python bench/throughput.py --device cpu --images 64 --backbone resnet18_w16_cifar --res 32 --batch 16 \
        --steps 2 --warmup 1                                            # CPU smoke test (tests/test_throughput.py)

The beton: --images JPEGs of 330-500 px a side (ImageNet's ~400x350 average, ~75 KB at quality 90; made once under
--data and reused), written as a JPEG beton. For each (method, backbone, res, decode): the networks exactly as
train_coss.py builds them (bf16 autocast, channels-last, torch.compile by default), --warmup untimed steps
(compilation, cuDNN autotuning), then --steps timed steps, loader included (the clock stops after a GPU sync).
Reports img/s, ms per step, peak GPU memory, the loader alone (same loader + view making, no model), the share of
the bf16 roofline (training FLOPs per image x img/s / measured dense bf16 matmul peak; FLOPs = 2 x multiply-adds,
backward = 2 x forward, target forward for the BYOL family, all views) and the projected time of one ImageNet-100
epoch (126,689 images). method "logo" means method.name=byol, method.logo=1.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import train_coss  # noqa: E402
from bench_loader import make_jpeg_tree, tree_stats  # noqa: E402
from config import load_config  # noqa: E402
from rf_resnet import count_flops  # noqa: E402

IN100_TRAIN = 126_689


def write_beton(tree, data_dir, workers):
    from write_ffcv import beton_path, write_split
    cfg = load_config(None, ["--data.source=imagefolder", f"--data.root={tree}", f"--data.beton_dir={data_dir}",
                             f"--data.name=throughput_{os.path.basename(tree)}", "--writer.write_mode=jpg",
                             "--writer.jpeg_quality=90", f"--writer.workers={workers}", "--writer.verify=0"])
    path = beton_path(cfg, "train")
    if not os.path.isfile(path):
        write_split(cfg, "train", log=lambda *a: None)
    return path


def matmul_peak(device):
    """Dense bf16 matmul FLOP/s measured here (the roofline's ceiling)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()
    return n * 2 * 8192**3 / (time.perf_counter() - t0)


def train_flops_per_image(cfg, online, target, res):
    """2 x MACs; fwd + bwd = 3 x fwd for the online net on each view; one forward of the target per view."""
    on = count_flops(online, res)
    flops = 2 * (2 * 3 * on)
    if target is not None:
        flops += 2 * (2 * count_flops(target, res))
    if cfg["method.logo"]:
        local = cfg["method.logo_local_res"]
        flops += 2 * (2 * 3 * count_flops(online, local))
    return flops


def add_setup_args(p):
    """The options `setup` reads (shared with bench/profile_step.py)."""
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "ref"])
    p.add_argument("--local-res", type=int, default=96, help="LoGo's local crops, px")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=os.path.join(REPO, "bench", "_data"))
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config values, e.g. training.nan_check_every=20")


def setup(path, method, backbone, res, decode, args, device):
    """The trainer's pieces for one case, built as train_coss.py builds them (ImageNet-size heads, BYOL's ImageNet
    augmentations, LARS): (cfg, loader, make_views, step(views, local_views, labels), online, target). method "logo" = byol + LoGo.
    Shared with bench/profile_step.py; args: batch, workers, compile, kernels, local_res, set."""
    name, logo = ("byol", 1) if method == "logo" else (method, 0)
    cfg = load_config(None, [
        f"--method.name={name}", f"--method.logo={logo}", f"--model.backbone={backbone}", f"--augment.res={res}",
        f"--optim.batch_size={args.batch}", f"--data.decode={decode}", f"--augment.workers={args.workers}",
        "--augment.interpolation=bilinear", "--augment.p_blur1=1.0", "--augment.p_blur2=0.1",
        "--augment.c_min=0.08", "--method.proj_hidden=4096", "--method.proj_dim=256",
        "--method.pred_hidden=4096", "--method.local_hidden=1024", "--optim.lars_eta=0.001",
        "--optim.weight_decay=1e-6",
        f"--training.compile={args.compile}", f"--training.kernels={args.kernels}",
        f"--method.logo_local_res={args.local_res}", f"--training.device={device.type}"]
        + [f"--{kv}" for kv in args.set])
    n_images = train_coss.num_images_and_classes(path)[0]
    loader, _ = train_coss.train_loader(cfg, path, np.arange(n_images), 1, res)
    make_views = train_coss.view_maker(cfg, device)
    online, target, probe, affinity = train_coss.build_model(cfg, 100, device)
    opt = train_coss.build_optimizer(cfg, online, peak_lr=0.1)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    aff_opt = torch.optim.Adam(affinity.parameters(), lr=1e-3) if affinity is not None else None
    model = torch.compile(online, dynamic=False) if args.compile else online
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    nets, opts = (model, online, target, probe, affinity), (opt, probe_opt, aff_opt)

    def step(views, local_views, labels):
        train_coss.train_step(cfg, nets, opts, views, local_views, labels, amp, 0.99, 1, "",
                              cfg["training.nan_check_every"] == 1)
    return cfg, loader, make_views, step, online, target


def bench_one(path, method, backbone, res, decode, args, device, peak):
    cfg, loader, make_views, train_step, online, target = setup(path, method, backbone, res, decode, args, device)
    flops = train_flops_per_image(cfg, online, target, res)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def batches():
        step = 0
        while True:
            for batch in loader:
                yield step, batch
                step += 1

    def run(steps, source, with_model):
        t0 = None
        for step, batch in source:
            if step == args.warmup and t0 is None:
                sync()
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            gen = torch.Generator(device=device).manual_seed(step)
            views, local_views, labels = make_views(batch, res, gen)
            if with_model:
                train_step(views, local_views, labels)
            if step + 1 == args.warmup + steps:
                break
        sync()
        return (time.perf_counter() - t0) / steps

    step_s = run(args.steps, batches(), True)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    loader_s = run(args.steps, batches(), False)
    img_s = args.batch / step_s
    return {"method": method, "backbone": backbone, "res": res, "decode": decode, "batch": args.batch,
            "img_per_s": img_s, "step_ms": step_s * 1e3, "loader_img_per_s": args.batch / loader_s,
            "peak_gib": mem, "tflops_per_image": flops / 1e12, "roofline": flops * img_s / peak,
            "in100_epoch_s": IN100_TRAIN / img_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=IN100_TRAIN, help="train images of the synthetic beton")
    p.add_argument("--method", nargs="+", default=["co_byol"], help="byol co_byol simclr co_simclr logo")
    p.add_argument("--backbone", nargs="+", default=["resnet18"])
    p.add_argument("--res", nargs="+", type=int, default=[224])
    p.add_argument("--decode", nargs="+", default=["gpu"], choices=["cpu", "gpu"])
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, autotuning)")
    add_setup_args(p)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tree = os.path.join(args.data, f"jpegs_{args.images}")
    make_jpeg_tree(tree, args.images, args.workers)
    path = write_beton(tree, args.data, args.workers)
    peak = matmul_peak(device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    stats = tree_stats(tree)
    print(f"{gpu}; torch {torch.__version__}; {args.images} JPEGs, mean {stats['mean_wh'][0]:.0f}x"
          f"{stats['mean_wh'][1]:.0f} px, {stats['mean_kb']:.0f} KB; {args.workers} loader threads; batch "
          f"{args.batch}; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; compile {args.compile}; kernels {args.kernels}")
    print("| method | backbone | res | decode | img/s | step ms | loader alone img/s | peak GiB | % bf16 roofline "
          "| IN-100 epoch s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for backbone in args.backbone:
        for res in args.res:
            for method in args.method:
                for decode in args.decode:
                    r = bench_one(path, method, backbone, res, decode, args, device, peak)
                    rows.append(r)
                    print(f"| {method} | {backbone} | {res} | {decode} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} "
                          f"| {r['loader_img_per_s']:.0f} | {r['peak_gib']:.1f} | {100 * r['roofline']:.0f} % | "
                          f"{r['in100_epoch_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": gpu, "torch": torch.__version__, "peak_flops": peak, "args": vars(args),
                       "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip numba's finaliser noise at shutdown (see bench_loader.py)
