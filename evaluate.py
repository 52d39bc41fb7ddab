"""Evaluation: the trainer's monitors, and the evaluation suite for checkpoints.

    python evaluate.py --ckpt runs/<run>                          # -> runs/<run>/eval/{eval.json, eval.md, *.png}
    python evaluate.py --compare runs/<a> runs/<b> --names BYOL CO-BYOL --out reports/byol_vs_co_byol
    (any --section.key=value after these overrides the run's config, e.g. --linear.epochs=30)

Monitors (train_coss.py calls `evaluate`): weighted kNN (k, T) on L2-normalised pooled features against a bank of
train images, the online linear probe, and a linear probe fitted on frozen features (full-batch L-BFGS).
Suite (`evaluate_checkpoint`): kNN at each linear.knn_k; offline linear evaluation (SGD on precomputed centre-crop
features: our departure from the usual 100-epoch protocol with random-resized-crop augmentation, which costs a
backbone pass per image per epoch); robustness of backbone + that linear head (robustness.py: common corruptions at
5 severities, masked patches, L-inf PGD); analyses (analyses.py: global vs local similarity of image pairs with its
Pearson r, local redundancy, effective receptive fields). Images are centre-cropped (eval.crop_ratio) and resized
to the training resolution (augment.res).
"""
import argparse
import json
import shlex
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import uint8_hwc_to_normalized
from config import ConfigError, upgrade
from beton_files import BetonError, quiet_numba_finalizers, seeded_subset

# Every "N images" of the evaluations is a random subset drawn with this seed: the same images for every run and
# method compared, and never the first N of a class-ordered beton.
EVAL_SUBSET_SEED = 0


def eval_loader(cfg, path, n_images, res):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor
    total = len(Reader(path).metadata)
    indices = seeded_subset(total, n_images, EVAL_SUBSET_SEED)
    return Loader(path, batch_size=256, num_workers=cfg["augment.workers"], order=OrderOption.SEQUENTIAL,
                  indices=indices, drop_last=False,
                  pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=cfg["eval.crop_ratio"]),
                                       ToTensor()], "label": [IntDecoder(), ToTensor()]})


@torch.no_grad()
def extract_features(backbone, loader, device, fmt=torch.channels_last):
    backbone.eval()
    feats, labels = [], []
    for images, y in loader:
        x = uint8_hwc_to_normalized(images.to(device), fmt)
        feats.append(backbone(x)[1].float().cpu())  # pooled features [B, C], not normalised
        labels.append(y.view(-1).long().clone())  # FFCV reuses its output buffers: copy what we keep
    backbone.train()
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(bank, bank_y, query, query_y, num_classes, k=20, t=0.07, chunk=1024):
    """Weighted kNN on L2-normalised features: votes exp(sim / t) of the k most similar bank items."""
    correct = 0
    for i in range(0, len(query), chunk):
        sim, idx = (query[i:i + chunk] @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, bank_y[idx], (sim / t).exp())
        correct += int((votes.argmax(1) == query_y[i:i + chunk]).sum())
    return correct / len(query)


