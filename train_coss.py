"""CO-SSL trainer: CO-BYOL, CO-SimCLR, BYOL, SimCLR and LoGo on RF-ResNets, fed by FFCV betons.

    python train_coss.py --config configs/demo.yaml --demo       # the CPU demo, a 5-minute budget (make demo)
    torchrun --nproc_per_node=8 train_coss.py --config configs/in100.yaml
    python train_coss.py --config configs/in100.yaml --training.resume=1   # continue a killed run exactly
    python train_coss.py --plot runs/<run>                        # PNG curves of a run

Reads top to bottom in run order: distributed set-up, data, model, optimiser and schedules, the loss of each
method, the training step (Run: everything a step needs, built by build_run; the benchmarks in bench/ time the same
object), checkpoints, the loop (train: only the loop, evaluations and checkpoints around a Run), main. The monitors
(kNN, linear probes) are in evaluate.py.
Every run folder holds params.json (resolved config), env.json (versions, devices), log.jsonl (metrics),
TensorBoard scalars (tb/) and checkpoint.pt (atomic; the last good one survives a crash or a NaN).
"""
import argparse
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augment import ViewAugment
from config import VERSION as __version__
from config import ConfigError, as_dict, help_text, load_config, print_config
from evaluate import CheckpointError, evaluate, nonfinite_tensors, read_checkpoint
import methods
from losses import ema_update, logo_affinity_losses, mix
from methods import MethodError, forward_views, pack_views
from models import TargetNet, affinity_mlp
from rf_resnet import build_backbone, get_layout, memory_format, min_input_side
from write_ffcv import BetonError, quiet_numba_finalizers

DEMO_CONFIG = "configs/fmnist.yaml"
CONFIG_SECTIONS = ("data", "model", "method", "augment", "optim", "training", "eval")  # what train_coss reads


class TrainingError(RuntimeError):
    """Stops a run with one line for the user (bad input, NaN loss)."""


class CheckpointWriteError(TrainingError):
    """The disk refused a checkpoint (full, quota, file size limit): the previous checkpoint stays, and the last
    line says how to resume once there is room."""


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; otherwise one process).

def setup_distributed(device_pref):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device=cuda but no CUDA device is visible to torch; run on the CPU with "
                            "--training.device=cpu (or auto, which takes CUDA when there is one)")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


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


class ViewPlan(NamedTuple):
    """The views of every image: n_global at augment.res with scale global_scale (the targets come from these) and
    n_local at local_res with scale local_scale; all cut from one decode."""
    n_global: int
    global_scale: tuple
    n_local: int
    local_res: int
    local_scale: tuple


def view_plan(cfg):
    """LoGo's 2 global + 2 local crops (its method.logo_* keys), or augment's global_views + local_views."""
    if cfg["method.logo"]:
        return ViewPlan(2, (cfg["method.logo_global_cmin"], 1.0), 2, cfg["method.logo_local_res"],
                        (0.05, cfg["method.logo_local_cmax"]))
    return ViewPlan(cfg["augment.global_views"], (cfg["augment.c_min"], 1.0), cfg["augment.local_views"],
                    cfg["augment.local_res"], (cfg["augment.local_cmin"], cfg["augment.local_cmax"]))


def train_loader(cfg, path, indices, world, res):
    """data.decode=cpu: per sample, every view cut from one decode (multiview_decoder: [V, res, res, 3] uint8, or
    flat rows of global and local views, split by split_views) and the label; the crop decoder is returned so
    progressive resolution can resize it.
    data.decode=gpu: per sample, the stored bytes (gpu_views.ImageBytesDecoder) and the label; no decoders."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from multiview_decoder import MultiViewRandomResizedCropDecoder
    seed = cfg["training.seed"]
    if cfg["data.decode"] == "gpu":
        from gpu_views import ImageBytesDecoder, max_image_bytes
        decoders = []
        pipelines = {"image": [ImageBytesDecoder(max_image_bytes(path)), ToTensor()],
                     "label": [IntDecoder(), ToTensor()]}
    else:
        plan = view_plan(cfg)
        decoders = [MultiViewRandomResizedCropDecoder(
            (res, res), plan.n_global, scale=plan.global_scale, interpolation=cfg["augment.interpolation"], seed=seed,
            local_size=(plan.local_res, plan.local_res), local_views=plan.n_local, local_scale=plan.local_scale)]
        pipelines = {"image": [decoders[0], ToTensor()], "label": [IntDecoder(), ToTensor()]}
    loader = Loader(path, batch_size=cfg["optim.batch_size"], num_workers=cfg["augment.workers"],
                    order=OrderOption.RANDOM, seed=seed, indices=indices, drop_last=True, distributed=world > 1,
                    pipelines=pipelines)
    return loader, decoders


def views_text(cfg):
    """The views of an image in words, for the start line: '2 views of 224 px' or '2 x 224 px + 6 x 96 px views'."""
    plan = view_plan(cfg)
    if not plan.n_local:
        return f"{plan.n_global} views of {cfg['augment.res']} px"
    return f"{plan.n_global} x {cfg['augment.res']} px + {plan.n_local} x {plan.local_res} px views"


def view_augments(cfg):
    """(the global views' ViewAugments, the local views'): global view i takes BYOL's view 1 or 2 policy (i even or
    odd: blur p_blur1/2, solarize p_solarize1/2); LoGo's local pair the same two; multi-crop local views DINO's
    local policy (blur p_blur_local, solarize p_solarize_local)."""
    plan = view_plan(cfg)
    common = dict(p_jitter=cfg["augment.p_jitter"], brightness=cfg["augment.brightness"],
                  contrast=cfg["augment.contrast"], saturation=cfg["augment.saturation"], hue=cfg["augment.hue"],
                  p_gray=cfg["augment.p_gray"])
    pair = (ViewAugment(p_blur=cfg["augment.p_blur1"], p_solarize=cfg["augment.p_solarize1"], **common),
            ViewAugment(p_blur=cfg["augment.p_blur2"], p_solarize=cfg["augment.p_solarize2"], **common))
    local = ViewAugment(p_blur=cfg["augment.p_blur_local"], p_solarize=cfg["augment.p_solarize_local"], **common)
    globals_ = tuple(pair[i % 2] for i in range(plan.n_global))
    locals_ = tuple(pair[i % 2] if cfg["method.logo"] else local for i in range(plan.n_local))
    return globals_, locals_


def view_maker(cfg, device):
    """batch from the train loader -> (global views, local views or None, labels) on `device`: tuples of
    normalised float [B, 3, res, res] and [B, 3, local_res, local_res] channels-last tensors, per-sample
    augmentations drawn from the step's generator."""
    from multiview_decoder import split_views
    plan = view_plan(cfg)
    augments, local_augments = view_augments(cfg)
    fmt = memory_format(cfg["training.channels_last"])
    if cfg["data.decode"] == "gpu":
        from gpu_views import GPUViews, upload
        dtype = torch.bfloat16 if device.type == "cuda" and cfg["training.bf16"] else torch.float32
        globals_ = GPUViews(augments, plan.global_scale, out_dtype=dtype, backend=cfg["training.kernels"])
        locals_ = GPUViews(local_augments, plan.local_scale, out_dtype=dtype, backend=cfg["training.kernels"]) \
            if plan.n_local else None

        def make(batch, res, gen):
            images = upload(batch[0], device)  # one decode per image for all views
            local = locals_(images, plan.local_res, gen) if locals_ is not None else None
            views = globals_(images, res, gen)  # the crop kernels write channels-last
            if fmt != torch.channels_last:
                views = tuple(v.contiguous(memory_format=fmt) for v in views)
                local = tuple(v.contiguous(memory_format=fmt) for v in local) if local is not None else None
            return views, local, batch[1].to(device, non_blocking=True).view(-1).long()
    else:
        def make(batch, res, gen):
            rows = batch[0].to(device, non_blocking=True)
            views_u8, local_u8 = split_views(rows, plan.n_global, (res, res), plan.n_local,
                                             (plan.local_res, plan.local_res))  # [B, V, res, res, 3], [B, L, ...]
            views = tuple(aug(views_u8[:, v], gen, memory_format=fmt) for v, aug in enumerate(augments))
            local = None
            if local_u8 is not None:
                local = tuple(aug(local_u8[:, v], gen, memory_format=fmt) for v, aug in enumerate(local_augments))
            return views, local, batch[1].to(device, non_blocking=True).view(-1).long()
    return make


