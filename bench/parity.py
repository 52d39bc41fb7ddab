"""Side-by-side parity: our trainer's step against an independent implementation of the same method (lightly, from
PyPI), on the same images, recipe, resolution, batch, step count, seed and initial backbone, both evaluated by the
same code (evaluate.py's kNN and linear probe, same bank and val images).

    make parity-setup                     # lightly 1.6.0 into .venv (no dependencies: our pins stay), once
    python bench/parity.py --method byol --seeds 0 1 --steps 300 --eval-every 50 --out reports/parity/byol
    python bench/parity.py --report reports/parity/byol        # the table and PNG again from rows.jsonl

Each run is one (trainer, views, seed): trainer `ours` is train_coss.build_run's Run.step (what the trainer runs);
`ref` is the method written as lightly's own example writes it (lightly's heads, loss and momentum update,
torch.optim.SGD). Views `ours` come from our FFCV decoder and ViewAugment; `ref` from lightly's transforms (PIL,
torchvision) in a torch DataLoader over the same beton's pixels. `--runs` picks the pairs: the default
ours:ours ref:ref is the comparison; ours:ref and ref:ours swap the data path between the two, to find which side
a difference comes from. Both start from the same backbone weights (built from the seed; checked).

Each run is a subprocess (the torch DataLoader's workers and FFCV's threads never share a process); its kNN rows go
to <out>/rows.jsonl as they come, and the report (<out>/parity.md, <out>/parity.png) is made from that file, so
an interrupted session keeps what finished. `--set key=value` changes the recipe of both sides (see RECIPES).
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# The shared recipe per method: one value per knob, written into both sides (ours through config keys, the
# reference through lightly's arguments). Loss scales differ between the two codes; `ref_lr` is the lr the
# reference's loss needs and `ours_lr_scale` the factor that makes our update equal (see each recipe's note).
COMMON = dict(res=32, batch=256, c_min=0.08, blur=(0.0, 0.0), proj_hidden=1024, proj_dim=128, pred_hidden=1024,
              ref_lr=0.06, tau=0.99, weight_decay=0.0, temperature=0.1)  # lightly's examples at 32 px, no blur
RECIPES = {
    "byol": dict(
        COMMON,
        note="BYOL as lightly's example: heads 1024/128, SGD momentum 0.9 at a constant lr 0.06 (lightly's loss "
             "0.5 (-cos - cos)), no weight decay, constant EMA 0.99, crop scale 0.08-1, BYOL's jitter, grey, "
             "solarize 0/0.2, no blur. Our loss (2 - 2cos summed over both pairs) has 4x lightly's gradient, so "
             "our lr is 0.06 / 4.",
        jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.0, 0.2), ours_lr_scale=0.25),
    "simclr": dict(
        COMMON,
        note="SimCLR as lightly's example: head 1024/128, NT-Xent at T 0.1 over 2B views, SGD momentum 0.9 at a "
             "constant lr 0.06, no weight decay, crop scale 0.08-1, jitter, grey, no blur, no solarize. Our loss "
             "equals lightly's NTXentLoss, so the lrs are equal. lightly's SimCLRProjectionHead ends in a "
             "BatchNorm, ours (SimCLR v1's) does not: a head difference the comparison keeps.",
        jitter=(0.8, 0.8, 0.8, 0.2), solarize=(0.0, 0.0), ours_lr_scale=1.0,
        ref_last_bn=1),  # 0: lightly's trainer with our head (no BatchNorm on the output), a swap run
    "moco_v3": dict(
        COMMON,
        note="MoCo v3 (ResNet) as its public code builds it, from lightly's blocks: projector Linear, BN, ReLU, "
             "Linear, BN without affine (lightly's ProjectionHead), predictor BYOLPredictionHead (no output BN, as "
             "the ResNet code), momentum encoder by lightly's update_momentum at a constant 0.99; the loss is the "
             "paper's Algorithm 1, ctr(q1, k2) + ctr(q2, k1) with ctr = 2T x cross-entropy of q k^T / T, at T 0.2 "
             "(lightly has no MoCo v3 loss). Views: lightly's BYOLTransform (MoCo v3 uses BYOL's augmentations), "
             "no blur. SGD momentum 0.9 at a constant lr 0.06, no weight decay. Our loss is the same sum, lr x1.",
        jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.0, 0.2), ours_lr_scale=1.0, temperature=0.2),
    "moco_v2": dict(
        COMMON,
        note="MoCo v2 as lightly's blocks build it: MoCoProjectionHead (Linear, ReLU, Linear; hidden 1024, out 128), "
             "lightly's NTXentLoss with a memory bank of 4,096 keys at T 0.2, symmetrised as solo-learn's MoCo V2+ "
             "(one bank per view: each view's queries against the other view's keys and that view's bank; ours "
             "keeps one queue of both views' keys, the same negatives in expectation), key encoder by "
             "update_momentum at a constant 0.99 (MoCo's 0.999 would barely move in 300 steps). Views: lightly's "
             "SimCLRTransform with MoCo v2's jitter 0.4/0.4/0.4/0.1, no blur. SGD momentum 0.9 at a constant lr "
             "0.06, no weight decay. Our loss is the same mean of the two directions, lr x1.",
        jitter=(0.4, 0.4, 0.4, 0.1), solarize=(0.0, 0.0), ours_lr_scale=1.0, temperature=0.2, queue=4096),
    "dino": dict(
        COMMON,
        note="DINO as lightly's example: DINOProjectionHead (hidden 1024, bottleneck 128, 4096 prototypes, "
             "GELU, no BN, weight-normalised last layer), DINOLoss (student T 0.1, teacher T 0.04 without warm-up, "
             "centre momentum 0.9) over the 2 global views, teacher = a copy of the student (DINO's code; "
             "lightly's example builds a fresh head) moved by update_momentum at a constant 0.99, last layer never "
             "frozen (300 steps are ~1 epoch: DINO's one frozen epoch would be the whole run). Views: lightly's "
             "BYOLTransform (DINO's global crops are BYOL's augmentations), no blur. SGD momentum 0.9 at a "
             "constant lr 0.06, no weight decay. Our loss is the same mean over the two pairs, lr x1.",
        jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.0, 0.2), ours_lr_scale=1.0, dino_out_dim=4096,
        student_temp=0.1, teacher_temp=0.04, center_momentum=0.9),
}


def recipe_of(method, sets):
    r = dict(RECIPES[method])
    for item in sets:
        key, _, value = item.partition("=")
        if key not in r or key == "note":
            known = ", ".join(k for k in r if k != "note")
            raise SystemExit(f"parity: --set {item}: unknown recipe key (known: {known})")
        old = r[key]
        r[key] = tuple(float(v) for v in value.split(",")) if isinstance(old, tuple) else type(old)(value)
    return r


def our_config(method, recipe, seed, extra=()):
    """Our trainer's config for the recipe (configs/fmnist.yaml, the embedded 32 px betons, then the recipe)."""
    from config import load_config
    lr_per_256 = recipe["ref_lr"] * recipe["ours_lr_scale"] * 256 / recipe["batch"]
    overrides = [
        f"--method.name={method}", f"--augment.res={recipe['res']}", f"--optim.batch_size={recipe['batch']}",
        f"--augment.c_min={recipe['c_min']}", f"--augment.p_blur1={recipe['blur'][0]}",
        *(f"--augment.{k}={v}" for k, v in zip(("brightness", "contrast", "saturation", "hue"), recipe["jitter"])),
        f"--augment.p_blur2={recipe['blur'][1]}", f"--augment.p_solarize1={recipe['solarize'][0]}",
        f"--augment.p_solarize2={recipe['solarize'][1]}", f"--method.proj_hidden={recipe['proj_hidden']}",
        f"--method.proj_dim={recipe['proj_dim']}", f"--method.pred_hidden={recipe['pred_hidden']}",
        f"--method.temperature={recipe['temperature']}", f"--optim.lr={lr_per_256}", "--optim.lr_schedule=constant",
        "--optim.warmup_epochs=0", f"--optim.weight_decay={recipe['weight_decay']}", f"--optim.tau={recipe['tau']}",
        "--optim.tau_schedule=constant", "--optim.momentum=0.9", "--optim.lars_eta=0", f"--training.seed={seed}",
        "--eval.bank_images=10000", "--eval.val_images=0",
        *([f"--dino.out_dim={recipe['dino_out_dim']}", f"--dino.student_temp={recipe['student_temp']}",
           f"--dino.teacher_temp={recipe['teacher_temp']}",
           f"--dino.warmup_teacher_temp={recipe['teacher_temp']}", "--dino.warmup_teacher_temp_epochs=0",
           f"--dino.center_momentum={recipe['center_momentum']}", "--dino.freeze_last_layer=0"]
          if method == "dino" else []),
        *([f"--moco.queue_size={recipe['queue']}", "--method.proj_hidden=1024"] if method == "moco_v2" else []),
        *extra]
    return load_config(os.path.join(ROOT, "configs", "fmnist.yaml"), overrides)