def feature_probe_accuracy(train_f, train_y, val_f, val_y, num_classes, iters, weight_decay=1e-4):
    """A linear classifier on frozen, standardised features: full-batch L-BFGS on cross-entropy + L2 (a convex
    problem, so the result does not hinge on a learning rate), then val accuracy."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    xs, xv = (train_f - mean) / std, (val_f - mean) / std
    clf = nn.Linear(xs.shape[1], num_classes)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(xs), train_y) + weight_decay * clf.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float((clf(xv).argmax(1) == val_y).float().mean())


def evaluate(cfg, backbone, probe, device, num_classes, res, with_probe_fit, train_path, val_path):
    """kNN on L2-normalised features, the online probe on the raw pooled features, and (at the end) a linear probe
    fitted on the frozen normalised features; one feature pass over the bank and one over val."""
    from rf_resnet import memory_format
    fmt = memory_format(cfg["training.channels_last"])
    train_f, train_y = extract_features(backbone, eval_loader(cfg, train_path, cfg["eval.bank_images"], res), device,
                                        fmt)
    val_raw, val_y = extract_features(backbone, eval_loader(cfg, val_path, cfg["eval.val_images"], res), device, fmt)
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_raw, dim=1)
    out = {"knn": knn_accuracy(train_f, train_y, val_f, val_y, num_classes, cfg["eval.k"], cfg["eval.t"])}
    if probe is not None:
        with torch.no_grad():
            logits = probe(val_raw.to(device)).cpu()
        out["online_probe"] = float((logits.argmax(1) == val_y).float().mean())
    if with_probe_fit and cfg["eval.probe_iters"]:
        out["probe"] = feature_probe_accuracy(train_f, train_y, val_f, val_y, num_classes, cfg["eval.probe_iters"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The evaluation suite: python evaluate.py --ckpt RUN_DIR   |   python evaluate.py --compare RUN_A RUN_B --out DIR

class CheckpointError(ValueError):
    """A checkpoint that must not be used: missing, empty, truncated, foreign, incomplete or non-finite."""


CHECKPOINT_KEYS = ("online", "target", "probe", "opt", "probe_opt", "epoch", "step", "rng", "config")


def nonfinite_tensors(tree, name=""):
    """Names of the floating-point tensors in a nested state (dicts, lists, tuples) that hold a NaN or an inf."""
    if isinstance(tree, torch.Tensor):
        return [name] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    return [bad for k, v in items for bad in nonfinite_tensors(v, f"{name}.{k}" if name else str(k))]


def read_checkpoint(path):
    """A train_coss.py checkpoint.pt as a dict, or CheckpointError with one line saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (give a run folder or its checkpoint.pt)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a text file: torch raises many kinds
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated or not one: {why})") from None
    if isinstance(ck, dict) and ck and all(isinstance(v, torch.Tensor) for v in ck.values()) and "online" not in ck:
        raise CheckpointError(f"{path} holds bare weights (an exported backbone.pt?), not a train_coss.py "
                              f"checkpoint: give the run folder or its checkpoint.pt, which also holds the config")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a complete train_coss.py checkpoint (missing {', '.join(missing)})")
    bad = nonfinite_tensors(ck)
    if bad:
        raise CheckpointError(f"{path} holds NaN/inf in {len(bad)} tensors (e.g. {', '.join(bad[:3])}); refusing "
                              f"to use it")
    ck["config"] = upgrade(ck["config"])  # keys an older version named otherwise, under today's names
    return ck