def resolution_at(cfg, epoch):
    """Progressive resolution (FFCV style): res_start -> res linearly over res_ramp_epochs, multiples of 8."""
    start, end, ramp = cfg["augment.res_start"], cfg["augment.res"], cfg["augment.res_ramp_epochs"]
    if not start or ramp == 0 or epoch >= ramp:
        return end
    return max(8, int(round((start + (end - start) * epoch / ramp) / 8)) * 8)


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedules.

def build_model(cfg, num_classes, device, init=True):
    """The networks of a run: online, EMA target, probe, LoGo's affinity MLP. init=False skips model.init (a resumed
    run restores every weight from its checkpoint, and the init file may be gone by then)."""
    width = cfg["model.width"]
    backbone = build_backbone(cfg["model.backbone"], **({"width": width} if width else {}))
    if cfg["model.init"] and init:
        load_init(backbone, cfg["model.init"])
    online = methods.build_net(backbone, cfg["method.name"], cfg["method.proj_hidden"], cfg["method.proj_dim"],
                    cfg["method.pred_hidden"], cfg["method.local_hidden"], cfg["method.local_grid"],
                    cfg["method.local_layer"], cfg["method.dino_out_dim"], cfg["method.proj_out_bn"],
                    cfg["method.pred_out_bn"])
    target = TargetNet(online) if methods.get(cfg["method.name"]).ema_target else None
    probe = nn.Linear(backbone.num_features, num_classes)
    affinity = affinity_mlp(cfg["method.proj_dim"]) if cfg["method.logo"] else None
    if cfg["training.sync_bn"] and device.type == "cuda":  # as the references: the online and target networks
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target) if target is not None else None
    fmt = memory_format(cfg["training.channels_last"])
    mods = [m for m in (online, target, probe, affinity) if m is not None]
    for m in mods:
        m.to(device=device, memory_format=fmt)
    return online, target, probe, affinity


def load_init(backbone, path):
    """model.init: torchvision-format weights (a state_dict, or a dict holding one under 'state_dict'/'model') into
    the backbone before the target copies it; the classifier (fc.*) is dropped on purpose, every other key must
    match in name and shape."""
    if os.path.isdir(path):
        raise TrainingError(f"model.init: {path} is a folder; give the weights file (for a run of ours: its "
                            f"backbone.pt)")
    if not os.path.isfile(path):
        raise TrainingError(f"model.init: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        try:  # a training checkpoint of ours holds more than tensors, so the safe load refuses it
            full = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            full = None
        if isinstance(full, dict) and "online" in full and "config" in full:
            raise TrainingError(f"model.init: {path} is a training checkpoint of train_coss.py; give its run's "
                                f"backbone.pt instead") from None
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        raise TrainingError(f"model.init: {path} is not a torch state_dict "
                            f"({(first[0] if first else type(e).__name__)[:120]})") from None
    if isinstance(state, dict) and "online" in state and "config" in state:
        raise TrainingError(f"model.init: {path} is a training checkpoint of train_coss.py; give its run's "
                            f"backbone.pt instead")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainingError(f"model.init: {path} holds no state_dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"model.init: {path} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), "
                            f"first {bad[0]}")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise TrainingError(f"model.init: {path} does not fit model.backbone ({detail[:300]})") from None


