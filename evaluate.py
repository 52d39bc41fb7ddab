"""Evaluation of a backbone on the val beton (the trainer's monitors): weighted kNN (k, T) on L2-normalised pooled
features against a bank of train images, the online linear probe, and a linear probe fitted on frozen features
(full-batch L-BFGS). Images are centre-cropped (eval.crop_ratio) and resized to the training resolution.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import uint8_hwc_to_normalized


def eval_loader(cfg, path, n_images, res):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor
    total = len(Reader(path).metadata)
    indices = np.arange(min(n_images, total) if n_images else total)
    return Loader(path, batch_size=256, num_workers=cfg["augment.workers"], order=OrderOption.SEQUENTIAL,
                  indices=indices, drop_last=False,
                  pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=cfg["eval.crop_ratio"]),
                                       ToTensor()], "label": [IntDecoder(), ToTensor()]})


@torch.no_grad()
def extract_features(backbone, loader, device):
    backbone.eval()
    feats, labels = [], []
    for images, y in loader:
        x = uint8_hwc_to_normalized(images.to(device))
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
    train_f, train_y = extract_features(backbone, eval_loader(cfg, train_path, cfg["eval.bank_images"], res), device)
    val_raw, val_y = extract_features(backbone, eval_loader(cfg, val_path, cfg["eval.val_images"], res), device)
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_raw, dim=1)
    out = {"knn": knn_accuracy(train_f, train_y, val_f, val_y, num_classes, cfg["eval.k"], cfg["eval.t"])}
    if probe is not None:
        with torch.no_grad():
            logits = probe(val_raw.to(device)).cpu()
        out["online_probe"] = float((logits.argmax(1) == val_y).float().mean())
    if with_probe_fit and cfg["eval.probe_iters"]:
        out["probe"] = feature_probe_accuracy(train_f, train_y, val_f, val_y, num_classes, cfg["eval.probe_iters"])
    return out
