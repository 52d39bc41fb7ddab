"""A dry run before a GPU-week: `python train_coss.py --config configs/in100.yaml --dry-run [--dry-run-processes N]`.

Builds the run as it would be on N processes (N: the option, else the config's training.written_for, else 1), takes
a few steps on the CPU on synthetic images at a small resolution and batch, at the recipe's effective peak lr
(optim.lr x batch_size x N / 256, no warm-up: the lr the run reaches after its warm-up), and prints per parameter
group the update-to-weight ratio ||w_after - w_before|| / ||w_before|| of each step's layers, the loss trend and
any non-finite value. It stops with one line (exit 2) where a weight layer's ratio (conv and linear weights: the
groups LARS adapts) passes RATIO_BOUND. Biases and norms are shown but not bounded: a bias starts at 0, so its
first updates are large relative to its norm in every reference recipe.

RATIO_BOUND, from the references: the largest per-step move a reference recipe allows a layer is solo-learn's LARS
with clip_lr at eta 0.02 (its ImageNet-100 recipes): the clipped ratio caps a layer's step at eta ||w|| = 0.02 ||w||
before momentum. BYOL's own LARS at its recipe moves a layer by lr x eta = 3.2 x 0.001 = 0.0032 ||w||. Momentum 0.9
adds at most the previous steps' moves (1 + 0.9 + ... < 4.1 over the first 5 steps). 0.1 is five times solo-learn's
cap: no reference recipe reaches it, while the unclipped LARS of our earlier configs on 8 GPUs (peak lr 8.0, eta
0.02) moved every layer by 0.16 of its norm at the first step. With plain SGD the ratio is lr ||g|| / ||w||; the
small synthetic batch makes ||g|| noisier, hence larger, than the real batch's, so the check errs on the safe side.
"""
import math
import os

import torch

RATIO_BOUND = 0.1
GROUP_NAMES = {(True, False): "weights (conv, linear)", (False, False): "biases and norms",
               (True, True): "predictor weights", (False, True): "predictor biases and norms"}


class DryRunError(Exception):
    """A dry run found what the recipe would do wrong (one line)."""


def small_config(cfg, res, batch):
    """The config of the dry run: the recipe's keys, on the CPU, uncompiled, at a small resolution and batch."""
    from config import load_config
    local_res = max(8, res // 2)
    overrides = [f"--augment.res={res}", "--augment.res_start=0", f"--optim.batch_size={batch}",
                 "--training.device=cpu", "--training.compile=0", "--training.prefetch=0", "--data.decode=cpu",
                 "--training.nan_check_every=1"]
    if cfg["augment.local_views"]:
        overrides.append(f"--augment.local_res={local_res}")
    if cfg["logo.enabled"]:
        overrides.append(f"--logo.local_res={local_res}")
    if cfg["method.name"] == "moco_v2":  # the queue must hold at least one step's keys of the small batch
        overrides.append(f"--moco.queue_size={max(cfg['moco.queue_size'], 2 * batch)}")
    return load_config(cfg.source_file, [*(f"--{k}={v}" for k, v in cfg.overrides.items()), *overrides])


REFERENCE_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "reference_recipes.yaml")
FACTOR = 3.0  # a weight layer's ratio may reach this multiple of the reference recipe's at the same step


def reference_of(cfg):
    """(recipe name, its optimiser overrides and total batch) from docs/reference_recipes.yaml when the config file
    is listed there, else None."""
    import yaml
    if not cfg.source_file:
        return None
    table = yaml.safe_load(open(REFERENCE_TABLE))
    name = os.path.relpath(os.path.abspath(cfg.source_file), os.path.join(os.path.dirname(REFERENCE_TABLE), "..",
                                                                          "configs"))
    for recipe, entry in table["recipes"].items():
        if name in entry["configs"]:
            keys = {k: v for k, (v, _) in reference_keys(table, recipe).items()}
            over = {k: keys[k] for k in ("optim.lr", "optim.weight_decay", "optim.momentum", "optim.lars_eta",
                                         "optim.lars_form", "optim.lars_clip") if k in keys}
            if keys.get("optimizer") == "sgd":
                over["optim.lars_eta"] = 0
            return recipe, over, keys["total_batch"]
    return None


def reference_keys(table, recipe):
    """A recipe's {key: [value, source]} in the table, its `base:` recipe's keys first."""
    entry = table["recipes"][recipe]
    keys = dict(reference_keys(table, entry["base"])) if entry.get("base") else {}
    keys.update(entry["keys"])
    return keys


