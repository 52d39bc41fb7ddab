"""Every "N images" option draws a seeded random subset, never the first N: on a class-ordered beton (any
ImageFolder source) the first 10 % would hold the first tenth of the classes."""
import numpy as np
import pytest
import torch

import train_coss
from conftest import make_cfg, quiet, read_beton, save_image
from evaluate import eval_loader, val_images
from beton_files import seeded_subset
from write_ffcv import write_split

CLASSES, PER_CLASS = 10, 30


def test_seeded_subset_is_random_reproducible_and_sorted():
    a = seeded_subset(1000, 100, 0)
    assert len(a) == len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0) and a.max() < 1000
    assert np.array_equal(a, seeded_subset(1000, 100, 0))          # the same on every rank and on resume
    assert not np.array_equal(a, seeded_subset(1000, 100, 1))
    assert a.min() < 100 and a.max() > 900                          # spread over the file, not its head
    assert np.array_equal(seeded_subset(50, 0, 0), np.arange(50))   # 0 = all
    assert np.array_equal(seeded_subset(50, 80, 0), np.arange(50))  # more than there is = all


@pytest.fixture(scope="module")
def ordered_beton(tmp_path_factory):
    """An ImageFolder beton of 10 classes x 30 images, written class by class (labels 0,0,...,1,1,...)."""
    tmp = tmp_path_factory.mktemp("ordered")
    for c in range(CLASSES):
        for i in range(PER_CLASS):
            save_image(tmp / "in" / "train" / f"n{c:08d}" / f"{i}.png", np.full((12, 12, 3), 20 * c, np.uint8))
        save_image(tmp / "in" / "val" / f"n{c:08d}" / "v.png", np.full((12, 12, 3), 20 * c, np.uint8))
    cfg = make_cfg(tmp, data__source="imagefolder", data__root=tmp / "in", data__name="ordered")
    write_split(cfg, "train", log=quiet)
    path = tmp / "betons" / "ordered_train.beton"
    labels = np.array(read_beton(path)[1])
    assert np.all(np.diff(labels) >= 0) and len(set(labels.tolist())) == CLASSES  # class-ordered, as ImageFolder
    return cfg, path, labels


@pytest.mark.timeout(300)
def test_a_tenth_of_a_class_ordered_beton_covers_its_classes(ordered_beton):
    """10 % = 30 images: the first 30 would be class 0 alone; a random 30 leave out a class with probability ~4 %
    each, so at least 8 of 10 classes (seeded: the same draw every time)."""
    cfg, path, labels = ordered_beton
    x, y = val_images(cfg, str(path), 30, 8)                     # evaluation subsets (bank, val, linear, robust)
    assert len(y) == 30 and len(set(y.tolist())) >= 8
    expected = labels[seeded_subset(len(labels), 30, 0)]
    assert sorted(y.tolist()) == sorted(expected.tolist())
    assert sum(len(b[1]) for b in eval_loader(cfg, str(path), 0, 8)) == len(labels)  # 0 = every image


@pytest.mark.timeout(300)
def test_the_training_subset_covers_the_classes_and_follows_the_seed(ordered_beton, tmp_path):
    cfg, path, labels = ordered_beton
    from config import load_config
    run_cfg = load_config(None, ["--training.device=cpu", "--augment.workers=1", "--optim.batch_size=8",
                                 "--model.width=4", "--augment.res=8", "--training.seed=3"])
    run = train_coss.build_run(run_cfg, torch.device("cpu"), 1, str(path), 30)
    indices = np.asarray(run.loader.indices)
    assert np.array_equal(np.sort(indices), seeded_subset(len(labels), 30, 3))
    assert len(set(labels[indices].tolist())) >= 8 and run.num_train == 30
