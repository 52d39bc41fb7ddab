"""Every ImageNet config against its reference recipe (docs/reference_recipes.yaml), key by key: equal, or named in
the config's header as `# departs: <key> -- <reason>`. A silent departure fails, and so does a stale departs line."""
import math
import os
import re

import pytest
import torch.nn as nn
import yaml

from conftest import REPO
from config import load_config
from dry_run import reference_keys

TABLE = yaml.safe_load(open(os.path.join(REPO, "docs", "reference_recipes.yaml")))
CONFIGS = [(recipe, name) for recipe, entry in TABLE["recipes"].items() for name in entry["configs"]]
DEPARTS = re.compile(r"^#\s*departs:\s*(\S+)\s+--\s+\S")


def _chain(path):
    """The config file and its bases, nearest first."""
    files = [path]
    base = (yaml.safe_load(open(path)) or {}).get("base")
    return files + (_chain(os.path.join(os.path.dirname(path), base)) if base else [])


def _departures(path):
    """{key: file} of the `# departs:` lines in the header (leading comment block) of each file of the chain."""
    named = {}
    for f in _chain(path):
        for line in open(f):
            if not line.startswith("#"):
                break
            m = DEPARTS.match(line)
            if m:
                named.setdefault(m.group(1), f)
    return named


def _layers(module):
    from models import DINOHead, NormedLinear
    if isinstance(module, DINOHead):
        return _layers(module.mlp) + ["L2", "NormedLinear"]
    out = []
    for m in module:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append("Linear")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append("BN" if m.affine else "BN(fixed)")
        elif isinstance(m, (nn.ReLU, nn.GELU)):
            out.append(type(m).__name__)
        elif isinstance(m, NormedLinear):
            out.append("NormedLinear")
        else:
            raise AssertionError(f"no name for {type(m).__name__} in the reference table's head notation")
    return out


def our_value(cfg, key):
    """A key of the table, read from a resolved config (see the table's header for the derived ones)."""
    if key == "total_batch":
        return cfg["optim.batch_size"] * cfg["training.written_for"]
    if key == "optimizer":
        return cfg["optim.optimizer"] if cfg["optim.optimizer"] == "adamw" else \
            "lars" if cfg["optim.lars_eta"] > 0 else "sgd"
    if key == "tau_final":
        return 1.0 if cfg["optim.tau_schedule"] == "cosine" else cfg["optim.tau"]
    if key.startswith("head."):
        from methods import build_net
        from rf_resnet import build_backbone
        net = build_net(build_backbone("resnet18_w16_cifar", width=4), cfg["method.name"], 32, 16, 32, 16,
                     dino_out_dim=8, proj_out_bn=cfg["method.proj_out_bn"], pred_out_bn=cfg["method.pred_out_bn"])
        head = getattr(net, key.split(".")[1])
        return None if head is None else "-".join(_layers(head))
    return cfg[key]


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_the_table_names_its_sources_and_every_config_exists():
    for recipe, entry in TABLE["recipes"].items():
        assert entry.get("accuracy"), recipe
        for name in entry["configs"]:
            assert os.path.isfile(os.path.join(REPO, "configs", name)), name
        for key, (value, source) in reference_keys(TABLE, recipe).items():
            assert source in TABLE["sources"], f"{recipe}.{key}: unknown source {source!r}"


@pytest.mark.parametrize("recipe,name", CONFIGS)
def test_each_key_equals_its_reference_or_is_a_named_departure(recipe, name):
    path = os.path.join(REPO, "configs", name)
    cfg = load_config(path)
    named = _departures(path)
    silent, stale = [], []
    for key, (value, source) in reference_keys(TABLE, recipe).items():
        ours = our_value(cfg, key)
        if not _same(ours, value) and key not in named:
            silent.append(f"{key}: {ours!r}, reference {value!r} ({TABLE['sources'][source]})")
        if _same(ours, value) and named.get(key) == path:
            stale.append(key)
    assert not silent, f"{name} departs silently from {recipe}'s reference: " + "; ".join(silent)
    assert not stale, f"{name} names departures that are not: {', '.join(stale)}"


@pytest.mark.parametrize("recipe,name", CONFIGS)
def test_each_header_says_its_gpus_total_batch_peak_lr_and_reference_accuracy(recipe, name):
    path = os.path.join(REPO, "configs", name)
    cfg = load_config(path)
    header = "".join(line for line in open(path) if line.startswith("#"))
    total = cfg["optim.batch_size"] * cfg["training.written_for"]
    assert cfg["training.written_for"] > 0, f"{name}: training.written_for is not set"
    assert re.search(rf"written for {cfg['training.written_for']} GPUs?\b", header, re.I), name
    assert f"total batch {total}" in header, name
    assert f"peak lr {cfg['optim.lr'] * total / 256:g}" in header, name
    assert "solo-learn" in header and "%" in header, f"{name}: no reference accuracy with its source"


def test_a_silent_departure_is_caught(tmp_path):
    """The check itself: a config on in100_byol.yaml with another lr and no departs line fails it; with one, it
    passes."""
    base = os.path.join(REPO, "configs", "in100_byol.yaml")
    for header, caught in (("", True), ("# departs: optim.lr -- a test\n", False)):
        path = tmp_path / "study.yaml"
        path.write_text(f"{header}base: {base}\noptim:\n  lr: 0.7\n")
        cfg, named = load_config(str(path)), _departures(str(path))
        keys = TABLE["recipes"]["byol"]["keys"]
        silent = [k for k, (v, _) in keys.items() if not _same(our_value(cfg, k), v) and k not in named]
        assert silent == (["optim.lr"] if caught else [])