def step_ratios(cfg, peak, steps, res, batch, log):
    """The few CPU steps at lr `peak`: ({group: [(largest ratio of a layer, its name) per step]}, losses)."""
    import train_coss
    small = small_config(cfg, res, batch)
    torch.manual_seed(small["training.seed"])
    run = train_coss.build_run(small, torch.device("cpu"), 1, num_classes=10)
    run.peak_lr, run.warmup_steps = peak, 0
    run.set_total_steps(10 ** 9)  # the cosine stays at its peak over the few steps taken
    plan = train_coss.view_plan(small)
    g = torch.Generator().manual_seed(0)  # the same synthetic images for the config and its reference
    names = {id(p): n for n, p in run.online.named_parameters()}
    ratios, losses = {}, []
    for step in range(steps):
        views = tuple(torch.randn(batch, 3, res, res, generator=g).contiguous(memory_format=torch.channels_last)
                      for _ in range(plan.n_global))
        local = tuple(torch.randn(batch, 3, plan.local_res, plan.local_res, generator=g).contiguous(
            memory_format=torch.channels_last) for _ in range(plan.n_local)) if plan.n_local else None
        labels = torch.randint(0, 10, (batch,), generator=g)
        before = {id(p): p.detach().clone() for group in run.opt.param_groups for p in group["params"]}
        try:
            terms, _, _ = run.step(train_coss.Prepared(step, views, local, labels))
        except train_coss.TrainingError as e:
            raise DryRunError(f"dry run: {e}") from None
        losses.append(float(terms["loss"].detach()))
        for group in run.opt.param_groups:
            name = GROUP_NAMES[(group["lars"], _is_pred(group, names))]
            worst = (0.0, "")
            for p in group["params"]:
                if not torch.isfinite(p).all():
                    raise DryRunError(f"dry run: {names.get(id(p), '?')} is not finite after step {step + 1}")
                norm = float(before[id(p)].norm())
                if norm > 0:  # a zero-initialised bias has no ratio to speak of
                    worst = max(worst, (float((p.detach() - before[id(p)]).norm()) / norm, names.get(id(p), "?")))
            ratios.setdefault(name, []).append(worst)
    return ratios, losses


def dry_run(cfg, processes=0, steps=5, res=64, batch=16, log=print):
    """The dry run of cfg as on `processes` processes (see the module's docstring); returns {group: (our ratios per
    step, the reference's or None)}. Raises DryRunError (one line) where a weight layer's ratio is far above the
    reference recipe's."""
    import train_coss
    processes = processes or cfg["training.written_for"] or 1
    peak = cfg["optim.lr"] * cfg["optim.batch_size"] * processes / 256
    device = torch.device("cpu" if cfg["training.device"] == "cpu" else "cuda")
    for line in train_coss.scale_lines(cfg, processes, device):
        log(f"dry run: {line}")
    log(f"dry run: {steps} steps on the CPU, batch {batch} of synthetic {res} px images, lr {peak:.4g} (the recipe's "
        f"peak on {processes} process{'es' if processes > 1 else ''}), {cfg['method.name']}")
    ours, losses = step_ratios(cfg, peak, steps, res, batch, log)
    ref = reference_of(cfg)
    theirs, ref_peak = None, None
    if ref is not None:
        recipe, over, total = ref
        from config import load_config
        ref_cfg = load_config(cfg.source_file, [*(f"--{k}={v}" for k, v in cfg.overrides.items()),
                                                *(f"--{k}={v}" for k, v in over.items())])
        ref_peak = over["optim.lr"] * total / 256
        theirs, _ = step_ratios(ref_cfg, ref_peak, steps, res, batch, log)
        log(f"dry run: beside it, the reference recipe ({recipe} in docs/reference_recipes.yaml: total batch {total}, "
            f"peak lr {ref_peak:.4g}, " + (f"LARS eta {over.get('optim.lars_eta')}, {over.get('optim.lars_form')} "
                                           f"form{', clipped' if over.get('optim.lars_clip') else ''}"
                                           if over.get("optim.lars_eta") else "SGD") + ") on the same images")
    log(f"dry run: {'parameter group':28s} " + " ".join(f"step {s + 1:<7d}" for s in range(steps)) +
        "  (largest ||update|| / ||weight|| of a layer" + ("; reference below" if theirs else "") + ")")
    for name, per_step in ours.items():
        log(f"dry run: {name:28s} " + " ".join(f"{r:<12.4g}" for r, _ in per_step))
        if theirs and name in theirs:
            log(f"dry run: {'  reference':28s} " + " ".join(f"{r:<12.4g}" for r, _ in theirs[name]))
    trend = "falling" if losses[-1] < losses[0] else "not falling (few steps on noise: a hint, not a verdict)"
    log("dry run: loss " + " ".join(f"{v:.4f}" for v in losses) + f" ({trend})")
    for name, per_step in ours.items():
        if "weights" not in name:
            continue  # biases start at 0 and norms at 1: their ratios are large in every reference, unbounded
        for s, (r, layer) in enumerate(per_step):
            bound, why = RATIO_BOUND, "no reference recipe moves a weight layer by that much in a step"
            if theirs and name in theirs:
                bound = max(FACTOR * theirs[name][s][0], 1e-3)
                why = f"{FACTOR:g}x the reference recipe's {theirs[name][s][0]:.3g} at that step"
            elif cfg["optim.optimizer"] != "lars" or not cfg["optim.lars_eta"]:
                continue  # SGD / AdamW without a reference: the ratio follows the gradient, shown only
            if not math.isfinite(r) or r > bound:
                raise DryRunError(f"dry run: at step {s + 1} {layer} moved by {r:.3g} of its norm ({name}), above "
                                  f"{bound:.3g} ({why}); lower optim.lr, or use optim.lars_form=solo with "
                                  f"optim.lars_clip=1")
    lars = cfg["optim.optimizer"] == "lars" and cfg["optim.lars_eta"] > 0
    log("dry run: ok: " + (f"every weight layer's update within {FACTOR:g}x the reference recipe's" if theirs else
                           f"every weight layer's update below {RATIO_BOUND} of its norm" if lars else
                           "no reference recipe in the table and no LARS ratio: the ratios are shown, not bounded") +
        f" over {steps} steps (biases and norms are shown, not bounded: they start at 0 and 1), every value finite")
    return {name: ([r for r, _ in per_step], [r for r, _ in theirs[name]] if theirs and name in theirs else None)
            for name, per_step in ours.items()}


def _is_pred(group, names):
    return any(names.get(id(p), "").startswith(("predictor.", "local_predictor.")) for p in group["params"])
