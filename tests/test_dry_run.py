"""The dry run (train_coss.py --dry-run, dry_run.py): every ImageNet config passes it, and a recipe whose steps are
far above its reference's (the unclipped LARS of our earlier in100.yaml on 8 GPUs) is stopped with one line."""
import glob
import os

import pytest

from conftest import REPO, run_main
from config import load_config
from dry_run import dry_run, reference_of

IMAGENET = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                  if not os.path.basename(p).startswith(("fmnist", "demo")))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", IMAGENET, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs")))
def test_every_imagenet_config_passes_the_dry_run(path):
    cfg = load_config(path)
    lines = []
    ratios = dry_run(cfg, steps=2, res=32, batch=8, log=lines.append)
    assert lines[-1].startswith("dry run: ok"), lines[-1]
    assert "weights (conv, linear)" in ratios and all(r >= 0 for r in ratios["weights (conv, linear)"][0])
    assert any(line.startswith("dry run: total batch") for line in lines)
    if reference_of(cfg) is not None:  # the table's configs are measured beside their reference recipe
        assert ratios["weights (conv, linear)"][1] is not None


@pytest.mark.timeout(600)
def test_the_old_unclipped_lars_on_8_gpus_is_stopped_with_one_line():
    """in100.yaml as it was: 256 per GPU on 8 GPUs, lr 1.0 per 256 (peak 8.0), LARS eta 0.02 without the clip:
    every layer moves by 8.0 x 0.02 = 0.16 of its norm at the first step; solo-learn's recipe: 0.02."""
    res = run_main("train_coss.py", "--config", os.path.join(REPO, "configs", "in100.yaml"), "--dry-run",
                   "--dry-run-processes", "8", "--optim.batch_size=256", "--optim.lr=1.0", "--optim.lars_form=byol",
                   "--optim.lars_clip=0", "--augment.res=32")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("train_coss.py: error:")]
    assert len(errors) == 1 and "at step 1" in errors[0] and "moved by 0.16 of its norm" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
