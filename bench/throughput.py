"""Benchmark (not a test): end-to-end training throughput of train_coss.py's own Run (build_run: its loader, view
maker and step), on a synthetic ImageNet-like JPEG beton or on a config's own beton.

    python bench/throughput.py --images 20000 --method byol co_byol --backbone resnet18 resnet50 \
        --res 160 224 --decode cpu gpu                                  # on one GPU
    python bench/throughput.py --device cpu --config configs/fmnist.yaml \
        --beton betons/fmnist_train.beton --compile 0 1 --fuse-views 0 1 \
        --steps 20 --repeats 8 --interleave 1                           # the CPU demo's step, switch by switch
    python bench/throughput.py --device cpu --images 64 --backbone resnet18_w16_cifar --res 32 --batch 16 \
        --steps 2 --warmup 1                                            # CPU smoke test (tests/test_throughput.py)

The synthetic beton: --images JPEGs of 330-500 px a side (ImageNet's ~400x350 average, ~75 KB at quality 90; made
once under --data and reused), written as a JPEG beton, trained with ImageNet-size heads and BYOL's ImageNet
augmentations. With --config and --beton instead: that config as it is (its method, network, resolution, batch), on
that beton. For each case (method, backbone, res, decode, and every combination of the step's switches --compile,
--fuse-views, --prefetch): the Run train_coss.py builds, --warmup untimed steps (their time is reported: compilation,
cuDNN autotuning), then --repeats windows of --steps timed steps, loader included (the clock stops after a GPU
sync); the median window counts (--interleave 1: the cases' windows alternate, for ratios on a drifting
machine). Reports img/s, ms per step, peak GPU memory, the loader alone (same loader + view making, no model),
the share of the roofline (training FLOPs per image x img/s / peak; FLOPs = 2 x multiply-adds, backward =
2 x forward, target forward for the BYOL family, all views; peak on a GPU: a measured dense bf16 matmul; on the
CPU: the cores' nominal fp32 FMA peak, cores x clock x FLOPs per cycle from the vector width, and a measured fp32
matmul beside it) and the projected time of one ImageNet-100 epoch (126,689 images). method "logo" means
method.name=byol, logo.enabled=1.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

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
    from beton_files import beton_path
    from write_ffcv import write_split
    cfg = load_config(None, ["--data.source=imagefolder", f"--data.root={tree}", f"--data.beton_dir={data_dir}",
                             f"--data.name=throughput_{os.path.basename(tree)}", "--writer.write_mode=jpg",
                             "--writer.jpeg_quality=90", f"--writer.workers={workers}", "--writer.verify=0"])
    path = beton_path(cfg, "train")
    if not os.path.isfile(path):
        write_split(cfg, "train", log=lambda *a: None)
    return path


def matmul_peak(device):
    """Dense matmul FLOP/s measured here: bf16 on a GPU (the roofline's ceiling), fp32 on the CPU (beside the
    nominal peak)."""
    cuda = device.type == "cuda"
    n, reps = (8192, 20) if cuda else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    for _ in range(3):
        a @ a
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    if cuda:
        torch.cuda.synchronize()
    return reps * 2 * n**3 / (time.perf_counter() - t0)


def backbone_rate(cfg, device, reps=5):
    """FLOP/s of the config's backbone alone, forward + backward on random channels-last input (2 x batch images at
    augment.res, fp32): what this machine's convolutions deliver at the step's shapes, beside the nominal peak."""
    from rf_resnet import build_backbone, memory_format
    width = cfg["model.width"]
    net = build_backbone(cfg["model.backbone"], **({"width": width} if width else {})).to(device)
    fmt = memory_format(cfg["training.channels_last"])
    net = net.to(memory_format=fmt)
    n, res = 2 * cfg["optim.batch_size"], cfg["augment.res"]
    x = torch.randn(n, 3, res, res, device=device).contiguous(memory_format=fmt)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        net(x)[1].sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return n * 2 * 3 * count_flops(net, res) / statistics.median(times)


def cpu_fma_peak(threads=None):
    """Nominal fp32 FLOP/s of the cores torch uses: threads x clock x FLOPs per cycle, where a core retires two FMA
    vector instructions per cycle (Zen 2-4, Intel since Haswell; Intel server cores with AVX-512: two 512-bit FMA
    ports) of 8 fp32 lanes (AVX2) or 16 (AVX-512), each FMA 2 FLOPs. Returns (FLOP/s, how it was computed)."""
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    mhz = [float(line.split(":", 1)[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    lanes = 16 if "avx512f" in flags and os.environ.get("ATEN_CPU_CAPABILITY", "") != "avx2" else \
        8 if "avx2" in flags and "fma" in flags else 4
    threads = threads or torch.get_num_threads()
    ghz = (max(mhz) if mhz else float("nan")) / 1e3
    per_cycle = 2 * lanes * 2
    return threads * ghz * 1e9 * per_cycle, f"{threads} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle " \
                                            f"(2 FMA units x {lanes} fp32 lanes x 2)"


def train_flops_per_image(cfg, online, target, res):
    """2 x MACs; fwd + bwd = 3 x fwd for the online net on each view (global views at res, local views at
    local_res); one forward of the target per global view."""
    plan = train_coss.view_plan(cfg)
    flops = 2 * (plan.n_global * 3 * count_flops(online, res))
    if target is not None:
        flops += 2 * (plan.n_global * count_flops(target, res))
    if plan.n_local:
        flops += 2 * (plan.n_local * 3 * count_flops(online, plan.local_res))
    return flops


def add_setup_args(p):
    """The options `setup` reads (shared with bench/profile_step.py)."""
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--compile", type=int, nargs="+", default=[1], help="training.compile values to run")
    p.add_argument("--fuse-views", type=int, nargs="+", default=[0], help="training.fuse_views values to run")
    p.add_argument("--prefetch", type=int, nargs="+", default=[0], help="training.prefetch values to run")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "ref"])
    p.add_argument("--local-res", type=int, default=96, help="LoGo's local crops, px")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=os.path.join(REPO, "bench", "_data"))
    p.add_argument("--config", help="time this config as it is (with --beton) instead of the synthetic ImageNet case")
    p.add_argument("--beton", help="with --config: the train beton to read")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config values, e.g. training.nan_check_every=20")


def switch_cases(args):
    """Every combination of the step's switches asked for: [{'compile': c, 'fuse_views': f, 'prefetch': p}]."""
    return [{"compile": c, "fuse_views": f, "prefetch": q} for c in args.compile for f in args.fuse_views
            for q in args.prefetch]


