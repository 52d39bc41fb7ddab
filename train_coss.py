"""CO-SSL trainer: CO-BYOL, CO-SimCLR, BYOL, SimCLR and LoGo on RF-ResNets, fed by FFCV betons.

    python train_coss.py --config configs/fmnist.yaml            # the CPU demo (also: make demo)
    torchrun --nproc_per_node=8 train_coss.py --config configs/in100.yaml
    python train_coss.py --config configs/in100.yaml --training.resume=1   # continue a killed run exactly
    python train_coss.py --plot runs/<run>                        # PNG curves of a run

Reads top to bottom in run order: distributed set-up, data, model, optimiser and schedules, the loss of each
method, the training step, checkpoints, the loop, main. The monitors (kNN, linear probes) are in evaluate.py.
Every run folder holds params.json (resolved config), env.json (versions, devices), log.jsonl (metrics),
TensorBoard scalars (tb/) and checkpoint.pt (atomic; the last good one survives a crash or a NaN).
"""
import argparse
import functools
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augment import ViewAugment
from config import ConfigError, as_dict, load_config
from evaluate import CheckpointError, evaluate, nonfinite_tensors, read_checkpoint
from kernels.local_info_nce import local_info_nce
from losses import (byol_loss, cosine_distance, cross_view_info_nce, ema_update, local_global_info_nce,
                    local_global_regression, logo_affinity_losses, mix, nt_xent)
from models import BYOL_FAMILY, SSLNet, TargetNet, affinity_mlp
from rf_resnet import build_backbone, memory_format
from write_ffcv import BetonError, quiet_numba_finalizers

DEMO_CONFIG = "configs/fmnist.yaml"


class TrainingError(RuntimeError):
    """Stops a run with one line for the user (bad input, NaN loss)."""


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; otherwise one process).

