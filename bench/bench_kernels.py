"""Benchmark (not a test): the fused ops of kernels/ against eager PyTorch and torch.compile, on one CUDA GPU.

    python bench/bench_kernels.py                  # all three ops, default shapes
    python bench/bench_kernels.py --json out.json

  local_global_cosine   CO-BYOL's local term for one view, forward + backward, bf16 P [B, L, D]:
                        Triton kernels vs the eager reference vs torch.compile(reference)
  local InfoNCE         CO-SimCLR's local term (both views, [2BL, 2B] logits), forward + backward:
                        the Triton kernels (kernels/local_info_nce.py) vs eager vs torch.compile
  crop_views            two augmented 224 px views per image from decoded ImageNet-sized images on the GPU:
                        the Triton kernels vs an eager pipeline (roi_align crops + augment.py's batched colour ops)
Times: GPU time, the summed durations of every kernel (and copy) an op launches, read with torch.profiler over
--iters runs after --warmup untimed runs (compilation): inside a training step the GPU is fed ahead of time, so this
is what an op costs there. Beside it, wall time per call (CUDA events, median), which small ops spend on the host
(Python, launches). The memory floor of an op is the bytes it must move (read its inputs once, write its outputs
once) over the copy bandwidth measured here.
"""
import argparse
import json
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from augment import apply_color_ops, byol_view_augments, normalize  # noqa: E402
from gpu_views import sample_views  # noqa: E402
from kernels.crop import crop_views, ragged_from_list  # noqa: E402
from kernels.local_global_cosine import local_global_cosine, local_global_cosine_ref  # noqa: E402
from kernels.local_info_nce import local_info_nce  # noqa: E402
from losses import local_global_info_nce  # noqa: E402


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)  # ms


