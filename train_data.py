"""The training data: the betons a run reads (checked at start-up), the views every image gives (the view plan:
global and local, all from one decode), the FFCV loader, the view maker of either data path (CPU decoders or the
GPU path) and the progressive resolution."""
from typing import NamedTuple

import torch

from augment import ViewAugment
from rf_resnet import memory_format


def betons(cfg):
    """(train path, val path, train images, classes): both betons checked at start-up (complete and readable), so a
    damaged val beton stops the run now, not after the last epoch."""
    from beton_files import read_beton_info
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
    if cfg["logo.enabled"]:
        return ViewPlan(2, (cfg["logo.global_cmin"], 1.0), 2, cfg["logo.local_res"],
                        (0.05, cfg["logo.local_cmax"]))
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
    locals_ = tuple(pair[i % 2] if cfg["logo.enabled"] else local for i in range(plan.n_local))
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

def clamp_loader_workers(cfg, log=print):
    """augment.workers above what numba may use here (the cores, or NUMBA_NUM_THREADS) fails deep in FFCV's
    loader; it is lowered with one warning line instead."""
    import numba
    most = numba.config.NUMBA_NUM_THREADS
    asked = cfg["augment.workers"]
    if asked > most:
        log(f"warning: augment.workers={asked} is more than the {most} threads numba can run here; using {most}")
        cfg.content[("augment", "workers")] = most
