"""The training step: the networks (build_model), the method's loss over packed views (method_loss, each method's
terms from the registry in methods/), and Run, which holds everything one step needs (loader, view maker,
networks, optimisers, schedules, autocast, the NaN policy). The trainer and every benchmark in bench/ run the same
Run.step; build_run builds it from a config. Also the time budget's calibration and the schedule checks."""
import math
import os
import re
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import methods
from checkpoints import rng_state, set_rng_state
from errors import TrainingError
from losses import ema_update, logo_affinity_losses, mix
from methods import forward_views, pack_views
from models import TargetNet, affinity_mlp
from optimizers import build_optimizer, lr_at, tau_at
from rf_resnet import build_backbone, memory_format
from train_data import num_images_and_classes, resolution_at, train_loader, view_maker, view_plan


def build_model(cfg, num_classes, device, init=True):
    """The networks of a run: online, EMA target, probe, LoGo's affinity MLP. init=False skips model.init (a resumed
    run restores every weight from its checkpoint, and the init file may be gone by then)."""
    width = cfg["model.width"]
    backbone = build_backbone(cfg["model.backbone"], **({"width": width} if width else {}))
    if cfg["model.init"] and init:
        load_init(backbone, cfg["model.init"])
    online = methods.build_net(backbone, cfg["method.name"], cfg["method.proj_hidden"], cfg["method.proj_dim"],
                    cfg["method.pred_hidden"], cfg["co.local_hidden"], cfg["co.local_grid"],
                    cfg["co.local_layer"], cfg["dino.out_dim"], cfg["method.proj_out_bn"],
                    cfg["method.pred_out_bn"], cfg["dino.head_bn"])
    target = TargetNet(online) if methods.get(cfg["method.name"]).ema_target else None
    probe = nn.Linear(backbone.num_features, num_classes)
    affinity = affinity_mlp(cfg["method.proj_dim"]) if cfg["logo.enabled"] else None
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
    return LossSpec(cfg["method.name"], cfg["co.w_s"], cfg["method.temperature"], cfg["co.mixing"], kernels,
                    cfg["logo.clip"], cfg["logo.lambda"], cfg["logo.enabled"], plan.n_global,
                    plan.n_local, cfg["dino.student_temp"], cfg["dino.center_momentum"])

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
        # optim.steps when set, else whole epochs; optim.minutes: set by calibrate()
        self.total_steps = cfg["optim.steps"] or cfg["optim.epochs"] * self.steps_per_epoch
        self.budgeted = False                                             # True once a time budget set it
        self.warmup_steps = cfg["optim.warmup_epochs"] * self.steps_per_epoch
        self.res, self.epoch, self.global_step = resolution_at(cfg, 0), 0, 0  # global_step: updates done so far
        self.make_views = view_maker(cfg, device)
        self.online, self.target, self.probe, self.affinity = build_model(cfg, num_classes, device, init)
        self.peak_lr = cfg["optim.lr"] * cfg["optim.batch_size"] * world / 256
        self.opt = build_optimizer(cfg, self.online, self.peak_lr)
        self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=cfg["optim.probe_lr"], momentum=0.9)
        self.aff_opt = (torch.optim.Adam(self.affinity.parameters(), lr=cfg["logo.affinity_lr"])
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
    subset drawn with training.seed, beton_files.seeded_subset) and the beton's classes (total and num_classes: the
    beton's image and class counts when the caller has read them already); without, no loader (run.step takes
    batches in the loader's format: CPU path (uint8 [B, 2, res, res, 3] views, labels), GPU path
    (ImageBytesDecoder rows, labels)) and num_classes for the probe."""
    loader, decoders = None, []
    if train_path is not None:
        from beton_files import seeded_subset
        if total is None or num_classes is None:
            total, num_classes = num_images_and_classes(train_path)
        num_train = total if num_train is None else min(num_train, total)
        indices = seeded_subset(total, num_train, cfg["training.seed"])
        loader, decoders = train_loader(cfg, train_path, indices, world, resolution_at(cfg, 0))
    return Run(cfg, device, world, loader, decoders, num_train, num_classes, init)

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
    grid = cfg["co.local_grid"]
    if grid == 1 or side == 1:
        why = ("co.local_grid=1 pools the feature map to 1x1" if side > 1 else
               f"{cfg['model.backbone']} turns a {res} px view into a 1x1 feature map (stride {res}); raise "
               f"augment.res{' and augment.res_start' if cfg['augment.res_start'] else ''} to at least {2 * res} "
               f"or choose a backbone with a smaller stride (python rf_resnet.py --list)")
        raise TrainingError(f"method.name={cfg['method.name']} needs a feature map of at least 2x2 locations, but "
                            f"{why}; with one location the local term only repeats the global one")