def setup_distributed(device_pref):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device=cuda but no CUDA device is visible")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def gather_with_grad(x):
    """All ranks' rows of x, concatenated in rank order, with gradient flowing back to each rank's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


# ---------------------------------------------------------------------------------------------------------------
# Data: FFCV betons written by write_ffcv.py with the same config.

def betons(cfg):
    """(train path, val path, train images, classes): both betons checked at start-up (complete and readable), so a
    damaged val beton stops the run now, not after the last epoch."""
    from write_ffcv import read_beton_info
    train_path, total_train, num_classes = read_beton_info(cfg, "train")
    val_path, _, _ = read_beton_info(cfg, "val")
    return train_path, val_path, total_train, num_classes


def num_images_and_classes(path):
    from ffcv.reader import Reader
    reader = Reader(path)
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    return len(labels), int(labels.max()) + 1


def train_loader(cfg, path, indices, world, res):
    """data.decode=cpu: per sample, views [V, res, res, 3] uint8 cut from one decode (+ LoGo's two local crops)
    and the label; the crop decoders are returned so progressive resolution can resize them.
    data.decode=gpu: per sample, the stored bytes (gpu_views.ImageBytesDecoder) and the label; no decoders."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor
    from multiview_decoder import MultiViewRandomResizedCropDecoder
    seed = cfg["training.seed"]
    if cfg["data.decode"] == "gpu":
        from gpu_views import ImageBytesDecoder, max_image_bytes
        decoders = []
        pipelines = {"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()],
                     "label": [IntDecoder(), ToTensor()]}
    else:
        decoders = [MultiViewRandomResizedCropDecoder((res, res), 2, scale=(global_cmin(cfg), 1.0),
                                                      interpolation=cfg["augment.interpolation"], seed=seed)]
        pipelines = {"image": [decoders[0], ToTensor()], "label": [IntDecoder(), ToTensor()]}
        if cfg["method.logo"]:  # a second decoder on the same field: the local crops (a second decode of the image)
            local = cfg["method.logo_local_res"]
            pipelines["local"] = PipelineSpec("image", decoder=MultiViewRandomResizedCropDecoder(
                (local, local), 2, scale=(0.05, cfg["method.logo_local_cmax"]),
                interpolation=cfg["augment.interpolation"], seed=seed + 1), transforms=[ToTensor()])
    loader = Loader(path, batch_size=cfg["optim.batch_size"], num_workers=cfg["augment.workers"],
                    order=OrderOption.RANDOM, seed=seed, indices=indices, drop_last=True, distributed=world > 1,
                    pipelines=pipelines)
    return loader, decoders


def global_cmin(cfg):
    return cfg["method.logo_global_cmin"] if cfg["method.logo"] else cfg["augment.c_min"]


def view_augments(cfg):
    common = dict(p_jitter=cfg["augment.p_jitter"], brightness=cfg["augment.brightness"],
                  contrast=cfg["augment.contrast"], saturation=cfg["augment.saturation"], hue=cfg["augment.hue"],
                  p_gray=cfg["augment.p_gray"])
    return (ViewAugment(p_blur=cfg["augment.p_blur1"], p_solarize=cfg["augment.p_solarize1"], **common),
            ViewAugment(p_blur=cfg["augment.p_blur2"], p_solarize=cfg["augment.p_solarize2"], **common))


def view_maker(cfg, device):
    """batch from the train loader -> (views, LoGo's local views or None, labels) on `device`: two normalised float
    [B, 3, res, res] channels-last tensors (and two at logo_local_res), per-sample augmentations."""
    augments = view_augments(cfg)
    fmt = memory_format(cfg["training.channels_last"])
    if cfg["data.decode"] == "gpu":
        from gpu_views import GPUViews, upload
        dtype = torch.bfloat16 if device.type == "cuda" and cfg["training.bf16"] else torch.float32
        globals_ = GPUViews(augments, (global_cmin(cfg), 1.0), out_dtype=dtype, backend=cfg["training.kernels"])
        locals_ = GPUViews(augments, (0.05, cfg["method.logo_local_cmax"]), out_dtype=dtype,
                           backend=cfg["training.kernels"])

        def make(batch, res, gen):
            images = upload(batch[0], device)  # one decode per image for all views
            local = locals_(images, cfg["method.logo_local_res"], gen) if cfg["method.logo"] else None
            views = globals_(images, res, gen)  # the crop kernels write channels-last
            if fmt != torch.channels_last:
                views = tuple(v.contiguous(memory_format=fmt) for v in views)
                local = tuple(v.contiguous(memory_format=fmt) for v in local) if local is not None else None
            return views, local, batch[1].to(device).view(-1).long()
    else:
        def make(batch, res, gen):
            views_u8 = batch[0].to(device, non_blocking=True)                       # [B, 2, res, res, 3]
            views = tuple(aug(views_u8[:, v], gen, memory_format=fmt) for v, aug in enumerate(augments))
            local = None
            if cfg["method.logo"]:
                local_u8 = batch[2].to(device, non_blocking=True)
                local = tuple(aug(local_u8[:, v], gen, memory_format=fmt) for v, aug in enumerate(augments))
            return views, local, batch[1].to(device).view(-1).long()
    return make


def resolution_at(cfg, epoch):
    """Progressive resolution (FFCV style): res_start -> res linearly over res_ramp_epochs, multiples of 8."""
    start, end, ramp = cfg["augment.res_start"], cfg["augment.res"], cfg["augment.res_ramp_epochs"]
    if not start or ramp == 0 or epoch >= ramp:
        return end
    return max(8, int(round((start + (end - start) * epoch / ramp) / 8)) * 8)


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedules.

def build_model(cfg, num_classes, device):
    width = cfg["model.width"]
    backbone = build_backbone(cfg["model.backbone"], **({"width": width} if width else {}))
    online = SSLNet(backbone, cfg["method.name"], cfg["method.proj_hidden"], cfg["method.proj_dim"],
                    cfg["method.pred_hidden"], cfg["method.local_hidden"], cfg["method.local_grid"])
    target = TargetNet(online) if cfg["method.name"] in BYOL_FAMILY else None
    probe = nn.Linear(backbone.num_features, num_classes)
    affinity = affinity_mlp(cfg["method.proj_dim"]) if cfg["method.logo"] else None
    fmt = memory_format(cfg["training.channels_last"])
    mods = [m for m in (online, target, probe, affinity) if m is not None]
    for m in mods:
        m.to(device=device, memory_format=fmt)
    return online, target, probe, affinity


def param_groups(model, weight_decay, predictor_lr_mult=1.0):
    """LARS groups: weight decay and trust-ratio adaptation on conv/linear weights only (not biases or norms); the
    BYOL predictors' groups get lr x predictor_lr_mult (a faster predictor speeds up short BYOL runs)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            pred = name.startswith(("predictor.", "local_predictor."))
            groups.setdefault((p.ndim > 1, pred), []).append(p)
    order = [(True, False), (False, False), (True, True), (False, True)]  # decayed first, predictors last
    return [{"params": groups[(lars, pred)], "weight_decay": weight_decay if lars else 0.0, "lars": lars,
             "lr_mult": predictor_lr_mult if pred else 1.0} for lars, pred in order if (lars, pred) in groups]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta * ||w|| / ||g + wd w|| (You et al. 2017; BYOL's variant:
    groups with lars=False get neither weight decay nor adaptation). One group's update is a handful of
    torch._foreach_* calls (a few kernel launches per group, not per parameter); tests check it against the
    per-parameter formula."""

    def __init__(self, params, lr, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, eta=eta, weight_decay=0.0, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                update = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            else:
                update = torch._foreach_mul(grads, 1.0)
            if group["lars"] and group["eta"] > 0:
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(update))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(update, list(trust.to(update[0].dtype).unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                bufs.append(state["momentum"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, update)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def build_optimizer(cfg, online, peak_lr):
    """optim.optimizer over param_groups (AdamW ignores the groups' 'lars' flag but keeps their weight decay)."""
    groups = param_groups(online, cfg["optim.weight_decay"], cfg["optim.predictor_lr_mult"])
    if cfg["optim.optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr, betas=(cfg["optim.momentum"], 0.999), foreach=True)
    return LARS(groups, lr=peak_lr, momentum=cfg["optim.momentum"], eta=cfg["optim.lars_eta"])


def lr_at(step, total, warmup, peak):
    """Linear warm-up to peak over `warmup` steps, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tau_at(step, total, base):
    """BYOL's EMA schedule: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


# ---------------------------------------------------------------------------------------------------------------
# The losses of each method (pure functions in losses.py; here: which tensors go where).

@functools.cache
def _compiled_local_info_nce():
    return torch.compile(local_global_info_nce, dynamic=False)


def local_info_nce_term(cfg, *args):
    """CO-SimCLR's local InfoNCE: the fused Triton op (kernels/local_info_nce.py) on CUDA, 2.3-3.3x faster than
    eager on an H100; torch.compile's fusion of the reference is faster still (0.16 vs 0.22 ms at B=256, L=49,
    D=256, BENCHMARKS.md), so that one runs when training.compile=1 on CUDA with training.kernels=auto."""
    if cfg["training.compile"] and args[0].is_cuda and cfg["training.kernels"] == "auto":
        return _compiled_local_info_nce()(*args)
    return local_info_nce(*args, backend=cfg["training.kernels"])


def method_loss(cfg, online, target, views, local_views, affinity):
    """Returns (loss to minimise, affinity loss or None, dict of logged terms)."""
    name, w_s, T = cfg["method.name"], cfg["method.w_s"], cfg["method.temperature"]
    x1, x2 = views
    o1, o2 = online(x1), online(x2)
    terms = {}
    if name in BYOL_FAMILY:
        t1, t2 = target(x1), target(x2)
        loss = terms["global"] = byol_loss(o1["p"], o2["p"], t1, t2)
        if name == "co_byol":
            terms["local"] = local_global_regression(o1["P"], o2["P"], t1, t2, cfg["training.kernels"])
            loss = mix(loss, terms["local"], w_s, cfg["method.mixing"])
    else:
        z1_all, z2_all = gather_with_grad(o1["z"]), gather_with_grad(o2["z"])
        offset = (dist.get_rank() * o1["z"].shape[0]) if z1_all.shape[0] != o1["z"].shape[0] else 0
        loss = terms["global"] = nt_xent(o1["z"], o2["z"], T, z1_all, z2_all, offset)
        if name == "co_simclr":
            terms["local"] = local_info_nce_term(cfg, o1["P"], o2["P"], o1["z"], o2["z"], T, z1_all, z2_all, offset)
            loss = mix(loss, terms["local"], w_s, cfg["method.mixing"])
    affinity_loss = None
    if local_views is not None:  # LoGo: L_gg (above) + L_lg + lambda L_ll
        l1, l2 = online(local_views[0], local=False), online(local_views[1], local=False)
        if name in BYOL_FAMILY:
            lg = sum(cosine_distance(l["p"], t).mean() for l in (l1, l2) for t in (t1, t2))
        else:
            lg = sum(cross_view_info_nce(l["z"], g["z"], T) for l in (l1, l2) for g in (o1, o2))
        terms["local_global"] = lg
        terms["local_local"], affinity_loss = logo_affinity_losses(affinity, l1["z"], l2["z"])
        # with logo_clip, L_ll enters through train_step's clipped gradient instead of lambda
        loss = loss + lg + (0.0 if cfg["method.logo_clip"] else cfg["method.logo_lambda"] * terms["local_local"])
        terms["affinity"] = affinity_loss
    terms["loss"] = loss
    return loss, affinity_loss, terms, o1["y"]


def backward_with_relative_clip(main, extra, params, clip):
    """Sets p.grad = g_main + s g_extra with s = min(1, clip |g_main| / |g_extra|) (norms over all params): LoGo's
    public-code way of adding L_ll. Two backward passes; single process only (check_options refuses DDP)."""
    g_main = torch.autograd.grad(main, params, retain_graph=True, allow_unused=True)
    g_extra = torch.autograd.grad(extra, params, allow_unused=True)

    def norm(grads):
        return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
    scale = torch.clamp(clip * norm(g_main) / (norm(g_extra) + 1e-12), max=1.0)
    for p, a, b in zip(params, g_main, g_extra):
        a = a if a is not None else torch.zeros_like(p)
        p.grad = a + scale.to(a.dtype) * b if b is not None else a
    return scale


def train_step(cfg, nets, optimizers, views, local_views, labels, amp, tau, world, nan_context, check_finite=True):
    """One step on augmented views (view_maker): method loss -> backward -> optimiser; LoGo's affinity step; the
    online probe on detached features; the EMA target. nets = (model (maybe DDP/compiled), online, target, probe,
    affinity); optimizers = (opt, probe_opt, aff_opt); nan_context ends the NaN message (text, or a function that
    makes it only when needed). Returns (logged terms, probe logits)."""
    model, online, target, probe, affinity = nets
    opt, probe_opt, aff_opt = optimizers
    with amp:
        loss, affinity_loss, terms, features = method_loss(cfg, model, target, views, local_views, affinity)
    if check_finite and not torch.isfinite(loss):  # sync
        raise TrainingError(f"loss is {float(loss.detach())} {nan_context() if callable(nan_context) else nan_context}")
    opt.zero_grad(set_to_none=True)
    if affinity_loss is not None and cfg["method.logo_clip"]:
        backward_with_relative_clip(loss, terms["local_local"], [p for p in online.parameters() if p.requires_grad],
                                    cfg["method.logo_clip"])
    else:
        loss.backward()
    opt.step()
    if affinity_loss is not None:  # LoGo's alternating step: train f_d on detached local embeddings
        aff_opt.zero_grad(set_to_none=True)
        affinity_loss.backward()
        if world > 1:  # f_d is small and steps on its own: average its gradients by hand
            for p in affinity.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        aff_opt.step()
    probe_logits = probe(features.detach().float())  # online probe: detached features, own optimiser
    probe_loss = F.cross_entropy(probe_logits, labels)
    probe_opt.zero_grad(set_to_none=True)
    probe_loss.backward()
    probe_opt.step()
    if target is not None:
        ema_update(target.tracked(), target.online_part(online), tau)
    return terms, probe_logits


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a crash never leaves a half-written one.

def kept_checkpoint(path):
    """What a stopped run leaves to resume from, for its last message."""
    if os.path.isfile(path):
        return f"the last good checkpoint is kept at {path}"
    return f"no checkpoint had been written yet ({path} would hold the first, at the end of an epoch)"


def save_checkpoint(path, state, when):
    """Writes state atomically, and only if every tensor in it is finite: a run never replaces a good checkpoint
    with a poisoned one (NaN/inf in a weight, a BatchNorm statistic, the EMA target or the optimiser state)."""
    bad = nonfinite_tensors(state)
    if bad:
        raise TrainingError(f"NaN/inf in {len(bad)} tensors of the state {when} (e.g. {', '.join(bad[:3])}); "
                            f"not saved: {kept_checkpoint(path)}")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def export_backbone(online, path):
    """The backbone as a torchvision-loadable state_dict (standard layouts) for linear evaluation elsewhere."""
    from rf_resnet import export_torchvision_state_dict
    backbone = online.module.backbone if hasattr(online, "module") else online.backbone
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(export_torchvision_state_dict(backbone), tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The run.

def run_folder(cfg):
    """<out_dir>/<run_name>; with no run_name, <method>_<backbone>_s<seed>_<start time>, and on resume the newest
    such folder."""
    out, name = cfg["training.out_dir"], cfg["training.run_name"]
    if name:
        return os.path.join(out, name)
    base = (f"{cfg['method.name']}{'_logo' if cfg['method.logo'] else ''}_{cfg['model.backbone']}"
            f"_s{cfg['training.seed']}_")
    if cfg["training.resume"] and os.path.isdir(out):
        earlier = sorted(d for d in os.listdir(out) if d.startswith(base))
        if earlier:
            return os.path.join(out, earlier[-1])
    return os.path.join(out, base + time.strftime("%Y%m%d-%H%M%S"))


def check_options(cfg, num_train, world):
    name = cfg["method.name"]
    if cfg["method.logo"] and name not in ("byol", "simclr"):
        raise TrainingError(f"method.logo=1 needs method.name byol or simclr (LoGo's bases), got {name}")
    if cfg["method.mixing"] == "convex" and cfg["method.w_s"] > 1:
        raise TrainingError(f"method.w_s={cfg['method.w_s']} > 1 with convex mixing; use method.mixing=additive")
    if cfg["method.logo_clip"] and world > 1:
        raise TrainingError("method.logo_clip is single-process only for now; use method.logo_lambda under torchrun")
    if cfg["optim.batch_size"] * world > num_train:
        raise TrainingError(f"batch of {cfg['optim.batch_size']} x {world} process(es) is larger than the "
                            f"{num_train} training images")


def resume_state(cfg, ckpt_path):
    """The checkpoint to continue from: complete, finite, and written with this run's model and method settings."""
    ck = read_checkpoint(ckpt_path)
    now = as_dict(cfg)
    differ = [f"{section}.{k}: {ck['config'].get(section, {}).get(k)!r} in the checkpoint, {v!r} now"
              for section in ("model", "method") for k, v in now[section].items()
              if ck["config"].get(section, {}).get(k) != v]
    if differ:
        raise TrainingError(f"{ckpt_path} was written with other settings ({'; '.join(differ[:4])}"
                            f"{'; ...' if len(differ) > 4 else ''}); refusing to resume")
    return ck


def _forget_after(log_path, step):
    """On resume: drop the log rows of steps after the checkpoint (they are run again), atomically."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as fh:
        rows = fh.readlines()
    keep = []
    for line in rows:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut by the crash
            pass
    tmp = f"{log_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, log_path)


def _write_params(run_dir, cfg, resumed_from=None):
    """params.json holds the config the run started with; a resume appends when, where and what changed."""
    path = os.path.join(run_dir, "params.json")
    now = json.loads(json.dumps(as_dict(cfg)))  # tuples as lists, as they come back from the file
    if resumed_from is not None and os.path.isfile(path):
        try:
            params = json.load(open(path))
        except ValueError:
            params = {}
        original = {k: v for k, v in params.items() if k != "resumes"} or resumed_from["config"]
        changed = {f"{sec}.{k}": [original.get(sec, {}).get(k), v] for sec, keys in now.items() for k, v in keys.items()
                   if original.get(sec, {}).get(k) != v}
        params = {**original, "resumes": params.get("resumes", []) + [
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": resumed_from["epoch"],
             "step": resumed_from["step"], "changed": changed}]}
    else:
        params = now
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(params, fh, indent=1)
    os.replace(tmp, path)


def _evaluate(cfg, online, probe, device, num_classes, final, train_path, val_path, ckpt_path):
    """The monitors; a failure (e.g. a val beton damaged during the run) is one line that says the weights are safe."""
    try:
        betons(cfg)  # re-checked: cheap, and FFCV hangs on a damaged file instead of raising
        return evaluate(cfg, online.backbone, probe, device, num_classes, cfg["augment.res"], final, train_path,
                        val_path)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainingError(f"evaluation failed: {why}; the trained weights are safe: {kept_checkpoint(ckpt_path)}"
                            + (f" and {os.path.join(os.path.dirname(ckpt_path), 'backbone.pt')}" if final else "")
                            + f" (evaluate them with: python evaluate.py --ckpt {os.path.dirname(ckpt_path)})") \
            from None


def train(cfg, on_step=None, log=print):
    """Runs (or resumes) a training run; returns the final metrics (rank 0; other ranks get only run_dir and rank).
    `on_step(step)` is called after every step."""
    rank, world, device = setup_distributed(cfg["training.device"])
    is_main = rank == 0
    if cfg["training.threads"]:
        torch.set_num_threads(cfg["training.threads"])
    seed = cfg["training.seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # data (both betons checked before anything else happens)
    train_path, val_path, total_train, num_classes = betons(cfg)
    num_train = min(cfg["training.train_images"], total_train) if cfg["training.train_images"] else total_train
    check_options(cfg, num_train, world)
    res = resolution_at(cfg, 0)
    loader, decoders = train_loader(cfg, train_path, np.arange(num_train), world, res)
    make_views = view_maker(cfg, device)
    steps_per_epoch = len(loader)
    epochs = cfg["optim.epochs"]
    total_steps = epochs * steps_per_epoch

    # model, optimisers
    online, target, probe, affinity = build_model(cfg, num_classes, device)
    peak_lr = cfg["optim.lr"] * cfg["optim.batch_size"] * world / 256
    opt = build_optimizer(cfg, online, peak_lr)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=cfg["optim.probe_lr"], momentum=0.9)
    aff_opt = torch.optim.Adam(affinity.parameters(), lr=cfg["method.logo_affinity_lr"]) if affinity else None
    run_dir = run_folder(cfg)
    if world > 1:  # one folder for all ranks (its default name holds rank 0's start time)
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(ckpt_path) and not cfg["training.resume"]:
        raise TrainingError(f"{run_dir} already holds a run; pass --training.resume=1 to continue it, or choose "
                            f"another training.run_name")

    # random-init baseline (before any step), then resume if asked
    start_epoch, step, results, ck = 0, 0, {}, None
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
    if cfg["training.resume"] and os.path.isfile(ckpt_path):
        try:
            ck = resume_state(cfg, ckpt_path)
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        online.load_state_dict(ck["online"])
        probe.load_state_dict(ck["probe"])
        opt.load_state_dict(ck["opt"])
        probe_opt.load_state_dict(ck["probe_opt"])
        if target is not None:
            target.load_state_dict(ck["target"])
        if affinity is not None:
            affinity.load_state_dict(ck["affinity"])
            aff_opt.load_state_dict(ck["aff_opt"])
        start_epoch, step, results = ck["epoch"], ck["step"], ck.get("results", {})
        set_rng_state(ck["rng"])
        if is_main:
            _forget_after(os.path.join(run_dir, "log.jsonl"), step)
        log(f"resumed {ckpt_path} at epoch {start_epoch}, step {step}")
    elif is_main and cfg["eval.random_init"] and "random_init" not in results:
        results["random_init"] = evaluate(cfg, online.backbone, None, device, num_classes, cfg["augment.res"], True,
                                          train_path, val_path)
        log(f"random init: knn={results['random_init']['knn']:.4f} probe={results['random_init'].get('probe', 0):.4f}")
    if is_main:
        _write_params(run_dir, cfg, ck)
        with open(os.path.join(run_dir, "env.json"), "w") as fh:
            json.dump(environment(device, world), fh, indent=1)
    model = online
    if world > 1:
        # broadcast_buffers=False: each rank keeps its BN running statistics (eval uses rank 0's); broadcasting them at
        # every forward both costs a collective per view and, on some torch versions, bumps tensors saved for backward
        model = nn.parallel.DistributedDataParallel(online, device_ids=[device] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    if cfg["training.compile"]:  # one graph per resolution (LoGo, progressive res): dynamic shapes hit an inductor
        # stride assertion in channels-last conv backward (torch 2.11, H100)
        model = torch.compile(model, dynamic=False)
    # TensorBoard hides the events of steps after the checkpoint (purge_step), as log.jsonl drops their rows
    tb = _tensorboard(run_dir, step + 1 if ck is not None else None) if is_main else None
    logfile = open(os.path.join(run_dir, "log.jsonl"), "a") if is_main else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg["training.bf16"])

    def state(epoch):
        return {"online": online.state_dict(), "target": target.state_dict() if target is not None else None,
                "probe": probe.state_dict(), "opt": opt.state_dict(), "probe_opt": probe_opt.state_dict(),
                "affinity": affinity.state_dict() if affinity is not None else None,
                "aff_opt": aff_opt.state_dict() if aff_opt is not None else None,
                "epoch": epoch + 1, "step": step, "rng": rng_state(), "config": as_dict(cfg), "results": results}

    def report(epoch, metrics):
        results[f"epoch{epoch}"] = metrics
        _write_row(logfile, tb, {"epoch": epoch, "step": step, **metrics}, step)
        log(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    try:  # a crash still leaves what was logged on disk
        # Steps are counted from 1 in logs and messages: "step k" is the k-th update (log rows carry the same k).
        for epoch in range(start_epoch, epochs):
            new_res = resolution_at(cfg, epoch)
            if new_res != res:
                res = new_res
                if decoders:  # CPU path: the crop decoders resize in the loader's threads
                    decoders[0].output_size = (res, res)
                    loader.generate_code()
            loader.next_epoch = epoch  # the RANDOM order of epoch e is seeded by seed + e: same order on resume
            check_every, checked = cfg["training.nan_check_every"], step + 1
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            t_epoch, seen = time.perf_counter(), 0
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", unit="step", file=sys.stderr,
                       disable=None if is_main else True)  # None: shown on a terminal only
            for i, batch in enumerate(loader):
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
                views, local_views, labels = make_views(batch, res, gen)
                lr = lr_at(step, total_steps, cfg["optim.warmup_epochs"] * steps_per_epoch, peak_lr)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_mult"]
                terms, probe_logits = train_step(
                    cfg, (model, online, target, probe, affinity), (opt, probe_opt, aff_opt), views, local_views,
                    labels, amp, tau_at(step, total_steps, cfg["optim.tau"]), world,
                    lambda: f"at step {step + 1} (epoch {epoch}); not applied: {kept_checkpoint(ckpt_path)}",
                    check_every == 1)
                step += 1
                if check_every > 1:  # a running flag on the device; the host looks at it every check_every steps
                    nonfinite = nonfinite | ~torch.isfinite(terms["loss"].detach())
                    if step % check_every == 0 or i == steps_per_epoch - 1:
                        if bool(nonfinite):  # sync
                            raise TrainingError(f"loss is nan/inf at a step between {checked} and {step} (epoch "
                                                f"{epoch}); {kept_checkpoint(ckpt_path)}")
                        checked = step + 1
                seen += len(labels) * world
                if is_main and (step % cfg["training.log_every"] == 0 or i == steps_per_epoch - 1):
                    rate = seen / (time.perf_counter() - t_epoch)
                    row = {"epoch": epoch, "step": step, "lr": lr, "res": res, "img_per_s": rate,
                           "probe_train_acc": float((probe_logits.argmax(1) == labels).float().mean()),
                           **{k: float(v.detach()) for k, v in terms.items()}}
                    _write_row(logfile, tb, row, step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_per_s=f"{rate:.0f}", refresh=False)
                    if bar.disable:  # no terminal: a plain log line instead of the bar
                        log(f"epoch {epoch} step {step}/{total_steps} loss {row['loss']:.4f} lr {lr:.3g} "
                            f"{rate:.0f} img/s")
                bar.update(1)
                if on_step is not None:
                    on_step(step)
            bar.close()
            # the weights first (only if finite), then the evaluation: a failing evaluation never costs the epoch
            last = epoch == epochs - 1
            if is_main and ((epoch + 1) % cfg["training.checkpoint_every"] == 0 or last):
                save_checkpoint(ckpt_path, state(epoch), f"after epoch {epoch} (step {step})")
            elif is_main and nonfinite_tensors(state(epoch)):  # caught now rather than at the next checkpoint
                raise TrainingError(f"NaN/inf in the state after epoch {epoch} (step {step}); "
                                    f"{kept_checkpoint(ckpt_path)}")
            if is_main and not last and cfg["eval.every"] and (epoch + 1) % cfg["eval.every"] == 0:
                report(epoch, _evaluate(cfg, online, probe, device, num_classes, False, train_path, val_path,
                                        ckpt_path))  # its results reach the next checkpoint
        if is_main and f"epoch{epochs - 1}" not in results:
            # the final evaluation, once the last checkpoint is on disk (also when a resume finds the run trained but
            # not evaluated); then the same weights are saved again with its results
            export_backbone(online, os.path.join(run_dir, "backbone.pt"))
            report(epochs - 1, _evaluate(cfg, online, probe, device, num_classes, True, train_path, val_path,
                                         ckpt_path))
            save_checkpoint(ckpt_path, state(epochs - 1), "with the final evaluation")
    finally:
        if logfile:
            logfile.close()
        if tb:
            tb.close()
    results["run_dir"], results["rank"] = run_dir, rank
    return results


def _write_row(logfile, tb, row, step):
    logfile.write(json.dumps({"time": time.time(), **row}) + "\n")
    logfile.flush()
    if tb is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                tb.add_scalar(k, v, step)


def _tensorboard(run_dir, purge_step=None):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)


def environment(device, world):
    import ffcv
    env = {"python": platform.python_version(), "torch": torch.__version__, "ffcv": "1.0.2",
           "numpy": np.__version__, "platform": platform.platform(), "cpus": os.cpu_count(), "world_size": world,
           "device": str(device), "ffcv_module": ffcv.__file__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def plot(run_dir):
    """PNG curves of loss, lr, kNN and probe accuracy from log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    panels = [("loss", ["loss", "global", "local"]), ("lr", ["lr"]), ("accuracy", ["knn", "online_probe", "probe"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if title == "accuracy" else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help=f"YAML config (default: the built-in CPU demo = {DEMO_CONFIG})")
    parser.add_argument("--plot", metavar="RUN_DIR", help="write RUN_DIR/curves.png and exit")
    parser.add_argument("--demo", action="store_true", help="end with the one-line demo summary")
    args, overrides = parser.parse_known_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    quiet_numba_finalizers()
    try:
        cfg = load_config(args.config, overrides)
        results = train(cfg)
    except (ConfigError, TrainingError, BetonError) as e:
        print(f"train_coss.py: error: {e}", file=sys.stderr)
        return 2
    if results["rank"] != 0:  # only rank 0 evaluates and holds results
        return 0
    final = [v for k, v in results.items() if k.startswith("epoch")][-1]
    if args.demo:
        rnd = results.get("random_init", {})
        print(f"demo: knn={final['knn']:.4f} probe={final.get('probe', float('nan')):.4f} "
              f"(random init: knn={rnd.get('knn', float('nan')):.4f} probe={rnd.get('probe', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    code = main()
    # numba's dispatcher finalisers (compiled FFCV pipelines) raise KeyErrors at interpreter shutdown and would
    # bury the last line; everything is written and closed by now, so leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
