"""Profile (not a test): where one training step's time goes, with torch.profiler, on one GPU.

    python bench/profile_step.py --method co_byol --backbone resnet18 --res 160 --decode gpu --out prof/
    python bench/profile_step.py --device cpu --images 64 --backbone resnet18_w16_cifar --res 32 --batch 16 \
        --steps 2 --warmup 1 --compile 0                                    # CPU smoke run

Runs bench/throughput.py's set-up (synthetic JPEG beton, the Run train_coss.build_run makes: loader, views, step), then
profiles --steps steps after --warmup untimed ones. Prints: wall time per step, the GPU's busy time per step (sum of
kernel durations; the rest is the GPU waiting for the host), and the top operators by CUDA and by CPU time;
writes a Chrome trace (open in chrome://tracing or Perfetto) and the tables under --out.
"""
import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_loader import make_jpeg_tree  # noqa: E402
from throughput import add_setup_args, setup, switch_cases, write_beton  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--method", default="co_byol")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--res", type=int, default=160)
    p.add_argument("--decode", default="gpu", choices=["cpu", "gpu"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="prof")
    add_setup_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    tree = os.path.join(args.data, f"jpegs_{args.images}")
    make_jpeg_tree(tree, args.images, args.workers)
    path = write_beton(tree, args.data, args.workers)
    if len(switch_cases(args)) != 1:
        p.error("give one value each of --compile, --fuse-views and --prefetch")
    switches = switch_cases(args)[0]
    _, run = setup(path, args.method, args.backbone, args.res, args.decode, switches, args, device)
    it = run.endless()

    def step(i):
        run.step(next(it))

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        for i in range(args.steps):
            step(args.warmup + i)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    os.makedirs(args.out, exist_ok=True)
    prof.export_chrome_trace(os.path.join(args.out, "trace.json"))
    named = " ".join(f"{k}={v}" for k, v in switches.items())
    lines = [f"{args.method} {args.backbone} {args.res}px decode={args.decode} batch {args.batch} {named}: "
             f"{wall * 1e3:.1f} ms per step wall ({args.batch / wall:.0f} img/s under the profiler)"]
    if cuda:
        lines.append(f"GPU busy {busy / args.steps * 1e3:.1f} ms per step ({100 * busy / args.steps / wall:.0f} % of "
                     f"the wall time; the rest the GPU waits for the host)")
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=25))
    lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    text = "\n".join(lines)
    with open(os.path.join(args.out, "profile.txt"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
