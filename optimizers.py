"""The optimiser and the schedules: parameter groups (LARS exclusions, predictor groups), LARS in its two forms,
AdamW, the lr (warm-up then cosine) and EMA (cosine to 1) schedules, and the start line that says what a run's
batch, lr, optimiser and BatchNorm are at this process count."""
import math

import torch


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