def case_config(method, backbone, res, decode, switches, args, device):
    """The config of one case: --config as it is, or the synthetic ImageNet case (ImageNet-size heads, BYOL's ImageNet
    augmentations, LARS); method "logo" = byol + LoGo; then the switches and --set."""
    common = [f"--training.{k}={v}" for k, v in switches.items()] + [
        f"--training.device={device.type}", f"--training.kernels={args.kernels}",
        f"--augment.workers={args.workers}"]
    if args.config:
        return load_config(args.config, common + [f"--{kv}" for kv in args.set])
    name, logo = ("byol", 1) if method == "logo" else (method, 0)
    return load_config(None, [
        f"--method.name={name}", f"--logo.enabled={logo}", f"--model.backbone={backbone}", f"--augment.res={res}",
        f"--optim.batch_size={args.batch}", f"--data.decode={decode}",
        "--augment.interpolation=bilinear", "--augment.p_blur1=1.0", "--augment.p_blur2=0.1",
        "--augment.c_min=0.08", "--method.proj_hidden=4096", "--method.proj_dim=256",
        "--method.pred_hidden=4096", "--co.local_hidden=1024", "--optim.lars_eta=0.001",
        "--optim.weight_decay=1e-6", "--optim.lr=0.1", f"--logo.local_res={args.local_res}"]
        + common + [f"--{kv}" for kv in args.set])


def setup(path, method, backbone, res, decode, switches, args, device):
    """The trainer's Run for one case, built by train_coss.build_run (shared with bench/profile_step.py)."""
    cfg = case_config(method, backbone, res, decode, switches, args, device)
    return cfg, train_coss.build_run(cfg, device, 1, path, num_classes=100 if not args.config else None)


