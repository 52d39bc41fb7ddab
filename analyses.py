"""What local representations learn: the paper's analyses (docs/METHOD_NOTES.md §6) and their pictures.

    global_local_similarity  for random image pairs (i, j): cos(y_i, y_j) of the pooled (global) features against
                             the similarity of their local maps, mean over all location pairs (l, l') of
                             cos(F_i[l], F_j[l']) = <mean_l F̂_i[l], mean_l' F̂_j[l']> (position-free: our choice);
                             and the Pearson r between the two (paper Fig. 3B)
    local_redundancy         mean cosine similarity between the distinct locations of one image's map
    effective_receptive_fields  |d sum_c F[c, h, w] / d x|, summed over colour channels, for chosen (h, w)
Plots go to PNG with matplotlib (Agg backend, no display needed).
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def global_local_similarity(backbone, x, pairs, generator=None):
    """x: normalised images [N, 3, H, W]. Returns (global cos [P], local cos [P], Pearson r, redundancy)."""
    if x.shape[0] < 2:
        raise ValueError("global_local_similarity needs at least two images")
    fmap, pooled = backbone(x)
    g = F.normalize(pooled.float(), dim=1)                                          # [N, C]
    loc = F.normalize(fmap.float().flatten(2).transpose(1, 2), dim=2)              # [N, L, C]
    centre = loc.mean(1)                                                            # mean of unit local vectors
    i = torch.randint(0, x.shape[0], (pairs,), generator=generator).to(x.device)
    j = (i + torch.randint(1, x.shape[0], (pairs,), generator=generator).to(x.device)) % x.shape[0]   # j != i
    glob = (g[i] * g[j]).sum(1)
    local = (centre[i] * centre[j]).sum(1)
    return glob.cpu(), local.cpu(), pearson(glob, local), local_redundancy(loc)


def local_redundancy(loc):
    """loc: unit local vectors [N, L, C]; mean over images of the mean cos between distinct locations."""
    L = loc.shape[1]
    if L < 2:
        return float("nan")
    gram = loc @ loc.transpose(1, 2)                                                # [N, L, L]
    return float(((gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (L * (L - 1))).mean())


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def effective_receptive_fields(backbone, x, locations):
    """x: one normalised image [1, 3, H, W]; locations: (h, w) on the feature map. Returns [len, H, W] maps of
    |gradient| of that location's summed channels w.r.t. the input, summed over colour channels."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for h, w in locations:
        inp = x.detach().clone().requires_grad_(True)
        fmap, _ = backbone(inp)
        fmap[0, :, h, w].sum().backward()
        out.append(inp.grad[0].abs().sum(0))
    backbone.train(was_training)
    return torch.stack(out)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_similarity(glob, local, r, path, title=""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(np.asarray(glob), np.asarray(local), s=4, alpha=0.5)
    ax.set_xlabel("cos similarity of the pair's global representations")
    ax.set_ylabel("mean cos similarity of their local ones")
    ax.set_title(f"{title}: image pairs, Pearson r = {r:.3f}" if title else f"Pearson r = {r:.3f}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def erf_box(layout, h, w):
    """The box drawn for feature-map location (h, w): (x0, y0, side) in pixel coordinates (pixel centres at
    integers), the stride-wide cell centred on the centre of the location's receptive field (rf_resnet.rf_centre),
    which the effective receptive field of a symmetric network is centred on too (tested)."""
    from rf_resnet import rf_centre
    offset, stride = rf_centre(layout)
    return offset + stride * w - stride / 2, offset + stride * h - stride / 2, stride


def plot_erf(image, maps, locations, layout, path, title=""):
    """image: uint8-like [H, W, 3] numpy; maps: [K, H, W] |gradient| maps of `locations` (h, w) on the feature map;
    each panel outlines the location's cell (solid) and its theoretical receptive field (dashed)."""
    from rf_resnet import rf_size
    plt = _plt()
    maps = np.asarray(maps)
    fig, axes = plt.subplots(1, len(maps), figsize=(2.7 * len(maps) + 1.2, 3.2), squeeze=False)
    rf = rf_size(layout)
    for ax, m, (h, w) in zip(axes[0], maps, locations):
        ax.imshow(image)
        shown = ax.imshow(m / max(float(m.max()), 1e-12), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        x0, y0, side = erf_box(layout, h, w)
        cell = plt.Rectangle((x0, y0), side, side, fill=False, color="cyan", lw=1.2)
        full = plt.Rectangle((x0 + side / 2 - rf / 2, y0 + side / 2 - rf / 2), rf, rf, fill=False, color="lime",
                             lw=1, ls="--")
        ax.add_patch(cell)
        ax.add_patch(full)
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        ax.set_title(f"location (row {h}, col {w})", fontsize=9)
        ax.set_xlabel("x (px)", fontsize=8)
        ax.set_ylabel("y (px)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.05, right=0.88, top=0.82, bottom=0.2, wspace=0.35)
    fig.colorbar(shown, cax=fig.add_axes([0.9, 0.2, 0.012, 0.62])).set_label(
        "|d location / d pixel|, / panel max", fontsize=8)
    fig.legend([cell, full], [f"the location's cell ({side:g} px, its stride)", f"theoretical RF ({rf} px)"],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: effective receptive fields" if title else "effective receptive fields", fontsize=10)
    _save(fig, path)


def objective(config):
    """A run's training objective in words, from its config's method sections: runs whose losses can share an axis."""
    method = (config or {}).get("method")
    if not method:
        return "unknown objective"
    name = method["name"] + (" + LoGo" if config.get("logo", {}).get("enabled") else "")
    if method["name"].startswith("co_"):
        co = config.get("co", {})
        name += f" (w_s {co.get('w_s', float('nan')):g}, {co.get('mixing', '?')})"
    return name


def plot_curves(runs, path, methods=None):
    """runs: {name: rows of log.jsonl}; methods: {name: the run's config sections}. Training loss against epoch on
    one panel per objective (the losses of different objectives are not comparable numbers), then kNN accuracy
    of every run against epoch."""
    plt = _plt()
    methods = methods or {}
    groups = {}
    for name in runs:
        groups.setdefault(objective(methods.get(name)), []).append(name)
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4.3 * (len(groups) + 1), 3.5), squeeze=False)
    axes = axes[0]
    labels = []
    for ax, (obj, names) in zip(axes, groups.items()):
        for name in names:
            steps = [r for r in runs[name] if "loss" in r]
            if steps:
                per_epoch = max(r["step"] for r in steps) / max(1, max(r["epoch"] for r in steps) + 1)
                ax.plot([r["step"] / per_epoch for r in steps], [r["loss"] for r in steps], label=name, lw=1)
        ax.set_title(f"training loss: {obj}", fontsize=9)
        labels.append(("epoch", "loss (objective's own units)"))
    for name, rows in runs.items():
        evals = [r for r in rows if "knn" in r]
        if evals:
            axes[-1].plot([r["epoch"] + 1 for r in evals], [r["knn"] for r in evals], "o-", label=name)
    axes[-1].set_title("kNN accuracy on val", fontsize=9)
    labels.append(("epochs trained (0: random init)", "kNN top-1 (fraction)"))
    _finish(fig, axes, labels, path)


def plot_robustness(results, path):
    """results: {name: eval.json dict}; accuracy against severity per corruption, mask fraction, PGD eps."""
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for name, res in results.items():
        rob = res["robustness"]
        sev = sorted({int(k) for c in rob["corruptions"].values() for k in c})
        mean = [np.mean([c[str(s)] for c in rob["corruptions"].values()]) for s in sev] if rob["corruptions"] else []
        if mean:
            axes[0].plot(sev, mean, "o-", label=name)
        fr = sorted(rob["masking"], key=float)
        axes[1].plot([float(f) for f in fr], [rob["masking"][f] for f in fr], "o-", label=name)
        eps = sorted(rob["pgd"], key=float)
        axes[2].plot([float(e) for e in eps], [rob["pgd"][e] for e in eps], "o-", label=name)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, title in zip(axes, ("common corruptions", "masked input cells", "L-inf PGD attack")):
        ax.set_title(title, fontsize=9)
    _finish(fig, axes, [("severity (1-5)", "top-1 (fraction), mean over corruptions"),
                        ("fraction of masked cells", "top-1 (fraction)"), ("PGD eps (x 1/255)", "top-1 (fraction)")],
            path)


def _finish(fig, axes, labels, path):
    for ax, (x, y) in zip(axes, labels):
        ax.set(xlabel=x, ylabel=y)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path):
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    os.replace(tmp, path)


def plot_run(run_dir):
    """PNG curves of a run from log.jsonl: loss terms and lr against step, kNN and probe accuracies against epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evaluate import read_jsonl
    log_path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f"{log_path} does not exist (give a run folder that train_coss.py wrote)")
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