# ---------------------------------------------------------------------------------------------------------------
# The reference: lightly's modules and loss, written as lightly's examples write them (MoCo v3: lightly's blocks and
# the paper's Algorithm 1, since lightly has no MoCo v3 loss).

def reference_model(method, backbone, dim, recipe):
    import torch.nn as nn
    import torch
    import torch.nn.functional as F
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules.heads import (BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead,
                                              ProjectionHead, SimCLRProjectionHead)
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class Features(nn.Module):  # our backbones return (map, pooled); lightly's examples take the pooled vector
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[1]

    class Momentum(nn.Module):
        """A backbone and projection head with their momentum copies, moved by lightly's update_momentum (the
        pattern of lightly's BYOL and MoCo examples); subclasses add their heads and loss."""

        def __init__(self, projection_head):
            super().__init__()
            self.backbone = Features(backbone)
            self.projection_head = projection_head
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def step_momentum(self):
            update_momentum(self.backbone, self.backbone_momentum, m=recipe["tau"])
            update_momentum(self.projection_head, self.projection_head_momentum, m=recipe["tau"])

        @torch.no_grad()
        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x))

    if method == "byol":
        class BYOL(Momentum):
            def __init__(self):
                super().__init__(BYOLProjectionHead(dim, recipe["proj_hidden"], recipe["proj_dim"]))
                self.prediction_head = BYOLPredictionHead(recipe["proj_dim"], recipe["pred_hidden"],
                                                          recipe["proj_dim"])
                self.criterion = NegativeCosineSimilarity()

            def forward(self, x):
                return self.prediction_head(self.projection_head(self.backbone(x)))

            def training_loss(self, x0, x1, step):
                self.step_momentum()
                p0, p1 = self(x0), self(x1)
                z0, z1 = self.forward_momentum(x0), self.forward_momentum(x1)
                return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return BYOL()

    if method == "moco_v3":
        def ctr(q, k):  # MoCo v3, Algorithm 1: 2T x cross-entropy of the unit queries against the unit keys
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
            logits = q @ k.T / recipe["temperature"]
            return 2 * recipe["temperature"] * F.cross_entropy(logits, torch.arange(len(q)))

        class MoCoV3(Momentum):
            def __init__(self):
                hidden, out = recipe["proj_hidden"], recipe["proj_dim"]
                super().__init__(ProjectionHead([(dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU()),
                                                 (hidden, out, nn.BatchNorm1d(out, affine=False), None)]))
                self.prediction_head = BYOLPredictionHead(out, recipe["pred_hidden"], out)

            def training_loss(self, x0, x1, step):
                self.step_momentum()
                q0, q1 = (self.prediction_head(self.projection_head(self.backbone(x))) for x in (x0, x1))
                k0, k1 = self.forward_momentum(x0), self.forward_momentum(x1)
                return ctr(q0, k1) + ctr(q1, k0)
        return MoCoV3()

    if method == "moco_v2":
        from lightly.models.modules.heads import MoCoProjectionHead

        class MoCoV2(Momentum):
            def __init__(self):
                super().__init__(MoCoProjectionHead(dim, recipe["proj_hidden"], recipe["proj_dim"]))
                self.criteria = nn.ModuleList(  # one memory bank per view, as solo-learn's MoCo V2+
                    NTXentLoss(temperature=recipe["temperature"], memory_bank_size=(recipe["queue"], recipe["proj_dim"]))
                    for _ in range(2))

            def training_loss(self, x0, x1, step):
                self.step_momentum()
                q0, q1 = (self.projection_head(self.backbone(x)) for x in (x0, x1))
                k0, k1 = self.forward_momentum(x0), self.forward_momentum(x1)
                return 0.5 * (self.criteria[0](q0, k1) + self.criteria[1](q1, k0))
        return MoCoV2()

    if method == "dino":
        class DINO(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = Features(backbone)
                def head():
                    return DINOProjectionHead(dim, recipe["proj_hidden"], recipe["proj_dim"], recipe["dino_out_dim"],
                                              batch_norm=False, norm_last_layer=True)
                self.head, self.teacher_head = head(), head()  # weight_norm modules cannot be deep-copied
                self.teacher_head.load_state_dict(self.head.state_dict())  # the teacher starts as the student
                self.teacher_backbone = copy.deepcopy(self.backbone)
                deactivate_requires_grad(self.teacher_backbone)
                deactivate_requires_grad(self.teacher_head)
                self.criterion = DINOLoss(output_dim=recipe["dino_out_dim"], warmup_teacher_temp=recipe["teacher_temp"],
                                          teacher_temp=recipe["teacher_temp"], warmup_teacher_temp_epochs=0,
                                          student_temp=recipe["student_temp"],
                                          center_momentum=recipe["center_momentum"])

            def training_loss(self, x0, x1, step):
                update_momentum(self.backbone, self.teacher_backbone, m=recipe["tau"])
                update_momentum(self.head, self.teacher_head, m=recipe["tau"])
                with torch.no_grad():
                    teacher = [self.teacher_head(self.teacher_backbone(x)) for x in (x0, x1)]
                student = [self.head(self.backbone(x)) for x in (x0, x1)]
                return self.criterion(teacher, student, teacher_temp=recipe["teacher_temp"])
        return DINO()

    class SimCLR(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Features(backbone)
            if recipe["ref_last_bn"]:  # lightly's SimCLR head: Linear, BN, ReLU, Linear, BN
                self.projection_head = SimCLRProjectionHead(dim, recipe["proj_hidden"], recipe["proj_dim"])
            else:  # ours (SimCLR v1's): no BatchNorm on the output
                hidden, out = recipe["proj_hidden"], recipe["proj_dim"]
                self.projection_head = ProjectionHead([(dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU()),
                                                       (hidden, out, None, None)])
            self.criterion = NTXentLoss(temperature=recipe["temperature"])

        def training_loss(self, x0, x1, step):
            return self.criterion(self.projection_head(self.backbone(x0)), self.projection_head(self.backbone(x1)))
    return SimCLR()


def reference_transform(method, recipe):
    from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform)
    b, c, s, h = recipe["jitter"]
    jitter = dict(cj_bright=b, cj_contrast=c, cj_sat=s, cj_hue=h)
    if method in ("byol", "moco_v3", "dino"):  # MoCo v3's and DINO's (global) views are BYOL's augmentations
        common = dict(input_size=recipe["res"], min_scale=recipe["c_min"], **jitter)
        return BYOLTransform(
            BYOLView1Transform(gaussian_blur=recipe["blur"][0], solarization_prob=recipe["solarize"][0], **common),
            BYOLView2Transform(gaussian_blur=recipe["blur"][1], solarization_prob=recipe["solarize"][1], **common))
    return SimCLRTransform(input_size=recipe["res"], min_scale=recipe["c_min"], gaussian_blur=recipe["blur"][0],
                           **jitter)


class PixelViews:
    """A map-style dataset over the beton's pixels: item i -> (lightly's views of image i, label)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def beton_pixels(path):
    """Every image of a raw, fixed-size beton as uint8 [N, H, W, 3] and its labels [N] (file order)."""
    import numpy as np
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    loader = Loader(path, batch_size=1000, num_workers=2, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    images, labels = [], []
    for x, y in loader:
        images.append(x.numpy().copy())
        labels.append(y.view(-1).numpy().copy())
    return np.concatenate(images), np.concatenate(labels)


def reference_views(method, recipe, train_path, seed, workers):
    """Endless (x0, x1, labels) batches from lightly's transforms in a torch DataLoader (shuffled with the seed)."""
    import torch
    images, labels = beton_pixels(train_path)
    data = PixelViews(images, labels, reference_transform(method, recipe))
    loader = torch.utils.data.DataLoader(
        data, batch_size=recipe["batch"], shuffle=True, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers else None)
    while True:
        for (x0, x1), y in loader:
            yield x0, x1, y


def our_views(cfg, train_path, seed):
    """Endless (x0, x1, labels) batches from our loader and view maker (the trainer's data path, its generators)."""
    import torch
    from train_data import num_images_and_classes, train_loader, view_maker
    from beton_files import seeded_subset
    total, _ = num_images_and_classes(train_path)
    loader, _ = train_loader(cfg, train_path, seeded_subset(total, 0, seed), 1, cfg["augment.res"])
    make, step, epoch = view_maker(cfg, torch.device("cpu")), 0, 0
    while True:
        loader.next_epoch = epoch
        for batch in loader:
            gen = torch.Generator().manual_seed(cfg["training.seed"] * 1_000_003 + step)  # Run.generator's
            (x0, x1), _, y = make(batch, cfg["augment.res"], gen)
            yield x0, x1, y
            step += 1
        epoch += 1


# ---------------------------------------------------------------------------------------------------------------
# One run: trainer x views x seed, in its own process.

def one_run(args):
    import numpy as np
    import torch
    from evaluate import evaluate
    from rf_resnet import build_backbone
    from step import Prepared, build_run
    from train_data import betons
    from beton_files import quiet_numba_finalizers
    quiet_numba_finalizers()
    recipe = recipe_of(args.method, args.set)
    trainer, views = args.one.split(":")
    seed = args.seeds[0]
    cfg = our_config(args.method, recipe, seed, args.ours)
    train_path, val_path, total, num_classes = betons(cfg)
    device = torch.device("cpu")

    def measure(backbone, final):
        return evaluate(cfg, backbone, None, device, num_classes, cfg["augment.res"], final, train_path, val_path)

    torch.manual_seed(seed)
    np.random.seed(seed)
    if trainer == "ours":
        run = build_run(cfg, device, 1, train_path if views == "ours" else None, None, num_classes, total)
        run.set_total_steps(args.steps)
        backbone = run.online.backbone
    else:
        backbone = build_backbone(cfg["model.backbone"])
        model = reference_model(args.method, backbone, backbone.num_features, recipe)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=recipe["ref_lr"], momentum=0.9,
                              weight_decay=recipe["weight_decay"])
    torch.manual_seed(seed)
    check = build_backbone(cfg["model.backbone"]).state_dict()
    same_init = all(torch.equal(v, backbone.state_dict()[k]) for k, v in check.items())
    if trainer == "ours" and views == "ours":
        batches = run.endless()
    elif views == "ours":
        batches = our_views(cfg, train_path, seed)
    else:
        batches = reference_views(args.method, recipe, train_path, seed, args.workers)

    out = open(os.path.join(args.out, "rows.jsonl"), "a")

    def row(step, metrics, seconds):
        out.write(json.dumps({"method": args.method, "trainer": trainer, "views": views, "seed": seed, "step": step,
                              "train_s": round(seconds, 1), "same_init": same_init, "recipe_set": args.set,
                              "ours_set": args.ours, **metrics}) + "\n")
        out.flush()
        print(f"parity {trainer}:{views} seed {seed} step {step}: " +
              " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)

    row(0, measure(backbone, True), 0.0)
    train_s, step, last_loss = 0.0, 0, float("nan")
    while step < args.steps:
        t = time.perf_counter()
        batch = next(batches)
        if trainer == "ours":
            if views == "ours":
                terms, _, _ = run.step(batch)
            else:
                x0, x1, y = batch
                fmt = torch.channels_last if cfg["training.channels_last"] else torch.contiguous_format
                terms, _, _ = run.step(Prepared(step, (x0.contiguous(memory_format=fmt),
                                                       x1.contiguous(memory_format=fmt)), None, y.view(-1).long()))
            last_loss = float(terms["loss"].detach())
        else:
            x0, x1, _ = batch
            model.train()
            loss = model.training_loss(x0, x1, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            last_loss = float(loss.detach())
        train_s += time.perf_counter() - t
        step += 1
        if not np.isfinite(last_loss):
            raise SystemExit(f"parity: {trainer}:{views} seed {seed}: loss {last_loss} at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            final = step == args.steps
            row(step, {**measure(backbone, final), "loss": last_loss}, train_s)
    out.close()


# ---------------------------------------------------------------------------------------------------------------
# The report: a table and one PNG from rows.jsonl.

def variant(method, recipe_set, ours_set):
    """A run's name in the report: the method, then any --set / --ours changes (a swap or recipe variant)."""
    return " ".join([method, *recipe_set, *ours_set])


def report(out_dir):
    import statistics
    path = os.path.join(out_dir, "rows.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"parity: {path} does not exist (run bench/parity.py with --out {out_dir} first)")
    rows, bad = [], 0
    for line in open(path):
        try:
            r = json.loads(line)
            if all(k in r for k in ("method", "trainer", "views", "seed", "step", "knn", "train_s", "same_init")):
                rows.append(r)
                continue
        except ValueError:
            pass
        bad += bool(line.strip())
    if bad:
        print(f"parity: skipped {bad} unreadable row(s) of {path} (a run cut while writing?)")
    if not rows:
        raise SystemExit(f"parity: {path} holds no rows")
    runs = {}
    for r in rows:
        runs.setdefault((variant(r["method"], r.get("recipe_set", []), r.get("ours_set", [])), r["trainer"], r["views"],
                         r["seed"]), []).append(r)
    lines = ["| method | trainer | views | seed | steps | train s | same init | kNN at 0 | kNN | probe at 0 | probe "
             "| kNN gain | probe gain |", "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    finals, longest = {}, max(r["step"] for r in rows)
    for key, rs in sorted(runs.items()):
        rs.sort(key=lambda r: r["step"])
        first, last = rs[0], rs[-1]
        if last["step"] < longest:  # a run that was stopped: in the table, not in the means
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {last['step']} (stopped) | "
                         f"{last['train_s']:.0f} | {'yes' if first['same_init'] else 'NO'} | {first['knn']:.4f} | "
                         f"{last['knn']:.4f} | | | | |")
            continue
        finals.setdefault(key[:3], []).append((last["knn"] - first["knn"], last.get("probe", float("nan")) -
                                               first.get("probe", float("nan")), last["knn"], last.get("probe")))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {last['step']} | {last['train_s']:.0f} | "
                     f"{'yes' if first['same_init'] else 'NO'} | {first['knn']:.4f} | {last['knn']:.4f} | "
                     f"{first.get('probe', float('nan')):.4f} | {last.get('probe', float('nan')):.4f} | "
                     f"{100 * (last['knn'] - first['knn']):+.1f} | "
                     f"{100 * (last.get('probe', float('nan')) - first.get('probe', float('nan'))):+.1f} |")
    lines += ["", "| method | trainer | views | runs | kNN mean | kNN gain mean | probe mean | probe gain mean |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, fs in sorted(finals.items()):
        mean = lambda i: statistics.mean(f[i] for f in fs)  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(fs)} | {mean(2):.4f} | {100 * mean(0):+.1f} | "
                     f"{mean(3):.4f} | {100 * mean(1):+.1f} |")
    with open(os.path.join(out_dir, "parity.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for (method, trainer, views, seed), rs in sorted(runs.items()):
        if rs[-1]["step"] < longest:
            continue
        who = {"ours": "our Run", "ref": "lightly"}
        label = f"{method}: {who[trainer]}, {'our' if views == 'ours' else 'lightly'} views"
        colour = colours.setdefault(label, f"C{len(colours)}")
        ax.plot([r["step"] for r in rs], [r["knn"] for r in rs], color=colour, marker="o", markersize=3,
                linestyle=("-", "--", ":", "-.")[seed % 4], label=f"{label}, seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("kNN accuracy (k 20, 10,000-image bank, 10,000 val)")
    ax.set_title("Parity: kNN against step (step 0 = the shared random init)\n"
                 "same pixels, recipe, steps, seed and initial backbone; one evaluation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, handlelength=4)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "parity.png"), dpi=120)
    print(f"parity: wrote {out_dir}/parity.md and {out_dir}/parity.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=sorted(RECIPES), default="byol")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--runs", nargs="+", default=["ours:ours", "ref:ref"],
                   help="trainer:views pairs, each of ours/ref (default: ours:ours ref:ref)")
    p.add_argument("--set", action="append", default=[], help="recipe key=value for both sides (RECIPES)")
    p.add_argument("--ours", action="append", default=[], help="an extra --section.key=value for our side only")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference views")
    p.add_argument("--out", default="reports/parity/byol")
    p.add_argument("--report", metavar="DIR", help="only write the table and PNG of DIR/rows.jsonl")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        return report(args.report)
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        one_run(args)
        # its rows are written and closed: leave without the interpreter's teardown, where FFCV's and the
        # DataLoader's threads have aborted a finished run ("terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    try:
        import lightly  # noqa: F401
    except ImportError:
        raise SystemExit("parity: lightly is not installed; run `make parity-setup` first") from None
    recipe_of(args.method, args.set)  # a bad --set is refused here, before any run starts
    for run in args.runs:
        if run.count(":") != 1 or any(s not in ("ours", "ref") for s in run.split(":")):
            raise SystemExit(f"parity: --runs {run}: expected trainer:views with each of ours/ref")
    rows_path = os.path.join(args.out, "rows.jsonl")
    done = set()
    if os.path.isfile(rows_path):
        for line in open(rows_path):
            try:
                r = json.loads(line)
                done.add((variant(r["method"], r.get("recipe_set", []), r.get("ours_set", [])),
                          f"{r['trainer']}:{r['views']}", r["seed"]))
            except (ValueError, KeyError, TypeError):
                continue
    name = variant(args.method, args.set, args.ours)
    again = [f"{run} seed {seed}" for seed in args.seeds for run in args.runs if (name, run, seed) in done]
    if again:
        raise SystemExit(f"parity: {rows_path} already holds {', '.join(again)}; give another --out (or move that "
                         f"file aside) so two runs' rows never mix")
    for seed in args.seeds:  # seeds outermost: a cut-short session still has both sides of the first seed
        for run in args.runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", run, "--method", args.method, "--seeds",
                   str(seed), "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--out", args.out,
                   "--workers", str(args.workers), *sum((["--set", s] for s in args.set), []),
                   *(f"--ours={s}" for s in args.ours)]
            t = time.perf_counter()
            if subprocess.run(cmd, cwd=ROOT).returncode:
                raise SystemExit(f"parity: the run {run} seed {seed} failed")
            print(f"parity: {run} seed {seed} took {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    report(args.out)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # our refusals carry their one line: print it, exit 2 (no traceback)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