def param_groups(model, weight_decay, predictor_lr_mult=1.0, fix_pred_lr=False):
    """LARS groups: weight decay and trust-ratio adaptation on conv/linear weights only (not biases or norms); the
    predictors' groups get lr x predictor_lr_mult (a faster predictor speeds up short BYOL runs), and with
    fix_pred_lr the peak lr at every step after the warm-up (SimSiam's fix_pred_lr)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            pred = name.startswith(("predictor.", "local_predictor."))
            groups.setdefault((p.ndim > 1, pred), []).append(p)
    order = [(True, False), (False, False), (True, True), (False, True)]  # decayed first, predictors last
    return [{"params": groups[(lars, pred)], "weight_decay": weight_decay if lars else 0.0, "lars": lars,
             "lr_mult": predictor_lr_mult if pred else 1.0, "fixed": fix_pred_lr and pred}
            for lars, pred in order if (lars, pred) in groups]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017) on the groups with lars=True (conv and linear
    weights); the others (biases, norms) get neither weight decay nor the ratio, as BYOL's, MoCo v3's and
    solo-learn's (exclude_bias_n_norm) LARS. With u = g + wd w:
      form 'byol' (BYOL's and MoCo v3's code):  ratio = eta ||w|| / ||u||                    (1 if a norm is 0)
      form 'solo' (solo-learn's lars.py):       ratio = eta ||w|| / (||g|| + wd ||w|| + eps)  (1 and u = g if ||w||
                                                or ||g|| is 0)
      clip (solo-learn's clip_lr):              ratio = min(ratio / lr, 1)
    then buf = momentum buf + ratio u and w -= lr buf. One group's update is a handful of torch._foreach_* calls
    (a few kernel launches per group, not per parameter); tests check each form against its formula written out."""

    def __init__(self, params, lr, momentum=0.9, eta=0.001, form="byol", clip=False, eps=1e-8):
        if form not in ("byol", "solo"):
            raise ValueError(f"LARS form is 'byol' or 'solo', got {form!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eta=eta, weight_decay=0.0, lars=True, form=form,
                                      clip=clip, eps=eps))

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint of a version before 0.7.0 ran BYOL's form, unclipped
            group.setdefault("form", "byol")
            group.setdefault("clip", False)
            group.setdefault("eps", 1e-8)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, wd = [p.grad for p in params], group["weight_decay"]
            adapt = group["lars"] and group["eta"] > 0
            if adapt and group["form"] == "solo":
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                both = (w_norm > 0) & (g_norm > 0)
                ratio = torch.where(both, group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                    torch.ones_like(w_norm))
                decay = list((both.to(params[0].dtype) * wd).unbind())  # no decay where a norm is 0
                update = torch._foreach_add(grads, torch._foreach_mul(params, decay)) if wd else \
                    torch._foreach_mul(grads, 1.0)
            else:
                update = torch._foreach_add(grads, params, alpha=wd) if wd else torch._foreach_mul(grads, 1.0)
                if adapt:
                    w_norm = torch.stack(torch._foreach_norm(params))
                    u_norm = torch.stack(torch._foreach_norm(update))
                    both = (w_norm > 0) & (u_norm > 0)
                    ratio = torch.where(both, group["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
            if adapt:
                if group["clip"]:
                    ratio = torch.where(both, torch.clamp(ratio / group["lr"], max=1.0), ratio)
                torch._foreach_mul_(update, list(ratio.to(update[0].dtype).unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                bufs.append(state["momentum"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, update)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def batchnorm_text(cfg, device, world):
    """The BatchNorm a run uses, in words (the start line)."""
    if not cfg["training.sync_bn"]:
        return "per-process BatchNorm" + (f" (each of {world} processes over its own batch)" if world > 1 else "")
    if device.type != "cuda":
        return "per-process BatchNorm (sync_bn needs CUDA)"
    return f"SyncBatchNorm over {world} process{'es' if world > 1 else ' (nothing to sync)'}"


def optimizer_text(cfg):
    """The optimiser in words (the start line): AdamW, SGD with momentum, or LARS and its form."""
    if cfg["optim.optimizer"] == "adamw":
        return f"AdamW (betas {cfg['optim.momentum']:g}, 0.999)"
    kind = "SGD" if not cfg["optim.lars_eta"] else \
        f"LARS ({cfg['optim.lars_form']} form, eta {cfg['optim.lars_eta']:g}{', clipped' if cfg['optim.lars_clip'] else ''})"
    return f"{kind}, momentum {cfg['optim.momentum']:g}, weight decay {cfg['optim.weight_decay']:g}"


def scale_lines(cfg, world, device):
    """What a run will be, said before it starts: the total batch, the peak lr after the linear scaling, the
    optimiser and the BatchNorm; where the process count differs from the config's training.written_for, what that
    changes. A list of lines (rank 0 prints them)."""
    total = cfg["optim.batch_size"] * world
    peak = cfg["optim.lr"] * total / 256
    lines = [f"total batch {total} ({cfg['optim.batch_size']} x {world} process{'es' if world > 1 else ''}), "
             f"peak lr {peak:.4g} (optim.lr {cfg['optim.lr']:g} per 256 x {total} / 256), {optimizer_text(cfg)}, "
             f"{batchnorm_text(cfg, device, world)}"]
    meant = cfg["training.written_for"]
    if meant and meant != world:
        meant_total = cfg["optim.batch_size"] * meant
        lines.append(
            f"note: this config was written for {meant} processes (total batch {meant_total}, peak lr "
            f"{cfg['optim.lr'] * meant_total / 256:.4g}); with {world} the total batch and peak lr are "
            f"{total / meant_total:g}x those and an epoch has {meant_total / total:g}x the steps, so the per-step EMA "
            f"(optim.tau) moves {meant_total / total:g}x as often per epoch and BatchNorm sees other batches; to keep "
            f"the recipe's total batch, set "
            f"optim.batch_size={meant_total // world if meant_total % world == 0 else meant_total / world}")
    if cfg["training.sync_bn"] and device.type != "cuda":
        lines.append("warning: training.sync_bn=1, but torch cannot sync BatchNorm on the CPU (gloo): each process "
                     "normalises over its own batch")
    return lines


def build_optimizer(cfg, online, peak_lr):
    """optim.optimizer over param_groups (AdamW ignores the groups' 'lars' flag but keeps their weight decay)."""
    groups = param_groups(online, cfg["optim.weight_decay"], cfg["optim.predictor_lr_mult"], cfg["optim.fix_pred_lr"])
    if cfg["optim.optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr, betas=(cfg["optim.momentum"], 0.999), foreach=True)
    return LARS(groups, lr=peak_lr, momentum=cfg["optim.momentum"], eta=cfg["optim.lars_eta"],
                form=cfg["optim.lars_form"], clip=cfg["optim.lars_clip"])


def lr_at(step, total, warmup, peak, schedule="cosine"):
    """Linear warm-up to peak over `warmup` steps, then cosine to 0 (or peak throughout: schedule='constant')."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tau_at(step, total, base):
    """BYOL's EMA schedule: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


# ---------------------------------------------------------------------------------------------------------------
# The losses of each method (pure functions in losses.py; here: which tensors go where).

def inductor_cache_per_isa():
    """torch 2.14.1's inductor cache does not tell apart CPU kernels compiled for different instruction sets: a graph
    compiled with the native AVX-512 kernels and reused under ATEN_CPU_CAPABILITY=avx2 (what `make test` sets) gave
    a loss of 2.0 for the true 5.0 (checked by hand; tests/test_step.py would fail). So unless the user chose a cache
    folder (TORCHINDUCTOR_CACHE_DIR), each CPU capability gets its own below inductor's default one. (Importing
    torch._dynamo, as building an optimiser does, already sets the variable to that default; inductor reads it
    again at every compilation.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    default = os.path.abspath(default_cache_dir())
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == default:
        capability = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"cpu-{capability}")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class LossSpec(NamedTuple):
    """The config values the loss reads, as plain constants (what torch.compile guards on, not the Config)."""
    name: str
    w_s: float
    temperature: float
    mixing: str
    kernels: str
    logo_clip: float
    logo_lambda: float
    logo: bool
    n_global: int
    n_local: int
    dino_student_temp: float
    dino_center_momentum: float


def loss_spec(cfg):
    """With training.compile and training.kernels=auto the local terms are the PyTorch references inside the
    compiled graph (on the CPU they are anyway): inductor fuses them (faster than the Triton op for the local
    InfoNCE, BENCHMARKS.md), and an autograd.Function around a Triton launch would split the graph."""
    kernels = cfg["training.kernels"]
    if cfg["training.compile"] and kernels == "auto":
        kernels = "ref"
    plan = view_plan(cfg)
    return LossSpec(cfg["method.name"], cfg["method.w_s"], cfg["method.temperature"], cfg["method.mixing"], kernels,
                    cfg["method.logo_clip"], cfg["method.logo_lambda"], cfg["method.logo"], plan.n_global,
                    plan.n_local, cfg["method.dino_student_temp"], cfg["method.dino_center_momentum"])


def method_loss(spec, online, target, packed, local_packed, affinity, state=None, noise=None):
    """The method's loss on packed views (pack_views): the global views, and the local views or None. spec:
    LossSpec; online: the online network (maybe DDP); target: the EMA network or None; state: the method's own
    tensors (methods/: DINO's centre and teacher temperature, MoCo v2's queue and pointer). The multi-crop rule of
    losses.py's table (LoGo: its own terms on its 2 + 2 views); each method's terms come from its registry entry
    (methods/base.py says the order). Returns (loss to minimise, affinity loss or None, dict of logged terms, global
    view 1's pooled features, the state's update or None, which method.apply_update applies after the backward)."""
    method = methods.get(spec.name)
    outs = forward_views(online, packed, spec.n_global)                     # the global views, local heads on
    locs = forward_views(online, local_packed, spec.n_local, local=False) if local_packed is not None else []
    crops = outs + ([] if spec.logo else locs)                              # the views of the multi-crop rule
    ctx = method.other_side(spec, target, packed, outs)
    terms = {}
    loss = terms["global"] = method.global_loss(spec, crops, outs, locs, ctx, state)
    if method.local:
        terms["local"] = method.local_loss(spec, outs, ctx, state)
        loss = mix(loss, terms["local"], spec.w_s, spec.mixing)
    affinity_loss = None
    if spec.logo:  # LoGo: L_gg (above) + L_lg + lambda L_ll
        lg = method.logo_local_global(spec, outs, locs, ctx)
        if lg is None:  # L_lg is inside the base's loss (MoCo v2, as LoGo's code)
            lg = 0.0
        else:
            terms["local_global"] = lg
        terms["local_local"], affinity_loss = logo_affinity_losses(affinity, locs[0]["z"], locs[1]["z"], noise)
        # with logo_clip, L_ll enters through the step's clipped gradient instead of lambda
        loss = loss + lg + (0.0 if spec.logo_clip else spec.logo_lambda * terms["local_local"])
        terms["affinity"] = affinity_loss
    update = method.state_update(spec, ctx)
    terms["loss"] = loss
    return loss, affinity_loss, terms, outs[0]["y"], update


def update_state(spec, state, update):
    """After the backward, outside any compiled graph: the method's state takes the step's update (DINO's centre
    moves towards the teacher mean, MoCo v2's queue takes the keys); in place, no host sync."""
    if update is not None:
        methods.get(spec.name).apply_update(spec, state, update)


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


# ---------------------------------------------------------------------------------------------------------------
# The step: one Run holds everything a training step needs; the trainer and every benchmark use it.

class Prepared(NamedTuple):
    """One step's inputs, made from a loader batch with that step's generator: views, LoGo's local views, labels."""
    step: int
    views: tuple
    local_views: tuple
    labels: torch.Tensor
    ready: object = None  # a CUDA event the step waits for (views made on the side stream), or None


class Run:
    """Everything one training step needs, built from the config by build_run: loader, view maker, networks,
    optimisers, schedules, autocast, the NaN policy. run.step(batch) is one training step; run.batches() yields the
    epoch's inputs (made one step ahead with training.prefetch); run.state_dict() / load_state_dict() are the
    checkpoint's own part (the trainer adds epoch, config and results)."""

    def __init__(self, cfg, device, world, loader, decoders, num_train, num_classes, init=True):
        self.cfg, self.device, self.world = cfg, device, world
        self.loader, self.decoders, self.num_train = loader, decoders, num_train
        self.steps_per_epoch = len(loader) if loader is not None else 1
        self.total_steps = cfg["optim.epochs"] * self.steps_per_epoch  # optim.minutes: set by calibrate()
        self.budgeted = False                                             # True once a time budget set it
        self.warmup_steps = cfg["optim.warmup_epochs"] * self.steps_per_epoch
        self.res, self.epoch, self.global_step = resolution_at(cfg, 0), 0, 0  # global_step: updates done so far
        self.make_views = view_maker(cfg, device)
        self.online, self.target, self.probe, self.affinity = build_model(cfg, num_classes, device, init)
        self.peak_lr = cfg["optim.lr"] * cfg["optim.batch_size"] * world / 256
        self.opt = build_optimizer(cfg, self.online, self.peak_lr)
        self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=cfg["optim.probe_lr"], momentum=0.9)
        self.aff_opt = (torch.optim.Adam(self.affinity.parameters(), lr=cfg["method.logo_affinity_lr"])
                        if self.affinity is not None else None)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=device.type == "cuda" and cfg["training.bf16"])
        self.fuse, self.prefetch = cfg["training.fuse_views"], cfg["training.prefetch"]
        self.spec = loss_spec(cfg)
        model = self.online
        if world > 1:
            # forward_sync_buffers=False (torch 2.14's name for broadcast_buffers=False, which now warns): each rank
            # keeps its BN running statistics (eval uses rank 0's); broadcasting them at every forward both costs a
            # collective per view and, on some torch versions, bumps tensors saved for backward. The one sync it
            # still does, at construction, copies rank 0's buffers, which every rank built identically from the seed
            model = nn.parallel.DistributedDataParallel(
                self.online, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
        target, affinity, spec = self.target, self.affinity, self.spec

        # the method's own tensors on the device, part of the checkpoint (DINO's teacher centre and temperature,
        # MoCo v2's queue and its pointer)
        self.method = methods.get(cfg["method.name"])
        self.state = self.method.init_state(cfg, device)

        def forward_loss(packed, local_packed, state, noise=None):
            return method_loss(spec, model, target, packed, local_packed, affinity, state, noise)
        self.forward_loss = forward_loss
        if cfg["training.compile"]:
            # the online and target networks and the losses in one graph (backward compiled with it); one graph
            # per resolution (LoGo, progressive res): dynamic shapes hit an inductor stride assertion in
            # channels-last conv backward (torch 2.11, H100)
            inductor_cache_per_isa()
            mode = None if cfg["training.compile_mode"] == "default" else cfg["training.compile_mode"]
            self.forward_loss = torch.compile(forward_loss, dynamic=False, mode=mode)
        # the NaN policy: nan_check_every=1 looks at the loss before every update (a host sync); otherwise a flag on
        # the device is read every nan_check_every steps (0: with the log rows, no sync of its own) and at epoch end
        self.check_every = cfg["training.nan_check_every"] or cfg["training.log_every"]
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.checked = 1                            # first step not yet known to be finite
        self.kept = lambda: "this Run writes no checkpoints"  # the trainer says what a stopped run leaves
        self._side = torch.cuda.Stream(device) if device.type == "cuda" and self.prefetch else None

    # -- schedules and inputs

    @property
    def epochs(self):
        """Epochs the run spans (the last may be partial under optim.minutes)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def set_total_steps(self, total):
        """The run's length in steps, from a time budget: the lr and tau schedules are stretched to it."""
        self.total_steps, self.budgeted = int(total), True

    def lr(self, step):
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg["optim.lr_schedule"])

    def set_lr(self, step):
        """The optimiser's lr at `step` (0-based): the schedule's, times each group's multiplier; predictor groups
        with optim.fix_pred_lr keep the peak after the warm-up."""
        lr = self.lr(step)
        fixed = lr if step < self.warmup_steps else self.peak_lr
        for group in self.opt.param_groups:
            group["lr"] = (fixed if group.get("fixed") else lr) * group["lr_mult"]

    def tau(self, step):
        if self.cfg["optim.tau_schedule"] == "constant":
            return self.cfg["optim.tau"]
        return tau_at(step, self.total_steps, self.cfg["optim.tau"])

    def generator(self, step):
        """The generator of step `step`'s augmentations (0-based): the same views on resume and with prefetch."""
        return torch.Generator(device=self.device).manual_seed(self.cfg["training.seed"] * 1_000_003 + step)

    def logo_noise(self, local_views):
        """LoGo's noise on the positive pairs that train f_d (its public code: Gaussian, std 0.3 / sqrt(D)), drawn
        from this step's own generator, so a resumed run draws the same."""
        B, D = local_views[0].shape[0], self.cfg["method.proj_dim"]
        g = torch.Generator(device=self.device).manual_seed(self.cfg["training.seed"] * 1_000_003 + self.global_step
                                                            + 500_000_003)
        std = 0.3 / math.sqrt(D)
        return tuple(std * torch.randn(B, D, generator=g, device=self.device) for _ in range(2))

    def set_epoch(self, epoch):
        """Progressive resolution and the loader's order for this epoch (RANDOM order of epoch e: seed + e)."""
        self.epoch = epoch
        new_res = resolution_at(self.cfg, epoch)
        if new_res != self.res:
            self.res = new_res
            if self.decoders:  # CPU path: the crop decoders resize in the loader's threads
                self.decoders[0].output_size = (new_res, new_res)
                self.loader.generate_code()
        if self.loader is not None:
            self.loader.next_epoch = epoch
        self.method.set_epoch(self, epoch)

    def prepare(self, batch, step):
        """A loader batch -> the Prepared inputs of step `step` (views cut and augmented on the run's device)."""
        if self._side is None:
            return Prepared(step, *self.make_views(batch, self.res, self.generator(step)))
        with torch.cuda.stream(self._side):
            views, local, labels = self.make_views(batch, self.res, self.generator(step))
            ready = torch.cuda.Event()
            ready.record(self._side)
        return Prepared(step, views, local, labels, ready)

    def batches(self):
        """The epoch's inputs for run.step: loader batches as they are, or with training.prefetch the Prepared
        inputs of the next step made while the current one runs (a thread feeds the loader and the view maker; on
        CUDA it makes the views on a side stream)."""
        if not self.prefetch:
            yield from self.loader
            return
        from concurrent.futures import ThreadPoolExecutor
        it, step = iter(self.loader), self.global_step
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            def make(s):
                batch = next(it, None)
                return None if batch is None else self.prepare(batch, s)
            pending = pool.submit(make, step)
            while True:  # leaving (the end, or a consumer that stops) waits for the thread's last batch
                item = pending.result()
                if item is None:
                    return
                step += 1
                pending = pool.submit(make, step)
                yield item

    def endless(self):
        """run.batches() epoch after epoch from epoch 0, the step counter running on (benchmarks, calibration);
        closing it ends the loader's current epoch."""
        epoch = 0
        while True:
            self.set_epoch(epoch)
            yield from self.batches()
            epoch += 1

    # -- the step

    def step(self, batch):
        """One training step on a loader batch (or run.batches()' Prepared): views with this step's generator, lr and
        tau of this step, loss -> backward -> optimiser; LoGo's affinity step; the online probe; the EMA target;
        the NaN policy. Returns (logged terms, probe logits, labels); nothing in it waits for the device unless
        nan_check_every=1."""
        s = self.global_step
        item = batch if isinstance(batch, Prepared) else self.prepare(batch, s)
        if item.step != s:
            raise RuntimeError(f"inputs made for step {item.step + 1} given to step {s + 1}")
        if item.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.ready)
            for t in (*item.views, *(item.local_views or ()), item.labels):
                t.record_stream(current)
        self.set_lr(s)
        terms, probe_logits = self._update(item.views, item.local_views, item.labels, self.tau(s))
        self.global_step = s + 1
        return terms, probe_logits, item.labels

    def _update(self, views, local_views, labels, tau):
        online = self.online
        packed = pack_views(views, self.fuse)
        local_packed = pack_views(local_views, self.fuse) if local_views is not None else None
        noise = self.logo_noise(local_views) if self.affinity is not None else None
        with self.amp:
            loss, affinity_loss, terms, features, update = self.forward_loss(packed, local_packed, self.state, noise)
        step = self.global_step + 1  # 1-based in messages and logs
        if self.check_every == 1:
            if not torch.isfinite(loss):  # sync
                raise TrainingError(f"loss is {float(loss.detach())} at step {step} (epoch {self.epoch}); not "
                                    f"applied: {self.kept()}")
        else:
            self.nonfinite |= ~torch.isfinite(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        if affinity_loss is not None and self.spec.logo_clip:
            backward_with_relative_clip(loss, terms["local_local"], [p for p in online.parameters() if p.requires_grad],
                                        self.spec.logo_clip)
        else:
            loss.backward()
        # after the backward: a compiled graph may read the state it saved for backward (a mutation before it
        # fails autograd's version check, or under torch.compile is read stale)
        update_state(self.spec, self.state, update)
        self.method.after_backward(self)
        self.opt.step()
        if affinity_loss is not None:  # LoGo's alternating step: train f_d on detached local embeddings
            self.aff_opt.zero_grad(set_to_none=True)
            affinity_loss.backward()
            if self.world > 1:  # f_d is small and steps on its own: average its gradients by hand
                for p in self.affinity.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
            self.aff_opt.step()
        # the online probe: detached features, its own optimiser
        probe_logits = self.probe(features.detach().to(self.probe.weight.dtype))
        probe_loss = F.cross_entropy(probe_logits, labels)
        self.probe_opt.zero_grad(set_to_none=True)
        probe_loss.backward()
        self.probe_opt.step()
        if self.target is not None:
            ema_update(self.target.tracked(), self.target.online_part(online), tau)
        if self.check_every > 1 and (step % self.check_every == 0 or step % self.steps_per_epoch == 0
                                     or step == self.total_steps):
            self.check_finite()
        return terms, probe_logits

    def check_finite(self):
        """Reads the device-side NaN flag (a sync): raises if a loss since the last look was NaN/inf."""
        if self.check_every > 1:
            if bool(self.nonfinite):
                raise TrainingError(f"loss is nan/inf at a step between {self.checked} and {self.global_step + 1} "
                                    f"(epoch {self.epoch}); {self.kept()}")
            self.checked = self.global_step + 2

    # -- the checkpoint's own part

    def state_dict(self):
        opt = lambda o: o.state_dict() if o is not None else None  # noqa: E731
        return {"online": self.online.state_dict(), "target": opt(self.target), "probe": self.probe.state_dict(),
                "opt": self.opt.state_dict(), "probe_opt": self.probe_opt.state_dict(),
                "affinity": opt(self.affinity), "aff_opt": opt(self.aff_opt), "step": self.global_step,
                "rng": rng_state(), "budget_steps": self.total_steps if self.budgeted else None,
                "method_state": [t.clone() for t in self.state] if self.state is not None else None}

    def load_state_dict(self, ck):
        self.online.load_state_dict(ck["online"])
        self.probe.load_state_dict(ck["probe"])
        self.opt.load_state_dict(ck["opt"])
        self.probe_opt.load_state_dict(ck["probe_opt"])
        if self.target is not None:
            self.target.load_state_dict(ck["target"])
        if self.affinity is not None:
            self.affinity.load_state_dict(ck["affinity"])
            self.aff_opt.load_state_dict(ck["aff_opt"])
        if self.state is not None:
            for t, saved in zip(self.state, ck["method_state"]):
                t.copy_(saved)
        self.global_step = self.checked = ck["step"]
        self.checked += 1
        self.nonfinite.zero_()
        if ck.get("budget_steps") and self.cfg["optim.minutes"]:  # a budgeted run keeps the length it measured
            self.set_total_steps(ck["budget_steps"])
        set_rng_state(ck["rng"])


def build_run(cfg, device, world=1, train_path=None, num_train=None, num_classes=None, total=None, init=True):
    """The Run of a config: with train_path, its loader over num_train images of that beton (None: all; fewer: a
    subset drawn with training.seed, write_ffcv.seeded_subset) and the beton's classes (total and num_classes: the
    beton's image and class counts when the caller has read them already); without, no loader (run.step takes
    batches in the loader's format: CPU path (uint8 [B, 2, res, res, 3] views, labels), GPU path
    (ImageBytesDecoder rows, labels)) and num_classes for the probe."""
    loader, decoders = None, []
    if train_path is not None:
        from write_ffcv import seeded_subset
        if total is None or num_classes is None:
            total, num_classes = num_images_and_classes(train_path)
        num_train = total if num_train is None else min(num_train, total)
        indices = seeded_subset(total, num_train, cfg["training.seed"])
        loader, decoders = train_loader(cfg, train_path, indices, world, resolution_at(cfg, 0))
    return Run(cfg, device, world, loader, decoders, num_train, num_classes, init)


# optim.minutes: untimed first steps (compilation, caches, and the batches the loader queued ahead while the run
# started: timing those made a 2-core run 5-15 % longer than its budget), then at most this many timed steps
CALIBRATION_STEPS = (10, 40)


def calibrate(run, minutes, log=print):
    """optim.minutes: times the run's first steps (after a few untimed ones), sets the step count that fits the
    budget, then undoes those steps (weights, optimisers, random generators, step counter), so what follows is the
    run of that many steps from its start. At most ~30 s of timing. All ranks step together; rank 0's measurement
    decides. Returns the images/s measured."""
    import copy
    warm, most = CALIBRATION_STEPS
    saved = copy.deepcopy(run.state_dict())
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    timed, t0 = 0, None
    batches = run.endless()  # tiny datasets: the steps may span epochs
    for taken, batch in enumerate(batches, 1):
        run.step(batch)
        if taken == warm:
            sync()
            t0 = time.perf_counter()
        elif taken > warm:
            timed += 1
            enough = timed >= most or (timed >= 5 and time.perf_counter() - t0 > 30)
            if run.world > 1:  # rank 0's clock decides for all: ranks that disagreed would wait on each other forever
                flag = torch.tensor([int(enough)], device=run.device)
                dist.broadcast(flag, src=0)
                enough = bool(flag.item())
            if enough:
                break
    batches.close()  # ends the loader's epoch (and the prefetch thread) mid-way
    sync()
    seconds_per_step = (time.perf_counter() - t0) / timed
    total = [max(1, int(minutes * 60 / seconds_per_step))]
    if run.world > 1:
        dist.broadcast_object_list(total, src=0)
    run.load_state_dict(saved)
    run.set_total_steps(total[0])
    rate = run.cfg["optim.batch_size"] * run.world / seconds_per_step
    log(f"optim.minutes={minutes:g}: {rate:.0f} img/s over {timed} timed steps -> {total[0]} steps "
        f"({total[0] / run.steps_per_epoch:.2f} epochs); those first steps are undone, the run starts at step 0")
    return rate


def check_schedule(run, log=print):
    """A warm-up that fills the whole run (the lr would never reach its peak and decay): refused for a run of fixed
    epochs (the config is wrong, and the user can fix it now); under optim.minutes, where the length is only known
    once measured on this machine, the budget wins: one warning line, and the warm-up shrinks to a tenth of the run."""
    if not run.warmup_steps or run.warmup_steps < run.total_steps:
        return
    cfg = run.cfg
    asked = f"optim.warmup_epochs={cfg['optim.warmup_epochs']:g} is {run.warmup_steps:.0f} steps"
    if not run.budgeted:
        raise TrainingError(f"{asked}, but the run has only {run.total_steps}: lower optim.warmup_epochs or raise "
                            f"optim.epochs")
    run.warmup_steps = max(1, run.total_steps // 10)
    log(f"warning: {asked}, but optim.minutes={cfg['optim.minutes']:g} gives only {run.total_steps} on this "
        f"machine; warming up over the first {run.warmup_steps} steps (a tenth) instead")


@torch.no_grad()
def check_local_map(cfg, online, device):
    """A CO method aligns every location of the feature map with the other view's global representation: refused
    when the map is 1x1 at the run's (smallest) resolution, where the local term only repeats the global one."""
    if not cfg["method.name"].startswith("co_"):
        return
    res = min(r for r in (cfg["augment.res"], cfg["augment.res_start"]) if r)
    backbone = online.backbone
    was_training = backbone.training
    backbone.eval()
    side = backbone(torch.zeros(1, 3, res, res, device=device), online.map_stage)[0].shape[-1]
    backbone.train(was_training)
    grid = cfg["method.local_grid"]
    if grid == 1 or side == 1:
        why = ("method.local_grid=1 pools the feature map to 1x1" if side > 1 else
               f"{cfg['model.backbone']} turns a {res} px view into a 1x1 feature map (stride {res}); raise "
               f"augment.res{' and augment.res_start' if cfg['augment.res_start'] else ''} to at least {2 * res} "
               f"or choose a backbone with a smaller stride (python rf_resnet.py --list)")
        raise TrainingError(f"method.name={cfg['method.name']} needs a feature map of at least 2x2 locations, but "
                            f"{why}; with one location the local term only repeats the global one")


def clamp_loader_workers(cfg, log=print):
    """augment.workers above what numba may use here (the cores, or NUMBA_NUM_THREADS) fails deep in FFCV's
    loader; it is lowered with one warning line instead."""
    import numba
    most = numba.config.NUMBA_NUM_THREADS
    asked = cfg["augment.workers"]
    if asked > most:
        log(f"warning: augment.workers={asked} is more than the {most} threads numba can run here; using {most}")
        cfg.content[("augment", "workers")] = most


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
    buf = io.BytesIO()
    torch.save(state, buf)  # serialised in memory first: a failing disk then raises a plain OSError with its errno
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise CheckpointWriteError(f"could not write the checkpoint {when} ({e.strerror or e}; it needs "
                            f"{buf.getbuffer().nbytes / 2**20:.0f} MiB{free}); the previous one is untouched: "
                            f"{kept_checkpoint(path)}") from None
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
    method = methods.get(name)
    if cfg["method.logo"] and not method.logo_base:
        bases = " or ".join(m.name for m in methods.REGISTRY.values() if m.logo_base)
        raise TrainingError(f"method.logo=1 needs method.name {bases} (LoGo's bases), got {name}")
    if cfg["method.proj_out_bn"] != "auto" and method.own_head_form:
        raise TrainingError(f"method.proj_out_bn={cfg['method.proj_out_bn']}: {name}'s head has its own form; "
                            "leave it auto")
    if cfg["method.pred_out_bn"] != "auto" and not method.predictor:
        raise TrainingError(f"method.pred_out_bn={cfg['method.pred_out_bn']}: {name} has no predictor; leave it auto")
    try:
        method.check(cfg, world)
    except MethodError as e:
        raise TrainingError(str(e)) from None
    if cfg["method.mixing"] == "convex" and cfg["method.w_s"] > 1:
        raise TrainingError(f"method.w_s={cfg['method.w_s']} > 1 with convex mixing; use method.mixing=additive")
    if cfg["augment.local_cmin"] > cfg["augment.local_cmax"]:
        raise TrainingError(f"augment.local_cmin={cfg['augment.local_cmin']} is above augment.local_cmax="
                            f"{cfg['augment.local_cmax']}")
    if cfg["method.logo"] and (cfg["augment.global_views"] != 2 or cfg["augment.local_views"]):
        raise TrainingError("method.logo=1 makes its own 2 global + 2 local views (method.logo_local_res, "
                            "logo_global_cmin, logo_local_cmax); leave augment.global_views=2 and local_views=0")
    if cfg["method.logo_clip"] and world > 1:
        raise TrainingError("method.logo_clip is single-process only for now; use method.logo_lambda under torchrun")
    if cfg["method.logo"] and cfg["method.logo_local_cmax"] <= 0.05:
        raise TrainingError(f"method.logo_local_cmax={cfg['method.logo_local_cmax']} is not above 0.05, LoGo's "
                            f"smallest local crop scale (its local crops take scale (0.05, logo_local_cmax))")
    check_view_sizes(cfg)
    out_dir, run_name = cfg["training.out_dir"], cfg["training.run_name"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainingError(f"training.out_dir={out_dir} is a file, not a folder; give a folder for the runs")
    if "/" in run_name or "\\" in run_name or run_name in (".", ".."):
        raise TrainingError(f"training.run_name={run_name!r} must be a plain folder name (no '/'); put the path in "
                            f"training.out_dir")
    if cfg["training.kernels"] == "triton" and not torch.cuda.is_available() and \
            os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter runs them on the CPU (the suite does)
        raise TrainingError("training.kernels=triton needs CUDA (the Triton ops run on the GPU, or on the CPU "
                            "under TRITON_INTERPRET=1); use training.kernels=auto or ref on the CPU")
    if cfg["optim.batch_size"] * world > num_train:
        raise TrainingError(f"batch of {cfg['optim.batch_size']} x {world} process(es) is larger than the "
                            f"{num_train} training images")


def check_view_sizes(cfg):
    """Every view the run makes (global, the resolution ramp's start, multi-crop's and LoGo's local views, and the
    evaluation's centre crops at augment.res) must be large enough for the backbone: BagNet's unpadded
    convolutions need at least its receptive field (33 px); smaller views would fail inside the first forward."""
    layout = get_layout(cfg["model.backbone"])
    need = min_input_side(layout)
    views = [("augment.res", cfg["augment.res"]), ("augment.res_start", cfg["augment.res_start"])]
    if cfg["augment.local_views"]:
        views.append(("augment.local_res", cfg["augment.local_res"]))
    if cfg["method.logo"]:
        views.append(("method.logo_local_res", cfg["method.logo_local_res"]))
    small = [f"{key}={res}" for key, res in views if res and res < need]
    if small:
        raise TrainingError(f"model.backbone={cfg['model.backbone']} needs views of at least {need} px (its unpadded "
                            f"convolutions leave nothing of a smaller one), but {' and '.join(small)}; raise "
                            f"{'them' if len(small) > 1 else 'it'} to {need} or more, or choose a padded backbone "
                            f"(python rf_resnet.py --list)")


DATA_KEYS = {  # what the data is, per source (beton_dir and decode may change; a key a source ignores may too)
    "synthetic": ("source", "name", "synthetic_images", "synthetic_classes", "synthetic_min_size",
                  "synthetic_max_size"),
    "fashion_mnist": ("source", "name", "root", "image_size"),
    "imagenet100": ("source", "name", "root", "class_list"),
    "imagefolder": ("source", "name", "root"),
    "tiny_imagenet": ("source", "name", "root"),
}


def resume_state(cfg, ckpt_path, data=None):
    """The checkpoint to continue from: complete, finite, and written with this run's model, method and data
    settings; data = {"train_images", "classes"} of the betons this run reads (checked against the checkpoint's)."""
    ck = read_checkpoint(ckpt_path)
    then_data, now_data = ck["config"].get("data", {}), as_dict(cfg)["data"]
    differ = [f"data.{k}: {then_data.get(k)!r} in the checkpoint, {now_data[k]!r} now" for k in DATA_KEYS[now_data["source"]]
              if k in then_data and then_data[k] != now_data[k]]
    if data is not None:
        held = ck.get("data") or {}
        classes = held.get("classes", ck["probe"]["weight"].shape[0] if ck.get("probe") else None)
        if classes is not None and classes != data["classes"]:
            differ.append(f"{classes} classes in the checkpoint's data, {data['classes']} now")
        if held.get("train_images") not in (None, data["train_images"]):
            differ.append(f"{held['train_images']} train images in the checkpoint's data, {data['train_images']} "
                          f"now")
    if differ:
        raise TrainingError(f"{ckpt_path} was trained on other data ({'; '.join(differ[:3])}); refusing to resume "
                            f"it on this data (give another training.run_name, or the data it was trained on)")
    now = as_dict(cfg)
    # a key the checkpoint's version did not have yet reads as its default (which is that version's behaviour)
    defaults = {".".join(key): param.default for key, param in cfg.entries.items()}
    if ck["config"].get("method", {}).get("name") in ("moco_v3", "co_moco_v3"):
        defaults["method.pred_out_bn"] = "fixed"  # before 0.7.0 MoCo v3's predictor ended in a fixed BatchNorm
    then = {(section, k): ck["config"].get(section, {}).get(k, defaults[f"{section}.{k}"])
            for section in ("model", "method") for k in now[section]}
    then_batch = ck["config"].get("optim", {}).get("batch_size")
    if then_batch not in (None, cfg["optim.batch_size"]):
        raise TrainingError(f"{ckpt_path} was trained at optim.batch_size={then_batch}, now {cfg['optim.batch_size']}: "
                            f"the lr, tau and step schedules were laid out in that batch's steps, and another batch "
                            f"would end them early or late; resume with --optim.batch_size={then_batch}")
    differ = [f"{section}.{k}: {then[section, k]!r} in the checkpoint, {v!r} now"
              for section in ("model", "method") for k, v in now[section].items()
              if then[section, k] != v and f"{section}.{k}" != "model.init"]  # init: step 0's weights only
    if differ:
        raise TrainingError(f"{ckpt_path} was written with other settings ({'; '.join(differ[:4])}"
                            f"{'; ...' if len(differ) > 4 else ''}); refusing to resume")
    return ck


def _clear_leftovers(run_dir, fresh, log=print):
    """What dead processes left in a run folder: `*.tmp-<pid>` files of processes that no longer run, and, when the
    run starts fresh (no checkpoint to resume), the log rows and TensorBoard events of an earlier attempt that was
    killed before its first checkpoint (kept, they would show steps 1..k twice)."""
    import shutil
    for name in os.listdir(run_dir):
        pid = name.rpartition(".tmp-")[2]
        if ".tmp-" in name and pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(run_dir, name))
    if fresh:
        gone = [n for n in ("log.jsonl", "tb") if os.path.exists(os.path.join(run_dir, n))]
        for name in gone:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if gone:
            log(f"{run_dir} held {' and '.join(gone)} of an earlier attempt that wrote no checkpoint: removed, "
                f"this run starts at step 1")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    """Runs (or resumes) a training run: the loop, evaluations and checkpoints around a Run (build_run). Returns the
    final metrics (rank 0; other ranks get only run_dir and rank). `on_step(step)` is called after every step."""
    t_start = time.perf_counter()
    rank, world, device = setup_distributed(cfg["training.device"])
    is_main = rank == 0
    say = log if is_main else (lambda *_: None)  # lines every rank reaches but only rank 0 prints
    clamp_loader_workers(cfg, say)
    if cfg["training.threads"]:
        torch.set_num_threads(cfg["training.threads"])
    seed = cfg["training.seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # data (both betons checked before anything else happens), then everything a step needs
    train_path, val_path, total_train, num_classes = betons(cfg)
    num_train = min(cfg["training.train_images"], total_train) if cfg["training.train_images"] else total_train
    check_options(cfg, num_train, world)
    run_dir = run_folder(cfg)
    if world > 1:  # one folder for all ranks (its default name holds rank 0's start time)
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    cfg.run_dir = run_dir  # for main's resume line after Ctrl-C
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    resume = cfg["training.resume"]
    # a resumed run takes every weight from its checkpoint: model.init is not read (its file may be gone)
    run = build_run(cfg, device, world, train_path, num_train, num_classes, total_train,
                    init=not (resume and os.path.isfile(ckpt_path)))
    check_local_map(cfg, run.online, device)
    steps_per_epoch = run.steps_per_epoch
    if os.path.isfile(ckpt_path) and not resume:
        raise TrainingError(f"{run_dir} already holds a run; pass --training.resume=1 to continue it, or choose "
                            f"another training.run_name")
    if resume is True and not os.path.isfile(ckpt_path):
        raise TrainingError(f"training.resume=1 but there is no checkpoint to resume ({ckpt_path} does not exist); "
                            f"drop training.resume to start this run, or pass training.resume=auto to resume when "
                            f"there is a checkpoint and start fresh otherwise")
    if resume == "auto":
        log("training.resume=auto: " + (f"resuming {ckpt_path}" if os.path.isfile(ckpt_path) else
                                        f"no checkpoint in {run_dir}, starting fresh"))
    run.kept = lambda: kept_checkpoint(ckpt_path)

    # random-init baseline (before any step), then resume if asked
    start_epoch, results, ck, eval_seconds = 0, {}, None, 0.0
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        _clear_leftovers(run_dir, fresh=not os.path.isfile(ckpt_path), log=log)
    if cfg["training.resume"] and os.path.isfile(ckpt_path):
        try:
            ck = resume_state(cfg, ckpt_path, {"train_images": num_train, "classes": num_classes})
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        run.load_state_dict(ck)
        start_epoch, results = ck["epoch"], ck.get("results", {})
        if is_main:
            _forget_after(os.path.join(run_dir, "log.jsonl"), run.global_step)
        log(f"resumed {ckpt_path} at epoch {start_epoch}, step {run.global_step} ({cfg['method.name']}, "
            f"{cfg['model.backbone']}, data {cfg['data.name']}: {num_train} train images, {num_classes} classes)")
    elif is_main and cfg["eval.random_init"] and "random_init" not in results:
        t_eval = time.perf_counter()
        results["random_init"] = evaluate(cfg, run.online.backbone, None, device, num_classes, cfg["augment.res"],
                                          True, train_path, val_path)
        eval_seconds = time.perf_counter() - t_eval
        log(f"random init: knn={results['random_init']['knn']:.4f} probe={results['random_init'].get('probe', 0):.4f} "
            f"({eval_seconds:.0f} s)")
    if cfg["optim.minutes"] and ck is None:
        if cfg["training.compile"]:
            log("compiling the step (the first steps wait for it; a minute or more on a CPU) ...")
        calibrate(run, cfg["optim.minutes"], say)
    check_schedule(run, say)
    epochs = run.epochs
    if is_main:
        log(f"run {run_dir}: {device}, {num_train} train images, {steps_per_epoch} steps/epoch x {epochs} epochs "
            f"({run.total_steps} steps, from step {run.global_step}), batch {cfg['optim.batch_size']}"
            f"{f' x {world} processes' if world > 1 else ''}, {views_text(cfg)}, "
            f"compile {'on' if cfg['training.compile'] else 'off'}")
        for line in scale_lines(cfg, world, device):
            log(line)
        if cfg["training.compile"] and not cfg["optim.minutes"]:
            log("compiling the step (the first step waits for it; a minute or more on a CPU) ...")
    if is_main:
        _write_params(run_dir, cfg, ck)
        with open(os.path.join(run_dir, "env.json"), "w") as fh:
            json.dump(environment(device, world), fh, indent=1)
    # TensorBoard hides the events of steps after the checkpoint (purge_step), as log.jsonl drops their rows
    tb = _tensorboard(run_dir, run.global_step + 1 if ck is not None else None) if is_main else None
    logfile = open(os.path.join(run_dir, "log.jsonl"), "a") if is_main else None

    def checkpoint(epoch, when):
        save_checkpoint(ckpt_path, {**run.state_dict(), "epoch": epoch + 1, "config": as_dict(cfg),
                                    "results": results, "data": {"train_images": num_train, "classes": num_classes}},
                        when)

    def report(epoch, metrics):
        results[f"epoch{epoch}"] = metrics
        _write_row(logfile, tb, {"epoch": epoch, "step": run.global_step, **metrics}, run.global_step)
        log(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def evaluate_now(final):
        return _evaluate(cfg, run.online, run.probe, device, num_classes, final, train_path, val_path, ckpt_path)

    steps_here, train_seconds, row = 0, 0.0, {}
    try:  # a crash still leaves what was logged on disk
        # Steps are counted from 1 in logs and messages: "step k" is the k-th update (log rows carry the same k).
        for epoch in range(start_epoch, epochs):
            run.set_epoch(epoch)
            t_epoch, seen = time.perf_counter(), 0
            in_epoch = min(steps_per_epoch, run.total_steps - epoch * steps_per_epoch)  # optim.minutes: last partial
            bar = tqdm(total=in_epoch, desc=f"epoch {epoch}", unit="step", file=sys.stderr,
                       disable=None if is_main else True)  # None: shown on a terminal only
            batches = run.batches()
            for i, batch in enumerate(batches):
                terms, probe_logits, labels = run.step(batch)
                step = run.global_step
                seen += len(labels) * world
                if is_main and (step % cfg["training.log_every"] == 0 or i == in_epoch - 1):
                    rate = seen / (time.perf_counter() - t_epoch)  # metrics read here only: the steady state has
                    lr = run.lr(step - 1)                           # no host sync of its own
                    row = {"epoch": epoch, "step": step, "lr": lr, "res": run.res, "img_per_s": rate,
                           "probe_train_acc": float((probe_logits.argmax(1) == labels).float().mean()),
                           **{k: float(v.detach()) for k, v in terms.items()}}
                    _write_row(logfile, tb, row, step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_per_s=f"{rate:.0f}", refresh=False)
                    if bar.disable:  # no terminal: a plain log line instead of the bar
                        log(f"epoch {epoch} step {step}/{run.total_steps} loss {row['loss']:.4f} lr {lr:.3g} "
                            f"{rate:.0f} img/s")
                bar.update(1)
                if on_step is not None:
                    on_step(step)
                if i == in_epoch - 1:
                    break
            batches.close()  # a partial last epoch ends the loader's epoch early
            bar.close()
            steps_here += in_epoch
            epoch_seconds = time.perf_counter() - t_epoch
            train_seconds += epoch_seconds
            if is_main:
                left = (run.total_steps - run.global_step) * train_seconds / steps_here
                ending = f", then the final evaluation (~{eval_seconds:.0f} s)" if eval_seconds else ""
                log(f"epoch {epoch} done ({epoch + 1}/{epochs}): loss {row.get('loss', float('nan')):.4f}, "
                    f"{seen / epoch_seconds:.0f} img/s, {epoch_seconds:.0f} s; "
                    f"{'training done' if left == 0 else f'ETA {left / 60:.1f} min of training'}{ending}")
            # the weights first (only if finite), then the evaluation: a failing evaluation never costs the epoch
            last = epoch == epochs - 1
            if is_main and ((epoch + 1) % cfg["training.checkpoint_every"] == 0 or last):
                checkpoint(epoch, f"after epoch {epoch} (step {run.global_step})")
            elif is_main and nonfinite_tensors(run.state_dict()):  # caught now rather than at the next checkpoint
                raise TrainingError(f"NaN/inf in the state after epoch {epoch} (step {run.global_step}); "
                                    f"{kept_checkpoint(ckpt_path)}")
            if is_main and not last and cfg["eval.every"] and (epoch + 1) % cfg["eval.every"] == 0:
                report(epoch, evaluate_now(False))  # its results reach the next checkpoint
        if is_main and f"epoch{epochs - 1}" not in results:
            # the final evaluation, once the last checkpoint is on disk (also when a resume finds the run trained but
            # not evaluated); then the same weights are saved again with its results
            export_backbone(run.online, os.path.join(run_dir, "backbone.pt"))
            report(epochs - 1, evaluate_now(True))
            checkpoint(epochs - 1, "with the final evaluation")
    finally:
        if logfile:
            logfile.close()
        if tb:
            tb.close()
    results["run_dir"], results["rank"] = run_dir, rank
    if is_main:
        log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; run folder {run_dir} (checkpoint.pt, "
            f"backbone.pt, log.jsonl, params.json, env.json, tb/; curves: python train_coss.py --plot {run_dir})")
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


def cpu_name():
    """The CPU's model name and its widest vector ISA (numbers measured on a CPU depend on both)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    isa = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{name} ({isa})"


def git_commit():
    """The code's commit (with '+changes' when the tree differs from it), or None outside a git checkout."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+changes" if dirty else "")) or None


def environment(device, world):
    import ffcv
    env = {"version": __version__, "git_commit": git_commit(), "python": platform.python_version(),
           "torch": torch.__version__, "ffcv": "1.0.2", "numpy": np.__version__, "platform": platform.platform(),
           "cpu": cpu_name(), "cpus": os.cpu_count(), "world_size": world, "device": str(device),
           "ffcv_module": ffcv.__file__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def plot(run_dir):
    """PNG curves of a run from log.jsonl: loss terms and lr against step, kNN and probe accuracies against epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evaluate import read_jsonl
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise TrainingError(f"{log_path} does not exist (give a run folder that train_coss.py wrote)")
    rows, bad = read_jsonl(log_path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for k in ("loss", "global", "local", "global_global", "local_global", "local_local"):
        pts = [(r["step"], r[k]) for r in rows if k in r and "lr" in r]
        if pts:
            axes[0].plot(*zip(*pts), label=k, lw=1)
    pts = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if pts:
        axes[1].plot(*zip(*pts), lw=1)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    start = (torch.load(ckpt, map_location="cpu", weights_only=False).get("results", {}).get("random_init", {})
             if os.path.isfile(ckpt) else {})
    for k in ("knn", "probe", "online_probe"):  # evaluation rows: one per evaluated epoch; 0 = the random init
        pts = [(0, start[k])] if k in start else []
        pts += [(r["epoch"] + 1, r[k]) for r in rows if k in r and "lr" not in r]
        if pts:
            axes[2].plot(*zip(*pts), "o-", label=k)
    for ax, title, x, y in ((axes[0], "training loss", "step", "loss (objective's own units)"),
                            (axes[1], "learning rate", "step", "learning rate"),
                            (axes[2], "val accuracy", "epochs trained (0: random init)", "top-1 (fraction)")):
        ax.set(title=title, xlabel=x, ylabel=y)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=10)
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    if bad:
        print(f"train_coss.py: skipped {bad} unreadable row(s) of {log_path} (a run cut while writing?)",
              file=sys.stderr)
    return out


def resume_hint(cfg, argv):
    """After Ctrl-C: what is kept, and the command that continues the run."""
    run_dir = getattr(cfg, "run_dir", None) if cfg is not None else None
    if run_dir is None:
        return "stopped before the run started; nothing to resume"
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        return f"{kept_checkpoint(ckpt)}; nothing to resume yet"
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith(("--training.resume", "--training.run_name", "--training.out_dir"))]
    args += [f"--training.out_dir={os.path.dirname(run_dir) or '.'}",
             f"--training.run_name={os.path.basename(run_dir)}", "--training.resume=1"]
    return f"{kept_checkpoint(ckpt)}; resume with: python train_coss.py {' '.join(args)}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): unwinds like Ctrl-C, so the same clean-up runs."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=help_text(CONFIG_SECTIONS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default: the built-in defaults = {DEMO_CONFIG})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--plot", metavar="RUN_DIR", help="write RUN_DIR/curves.png and exit")
    parser.add_argument("--methods", action="store_true", help="list the registered methods (methods/) and exit")
    parser.add_argument("--demo", action="store_true", help="end with the one-line demo summary")
    parser.add_argument("--dry-run", action="store_true", help="build the run as on --dry-run-processes processes, "
                        "take 5 CPU steps on synthetic images at the recipe's peak lr, print each parameter group's "
                        "update-to-weight ratios and the loss; exit 2 where a ratio is far above the references' "
                        "(dry_run.py)")
    parser.add_argument("--dry-run-processes", type=int, default=0, metavar="N",
                        help="processes (GPUs) the dry run assumes (default: training.written_for, else 1)")
    args, overrides = parser.parse_known_args(argv)
    if threading.current_thread() is threading.main_thread():  # a scheduler's SIGTERM ends a run as Ctrl-C does
        signal.signal(signal.SIGTERM, _terminate)
    if args.methods:
        print(methods.table())
        return 0
    if args.plot:
        try:
            print(plot(args.plot))
        except TrainingError as e:
            print(f"train_coss.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    quiet_numba_finalizers()
    t0, cfg = time.perf_counter(), None
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:  # the same refusals the run would give, before printing what it would run
            check_options(cfg, sys.maxsize, 1)
            print_config(cfg, CONFIG_SECTIONS)
            return 0
        if args.dry_run:
            from dry_run import dry_run
            dry_run(cfg, args.dry_run_processes)
            return 0
        results = train(cfg)
    except CheckpointWriteError as e:
        hint = resume_hint(cfg, argv)
        then = hint.split("; ")[-1] if "resume with: " in hint else "start the run again"
        print(f"train_coss.py: error: {e}; once there is room, {then}", file=sys.stderr)
        return 2
    except (ConfigError, TrainingError, BetonError) as e:
        print(f"train_coss.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "DryRunError":
            raise
        print(f"train_coss.py: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"\ntrain_coss.py: terminated (SIGTERM); {resume_hint(cfg, argv)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"\ntrain_coss.py: interrupted; {resume_hint(cfg, argv)}", file=sys.stderr)
        return 130
    if results["rank"] != 0:  # only rank 0 evaluates and holds results
        return 0
    final = [v for k, v in results.items() if k.startswith("epoch")][-1]
    if args.demo:
        rnd = results.get("random_init", {})
        print(f"demo: knn={final['knn']:.4f} probe={final.get('probe', float('nan')):.4f} "
              f"(random init: knn={rnd.get('knn', float('nan')):.4f} probe={rnd.get('probe', float('nan')):.4f}) "
              f"in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    code = main()
    # numba's dispatcher finalisers (compiled FFCV pipelines) raise KeyErrors at interpreter shutdown and would
    # bury the last line; everything is written and closed by now, so leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
