"""write_ffcv.py: round trips, the ImageNet-100 filter, bad inputs, atomic writes, the CLI."""
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from config import FASHION_MNIST_DIR
from conftest import REPO, make_cfg, read_beton, run_main, run_script, save_image, wnid_colour

import write_ffcv
from beton_files import beton_path
from write_ffcv import SourceError, Synthetic, write_split

PY = sys.executable


def quiet(*_):
    pass


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


# --------------------------------------------------------------------------------------------------- round trips

def test_raw_round_trip_is_exact_with_labels(tmp_path):
    cfg = make_cfg(tmp_path, data__source="synthetic", data__synthetic_images=40, data__synthetic_classes=7)
    summary = write_split(cfg, "train", log=quiet)
    images, labels = read_beton(summary["path"])
    source = Synthetic("train", 40, 24, 64, 7, 0)
    assert summary["written"] == len(images) == 40
    assert len({img.shape for img in images}) > 1  # varying sizes really were exercised
    for i, (img, label) in enumerate(zip(images, labels)):
        np.testing.assert_array_equal(img, source.image(i))
        assert label == source.label(i)


def test_shuffle_keeps_every_sample_once(tmp_path):
    cfg = make_cfg(tmp_path, data__source="synthetic", data__synthetic_images=30, writer__shuffle=1,
                   writer__seed=3)
    images, labels = read_beton(write_split(cfg, "train", log=quiet)["path"])
    source = Synthetic("train", 30, 24, 64, 10, 3)
    originals = [source.image(i).tobytes() for i in range(30)]
    order = [originals.index(img.tobytes()) for img in images]
    assert sorted(order) == list(range(30)) and order != list(range(30))
    assert labels == [source.label(i) for i in order]


# Stated bound: the synthetic images (noise of sigma 8, hard colour edges) lose most to OpenCV's 4:2:0 chroma
# subsampling, so at quality 90 we ask for >= 27.5 dB on average and >= 24 dB for every image (measured:
# 28.3 / 24.6); quality 50 must be worse on average than quality 90.
JPEG_MEAN_PSNR_DB, JPEG_MIN_PSNR_DB = 27.5, 24.0


def _jpg_psnrs(tmp_path, quality):
    cfg = make_cfg(tmp_path / f"q{quality}", data__source="synthetic", data__synthetic_images=20,
                   writer__write_mode="jpg", writer__jpeg_quality=quality)
    images, labels = read_beton(write_split(cfg, "train", log=quiet)["path"])
    source = Synthetic("train", 20, 24, 64, 10, 0)
    assert labels == [source.label(i) for i in range(20)]
    out = []
    for i, img in enumerate(images):
        ref = source.image(i)
        assert img.shape == ref.shape
        assert not np.array_equal(img, ref)  # really was JPEG-compressed
        out.append(psnr(img, ref))
    return np.array(out)


def test_jpg_round_trip_within_psnr(tmp_path):
    q90 = _jpg_psnrs(tmp_path, 90)
    assert q90.mean() >= JPEG_MEAN_PSNR_DB and q90.min() >= JPEG_MIN_PSNR_DB
    assert _jpg_psnrs(tmp_path, 50).mean() < q90.mean()


def test_max_resolution_shrinks_longest_side(tmp_path):
    cfg = make_cfg(tmp_path, data__source="synthetic", data__synthetic_images=12, data__synthetic_min_size=40,
                   data__synthetic_max_size=90, writer__max_resolution=0)
    src = Synthetic("train", 12, 40, 90, 10, 0)
    tree = tmp_path / "tree"
    for i in range(12):
        for split in ("train", "val"):
            save_image(tree / split / f"n{i % 3:08d}" / f"{i}.png", src.image(i))
    cfg = make_cfg(tmp_path, data__source="imagefolder", data__root=tree, writer__max_resolution=32)
    images, _ = read_beton(write_split(cfg, "train", log=quiet)["path"])
    assert all(max(img.shape[:2]) == 32 for img in images)


