"""Strict configuration shared by write_ffcv.py and train_coss.py.

One YAML file drives both scripts. The parameters are fastargs `Section`/`Param`s, but loading is ours because
plain fastargs is too forgiving for a tool that runs for days:
  - an unknown YAML key or `--section.key` on the command line is an error naming the key (fastargs ignores it);
  - booleans accept only true/false/1/0/yes/no (fastargs turns the string 'False' into True);
  - an int parameter refuses 0.5 (fastargs truncates it to 0) and a float accepts only numbers;
  - a validation failure raises ConfigError, which the scripts turn into one line and exit code 2
    (fastargs prints a table and exits 0).

Usage:
    cfg = load_config(yaml_path_or_None, ["--writer.workers=4", ...])
    cfg["writer.workers"]   # -> 4
"""
import math
import os
import re
import textwrap

import yaml
from fastargs import Param, Section
from fastargs.config import Config
from fastargs.validation import Checker

VERSION = "0.8.1"  # the project's version (pyproject.toml and CHANGELOG.md say the same; a test checks)
REPO = os.path.dirname(os.path.abspath(__file__))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
IMAGENET100_CLASSES = os.path.join(REPO, "data", "imagenet100_classes.txt")


class ConfigError(ValueError):
    """A bad config file, key or value. Its message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------------------------
# Strict checkers (fastargs calls check(value) and wraps any exception into ValidationError).

class _Number(Checker):
    """A number in [min, max]; subclasses turn the raw value into their type or raise."""
    kind = "a number"

    def __init__(self, min=None, max=None):
        self.min, self.max = min, max

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError(f"a bool is not {self.kind}")
        value = self.convert(value)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ValueError(value)
        return value

    def help(self):
        return self.kind + _range_help(self.min, self.max)


class StrictInt(_Number):
    kind = "an int"

    def convert(self, value):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, int):
            return value
        raise ValueError(value)  # 0.5, '2.0', 'two'


class StrictFloat(_Number):
    kind = "a float"

    def convert(self, value):
        if isinstance(value, str):
            value = float(value.strip())  # raises on non-numbers
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(value)
        return float(value)


class StrictBool(Checker):
    TRUE = {"1", "true", "yes", "on"}
    FALSE = {"0", "false", "no", "off"}

    def check(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            v = value.strip().lower()
            if v in self.TRUE:
                return True
            if v in self.FALSE:
                return False
        raise ValueError(value)

    def help(self):
        return "a boolean (1/0/true/false)"


class BoolOrAuto(StrictBool):
    """A boolean, or the word 'auto' (kept as the string 'auto')."""

    def check(self, value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return super().check(value)

    def help(self):
        return "1/0/true/false or auto"


class Choice(Checker):
    def __init__(self, *choices):
        self.choices = choices

    def check(self, value):
        if value not in self.choices:
            raise ValueError(value)
        return value

    def help(self):
        return "one of " + "/".join(self.choices)


class Text(Checker):
    def check(self, value):
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)  # a YAML path like 2024 arrives as an int; keep it as text

    def help(self):
        return "a string"


class NameFrom(Text):
    """One of the names a module holds, read from it when checked (its import is deferred: config.py stays light,
    and a new backbone preset or method module needs no change here). names(): the names; help: "{names}" in it."""

    def __init__(self, names, help):
        self.names, self.help_text = names, help

    def check(self, value):
        if str(super().check(value)) not in self.names():
            raise ValueError(value)
        return str(value)

    def help(self):
        return self.help_text.format(names="/".join(self.names()))


def _backbones():
    from rf_resnet import PRESETS
    return tuple(PRESETS)


def _methods():
    from methods import NAMES
    return NAMES


class FloatList(Checker):
    """Comma-separated numbers (YAML may also give a list), each in [min, max]."""

    def __init__(self, min=None, max=None, choices=None):
        self.min, self.max = min, max

    def check(self, value):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        out = []
        for item in items:
            v = float(item)  # ValueError -> reported by load_config as a bad value
            if v != v or (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
                raise ValueError(item)
            out.append(v)
        if not out:
            raise ValueError(value)
        return tuple(out)

    def help(self):
        return "comma-separated numbers" + _range_help(self.min, self.max)


class NameList(Checker):
    """Comma-separated names, each one of `choices` (empty = none)."""

    def __init__(self, *choices):
        self.choices = choices

    def check(self, value):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        items = tuple(str(v).strip() for v in items)
        if any(v not in self.choices for v in items):
            raise ValueError(value)
        return items

    def help(self):
        return "comma-separated names from " + "/".join(self.choices)


def _range_help(lo, hi):
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# The sections. Defaults are the embedded default (Fashion-MNIST), so `write_ffcv.py` with no --config writes it.

SECTIONS = {}  # section -> its one-line description, in declaration order (for --help)


def _section(cfg, name, description):
    SECTIONS[name] = description
    return Section(name, description, config_descriptor=cfg)


def _method_sections():
    """The sections the method registry declares (methods/: the CO variants' co.*, LoGo's logo.*, moco.*, dino.*)."""
    from methods import config_sections
    return config_sections()


def _declare(cfg):
    _section(cfg, "data", "Dataset source and beton location (both scripts)").params(
        source=Param(Choice("fashion_mnist", "imagenet100", "imagefolder", "tiny_imagenet", "synthetic"),
                     "where images come from", default="fashion_mnist"),
        root=Param(Text(), "dataset root: ImageNet root holding train/ and val/ (imagenet100, imagefolder), the "
                           "tiny-imagenet-200 folder (tiny_imagenet), or the Fashion-MNIST folder",
                   default=FASHION_MNIST_DIR),
        class_list=Param(Text(), "imagenet100: file of wnids, one per line", default=IMAGENET100_CLASSES),
        beton_dir=Param(Text(), "folder for <name>_<split>.beton (relative to the current folder)", default="betons"),
        name=Param(Text(), "beton name prefix", default="fmnist"),
        image_size=Param(StrictInt(0, 4096), "fashion_mnist: resize the 28x28 images to this side (0 = keep 28)",
                         default=32),
        synthetic_images=Param(StrictInt(1), "synthetic: images per split (val gets a quarter)", default=256),
        synthetic_min_size=Param(StrictInt(1), "synthetic: smallest image side, px", default=24),
        synthetic_max_size=Param(StrictInt(1), "synthetic: largest image side, px", default=64),
        synthetic_classes=Param(StrictInt(1), "synthetic: number of classes", default=10),
        decode=Param(Choice("cpu", "gpu"), "cpu: FFCV decodes and crops on the host; gpu: FFCV reads bytes, the GPU "
                     "decodes each image once (nvJPEG) and kernels/crop.py cuts every view", default="cpu"),
    )
    _section(cfg, "writer", "How write_ffcv.py encodes the beton").params(
        write_mode=Param(Choice("raw", "jpg", "proportion", "smart"),
                         "raw pixels, JPEG, a random proportion of JPEGs, or JPEG only where raw is much larger",
                         default="raw"),
        max_resolution=Param(StrictInt(0), "longest side after resizing, px (0 = keep original size)", default=0),
        jpeg_quality=Param(StrictInt(1, 100), "JPEG quality for jpg/proportion/smart", default=90),
        compress_probability=Param(StrictFloat(0.0, 1.0), "proportion mode: fraction of images stored as JPEG",
                                   default=0.5),
        smart_threshold=Param(StrictInt(1), "smart mode: store JPEG when raw bytes > threshold x JPEG bytes",
                              default=4),
        workers=Param(StrictInt(1, 1024), "writer processes (also used for the verification scan)", default=2),
        chunk_size=Param(StrictInt(1), "images handed to a writer process at a time", default=100),
        page_size_mib=Param(StrictInt(2, 2048), "FFCV page size in MiB (power of 2; small pages waste less)",
                            default=4),
        max_pixels=Param(StrictInt(1), "images with more pixels than this are skipped as too large",
                         default=178_956_970),
        verify=Param(StrictBool(), "decode every file once before writing, to skip bad ones (file sources)",
                     default=True),
        overwrite=Param(StrictBool(), "replace an existing beton", default=False),
        shuffle=Param(StrictBool(), "write samples in a random order (seeded by writer.seed)", default=False),
        seed=Param(StrictInt(0), "seed for shuffle and for synthetic images", default=0),
    )


    # ---- trainer (train_coss.py). Defaults: the CPU demo on Fashion-MNIST (CO-BYOL, width-16 ResNet-18, 32 px).
    _section(cfg, "model", "Backbone").params(
        backbone=Param(NameFrom(_backbones, "a backbone preset: {names} (python rf_resnet.py --list)"),
                       "preset of rf_resnet.py (python rf_resnet.py --list)", default="resnet18_w16_cifar"),
        width=Param(StrictInt(0), "stage-1 channels; 0 = the preset's", default=0),
        init=Param(Text(), "start the backbone from this torchvision-format state_dict (.pt; its fc.* keys are "
                   "dropped, every other key must match); empty = random init", default=""),
    )
    _section(cfg, "method", "SSL method and heads").params(
        name=Param(NameFrom(_methods, "one of {names}"),
                   "the method, from the registry (methods/; python train_coss.py --methods lists "
                   "each with its paper and terms; exact formulas: losses.py's table; ImageNet-100 recipes: "
                   "configs/in100*.yaml). A co_ method is its base plus the local term: every location of the "
                   "feature map, through 1x1 local heads, matched with the other view's global target in that "
                   "method's way, mixed with w_s", default="co_byol"),
        proj_hidden=Param(StrictInt(1), "projector hidden width", default=512),
        proj_dim=Param(StrictInt(1), "embedding dim (global and local)", default=128),
        proj_out_bn=Param(Choice("auto", "none", "affine", "fixed"), "BatchNorm on the projector's output (global "
                          "and local heads; the last Linear then has no bias). auto: the family's own (MoCo v3: "
                          "fixed, every other: none); affine: with scale and shift (SimCLR v2's head, lightly's "
                          "SimCLRProjectionHead); fixed: without (MoCo v3's). BYOL, SimCLR and MoCo v3 families only",
                          default="auto"),
        pred_out_bn=Param(Choice("auto", "none", "affine", "fixed"), "BatchNorm on the predictor's output (BYOL and "
                          "MoCo v3 families, global and local). auto: none, as BYOL and MoCo v3's ResNet code "
                          "(before 0.7.0 MoCo v3's predictor ended in a fixed one: a checkpoint of that version "
                          "resumes with it)", default="auto"),
        pred_hidden=Param(StrictInt(1), "predictor hidden width (BYOL family)", default=512),
        temperature=Param(StrictFloat(1e-4), "NT-Xent / local InfoNCE temperature (SimCLR and MoCo v3 families)",
                          default=0.2),
    )
    for name, description, params in _method_sections():  # co, logo, moco, dino: declared by methods/
        _section(cfg, name, description).params(**params)
    _section(cfg, "augment", "Views (train loader)").params(
        res=Param(StrictInt(8), "side of each view, px (the final one if progressive)", default=32),
        res_start=Param(StrictInt(0), "progressive resolution: side at epoch 0 (0 = off)", default=0),
        res_ramp_epochs=Param(StrictInt(0), "progressive: epochs to go from res_start to res", default=0),
        c_min=Param(StrictFloat(0.01, 1.0), "RandomResizedCrop scale (c_min, 1)", default=0.3),
        interpolation=Param(Choice("area", "bilinear"), "crop resize: FFCV INTER_AREA or our bilinear",
                            default="area"),
        p_jitter=Param(StrictFloat(0.0, 1.0), "colour jitter probability", default=0.8),
        brightness=Param(StrictFloat(0.0), "colour jitter: brightness factor range 1 +- this", default=0.4),
        contrast=Param(StrictFloat(0.0), "colour jitter: contrast factor range 1 +- this", default=0.4),
        saturation=Param(StrictFloat(0.0), "colour jitter: saturation factor range 1 +- this", default=0.2),
        hue=Param(StrictFloat(0.0, 0.5), "colour jitter: hue shift range +- this (of a full turn)", default=0.1),
        p_gray=Param(StrictFloat(0.0, 1.0), "grayscale probability", default=0.2),
        p_blur1=Param(StrictFloat(0.0, 1.0), "blur probability, view 1", default=1.0),
        p_blur2=Param(StrictFloat(0.0, 1.0), "blur probability, view 2 (BYOL: 0.1; the demo 0.5)", default=0.5),
        p_solarize1=Param(StrictFloat(0.0, 1.0), "solarize probability, view 1", default=0.0),
        p_solarize2=Param(StrictFloat(0.0, 1.0), "solarize probability, view 2", default=0.2),
        global_views=Param(StrictInt(2), "multi-crop: global views per image, at res, scale (c_min, 1)", default=2),
        local_views=Param(StrictInt(0), "multi-crop: local views per image, at local_res, scale (local_cmin, "
                          "local_cmax); cut from the same decode as the global views (0 = off)", default=0),
        local_res=Param(StrictInt(8), "multi-crop: side of the local views, px (DINO/SwAV on ImageNet: 96)",
                        default=96),
        local_cmin=Param(StrictFloat(0.01, 1.0), "multi-crop: local crop scale, min (DINO: 0.05)", default=0.05),
        local_cmax=Param(StrictFloat(0.01, 1.0), "multi-crop: local crop scale, max (DINO: 0.14)", default=0.14),
        p_blur_local=Param(StrictFloat(0.0, 1.0), "multi-crop: blur probability of the local views (DINO: 0.5)",
                           default=0.5),
        p_solarize_local=Param(StrictFloat(0.0, 1.0), "multi-crop: solarize probability of the local views "
                               "(DINO: 0)", default=0.0),
        workers=Param(StrictInt(1), "FFCV loader threads", default=2),
    )
    _section(cfg, "optim", "Optimisation").params(
        batch_size=Param(StrictInt(2), "images per step per process", default=64),
        epochs=Param(StrictInt(1), "passes over the training images (ignored when optim.minutes or optim.steps is "
                     "set)", default=3),
        minutes=Param(StrictFloat(0.0, 1e6), "training budget in minutes (at most 10^6, about two years): the step count is set from the throughput of "
                      "the first steps (timed, then undone), so the lr and tau schedules run whole; the last epoch "
                      "may be partial; 0 = train optim.epochs", default=0.0),
        steps=Param(StrictInt(0), "train exactly N steps, the lr and tau schedules stretched to them (to compare "
                    "runs at equal steps, e.g. a CO variant at its base's measured step count); the last epoch may "
                    "be partial; 0 = train optim.epochs; not with optim.minutes", default=0),
        lr=Param(StrictFloat(0.0), "base lr per 256 images (x batch_size * world / 256)", default=0.6),
        warmup_epochs=Param(StrictFloat(0.0), "linear warm-up, then optim.lr_schedule", default=0.2),
        lr_schedule=Param(Choice("cosine", "constant"), "after the warm-up: cosine to 0, or the peak lr throughout "
                          "(lightly's and SimSiam's examples)", default="cosine"),
        weight_decay=Param(StrictFloat(0.0), "not applied to biases and norms", default=5e-4),
        momentum=Param(StrictFloat(0.0, 1.0), "SGD/LARS momentum (AdamW: beta1)", default=0.9),
        optimizer=Param(Choice("lars", "adamw"), "lars: LARS / SGD with momentum (see lars_eta); adamw: AdamW, "
                        "same groups (no decay on biases and norms), betas (momentum, 0.999)", default="lars"),
        lars_eta=Param(StrictFloat(0.0), "LARS trust coefficient (0 = SGD with momentum)", default=0.0),
        lars_form=Param(Choice("byol", "solo"), "LARS trust ratio of a weight w with gradient g: byol (BYOL's and "
                        "MoCo v3's code): eta ||w|| / ||g + wd w||; solo (solo-learn's lars.py): eta ||w|| / "
                        "(||g|| + wd ||w|| + 1e-8). Both leave biases and norms alone (no decay, no ratio)",
                        default="byol"),
        lars_clip=Param(StrictBool(), "solo-learn's clip_lr: the ratio becomes min(ratio / lr, 1), so a layer's "
                        "step is at most min(ratio, lr) x its update (about eta ||w||)", default=False),
        tau=Param(StrictFloat(0.0, 1.0), "EMA tau (momentum) of the target at step 0 (BYOL, MoCo, DINO)",
                  default=0.99),
        tau_schedule=Param(Choice("cosine", "constant"), "cosine: tau rises to 1 over the run (BYOL, MoCo v3, "
                           "DINO); constant: tau throughout (MoCo v2)", default="cosine"),
        probe_lr=Param(StrictFloat(0.0), "online linear probe: SGD lr", default=0.1),
        predictor_lr_mult=Param(StrictFloat(0.0), "lr multiplier of the predictors (global and local)",
                                default=1.0),
        fix_pred_lr=Param(StrictBool(), "the predictors keep the peak lr (after the warm-up) instead of following "
                          "the schedule: SimSiam's fix_pred_lr", default=False),
    )
    _section(cfg, "training", "Run control").params(
        seed=Param(StrictInt(0), "seed of weights, loader order, augmentations and the train_images subset",
                   default=0),
        device=Param(Choice("auto", "cpu", "cuda"), "auto = CUDA when visible, else the CPU", default="auto"),
        sync_bn=Param(StrictBool(), "SyncBatchNorm: every BatchNorm of the online and target networks normalises "
                      "over the batch of all processes (solo-learn, MoCo v3 and DINO for ResNets). CUDA only: torch "
                      "cannot sync BatchNorm on the CPU (gloo), where a warning says each process keeps its own",
                      default=False),
        written_for=Param(StrictInt(0), "processes (GPUs) the config's batch and lr were written for; the start "
                          "line says what another count changes (0 = not stated)", default=0),
        compile=Param(StrictBool(), "torch.compile the forward and the loss as one graph: online and target networks, "
                      "the method's losses, and their backward", default=False),
        compile_mode=Param(Choice("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                           "torch.compile mode (reduce-overhead: CUDA graphs, for small models whose step is launch-"
                           "bound)", default="default"),
        fuse_views=Param(StrictBool(), "both views through one forward per network (a batch of 2B; BatchNorm then "
                         "normalises over both views together); 0 = one forward per view", default=False),
        prefetch=Param(StrictBool(), "make the next step's views while the current step runs (a thread; on CUDA a "
                       "side stream)", default=False),
        bf16=Param(StrictBool(), "bf16 autocast (CUDA only)", default=True),
        channels_last=Param(StrictBool(), "channels-last memory for nets and views (also faster on the CPU: "
                            "BENCHMARKS.md)", default=True),
        out_dir=Param(Text(), "runs are written to <out_dir>/<run_name>", default="runs"),
        run_name=Param(Text(), "empty = <method>_<backbone>_s<seed>", default=""),
        checkpoint_every=Param(StrictInt(1), "epochs between checkpoints (and the last one)", default=1),
        resume=Param(BoolOrAuto(), "1: continue from <run>/checkpoint.pt (an error if there is none); auto: continue "
                     "if there is one, else start fresh (for cluster requeues); with no run_name, <run> is the newest "
                     "folder of this method, backbone and seed", default=False),
        log_every=Param(StrictInt(1), "steps between log lines", default=20),
        nan_check_every=Param(StrictInt(0), "steps between looks at the NaN/inf flag of the loss (each a host sync; "
                              "1 = before every update; 0 = with the log rows, every log_every steps; always at an "
                              "epoch's end, before its checkpoint)", default=0),
        train_images=Param(StrictInt(0), "train on a random subset of N images, drawn with training.seed (0 = all)",
                           default=0),
        threads=Param(StrictInt(0), "torch CPU threads (0 = leave)", default=0),
        kernels=Param(Choice("auto", "triton", "ref"), "fused Triton ops (kernels/): auto = on CUDA, the PyTorch "
                      "references on CPU; ref = always the references", default="auto"),
    )
    _section(cfg, "eval", "kNN monitor and linear probes (val beton)").params(
        every=Param(StrictInt(0), "epochs between kNN evaluations (0 = only at the end)", default=0),
        k=Param(StrictInt(1), "kNN neighbours", default=20),
        t=Param(StrictFloat(1e-4), "kNN temperature", default=0.07),
        bank_images=Param(StrictInt(0), "train images in the kNN bank / probe fit: a random subset, seed 0 (0 = all)",
                          default=10000),
        val_images=Param(StrictInt(0), "val images evaluated: a random subset, seed 0 (0 = all)", default=0),
        crop_ratio=Param(StrictFloat(0.1, 1.0), "centre crop side / short side", default=1.0),
        probe_iters=Param(StrictInt(0), "L-BFGS iterations of the linear probe on frozen features at the end "
                                       "(0 = skip)", default=100),
        random_init=Param(StrictBool(), "also evaluate the untrained network (the demo's baseline)", default=True),
    )
    # ---- evaluation suite (evaluate.py --ckpt RUN). Defaults: sized for the CPU demo's checkpoints.
    _section(cfg, "linear", "Offline linear evaluation on frozen features (evaluate.py)").params(
        train_images=Param(StrictInt(0), "train images whose centre-crop features train the head: a random subset, "
                                          "seed 0 (0 = all)",
                           default=0),
        epochs=Param(StrictInt(1), "epochs of SGD over the precomputed features", default=100),
        batch_size=Param(StrictInt(1), "SGD batch of the offline linear head", default=256),
        lr=Param(StrictFloat(0.0), "peak lr per 256 (cosine to 0)", default=0.1),
        weight_decay=Param(StrictFloat(0.0), "weight decay of the offline linear head", default=0.0),
        knn_k=Param(FloatList(1), "kNN neighbour counts reported", default="20,200"),
    )
    _section(cfg, "robust", "Robustness of backbone + linear head (evaluate.py)").params(
        images=Param(StrictInt(1), "val images used for every robustness probe: a random subset, seed 0",
                     default=1000),
        corruptions=Param(NameList("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast",
                                   "jpeg"), "common corruptions (empty = none)",
                          default="gaussian_noise,shot_noise,impulse_noise,gaussian_blur,contrast,jpeg"),
        severities=Param(StrictInt(0, 5), "severities 1..N of each corruption", default=5),
        mask_fractions=Param(FloatList(0.0, 1.0), "internal corruption: fractions of masked cells",
                             default="0,0.25,0.5,0.75"),
        mask_patch=Param(StrictInt(0), "side of a masked cell, px (0 = image side / 8)", default=0),
        mask_fill=Param(Choice("mean", "noise"), "masked cells get the image's mean colour or noise",
                        default="mean"),
        pgd_eps=Param(FloatList(0.0, 255.0), "L-inf PGD radii, in 1/255 units", default="0.25,0.5,1,2"),
        pgd_steps=Param(StrictInt(1), "PGD iterations", default=10),
        seed=Param(StrictInt(0), "noise and masks", default=0),
    )
    _section(cfg, "analysis", "Local/global analyses and pictures (evaluate.py)").params(
        pairs=Param(StrictInt(2), "random val image pairs in the global-vs-local similarity scatter", default=500),
        erf_image=Param(StrictInt(0), "index of the val image whose effective receptive fields are drawn",
                        default=0),
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading.

def new_config():
    cfg = Config()
    _declare(cfg)
    return cfg


def _example_key(section):
    keys = sorted(k[1] for k in new_config().entries if k[0] == section)
    return keys[0] if keys else "key"


def _flatten(tree, prefix=()):
    """{'a': {'b': 1}} -> {('a', 'b'): 1}; a dotted key 'a.b' counts as nested."""
    out = {}
    for key, value in tree.items():
        path = prefix + tuple(str(key).split("."))
        if isinstance(value, dict):
            if not value:
                raise ConfigError(f"config key '{'.'.join(path)}' is an empty section")
            inner = _flatten(value, path)
            twice = sorted(set(inner) & set(out))
            if twice:
                raise ConfigError(_twice(twice[0]))
            out.update(inner)
        elif len(path) == 1 and path[0] in {k[0] for k in new_config().entries}:
            raise ConfigError(f"config key '{path[0]}' must be a section holding 'key: value' lines (for example "
                              f"'{path[0]}:' then '  {_example_key(path[0])}: ...' on the next line), not {value!r}")
        else:
            if path in out:
                raise ConfigError(_twice(path))
            out[path] = value
    return out


def _twice(path):
    dotted = ".".join(path)
    return (f"config key '{dotted}' is given twice (as '{dotted}:' and inside a '{path[0]}:' block, or in two "
            f"spellings); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a key that a mapping holds twice (yaml itself keeps the last one silently: two
    `method:` blocks would drop the first)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"config file {self.name}: '{key}' appears twice in one block (lines {lines[key]} "
                                  f"and {line}); merge the two")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_unique(text, path):
    loader = _UniqueKeyLoader(text)
    loader.name = path
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path, seen=()):
    """A YAML config as {(section, key): value}. A top-level `base: FILE` (relative to this file) is read first and
    overridden by this file's values, so a study config holds only what it changes."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    with open(path, "rb") as fh:
        data = fh.read()
    if b"\0" in data:
        raise ConfigError(f"config file {path} is a binary file, not YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") \
            from None
    try:
        tree = _load_unique(text, path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold sections (a mapping), not a {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return _flatten(tree)
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a file name, got {base!r}")
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (os.path.abspath(path),))
    merged.update(_flatten(tree))
    return merged


def _parse_overrides(args):
    """['--a.b=1', '--c.d', '2'] -> {('a','b'): '1', ('c','d'): '2'}; anything else is an error."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}' (expected --section.key=value)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option '{arg}' needs a value")
            key, value = arg[2:], args[i + 1]
            i += 1
        out[tuple(key.split("."))] = value
        i += 1
    return out


# old key -> its new name, for keys that moved (a config naming the old one is told the new one; a checkpoint's
# config is read with the new names, config.upgrade)
RENAMED = {**{f"method.{k}": f"co.{k}" for k in ("w_s", "mixing", "local_grid", "local_layer", "local_hidden")},
           "method.logo": "logo.enabled",
           **{f"method.logo_{k}": f"logo.{k}" for k in ("lambda", "local_res", "global_cmin", "local_cmax",
                                                           "affinity_lr", "clip")},
           "method.queue_size": "moco.queue_size",
           **{f"method.dino_{k}": f"dino.{k}" for k in ("out_dim", "student_temp", "teacher_temp",
                                                          "warmup_teacher_temp", "warmup_teacher_temp_epochs",
                                                          "center_momentum", "freeze_last_layer")}}
RENAMED_IN = {k: "0.8.0" for k in RENAMED}  # old key -> the version that renamed it


def upgrade(tree):
    """A config as {'section': {'key': value}} written by an older version (a checkpoint's), with its renamed keys
    under their new names."""
    out = {sec: dict(keys) for sec, keys in tree.items() if isinstance(keys, dict)}
    for old, new in RENAMED.items():
        (osec, okey), (nsec, nkey) = old.split(".", 1), new.split(".", 1)
        if okey in out.get(osec, {}):
            out.setdefault(nsec, {}).setdefault(nkey, out[osec].pop(okey))
    return out


def load_config(path=None, overrides=()):
    """Returns a validated fastargs Config: defaults < YAML file < command-line overrides."""
    cfg = new_config()
    values = {}
    for source, entries in (("config file", _read_yaml(path) if path else {}),
                            ("command line", _parse_overrides(list(overrides)))):
        for key, value in entries.items():
            if key not in cfg.entries and ".".join(key) in RENAMED:
                raise ConfigError(f"{source} key '{'.'.join(key)}' is now '{RENAMED['.'.join(key)]}' (renamed in "
                                  f"version {RENAMED_IN['.'.join(key)]}); use the new name")
            if key not in cfg.entries:
                section = key[0]
                known = sorted(".".join(p) for p in cfg.entries if p[0] == section)
                hint = f" (known in '{section}': {', '.join(p.split('.', 1)[1] for p in known)})" if known else \
                    f" (known sections: {', '.join(sorted({p[0] for p in cfg.entries}))})"
                raise ConfigError(f"unknown {source} key '{'.'.join(key)}'{hint}")
            values[key] = value
    for key, value in values.items():
        if value is None:
            raise ConfigError(f"config key '{'.'.join(key)}' has no value")
        cfg.content[key] = value
    for key, param in cfg.entries.items():
        try:
            cfg[key]
        except Exception:
            got = cfg.content.get(key, param.default)
            raise ConfigError(f"bad value for '{'.'.join(key)}': {got!r} (expected {param.checker.help()})") from None
    cfg.source_file = path  # where the values came from, for messages that name a command to run
    cfg.overrides = {".".join(k): v for k, v in _parse_overrides(list(overrides)).items()}
    return cfg


def as_dict(cfg):
    """The resolved config as {'section': {'key': value}} (for params.json and summaries)."""
    out = {}
    for key in cfg.entries:
        out.setdefault(key[0], {})[".".join(key[1:])] = cfg[key]
    return out


def _show(value):
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def help_text(sections):
    """Every key of `sections` with its type, default and meaning, generated from the declarations above (the one
    source for --help of write_ffcv.py, train_coss.py and evaluate.py)."""
    cfg = new_config()
    lines = ["config keys (set in the YAML file as 'section: key: value', or on the command line as "
             "--section.key=value; the command line wins):"]
    for section in sections:
        lines.append(f"\n  {section}: {SECTIONS[section]}")
        for key, param in cfg.entries.items():
            if key[0] != section:
                continue
            name = ".".join(key)
            lines.append(f"    --{name}  ({param.checker.help()}; default {_show(cfg[key])})")
            if param.desc:
                lines += textwrap.wrap(param.desc, 118, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def print_config(cfg, sections=None, stream=None):
    """The resolved config as YAML (the sections a script reads), loadable again with --config."""
    import sys
    tree = {sec: {k: (list(v) if isinstance(v, tuple) else v) for k, v in keys.items()}
            for sec, keys in as_dict(cfg).items() if sections is None or sec in sections}
    (stream or sys.stdout).write(yaml.safe_dump(tree, sort_keys=False, default_flow_style=False))
