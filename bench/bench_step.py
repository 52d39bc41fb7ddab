"""Benchmark (not a test): training-step throughput of train_coss.py's step on synthetic views (no data loading).

    python bench/bench_step.py --method co_byol --backbone resnet50 --res 224 --batch 256        # on a GPU
    python bench/bench_step.py --method byol co_byol --backbone resnet18 --res 32 --batch 32 --device cpu

For each (method, backbone, res): builds the networks exactly as train_coss.py does, runs the same
augment -> loss -> backward -> LARS -> probe -> EMA step on random uint8 views already on the device, with
bf16 autocast and channels-last on CUDA and optionally torch.compile; untimed warm-up steps (compilation), then the
median of --iters timed steps (CUDA-synchronised wall clock). Reports img/s (images, two views each), step ms,
the augmentations alone (ms per batch, both views) and peak GPU memory; --fixed-views 1 leaves the augmentations
out of the step.
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


def bench_one(method, backbone, res, batch, device, compile_, iters, warmup, local_hidden, fixed_views=False):
    cfg = load_config(None, [f"--method.name={method}", f"--model.backbone={backbone}", f"--augment.res={res}",
                             f"--optim.batch_size={batch}", "--method.proj_hidden=4096", "--method.proj_dim=256",
                             "--method.pred_hidden=4096", f"--method.local_hidden={local_hidden}",
                             "--optim.lars_eta=0.001", "--optim.lr=1.0", "--optim.weight_decay=1e-6",
                             "--augment.p_blur1=1.0", "--augment.p_blur2=0.1"])  # BYOL's ImageNet views
    online, target, probe, _ = train_coss.build_model(cfg, 100, device)
    opt = train_coss.build_optimizer(cfg, online, peak_lr=0.1)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    model = torch.compile(online) if compile_ else online
    augments = train_coss.view_augments(cfg)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    views_u8 = torch.randint(0, 256, (batch, 2, res, res, 3), dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, 100, (batch,), device=device, generator=gen)

    precomputed = tuple(aug(views_u8[:, v], gen) for v, aug in enumerate(augments))

    def step():  # --fixed-views: the step gets the same, already augmented views (augmentations out of the timing)
        views = precomputed if fixed_views else tuple(aug(views_u8[:, v], gen) for v, aug in enumerate(augments))
        train_coss.train_step(cfg, (model, online, target, probe, None), (opt, probe_opt, None),
                              views, None, labels, amp, 0.99, 1, "")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    aug_times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        tuple(aug(views_u8[:, v], gen) for v, aug in enumerate(augments))
        sync()
        aug_times.append(time.perf_counter() - t0)
    return {"method": method, "backbone": backbone, "res": res, "batch": batch, "compile": compile_,
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
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fixed-views", type=int, default=0, help="1: time the step without the augmentations")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| method | backbone | res | batch | compile | augment in step | img/s | step ms | augment alone ms | peak GiB |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for backbone in args.backbone:
        for res in args.res:
            for method in args.method:
                r = bench_one(method, backbone, res, args.batch, device, bool(args.compile), args.iters, args.warmup,
                              args.local_hidden, bool(args.fixed_views))
                print(f"| {r['method']} | {r['backbone']} | {r['res']} | {r['batch']} | {int(r['compile'])} | "
                      f"{'no' if args.fixed_views else 'yes'} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | "
                      f"{r['augment_ms']:.1f} | {r['peak_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