@pytest.mark.timeout(120)
def test_ffcv_loader_reads_the_beton(tmp_path):
    """The real FFCV Loader returns the stored pixels and labels (fixed size, so SimpleRGBImageDecoder applies)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    cfg = make_cfg(tmp_path, data__source="synthetic", data__synthetic_images=24, data__synthetic_min_size=20,
                   data__synthetic_max_size=20)
    path = write_split(cfg, "train", log=quiet)["path"]
    loader = Loader(path, batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    source = Synthetic("train", 24, 20, 20, 10, 0)
    seen = 0
    for images, labels in loader:
        for img, label in zip(images.numpy(), labels.numpy().reshape(-1)):
            np.testing.assert_array_equal(img, source.image(seen))
            assert label == source.label(seen)
            seen += 1
    assert seen == 24


# --------------------------------------------------------------------------------------------------- ImageNet-100

def test_imagenet100_filter_keeps_the_listed_classes_with_sorted_labels(tmp_path):
    wnids = [line.strip() for line in open(os.path.join(REPO, "data", "imagenet100_classes.txt")) if line.strip()]
    assert len(wnids) == 100
    extra = ["n99999998", "n99999999"]
    colours = {w: wnid_colour(w) for w in wnids + extra}
    assert len({c.tobytes() for c in colours.values()}) == 102
    tree = tmp_path / "imagenet"
    for w in wnids + extra:
        for split, n in (("train", 2), ("val", 1)):
            for k in range(n):
                save_image(tree / split / w / f"{w}_{k}.JPEG", np.tile(colours[w], (6, 5 + k, 1)), format="PNG")
    cfg = make_cfg(tmp_path, data__source="imagenet100", data__root=tree)
    for split, per_class in (("train", 2), ("val", 1)):
        images, labels = read_beton(write_split(cfg, split, log=quiet)["path"])
        assert len(images) == 100 * per_class
        by_colour = {c.tobytes(): w for w, c in colours.items()}
        found = [by_colour[img[0, 0].tobytes()] for img in images]
        assert not set(found) & set(extra)
        assert sorted(set(found)) == sorted(wnids)
        assert labels == [sorted(wnids).index(w) for w in found]  # documented: labels in sorted wnid order


def test_imagefolder_uses_every_train_class(tmp_path):
    tree = tmp_path / "in"
    for w in ("n02", "n01", "n03"):
        for split in ("train", "val"):
            save_image(tree / split / w / "a.png", np.tile(wnid_colour(w), (4, 4, 1)))
    (tree / "train" / "n01" / "README.txt").write_text("not an image")
    summary = write_split(make_cfg(tmp_path, data__source="imagefolder", data__root=tree), "train", log=quiet)
    images, labels = read_beton(summary["path"])
    assert labels == [0, 1, 2] and summary["ignored_files"] == 1
    assert [img[0, 0].tolist() for img in images] == [wnid_colour(w).tolist() for w in ("n01", "n02", "n03")]


def _tiny_imagenet_tree(root, wnids, train_per_class=2, val_images=()):
    """A fake Tiny-ImageNet-200 tree: train/<wnid>/images/*.JPEG (+ the boxes file and wnids.txt of the real one),
    val/images/*.JPEG with val/val_annotations.txt; every image one colour per wnid. val_images: (file, wnid)."""
    for w in wnids:
        for k in range(train_per_class):
            save_image(root / "train" / w / "images" / f"{w}_{k}.JPEG", np.tile(wnid_colour(w), (64, 64, 1)),
                       format="PNG")
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t63\t63\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for name, w in val_images:
        save_image(root / "val" / "images" / name, np.tile(wnid_colour(w), (64, 64, 1)), format="PNG")
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val_images))


def test_tiny_imagenet_layout_gives_the_same_labels_in_both_splits(tmp_path):
    wnids = ["n03", "n01", "n02"]
    val = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n03"), ("val_3.JPEG", "n02")]
    root = tmp_path / "tiny-imagenet-200"
    _tiny_imagenet_tree(root, wnids, 2, val)
    cfg = make_cfg(tmp_path, data__source="tiny_imagenet", data__root=root, data__name="tiny200")
    by_colour = {wnid_colour(w).tobytes(): w for w in wnids}
    train = write_split(cfg, "train", log=quiet)
    images, labels = read_beton(train["path"])
    assert len(images) == 6 and train["ignored_files"] == 0  # the boxes files live beside images/, not in it
    assert [sorted(wnids).index(by_colour[img[0, 0].tobytes()]) for img in images] == labels == [0, 0, 1, 1, 2, 2]
    images, labels = read_beton(write_split(cfg, "val", log=quiet)["path"])
    found = [by_colour[img[0, 0].tobytes()] for img in images]
    assert found == ["n02", "n01", "n03", "n02"]  # file order of val/images
    assert labels == [sorted(wnids).index(w) for w in found] == [1, 0, 2, 1]


@pytest.mark.parametrize("damage, message", [("unknown wnid", "has no folder in"), ("unlisted file", "are not in"),
                                             ("no annotations", "expected Tiny-ImageNet's layout"),
                                             ("annotated twice", "v0.JPEG is annotated twice with different wnids "
                                                                 "\\(n01 on line 1, n02 on line 2\\)"),
                                             ("annotated, absent", "1 images named in .* are missing from")])
def test_tiny_imagenet_val_that_does_not_match_train_is_refused(tmp_path, damage, message):
    root = tmp_path / "tiny"
    _tiny_imagenet_tree(root, ["n01", "n02"], 1, [("v0.JPEG", "n01")])
    if damage == "unknown wnid":
        with open(root / "val" / "val_annotations.txt", "a") as fh:
            fh.write("v9.JPEG\tn77\t0\t0\t1\t1\n")
    elif damage == "unlisted file":
        save_image(root / "val" / "images" / "v1.JPEG", np.zeros((8, 8, 3), np.uint8), format="PNG")
    elif damage == "annotated twice":
        with open(root / "val" / "val_annotations.txt", "a") as fh:
            fh.write("v0.JPEG\tn02\t0\t0\t1\t1\n")
    elif damage == "annotated, absent":
        with open(root / "val" / "val_annotations.txt", "a") as fh:
            fh.write("v5.JPEG\tn02\t0\t0\t1\t1\n")
    else:
        os.remove(root / "val" / "val_annotations.txt")
    with pytest.raises(SourceError, match=message):
        write_split(make_cfg(tmp_path, data__source="tiny_imagenet", data__root=root), "val", log=quiet)


# --------------------------------------------------------------------------------------------------- bad input

def _jpeg_bytes(array, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def test_bad_files_are_converted_or_skipped_and_listed(tmp_path):
    rng = np.random.default_rng(0)
    tree = tmp_path / "in"
    good = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    c = tree / "train" / "n0"
    save_image(c / "good.png", good)
    (c / "random_bytes.JPEG").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (c / "empty.jpg").write_bytes(b"")
    (c / "truncated.jpg").write_bytes(_jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:600])
    (c / "unreadable.png").write_bytes(good.tobytes())
    os.makedirs(tree / "train" / "n1")
    cmyk = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="CMYK")
    cmyk.save(tree / "train" / "n1" / "cmyk.jpg", quality=100)
    gray = rng.integers(0, 256, (17, 13), dtype=np.uint8)
    save_image(tree / "train" / "n1" / "gray.jpg", gray, quality=100)
    g16 = (rng.integers(0, 65536, (9, 11))).astype(np.uint16)
    Image.fromarray(g16).save(tree / "train" / "n1" / "gray16.png")
    pal = Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).quantize(16)
    pal.info["transparency"] = 0
    pal.save(tree / "train" / "n1" / "palette.png", transparency=0)
    save_image(tree / "train" / "n1" / "huge.png", np.zeros((300, 400, 3), np.uint8) + 7)
    save_image(tree / "train" / "n1" / "large.jpg", rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    for w in ("n0", "n1"):
        save_image(tree / "val" / w / "v.png", good)

    cfg = make_cfg(tmp_path, data__source="imagefolder", data__root=tree, writer__max_pixels=100_000,
                   writer__max_resolution=64)
    summary = write_split(cfg, "train", log=quiet)
    bad = {"random_bytes.JPEG", "empty.jpg", "truncated.jpg", "unreadable.png", "huge.png"}
    assert summary["skipped"] == len(bad) and summary["written"] == 6
    listed = open(summary["path"] + ".skipped.txt").read().splitlines()
    assert sorted(os.path.basename(line.split("\t")[0]) for line in listed) == sorted(bad)
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in listed)
    assert "too large" in [line for line in listed if "huge.png" in line][0]

    images, labels = read_beton(summary["path"])
    assert labels == [0] + [1] * 5
    np.testing.assert_array_equal(images[0], good)
    by_name = dict(zip(["cmyk", "gray", "gray16", "large", "palette"], images[1:6]))  # sorted file order
    ref_cmyk = np.asarray(Image.open(tree / "train" / "n1" / "cmyk.jpg").convert("RGB"))
    np.testing.assert_array_equal(by_name["cmyk"], ref_cmyk)
    ref_gray = np.asarray(Image.open(tree / "train" / "n1" / "gray.jpg"))
    np.testing.assert_array_equal(by_name["gray"], np.stack([ref_gray] * 3, axis=2))
    np.testing.assert_array_equal(by_name["gray16"], np.stack([(g16 >> 8).astype(np.uint8)] * 3, axis=2))
    np.testing.assert_array_equal(by_name["palette"], np.asarray(pal.convert("RGB")))
    assert max(by_name["large"].shape[:2]) == 64 and by_name["large"].shape[2] == 3


def test_verify_off_fails_cleanly_on_a_bad_file_instead_of_hanging(tmp_path):
    tree = tmp_path / "in"
    for split in ("train", "val"):
        save_image(tree / split / "n0" / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tree / "train" / "n0" / "bad.jpg").write_bytes(b"not a jpeg at all")
    cfg = make_cfg(tmp_path, data__source="imagefolder", data__root=tree, writer__verify=0)
    with pytest.raises(RuntimeError, match="writer process died"):
        write_split(cfg, "train", log=quiet)
    out = beton_path(cfg, "train")
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]


def _run_cli(*args, timeout=120):  # a new process (conftest.run_script)
    return run_script("write_ffcv.py", *args, timeout=timeout)


def _run(*args):  # the command's main() in this process (conftest.run_main): what it prints and returns
    return run_main("write_ffcv.py", *args)


@pytest.mark.parametrize("case", ["missing_root", "empty_class", "list_mismatch", "val_mismatch",
                                  "missing_val", "duplicate_in_list", "fashion_missing"])
def test_unwritable_datasets_give_one_error_line_and_exit_nonzero(tmp_path, case):
    tree = tmp_path / "in"
    for split in ("train", "val"):
        for w in ("n1", "n2"):
            save_image(tree / split / w / "a.png", np.zeros((4, 4, 3), np.uint8))
    class_list = tmp_path / "classes.txt"
    class_list.write_text("n1\nn2\n")
    args = ["--data.source=imagefolder", f"--data.root={tree}"]
    expect = {"missing_root": "dataset root not found", "empty_class": "empty class folder",
              "list_mismatch": "missing in", "val_mismatch": "different class folders",
              "missing_val": "missing folder", "duplicate_in_list": "repeats n2",
              "fashion_missing": "apt-get install dataset-fashion-mnist"}[case]
    if case == "missing_root":
        args = ["--data.source=imagefolder", f"--data.root={tmp_path / 'nowhere'}"]
    elif case == "empty_class":
        os.makedirs(tree / "train" / "n3")
        os.makedirs(tree / "val" / "n3")
    elif case == "list_mismatch":
        class_list.write_text("n1\nn2\nn7\n")
        args = ["--data.source=imagenet100", f"--data.root={tree}", f"--data.class_list={class_list}"]
    elif case == "duplicate_in_list":
        class_list.write_text("n1\nn2\nn2\n")
        args = ["--data.source=imagenet100", f"--data.root={tree}", f"--data.class_list={class_list}"]
    elif case == "val_mismatch":
        os.rename(tree / "val" / "n2", tree / "val" / "n9")
    elif case == "missing_val":
        os.rename(tree / "val", tree / "validation")
    elif case == "fashion_missing":
        args = ["--data.source=fashion_mnist", f"--data.root={tmp_path}"]
    split = "val" if case in ("val_mismatch", "missing_val") else "train"
    res = _run("--split", split, *args, f"--data.beton_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("write_ffcv.py: error:") and expect in lines[0], res.stderr
    assert not os.path.exists(tmp_path / "out" / "fmnist_train.beton")


def test_bad_option_is_an_error(tmp_path):
    res = _run("--split", "train", "--writer.write_mod=raw")
    assert res.returncode == 2 and "unknown command line key 'writer.write_mod'" in res.stderr


# --------------------------------------------------------------------------------------------------- nothing lost

def test_existing_beton_is_kept_unless_overwrite(tmp_path):
    args = ["--data.source=synthetic", "--data.synthetic_images=8", f"--data.beton_dir={tmp_path}"]
    first = _run("--split", "train", *args)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "fmnist_train.beton"
    assert first.stdout.strip().splitlines()[-1] == str(out)  # the output path is printed last
    before = out.read_bytes()
    again = _run("--split", "train", *args, "--writer.seed=5")
    assert again.returncode == 2 and "--writer.overwrite=1" in again.stderr
    assert out.read_bytes() == before
    forced = _run("--split", "train", *args, "--writer.seed=5", "--writer.overwrite=1")
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() != before


@pytest.mark.timeout(180)
def test_killed_write_leaves_nothing_at_the_final_path(tmp_path):
    """SIGKILL while writing: no beton appears, and an older beton at that path survives untouched."""
    out = tmp_path / "fmnist_train.beton"
    for keep_old in (False, True):
        if keep_old:
            out.write_bytes(b"old beton")
        proc = subprocess.Popen([PY, os.path.join(REPO, "write_ffcv.py"), "--split", "train",
                                 "--data.source=synthetic", "--data.synthetic_images=200000",
                                 "--data.synthetic_min_size=64", "--data.synthetic_max_size=96",
                                 f"--data.beton_dir={tmp_path}", "--writer.overwrite=1", "--writer.workers=1"],
                                cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not any(".tmp-" in f and os.path.getsize(tmp_path / f) > 1 << 20
                                                 for f in os.listdir(tmp_path)):
            assert proc.poll() is None, "writer ended before it could be interrupted"
            time.sleep(0.05)
        assert proc.poll() is None, "no temporary beton appeared in time"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if keep_old:
            assert out.read_bytes() == b"old beton"
        else:
            assert not out.exists()


# --------------------------------------------------------------------------------------------------- embedded data

@pytest.mark.timeout(300)
def test_fashion_mnist_source_reads_the_debian_package():
    train = write_ffcv.FashionMNIST(FASHION_MNIST_DIR, "train", 32)
    val = write_ffcv.FashionMNIST(FASHION_MNIST_DIR, "val", 0)
    assert (len(train), len(val)) == (60000, 10000)
    assert sorted(set(train.labels.tolist())) == list(range(10))
    assert np.bincount(val.labels).tolist() == [1000] * 10  # the test set is balanced
    img = train.image(0)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert val.image(5).shape == (28, 28, 3) and val.image(5).max() > 0


def test_synthetic_sources_differ_between_splits():
    a, b = Synthetic("train", 8, 24, 64, 10, 0), Synthetic("val", 8, 24, 64, 10, 0)
    assert len(a) == 8 and len(b) == 2
    assert a.image(0).tobytes() != b.image(0).tobytes()
    assert a.image(3).tobytes() == Synthetic("train", 8, 24, 64, 10, 0).image(3).tobytes()  # deterministic


def test_source_error_for_inverted_synthetic_sizes(tmp_path):
    cfg = make_cfg(tmp_path, data__source="synthetic", data__synthetic_min_size=50, data__synthetic_max_size=10)
    with pytest.raises(SourceError, match="synthetic_min_size"):
        write_split(cfg, "train", log=quiet)


# ------------------------------------------------------------------------- nothing lost: every readable image written

def _tree(tmp_path, files):
    """ROOT/{train,val}/<wnid>/... with `files` {relative path under train: array}; val gets one small image a class."""
    tree = tmp_path / "in"
    for rel, array in files.items():
        save_image(tree / "train" / rel, array)
    for wnid in {rel.split("/")[0] for rel in files}:
        save_image(tree / "val" / wnid / "v.png", np.zeros((4, 4, 3), np.uint8))
    return tree


@pytest.mark.timeout(300)
@pytest.mark.parametrize("verify", [1, 0])
def test_a_default_raw_write_takes_an_image_larger_than_one_page(tmp_path, verify):
    """1300x1300 px raw is 4.8 MiB, over FFCV's default 4 MiB page (once an abort after the whole pass)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (1300, 1300, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    tree = _tree(tmp_path, {"n0/big.png": big, "n0/small.png": small, "n1/small.png": small})
    cfg = make_cfg(tmp_path, data__source="imagefolder", data__root=tree, writer__verify=verify)
    lines = []
    summary = write_split(cfg, "train", log=lines.append)
    assert summary["written"] == 3 and summary["page_mib"] == 8
    assert any("page size 8 MiB" in line and "1300x1300" in line for line in lines)
    images, labels = read_beton(summary["path"])
    np.testing.assert_array_equal(images[0], big)
    assert labels == [0, 0, 1]
    loader = Loader(summary["path"], batch_size=3, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0), ToTensor()],
                               "label": [IntDecoder(), ToTensor()]})
    batches = list(loader)  # the trainer's reader takes the larger page
    assert batches[0][0].shape == (3, 16, 16, 3)


def test_the_verification_pass_skips_what_no_page_can_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(write_ffcv, "MAX_PAGE_BYTES", 2 << 20)  # 2 MiB pages at most: 900x900 px cannot fit
    tree = _tree(tmp_path, {"n0/big.png": np.zeros((900, 900, 3), np.uint8), "n0/ok.png": np.zeros((9, 9, 3),
                                                                                                    np.uint8)})
    cfg = make_cfg(tmp_path, data__source="imagefolder", data__root=tree, writer__page_size_mib=2)
    summary = write_split(cfg, "train", log=quiet)
    assert (summary["written"], summary["skipped"]) == (1, 1)
    assert "too large for a beton" in open(summary["path"] + ".skipped.txt").read()


def test_a_class_folder_whose_every_file_is_unreadable_is_an_error(tmp_path):
    tree = _tree(tmp_path, {"n0/a.png": np.zeros((8, 8, 3), np.uint8), "n1/placeholder.png": np.zeros((4, 4, 3),
                                                                                                       np.uint8)})
    (tree / "train" / "n1" / "placeholder.png").write_bytes(b"garbage")
    (tree / "train" / "n1" / "b.jpg").write_bytes(b"")
    res = _run("--split", "train", "--data.source=imagefolder", f"--data.root={tree}",
               f"--data.beton_dir={tmp_path / 'out'}")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "class folder n1 of train has no readable image" in lines[0], res.stderr
    assert not (tmp_path / "out" / "fmnist_train.beton").exists()
    listed = (tmp_path / "out" / "fmnist_train.beton.skipped.txt").read_text()
    assert "placeholder.png" in listed and "b.jpg" in listed


def test_dangling_symlinks_and_files_in_nested_folders_are_listed_and_counted(tmp_path):
    tree = _tree(tmp_path, {"n0/a.png": np.zeros((8, 8, 3), np.uint8),
                            "n0/extra/deeper/b.png": np.zeros((8, 8, 3), np.uint8),
                            "n0/extra/c.png": np.zeros((8, 8, 3), np.uint8)})
    os.symlink(tmp_path / "nowhere.jpg", tree / "train" / "n0" / "gone.jpg")
    lines = []
    summary = write_split(make_cfg(tmp_path, data__source="imagefolder", data__root=tree), "train",
                          log=lines.append)
    assert (summary["written"], summary["skipped"], summary["not_read"]) == (1, 0, 3)
    assert "did not read 3" in lines[0]
    listed = dict(line.split("\t") for line in open(summary["path"] + ".skipped.txt").read().splitlines())
    assert {os.path.basename(p) for p in listed} == {"gone.jpg", "b.png", "c.png"}
    assert "dangling symlink" in listed[str(tree / "train" / "n0" / "gone.jpg")]
    assert "nested sub-folder" in listed[str(tree / "train" / "n0" / "extra" / "deeper" / "b.png")]


def test_32_bit_integer_tiffs_and_gifs_are_converted(tmp_path):
    ramp = np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * (2 ** 31 // 4096)   # 0 .. 2^31: black to white
    tree = tmp_path / "in"
    os.makedirs(tree / "train" / "n0")
    Image.fromarray(ramp.astype(np.int32), mode="I").save(tree / "train" / "n0" / "a32.tif")
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE).save(tree / "train" / "n0" / "b.gif")
    save_image(tree / "val" / "n0" / "v.png", np.zeros((4, 4, 3), np.uint8))
    summary = write_split(make_cfg(tmp_path, data__source="imagefolder", data__root=tree), "train", log=quiet)
    assert summary["written"] == 2
    images, _ = read_beton(summary["path"])
    expected = (ramp >> 23).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images[0], np.stack([expected] * 3, axis=2))
    assert images[0].min() == 0 and images[0].max() == 255  # a ramp, not all white
    np.testing.assert_array_equal(images[1], np.asarray(Image.open(tree / "train" / "n0" / "b.gif").convert("RGB")))


# ------------------------------------------------------------------------------ nothing lost: killed and full writes

def _processes_mentioning(text):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if text.encode() in fh.read():
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().split(") ", 1)[1].split()[0] != "Z":  # zombies hold nothing
                            pids.append(int(pid))
        except OSError:
            pass
    return pids


def _start_long_write(out_dir, workers=2):
    proc = subprocess.Popen([PY, os.path.join(REPO, "write_ffcv.py"), "--split", "train", "--data.source=synthetic",
                             "--data.synthetic_images=400000", "--data.synthetic_min_size=64",
                             "--data.synthetic_max_size=96", f"--data.beton_dir={out_dir}", "--writer.overwrite=1",
                             f"--writer.workers={workers}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(".tmp-" in f and os.path.getsize(out_dir / f) > 1 << 20
                                             for f in os.listdir(out_dir)):
        assert proc.poll() is None, f"writer ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)
    assert proc.poll() is None, "no temporary beton appeared in time"
    return proc


def _shm_segments():
    return set(f for f in os.listdir("/dev/shm") if f.startswith("psm_")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.timeout(300)
def test_sigkill_of_a_write_leaves_no_process_and_the_next_write_removes_its_temporary(tmp_path):
    out_dir = tmp_path / "out"
    os.makedirs(out_dir)
    shm_before = _shm_segments()
    proc = _start_long_write(out_dir)
    assert len(_processes_mentioning(str(out_dir))) >= 3  # the parent and its two writer processes
    os.kill(proc.pid, signal.SIGKILL)  # the parent only, as a cluster's OOM killer or scheduler would
    proc.wait()
    time.sleep(5)
    assert _processes_mentioning(str(out_dir)) == []
    stale = [f for f in os.listdir(out_dir) if ".tmp-" in f]
    assert len(stale) == 1
    assert _shm_segments() <= shm_before  # no /dev/shm segment left behind
    res = _run_cli("--split", "train", "--data.source=synthetic", "--data.synthetic_images=8",
                   f"--data.beton_dir={out_dir}")
    assert res.returncode == 0, res.stderr
    assert f"removed {out_dir / stale[0]}" in res.stdout
    assert sorted(os.listdir(out_dir)) == ["fmnist_train.beton"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_stops_a_write_cleanly(tmp_path, sig):
    out_dir = tmp_path / "out"
    os.makedirs(out_dir)
    proc = _start_long_write(out_dir)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("write_ffcv.py:")]
    assert lines == [f"write_ffcv.py: stopped by {signal.Signals(sig).name}; the temporary beton was removed"], err
    assert "Traceback" not in err
    assert os.listdir(out_dir) == []
    time.sleep(1)
    assert _processes_mentioning(str(out_dir)) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only); skipped with the reason where the machine does not allow mounting."""
    mnt = tmp_path / "disk"
    os.makedirs(mnt)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["before", "during"])
def test_a_full_disk_is_one_line_and_exit_2(small_disk, when):
    if when == "before":  # fill the disk completely first
        with open(small_disk / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
    res = _run_cli("--split", "train", "--data.source=synthetic", "--data.synthetic_images=3000",
                   "--data.synthetic_min_size=40", "--data.synthetic_max_size=48", f"--data.beton_dir={small_disk}",
                   timeout=240)  # ~16 MiB of raw pixels into 3 MiB
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("write_ffcv.py: error: no space left on device"), res.stderr
    assert str(small_disk) in lines[0]
    assert [f for f in os.listdir(small_disk) if f != "filler"] == []