def read_jsonl(path):
    """The rows of a JSON-lines file (log.jsonl) and the count of lines that are not JSON objects (a row cut by a
    crash, a damaged file): skipped and counted, never a traceback."""
    rows, bad = [], 0
    with open(path, errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def checkpoint_identity(path):
    """What a stored evaluation was computed from: the checkpoint's step and the SHA-256 of its bytes (a reused
    eval.json must come from the very checkpoint on disk, not an earlier one of the same run)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def load_backbone(ckpt, device):
    """A run folder or its checkpoint.pt -> (backbone with the online weights, the run's config dict)."""
    from rf_resnet import build_backbone
    path = os.path.join(ckpt, "checkpoint.pt") if os.path.isdir(ckpt) else ckpt
    ck = read_checkpoint(path)
    model = ck["config"]["model"]
    try:
        backbone = build_backbone(model["backbone"], **({"width": model["width"]} if model["width"] else {}))
        state = {k[len("backbone."):]: v for k, v in ck["online"].items() if k.startswith("backbone.")}
        backbone.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"{path}: its backbone weights do not fit its model settings {model} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return backbone.to(device, memory_format=torch.channels_last).eval(), ck["config"]


# the sections only the suite reads (it also takes the run's data, model, augment and eval settings)
EVAL_SECTIONS = ("linear", "robust", "analysis")


class EvalError(RuntimeError):
    """One line for the user (bad checkpoint, missing beton)."""


def run_config(run_cfg, overrides):
    """The evaluation config: the run's data, model, augment and eval settings, then the user's overrides."""
    from config import load_config
    args = []
    for section in ("data", "model", "augment", "eval"):
        for key, value in run_cfg.get(section, {}).items():
            value = int(value) if isinstance(value, bool) else value
            args.append(f"--{section}.{key}={','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return load_config(None, args + list(overrides))


@torch.no_grad()
def val_images(cfg, path, n, res):
    """n val images (a seeded random subset, all when n is 0), centre-cropped as for kNN: uint8 [n, res, res, 3],
    labels [n]."""
    xs, ys = [], []
    for images, y in eval_loader(cfg, path, n, res):
        xs.append(images.clone())
        ys.append(y.view(-1).long().clone())
    return torch.cat(xs), torch.cat(ys)


class LinearHead(nn.Module):
    """Standardise pooled features with the train set's statistics, then one linear layer."""

    def __init__(self, mean, std, num_classes):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.fc = nn.Linear(mean.shape[0], num_classes)

    def forward(self, f):
        return self.fc((f - self.mean) / self.std)


def train_linear(train_f, train_y, num_classes, epochs, batch_size, lr, weight_decay, seed=0):
    """SGD (momentum 0.9, cosine lr from lr x batch / 256) on precomputed frozen features; returns the head."""
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(train_f.mean(0), train_f.std(0) + 1e-6, num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * -(-len(train_f) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_f), generator=g).split(batch_size):
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def topk(logits, y, ks=(1, 5)):
    top = logits.topk(max(ks), dim=1).indices
    return {f"top{k}": float((top[:, :k] == y[:, None]).any(1).float().mean()) for k in ks if k <= logits.shape[1]}


def robustness(cfg, classify, x, y, device, log=print):
    """Top-1 of classify (float [0, 1] images -> logits) under corruptions, masking and PGD, on x uint8 [N,H,W,3]."""
    from robustness import corrupt, mask_patches, pgd_attack
    x = x.permute(0, 3, 1, 2).float().div(255)
    g = torch.Generator().manual_seed(cfg["robust.seed"])

    def accuracy(transform):  # transform(images, labels) -> images; batches of 250, scored on `device`
        correct = 0
        for xb, yb in zip(x.split(250), y.split(250)):
            xb = transform(xb, yb).to(device)
            with torch.no_grad():
                correct += int((classify(xb).argmax(1).cpu() == yb).sum())
        return correct / len(x)

    out = {"clean": accuracy(lambda b, _: b), "corruptions": {}, "masking": {}, "pgd": {}}
    for name in cfg["robust.corruptions"]:
        out["corruptions"][name] = {str(s): accuracy(lambda b, _, s=s: corrupt(b, name, s, g))
                                    for s in range(1, cfg["robust.severities"] + 1)}
        log(f"  {name}, top-1 at severity " + ", ".join(f"{k}: {v:.3f}" for k, v in out["corruptions"][name].items()))
    for f in cfg["robust.mask_fractions"]:
        out["masking"][f"{f:g}"] = accuracy(lambda b, _, f=f: mask_patches(b, f, cfg["robust.mask_patch"],
                                                                             cfg["robust.mask_fill"], g))
    for eps in cfg["robust.pgd_eps"]:
        out["pgd"][f"{eps:g}"] = accuracy(lambda b, t, eps=eps: pgd_attack(
            classify, b.to(device), t.to(device), eps / 255, cfg["robust.pgd_steps"]))
    if out["corruptions"]:
        out["corruption_mean"] = float(np.mean([v for c in out["corruptions"].values() for v in c.values()]))
    return out


def evaluate_checkpoint(ckpt, out_dir, overrides=(), device="cpu", log=print, name=None):
    """The whole suite on one checkpoint: kNN (each linear.knn_k), offline linear evaluation (top-1/top-5),
    robustness, analyses; writes eval.json, eval.md, the PNGs (titled `name`, default the run folder's name) and
    analysis.npz (what the PNGs show, so a report can redraw them under other names) into out_dir. Returns the
    results dict."""
    from analyses import effective_receptive_fields, global_local_similarity, plot_erf, plot_similarity
    from augment import normalize
    from beton_files import read_beton_info
    device = torch.device(device)
    backbone, run_cfg = load_backbone(ckpt, device)
    cfg = run_config(run_cfg, overrides)
    paths = {s: read_beton_info(cfg, s)[0] for s in ("train", "val")}
    res = cfg["augment.res"]
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    train_f, train_y = extract_features(backbone, eval_loader(cfg, paths["train"], cfg["linear.train_images"], res),
                                        device)
    val_f, val_y = extract_features(backbone, eval_loader(cfg, paths["val"], cfg["eval.val_images"], res), device)
    backbone.eval()
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    ck_file = os.path.join(ckpt, "checkpoint.pt") if os.path.isdir(ckpt) else ckpt
    out = {"checkpoint": os.path.abspath(ckpt), "checkpoint_id": checkpoint_identity(ck_file),
           "config": {s: run_cfg.get(s) for s in ("model", "method", "co", "logo", "moco", "dino")},
           "settings": eval_settings(cfg), "images": {"train": len(train_f), "val": len(val_f)}, "knn": {}}
    bank, query = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    for k in cfg["linear.knn_k"]:
        out["knn"][str(int(k))] = knn_accuracy(bank, train_y, query, val_y, num_classes, int(k), cfg["eval.t"])
    head = train_linear(train_f, train_y, num_classes, cfg["linear.epochs"], cfg["linear.batch_size"],
                        cfg["linear.lr"], cfg["linear.weight_decay"])
    with torch.no_grad():
        out["linear"] = topk(head(val_f), val_y)
    log("kNN top-1 " + ", ".join(f"(k={k}) {v:.4f}" for k, v in out["knn"].items()) + "; linear "
        + ", ".join(f"{k} {v:.4f}" for k, v in out["linear"].items()) + f" ({time.perf_counter() - t0:.0f} s)")

    head = head.to(device)

    def classify(x01):  # float [0, 1] images -> logits of the frozen backbone + linear head
        return head(backbone(normalize(x01))[1].float())
    x, y = val_images(cfg, paths["val"], cfg["robust.images"], res)
    out["robustness"] = robustness(cfg, classify, x, y, device, log)
    rob = out["robustness"]
    log(f"robustness, top-1: clean {rob['clean']:.3f}; masked cells (fraction: top-1) "
        + ", ".join(f"{k}: {v:.3f}" for k, v in rob["masking"].items()) + "; PGD (eps/255: top-1) "
        + ", ".join(f"{k}: {v:.3f}" for k, v in rob["pgd"].items()) + f" ({time.perf_counter() - t0:.0f} s)")

    xs = uint8_hwc_to_normalized(x.to(device))
    glob, local, r, redundancy = global_local_similarity(backbone, xs, cfg["analysis.pairs"],
                                                         torch.Generator().manual_seed(0))
    out["analysis"] = {"pearson_global_local": r, "local_redundancy": redundancy,
                       "mean_global_cos": float(glob.mean()), "mean_local_cos": float(local.mean())}
    name = name or os.path.basename(os.path.normpath(ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt)))
    plot_similarity(glob, local, r, os.path.join(out_dir, "similarity.png"), name)
    i = min(cfg["analysis.erf_image"], len(x) - 1)
    with torch.no_grad():
        hw = backbone(xs[i:i + 1])[0].shape[-2:]
    locations = [(hw[0] // 4, hw[1] // 4), (hw[0] // 4, 3 * hw[1] // 4), (3 * hw[0] // 4, hw[1] // 4),
                 (3 * hw[0] // 4, 3 * hw[1] // 4)]
    maps = effective_receptive_fields(backbone, xs[i:i + 1].float(), locations)
    plot_erf(x[i].numpy(), maps.cpu(), locations, backbone.layout, os.path.join(out_dir, "erf.png"), name)
    tmp = os.path.join(out_dir, f"analysis.tmp-{os.getpid()}.npz")
    np.savez(tmp, glob=glob.cpu().numpy(), local=local.cpu().numpy(), r=r, image=x[i].numpy(),
             maps=maps.cpu().numpy(), locations=np.array(locations))
    os.replace(tmp, os.path.join(out_dir, "analysis.npz"))
    out["seconds"] = time.perf_counter() - t0
    _write_json(os.path.join(out_dir, "eval.json"), out)
    with open(os.path.join(out_dir, "eval.md"), "w") as fh:
        fh.write(markdown_tables({name: out}))
    log(f"wrote {out_dir}/: eval.json (every number and the settings), eval.md (tables), similarity.png, erf.png, "
        f"analysis.npz (the pictures' data)")
    return out


def eval_settings(cfg):
    """What an evaluation's numbers depend on besides the weights: stored in eval.json, so that --compare can tell
    whether a stored evaluation answers the question asked now."""
    from config import as_dict
    d = json.loads(json.dumps(as_dict(cfg)))  # tuples as lists, as they come back from the file
    return {"data": {k: d["data"][k] for k in ("beton_dir", "name")}, "augment": {"res": d["augment"]["res"]},
            "eval": {k: d["eval"][k] for k in ("t", "val_images", "crop_ratio")},
            **{section: d[section] for section in EVAL_SECTIONS}}


def settings_differ(stored, wanted):
    """['linear.epochs: 100 stored, 30 asked', ...] (empty when equal; an eval.json without settings differs)."""
    if stored is None:
        return ["no settings recorded (an older eval.json)"]
    return [f"{sec}.{k}: {stored.get(sec, {}).get(k)!r} stored, {v!r} asked" for sec, keys in wanted.items()
            for k, v in keys.items() if stored.get(sec, {}).get(k) != v]


def markdown_tables(results):
    """results: {name: eval.json dict} -> Markdown: accuracy, robustness, analyses (one column per run)."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def row(label, get):
        cells = []
        for n in names:
            try:
                v = get(results[n])
                cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
            except (KeyError, TypeError):
                cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = results[names[0]]
    for k in first["knn"]:
        row(f"kNN top-1 (k={k}, T=0.07)", lambda r, k=k: r["knn"][k])
    row("linear top-1", lambda r: r["linear"]["top1"])
    row("linear top-5", lambda r: r["linear"]["top5"])
    rob = first["robustness"]
    row(f"clean top-1 ({'robustness subset'})", lambda r: r["robustness"]["clean"])
    for c, sev in rob["corruptions"].items():
        row(f"{c}, mean of severities 1-{len(sev)}",
            lambda r, c=c: float(np.mean(list(r["robustness"]["corruptions"][c].values()))))
    if "corruption_mean" in rob:
        row("all corruptions, mean", lambda r: r["robustness"]["corruption_mean"])
    for f in rob["masking"]:
        row(f"masked cells {f}", lambda r, f=f: r["robustness"]["masking"][f])
    for e in rob["pgd"]:
        row(f"PGD eps {e}/255", lambda r, e=e: r["robustness"]["pgd"][e])
    row("Pearson r, global vs local similarity", lambda r: r["analysis"]["pearson_global_local"])
    row("local redundancy (mean intra-image cos)", lambda r: r["analysis"]["local_redundancy"])
    return "\n".join(lines) + "\n"


def compare(runs, names, out_dir, overrides=(), device="cpu", log=print, command=None):
    """Side-by-side report of runs: evaluates each (or reuses its <run>/eval/eval.json when it was made with the
    settings asked now; otherwise evaluates again and says why), then writes out_dir/report.md with training curves,
    the metric tables and robustness plots. `command`: the command line for the report's "made by" line."""
    from analyses import plot_curves, plot_robustness
    os.makedirs(out_dir, exist_ok=True)
    results, logs = {}, {}
    for run, name in zip(runs, names):
        eval_dir = os.path.join(run, "eval")
        path = os.path.join(eval_dir, "eval.json")
        stored = None
        if os.path.isfile(path):
            try:
                stored = json.load(open(path, errors="replace"))
            except ValueError:
                log(f"{path} is damaged (not JSON); evaluating {run} again")
            if stored is not None and not isinstance(stored, dict):
                log(f"{path} is damaged (not an evaluation); evaluating {run} again")
                stored = None
        ck_path = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
        ck = read_checkpoint(ck_path) if stored is not None or os.path.isfile(ck_path) else None  # read once
        if stored is not None and stored.get("checkpoint_id") != checkpoint_identity(ck_path):
            log(f"{path} was made from another checkpoint than {ck_path} holds now (it trained on, or the file was "
                f"replaced){'' if stored.get('checkpoint_id') else ' or records none (an older eval.json)'}; "
                f"evaluating {run} again")
            stored = None
        if stored is not None:
            differ = settings_differ(stored.get("settings"), eval_settings(run_config(ck["config"], overrides)))
            if differ:
                log(f"{path} was made with other settings ({'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''})"
                    f"; evaluating {run} again")
                stored = None
            else:
                log(f"{name}: reusing {path} (same checkpoint, same settings)")
        results[name] = (stored if stored is not None else
                         evaluate_checkpoint(run, eval_dir, overrides, device, log, name=name))
        redraw(eval_dir, results[name], name, out_dir)
        log_path = os.path.join(run, "log.jsonl")
        logs[name], bad = read_jsonl(log_path) if os.path.isfile(log_path) else ([], 0)
        if bad:
            log(f"{name}: skipped {bad} unreadable row(s) of {log_path} (a run cut while writing?)")
        rnd = ck.get("results", {}).get("random_init") if ck is not None else None
        if rnd:  # the untrained network's kNN, drawn at epoch 0
            logs[name].insert(0, {"epoch": -1, "knn": rnd["knn"]})
    plot_curves(logs, os.path.join(out_dir, "curves.png"),
                {name: upgrade(results[name]["config"]) for name in names})
    plot_robustness(results, os.path.join(out_dir, "robustness.png"))
    if command is None:
        command = shlex.join(["python", "evaluate.py", "--compare", *runs, "--names", *names, "--out", out_dir,
                              *overrides])
    md = [f"# {' vs '.join(names)}", "", f"Made by `{command}`.", "",
          "![training curves](curves.png)", "", markdown_tables(results), "![robustness](robustness.png)", ""]
    for name in names:
        md += [f"**{name}**: global vs local similarity of image pairs, and effective receptive fields of four "
               f"locations", "", f"![{name} similarity]({name}_similarity.png) ![{name} ERF]({name}_erf.png)", ""]
    tmp = os.path.join(out_dir, f"report.md.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write("\n".join(md))
    os.replace(tmp, os.path.join(out_dir, "report.md"))
    log(f"wrote {out_dir}/: report.md, curves.png, robustness.png, "
        + ", ".join(f"{n}_similarity.png, {n}_erf.png" for n in names))
    return results


def redraw(eval_dir, result, name, out_dir):
    """A run's similarity and ERF pictures, titled `name`, into out_dir/<name>_*.png (from its analysis.npz; an
    evaluation made before that file existed has its PNGs copied as they are)."""
    import shutil

    from analyses import plot_erf, plot_similarity
    from rf_resnet import get_layout
    data = os.path.join(eval_dir, "analysis.npz")
    if not os.path.isfile(data):
        for png in ("similarity.png", "erf.png"):
            shutil.copyfile(os.path.join(eval_dir, png), os.path.join(out_dir, f"{name}_{png}"))
        return
    d = np.load(data)
    model = result["config"]["model"]
    layout = get_layout(model["backbone"], **({"width": model["width"]} if model.get("width") else {}))
    plot_similarity(d["glob"], d["local"], float(d["r"]), os.path.join(out_dir, f"{name}_similarity.png"), name)
    plot_erf(d["image"], d["maps"], [tuple(int(v) for v in loc) for loc in d["locations"]], layout,
             os.path.join(out_dir, f"{name}_erf.png"), name)


def _write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    from config import help_text, print_config
    p = argparse.ArgumentParser(description="Evaluate train_coss.py checkpoints: kNN, linear evaluation, "
                                            "robustness, analyses; or compare runs side by side. The run's own "
                                            "config is used; --section.key=value overrides it.",
                                epilog=help_text(("data", "augment", "eval") + EVAL_SECTIONS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a run folder (or its checkpoint.pt) to evaluate")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="run folders to put side by side")
    p.add_argument("--names", nargs="+", help="labels for --compare (default: folder names)")
    p.add_argument("--out", help="output folder (default: <run>/eval, or reports/<names> for --compare)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--print-config", action="store_true",
                   help="print the evaluation config of --ckpt (the run's settings and the overrides) and exit")
    args, overrides = p.parse_known_args(argv)
    quiet_numba_finalizers()
    try:
        if args.print_config:
            if not args.ckpt:
                raise EvalError("--print-config needs --ckpt RUN (the run whose config is the starting point)")
            path = os.path.join(args.ckpt, "checkpoint.pt") if os.path.isdir(args.ckpt) else args.ckpt
            print_config(run_config(read_checkpoint(path)["config"], overrides),
                         ("data", "model", "augment", "eval") + EVAL_SECTIONS)
            return 0
        if bool(args.ckpt) == bool(args.compare):
            raise EvalError("give --ckpt RUN or --compare RUN_A RUN_B ...")
        if args.ckpt:
            evaluate_checkpoint(args.ckpt, args.out or os.path.join(
                args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "eval"), overrides,
                args.device)
        else:
            names = args.names or [os.path.basename(os.path.normpath(r)) for r in args.compare]
            if len(names) != len(args.compare):
                raise EvalError(f"--names gives {len(names)} labels for {len(args.compare)} runs")
            compare(args.compare, names, args.out or os.path.join("reports", "_vs_".join(names)), overrides,
                    args.device, command=shlex.join(["python", "evaluate.py", *(sys.argv[1:] if argv is None
                                                                                else argv)]))
    except (EvalError, ConfigError, CheckpointError, BetonError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip numba's finaliser noise at shutdown (see train_coss.py)
