"""What local representations learn: the paper's analyses (COSSL_NOTES §6) and their pictures.

    global_local_similarity  for random image pairs (i, j): cos(y_i, y_j) of the pooled (global) features against
                             the similarity of their local maps, mean over all location pairs (l, l') of
                             cos(F_i[l], F_j[l']) = <mean_l F̂_i[l], mean_l' F̂_j[l']> (position-free: our choice);
                             and the Pearson r between the two (paper Fig. 3B)
    local_redundancy         mean cosine similarity between the distinct locations of one image's map
    effective_receptive_fields  |d sum_c F[c, h, w] / d x|, summed over colour channels, for chosen (h, w)
Plots go to PNG with matplotlib (Agg backend, no display needed).
"""
import os

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
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(glob.numpy(), local.numpy(), s=4, alpha=0.5)
    ax.set_xlabel("cos similarity, global representations")
    ax.set_ylabel("cos similarity, local representations")
    ax.set_title(f"{title} Pearson r = {r:.3f}".strip(), fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_erf(image, maps, locations, fmap_hw, path, title=""):
    """image: uint8-like [H, W, 3] numpy; maps: [K, H, W]; the location's cell is outlined on each panel."""
    plt = _plt()
    H, W = image.shape[:2]
    fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 2.8))
    for ax, m, (h, w) in zip(np.atleast_1d(axes), maps, locations):
        ax.imshow(image)
        heat = (m / m.max().clamp_min(1e-12)).numpy()
        ax.imshow(heat, cmap="inferno", alpha=0.6)
        sy, sx = H / fmap_hw[0], W / fmap_hw[1]
        ax.add_patch(plt.Rectangle((w * sx - 0.5, h * sy - 0.5), sx, sy, fill=False, color="cyan", lw=1))
        ax.set_title(f"location ({h}, {w})", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_curves(runs, path):
    """runs: {name: rows of log.jsonl}; loss and kNN against epoch, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in runs.items():
        steps = [r for r in rows if "loss" in r]
        if steps:
            per_epoch = max(r["step"] for r in steps) / max(1, max(r["epoch"] for r in steps) + 1)
            axes[0].plot([r["step"] / per_epoch for r in steps], [r["loss"] for r in steps], label=name, lw=1)
        evals = [r for r in rows if "knn" in r]
        if evals:
            axes[1].plot([r["epoch"] + 1 for r in evals], [r["knn"] for r in evals], "o-", label=name)
    _finish(fig, axes, [("epoch", "training loss"), ("epoch (0: random init)", "kNN accuracy (val)")], path)


def plot_robustness(results, path):
    """results: {name: eval.json dict}; accuracy against severity per corruption, mask fraction, PGD eps."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
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
    _finish(fig, axes, [("severity", "top-1, mean over corruptions"), ("fraction of masked cells", "top-1"),
                        ("PGD L-inf eps (x 1/255)", "top-1")], path)


def _finish(fig, axes, labels, path):
    for ax, (x, y) in zip(axes, labels):
        ax.set(xlabel=x, ylabel=y)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path):
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    os.replace(tmp, path)