def gpu_ms(fn, iters, warmup):
    """Summed GPU time of every kernel/copy fn launches, per call (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return us / iters / 1e3


def both(fn, iters, warmup):
    return gpu_ms(fn, iters, warmup), timed(fn, iters, 0)


def copy_bandwidth():
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), 20, 5)
    return 2 * x.numel() / (ms * 1e-3)  # bytes/s (read + write)


def bench_cosine(shapes, iters, warmup, bw):
    rows = []
    compiled_ref = torch.compile(local_global_cosine_ref)
    for B, L, D in shapes:
        P = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        Z = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)

        def run(fn):
            def step():
                P.grad = None
                fn(P, Z).backward()
            return both(step, iters, warmup)
        floor = 3 * P.numel() * P.element_size() / bw * 1e3  # fwd reads P; bwd reads P, writes dP
        t = {"triton": run(lambda p, z: local_global_cosine(p, z, backend="triton")),
             "eager": run(local_global_cosine_ref), "compile": run(compiled_ref)}
        rows.append({"op": "local_global_cosine fwd+bwd", "shape": f"B={B} L={L} D={D} bf16", **t,
                     "floor_ms": floor})
    return rows


def bench_infonce(shapes, iters, warmup, bw, temperature=0.2):
    rows = []
    compiled = torch.compile(local_global_info_nce)
    for B, L, D in shapes:
        P1, P2 = (torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        z1, z2 = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

        def run(fn):
            def step():
                for t in (P1, P2, z1, z2):
                    t.grad = None
                fn(P1, P2, z1, z2, temperature).backward()
            return both(step, iters, warmup)
        # read P1, P2 (forward) and again with dP written (backward); dS [BL, 2B] bf16 written and read once per view
        floor = (3 * 2 * P1.numel() * 2 + 2 * 2 * B * L * 2 * B * 2) / bw * 1e3
        rows.append({"op": "local InfoNCE fwd+bwd", "shape": f"B={B} L={L} D={D} bf16",
                     "triton": run(lambda *a: local_info_nce(*a, backend="triton")),
                     "eager": run(local_global_info_nce), "compile": run(compiled), "floor_ms": floor})
    return rows


def sweep_infonce(B, L, D, iters, warmup):
    """GPU ms of the fused local InfoNCE (fwd+bwd) for each block configuration."""
    import kernels.local_info_nce as lin
    P1, P2 = (torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    z1, z2 = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    def step():
        for t in (P1, P2, z1, z2):
            t.grad = None
        lin.local_info_nce(P1, P2, z1, z2, 0.2, backend="triton").backward()
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                lin.CONFIG.update(block_m=bm, block_n=bn, num_warps=warps)
                try:
                    out.append((gpu_ms(step, iters, warmup), bm, bn, warps))
                except Exception as e:  # noqa: BLE001  (out of shared memory / registers: skip the config)
                    print(f"sweep: BLOCK_M={bm} BLOCK_N={bn} warps={warps} failed: {str(e).splitlines()[0][:80]}")
    lin.CONFIG.update(block_m=0, block_n=0, num_warps=4)
    for ms, bm, bn, warps in sorted(out)[:6]:
        print(f"sweep local InfoNCE B={B} L={L} D={D}: BLOCK_M={bm} BLOCK_N={bn} num_warps={warps}: {ms:.3f} ms GPU")
    return sorted(out)


def imagenet_like(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(h), int(w)) for h, w in zip(torch.randint(300, 501, (n,), generator=g),
                                              torch.randint(300, 501, (n,), generator=g))]
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device="cuda") for h, w in sizes]


def bench_crop(batch, size, iters, warmup, bw):
    from torchvision.ops import roi_align
    images = imagenet_like(batch)
    ragged = ragged_from_list(images, "chw")
    augments = byol_view_augments()
    gen = torch.Generator(device="cuda").manual_seed(0)
    V = len(augments)

    def params():
        return sample_views(ragged.height, ragged.width, augments, size, (0.08, 1.0), generator=gen)

    crops, color = params()
    fused = both(lambda: crop_views(ragged, crops, color, size), iters, warmup)
    with_sampling = both(lambda: crop_views(ragged, *params(), size), iters, warmup)

    hmax, wmax = int(ragged.height.max()), int(ragged.width.max())
    padded = torch.zeros(batch, 3, hmax, wmax, device="cuda")
    for i, t in enumerate(images):
        padded[i, :, :t.shape[1], :t.shape[2]] = t.float() / 255

    def eager():
        boxes = torch.stack([crops.src.double(), crops.left.double(), crops.top.double(),
                             (crops.left + crops.width).double(), (crops.top + crops.height).double()], 1).float()
        x = roi_align(padded, boxes, (size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        x = torch.where(crops.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        out = []
        for v in range(V):
            sl = slice(v * batch, (v + 1) * batch)
            p = {k: (t[sl] if torch.is_tensor(t) else t) for k, t in color.items()}
            out.append(normalize(apply_color_ops(x[sl], p)).to(torch.bfloat16))
        return out
    eager_ms = both(eager, iters, warmup)
    out_bytes = V * batch * 3 * size * size * 2
    floor = out_bytes / bw * 1e3  # writing the bf16 views (reads of the source pixels come on top)
    return [{"op": f"crop_views, {V} views at {size} px", "shape": f"{batch} images ~400x400",
             "triton": fused, "triton+sampling": with_sampling, "eager": eager_ms, "floor_ms": floor,
             "img_per_s_triton": batch / (with_sampling[1] * 1e-3), "img_per_s_eager": batch / (eager_ms[1] * 1e-3)}]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--crop-batch", type=int, default=256)
    p.add_argument("--json")
    p.add_argument("--sweep", type=int, default=0, help="1: also sweep the local InfoNCE kernel's block sizes")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.sweep:
        sweep_infonce(256, 49, 256, 20, 3)
    rows = bench_cosine([(256, 49, 256), (256, 196, 256), (512, 49, 256), (256, 49, 1024), (64, 1, 256)],
                        args.iters, args.warmup, bw)
    rows += bench_infonce([(256, 49, 256), (256, 196, 256), (128, 49, 256)], args.iters, args.warmup, bw)
    rows += bench_crop(args.crop_batch, 224, args.iters, args.warmup, bw)
    rows += bench_crop(args.crop_batch, 96, args.iters, args.warmup, bw)
    print("\n| op | shape | Triton GPU ms | eager GPU ms | compile GPU ms | floor ms | Triton / floor | eager / Triton "
          "| compile / Triton | wall ms Triton / eager / compile |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        tri = r.get("triton")
        gpu = {k: (f"{r[k][0]:.3f}" if k in r else "–") for k in ("triton", "eager", "compile")}
        wall = " / ".join(f"{r[k][1]:.2f}" if k in r else "–" for k in ("triton", "eager", "compile"))
        rel = [f"{tri[0] / r['floor_ms']:.1f}x" if tri else "–",
               f"{r['eager'][0] / tri[0]:.1f}x" if tri else "–",
               f"{r['compile'][0] / tri[0]:.2f}x" if tri and "compile" in r else "–"]
        print(f"| {r['op']} | {r['shape']} | {gpu['triton']} | {gpu['eager']} | {gpu['compile']} | "
              f"{r['floor_ms']:.3f} | {' | '.join(rel)} | {wall} |")
    for r in rows:
        if "img_per_s_triton" in r:
            print(f"{r['op']}: fused {r['img_per_s_triton']:.0f} img/s wall with per-batch parameter sampling "
                  f"({r['triton+sampling'][0]:.2f} ms GPU, {r['triton+sampling'][1]:.2f} ms wall), kernels alone "
                  f"{r['triton'][0]:.2f} ms GPU = {int(r['shape'].split()[0]) / (r['triton'][0] * 1e-3):.0f} img/s; "
                  f"eager {r['img_per_s_eager']:.0f} img/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bandwidth": bw,
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