def bench_cases(path, method, backbone, res, decode, args, device, peak):
    """One row per switch case of (method, backbone, res, decode). With --interleave the cases' Runs are all built
    and warmed up first, then their timed windows alternate (case 1, case 2, ..., case 1, ...), so that a machine
    whose speed drifts (a shared CPU) shifts every case alike and the ratios hold; peak GPU memory then covers all
    cases together."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def window(case):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            case["run"].step(next(case["source"]))
        sync()
        case["windows"].append((time.perf_counter() - t0) / args.steps)

    def start(switches):
        cfg, run = setup(path, method, backbone, res, decode, switches, args, device)
        case = {"cfg": cfg, "run": run, "switches": switches, "source": run.endless(), "windows": []}
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run.step(next(case["source"]))
        sync()
        case["warmup_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return case

    def finish(case):
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        case["source"].close()
        run, cfg = case["run"], case["cfg"]
        # the loader alone: the same loader and view maker, no model
        batches = (run.prepare(b, i) if not isinstance(b, train_coss.Prepared) else b
                   for i, b in enumerate(run.endless()))
        for _ in range(min(args.warmup, 2)):
            next(batches)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        sync()
        loader_s = (time.perf_counter() - t0) / args.steps
        batches.close()
        step_s, batch = statistics.median(case["windows"]), cfg["optim.batch_size"]
        img_s, flops = batch / step_s, train_flops_per_image(cfg, run.online, run.target, cfg["augment.res"])
        return {"method": cfg["method.name"] + ("+logo" if cfg["logo.enabled"] else "") if args.config else method,
                "views": "{0.n_global}+{0.n_local}".format(train_coss.view_plan(cfg)),
                "backbone": cfg["model.backbone"], "res": cfg["augment.res"], "decode": cfg["data.decode"],
                "batch": batch, **case["switches"], "img_per_s": img_s, "step_ms": step_s * 1e3,
                "windows_ms": [w * 1e3 for w in case["windows"]], "warmup_s": case["warmup_s"],
                "loader_img_per_s": batch / loader_s, "peak_gib": mem, "tflops_per_image": flops / 1e12,
                "roofline": flops * img_s / peak, "in100_epoch_s": IN100_TRAIN / img_s}

    if args.interleave:
        cases = [start(switches) for switches in switch_cases(args)]
        for _ in range(args.repeats):  # the median of --repeats windows of --steps steps, cases alternating
            for case in cases:
                window(case)
        yield from (finish(case) for case in cases)
        return
    for switches in switch_cases(args):
        case = start(switches)
        for _ in range(args.repeats):
            window(case)
        yield finish(case)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=IN100_TRAIN, help="train images of the synthetic beton")
    p.add_argument("--method", nargs="+", default=["co_byol"], help="byol co_byol simclr co_simclr logo")
    p.add_argument("--backbone", nargs="+", default=["resnet18"])
    p.add_argument("--res", nargs="+", type=int, default=[224])
    p.add_argument("--decode", nargs="+", default=["gpu"], choices=["cpu", "gpu"])
    p.add_argument("--steps", type=int, default=30, help="timed steps (per window)")
    p.add_argument("--repeats", type=int, default=1, help="timed windows of --steps; the median window is reported")
    p.add_argument("--interleave", type=int, default=0,
                   help="1: build every switch case first, then alternate their timed windows (robust ratios on a "
                        "machine whose speed drifts; all cases' memory at once)")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, autotuning)")
    add_setup_args(p)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.config:
        if not args.beton:
            p.error("--config needs --beton (the train beton of that config)")
        path, cases = args.beton, [(None, None, None, None)]
        what = f"{args.config} on {args.beton}"
    else:
        tree = os.path.join(args.data, f"jpegs_{args.images}")
        make_jpeg_tree(tree, args.images, args.workers)
        path = write_beton(tree, args.data, args.workers)
        cases = [(m, b, r, d) for b in args.backbone for r in args.res for m in args.method for d in args.decode]
        stats = tree_stats(tree)
        what = (f"{args.images} JPEGs, mean {stats['mean_wh'][0]:.0f}x{stats['mean_wh'][1]:.0f} px, "
                f"{stats['mean_kb']:.0f} KB; batch {args.batch}")
    measured = matmul_peak(device)
    if device.type == "cuda":
        peak, hw = measured, torch.cuda.get_device_name()
        peak_text = f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (measured)"
    else:
        peak, how = cpu_fma_peak()
        hw = platform.processor() or "cpu"
        conv = backbone_rate(case_config(*cases[0], switch_cases(args)[0], args, device), device)
        peak_text = (f"fp32 FMA peak {peak / 1e9:.0f} GFLOP/s ({how}); measured: fp32 matmul "
                     f"{measured / 1e9:.0f} GFLOP/s, the first case's backbone alone (fwd+bwd, 2 x batch) "
                     f"{conv / 1e9:.0f} GFLOP/s")
    print(f"{hw}; torch {torch.__version__}; {what}; {args.workers} loader threads; {peak_text}; kernels "
          f"{args.kernels}")
    print("| method | views | backbone | res | decode | compile | fuse views | prefetch | img/s | step ms | warm-up s "
          "| loader alone img/s | peak GiB | % roofline | IN-100 epoch s |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for method, backbone, res, decode in cases:
        for r in bench_cases(path, method, backbone, res, decode, args, device, peak):
            rows.append(r)
            print(f"| {r['method']} | {r['views']} | {r['backbone']} | {r['res']} | {r['decode']} | {r['compile']} | "
                  f"{r['fuse_views']} | {r['prefetch']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | "
                  f"{r['warmup_s']:.1f} | {r['loader_img_per_s']:.0f} | {r['peak_gib']:.1f} | "
                  f"{100 * r['roofline']:.1f} % | {r['in100_epoch_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": hw, "torch": torch.__version__, "peak_flops": peak, "matmul_flops": measured,
                       "backbone_flops": conv if device.type != "cuda" else None,
                       "args": vars(args), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip numba's finaliser noise at shutdown (see bench_loader.py)
