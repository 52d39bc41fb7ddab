"""Write a dataset split to an FFCV .beton (fields: image = RGBImageField, label = IntField).

    python write_ffcv.py --split train                      # the embedded default: Fashion-MNIST
    python write_ffcv.py --split val --config configs/in100.yaml --data.root=/datasets/imagenet

Sources (config `data.source`):
  fashion_mnist  Debian's dataset-fashion-mnist (60k train / 10k val), grayscale -> RGB, resized to data.image_size
  imagenet100    ROOT/{train,val}/<wnid>/* restricted to the wnids of data.class_list
  imagefolder    ROOT/{train,val}/<wnid>/* with every class folder of ROOT/train (ImageNet-1K)
  tiny_imagenet  Tiny-ImageNet-200 as distributed: ROOT/train/<wnid>/images/*.JPEG, ROOT/val/images/*.JPEG labelled
                 by ROOT/val/val_annotations.txt (file <tab> wnid <tab> box)
  synthetic      small random images of varying size, deterministic in (seed, split, index); for tests
Labels of folder sources are 0..K-1 in sorted wnid order (what torchvision's ImageFolder gives), taken from
ROOT/train so that train and val always agree.

Nothing is lost: files that cannot be decoded are skipped, counted and listed in <beton>.skipped.txt; the beton is
written to a temporary file beside the target and renamed only when complete.
"""
import argparse
import errno
import glob
import gzip
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from ctypes import c_uint64

import cv2
import numpy as np
from PIL import Image

from beton_files import beton_path, quiet_numba_finalizers
from config import ConfigError, load_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val")
Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check is replaced by writer.max_pixels (skip and list, not crash)


class SourceError(ValueError):
    """A dataset that cannot be written at all (missing root, empty class, class list mismatch)."""


# ---------------------------------------------------------------------------------------------------------------
# Image loading: any file PIL opens -> HxWx3 uint8 RGB, longest side <= max_resolution.

def resized_shape(h, w, max_resolution):
    """(h, w) after shrinking (never enlarging) so that the longest side is <= max_resolution; 0 means no limit."""
    if max_resolution <= 0 or max(h, w) <= max_resolution:
        return h, w
    scale = max_resolution / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_max_side(img, max_resolution):
    """Shrinks (never enlarges) so that the longest side is <= max_resolution; 0 means no limit."""
    h, w = resized_shape(*img.shape[:2], max_resolution)
    if (h, w) == img.shape[:2]:
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def load_image(path, max_resolution=0, max_pixels=178_956_970):
    """Decodes one file. Raises ValueError/OSError with a short reason for files that must be skipped."""
    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"too large: {w}x{h} pixels > writer.max_pixels={max_pixels}")
        if im.format == "JPEG" and max_resolution > 0:
            # DCT-domain downscaling while decoding; keeps both sides >= max_resolution, then INTER_AREA.
            im.draft(im.mode, (max_resolution, max_resolution))
        im.load()  # full decode: a truncated or corrupt file raises here
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            rgb = np.repeat(_high_byte(im)[:, :, None], 3, axis=2)
        elif im.mode == "F":
            raise ValueError("floating-point image mode F is not supported")
        else:
            # CMYK, L, LA, P (palette, with or without transparency), RGBA, YCbCr -> RGB
            rgb = np.asarray(im.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"unexpected decoded shape {rgb.shape}")
    return np.ascontiguousarray(resize_max_side(rgb, max_resolution))


def _high_byte(im):
    """A 16- or 32-bit integer grayscale image (PIL modes I;16*, I) -> uint8 by keeping the most significant byte of
    its declared depth: 16-bit PNG/TIFF >> 8; 32-bit TIFF >> 24 if unsigned, or negatives at 0 and >> 23 if signed
    (TIFF SampleFormat 2, which is how PIL writes mode I). Shifting by 8 for every depth made 32-bit images white."""
    arr = np.asarray(im).astype(np.int64)
    tags = getattr(im, "tag_v2", {})
    bits = (tags.get(258) or (32,))[0] if im.format == "TIFF" else (16 if im.mode.startswith("I;16") else 32)
    if im.mode.startswith("I;16") or bits <= 16:
        return np.clip(arr >> 8, 0, 255).astype(np.uint8)
    signed = (tags.get(339) or (1,))[0] == 2 if im.format == "TIFF" else True
    return (np.clip(arr, 0, None) >> 23 if signed else arr >> 24).clip(0, 255).astype(np.uint8)


MAX_PAGE_BYTES = 1 << 31  # the largest power of 2 that FFCV's header (uint32 page_size) holds


def _check_file(args):
    """(reason to skip or None, height, width as stored). decode=False reads only the header (writer.verify=0)."""
    path, max_resolution, max_pixels, decode = args
    try:
        if decode:
            h, w = load_image(path, max_resolution, max_pixels).shape[:2]
        else:
            with Image.open(path) as im:
                h, w = resized_shape(im.size[1], im.size[0], max_resolution)
        if h * w * 3 > MAX_PAGE_BYTES:
            raise ValueError(f"too large for a beton: {w}x{h} px is {h * w * 3 >> 20} MiB of raw pixels, more than "
                             f"FFCV's largest page ({MAX_PAGE_BYTES >> 20} MiB); set writer.max_resolution")
        return None, h, w
    except Exception as e:  # any reason to skip is recorded, never raised: one bad file must not stop a write
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 0, 0


def page_bytes(cfg, max_shape):
    """The FFCV page size: writer.page_size_mib, doubled until the largest image fits (a sample never spans pages;
    FFCV would abort the whole write on it). JPEG modes get room for an encoding larger than the raw pixels."""
    h, w = max_shape
    need = h * w * 3
    if cfg["writer.write_mode"] != "raw":
        need = need * 3 // 2 + (64 << 10)
    page = cfg["writer.page_size_mib"] << 20
    while page < need and page < MAX_PAGE_BYTES:
        page *= 2
    return page


# ---------------------------------------------------------------------------------------------------------------
# Sources. Each has: __len__, label(i), image(i) -> HxWx3 uint8, and `paths` (a list, or None when in memory).

class FashionMNIST:
    FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    paths = None

    def __init__(self, root, split, image_size):
        image_file, label_file = (os.path.join(root, f) for f in self.FILES[split])
        for f in (image_file, label_file):
            if not os.path.isfile(f):
                raise SourceError(f"Fashion-MNIST file not found: {f} — install it with "
                                  f"'apt-get install dataset-fashion-mnist' (make setup does), or set data.root")
        self.images = self._read_idx(image_file, magic=2051)  # [N, 28, 28] uint8
        self.labels = self._read_idx(label_file, magic=2049).astype(np.int64)  # [N]
        if len(self.images) != len(self.labels):
            raise SourceError(f"Fashion-MNIST {split}: {len(self.images)} images but {len(self.labels)} labels")
        self.image_size = image_size

    @staticmethod
    def _read_idx(path, magic):
        with gzip.open(path, "rb") as fh:
            data = fh.read()
        header = np.frombuffer(data, dtype=">u4", count=1)[0]
        if header != magic:
            raise SourceError(f"{path} is not an IDX file of the expected kind (magic {header}, expected {magic})")
        ndim = magic & 0xFF
        dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

    def __len__(self):
        return len(self.labels)

    def label(self, i):
        return int(self.labels[i])

    def max_shape(self):
        side = self.image_size or self.images.shape[1]
        return side, side

    def image(self, i):
        img = self.images[i]
        if self.image_size and self.image_size != img.shape[0]:
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))


class ImageFolderTree:
    """ROOT/<split>/<wnid>/<file>. classes: the wnids to keep (None = every folder of ROOT/train)."""

    def __init__(self, root, split, classes=None, max_resolution=0, max_pixels=178_956_970):
        if not os.path.isdir(root):
            raise SourceError(f"dataset root not found: {root} (set data.root)")
        train_dir, split_dir = os.path.join(root, "train"), os.path.join(root, split)
        for d in (train_dir, split_dir):
            if not os.path.isdir(d):
                raise SourceError(f"missing folder {d}: expected ImageNet layout ROOT/train/<wnid>/, ROOT/val/<wnid>/")
        train_classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
        split_classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        if classes is None:
            classes = train_classes
            if not classes:
                raise SourceError(f"no class folders in {train_dir}")
            if split_classes != train_classes:
                diff = sorted(set(train_classes) ^ set(split_classes))
                raise SourceError(f"{split_dir} and {train_dir} have different class folders "
                                  f"({len(diff)} differ, e.g. {', '.join(diff[:3])}); "
                                  f"val must be in <wnid>/ folders like train")
        else:
            for d, present in ((train_dir, set(train_classes)), (split_dir, set(split_classes))):
                missing = [c for c in classes if c not in present]
                if missing:
                    raise SourceError(f"{len(missing)} classes of the class list are missing in {d}, "
                                      f"e.g. {', '.join(missing[:3])}")
            classes = sorted(classes)
        self.classes = classes
        self.paths, labels, self.ignored = [], [], 0
        self.not_read = []  # (path, reason): dangling symlinks, files in nested sub-folders (listed, never dropped)
        for label, wnid in enumerate(classes):
            class_dir = os.path.join(split_dir, wnid)
            files = []
            for e in sorted(os.scandir(class_dir), key=lambda e: e.name):
                if e.name.startswith("."):
                    continue
                if e.is_symlink() and not os.path.exists(e.path):
                    self.not_read.append((e.path, "dangling symlink: its target does not exist"))
                elif e.is_dir():
                    self.not_read += [(os.path.join(d, f), f"in a nested sub-folder of {class_dir}: not read (a "
                                       f"class folder must hold its images directly)")
                                      for d, _, names in sorted(os.walk(e.path)) for f in sorted(names)]
                elif e.is_file():
                    files.append(e.name)
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            self.ignored += len(files) - len(images)
            if not images:
                raise SourceError(f"empty class folder: {class_dir} has no image files")
            self.paths += [os.path.join(class_dir, f) for f in images]
            labels += [label] * len(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_resolution, self.max_pixels = max_resolution, max_pixels

    def __len__(self):
        return len(self.paths)

    def label(self, i):
        return int(self.labels[i])

    def image(self, i):
        try:
            return load_image(self.paths[i], self.max_resolution, self.max_pixels)
        except Exception as e:
            raise RuntimeError(f"cannot decode {self.paths[i]}: {e} (writer.verify=1 skips such files)") from e


class TinyImageNet(ImageFolderTree):
    """Tiny-ImageNet-200's own layout (one of the CO-SSL paper's datasets): train images in
    ROOT/train/<wnid>/images/, val images in one folder ROOT/val/images/ with their wnids in
    ROOT/val/val_annotations.txt. Labels: 0..K-1 in sorted wnid order of ROOT/train (as ImageFolder would give);
    a val image whose wnid has no train folder, or that the annotations do not name, is an error (a beton with
    labels the other split lacks would be silently wrong)."""

    def __init__(self, root, split, max_resolution=0, max_pixels=178_956_970):
        if not os.path.isdir(root):
            raise SourceError(f"dataset root not found: {root} (set data.root)")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise SourceError(f"missing folder {train_dir}: expected Tiny-ImageNet's layout ROOT/train/<wnid>/images/")
        self.classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise SourceError(f"no class folders in {train_dir}")
        index = {wnid: i for i, wnid in enumerate(self.classes)}
        self.paths, labels, self.ignored, self.not_read = [], [], 0, []
        if split == "train":
            for wnid in self.classes:
                folder = os.path.join(train_dir, wnid, "images")
                files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
                images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
                self.ignored += len(files) - len(images)
                if not images:
                    raise SourceError(f"empty class folder: {folder} has no image files")
                self.paths += [os.path.join(folder, f) for f in images]
                labels += [index[wnid]] * len(images)
        else:
            folder, notes = os.path.join(root, split, "images"), os.path.join(root, split, f"{split}_annotations.txt")
            if not os.path.isfile(notes) or not os.path.isdir(folder):
                raise SourceError(f"missing {notes} or {folder}: expected Tiny-ImageNet's layout "
                                  f"ROOT/{split}/images/ and ROOT/{split}/{split}_annotations.txt")
            wnid_of = {}
            with open(notes) as fh:
                for n, line in enumerate(fh, 1):
                    fields = line.rstrip("\n").split("\t")
                    if not line.strip():
                        continue
                    if len(fields) < 2:
                        raise SourceError(f"{notes}, line {n}: expected 'file<TAB>wnid<TAB>...', got {line.strip()!r}")
                    if fields[1] not in index:
                        raise SourceError(f"{notes}, line {n}: wnid {fields[1]} has no folder in {train_dir}")
                    if fields[0] in wnid_of and wnid_of[fields[0]][0] != fields[1]:
                        first, at = wnid_of[fields[0]]
                        raise SourceError(f"{notes}: {fields[0]} is annotated twice with different wnids ({first} "
                                          f"on line {at}, {fields[1]} on line {n})")
                    wnid_of.setdefault(fields[0], (fields[1], n))
            files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            self.ignored = len(files) - len(images)
            unnamed = [f for f in images if f not in wnid_of]
            if unnamed:
                raise SourceError(f"{len(unnamed)} images of {folder} are not in {notes}, e.g. {unnamed[0]}")
            present = set(images)
            absent = [f for f in wnid_of if f not in present]
            if absent:
                raise SourceError(f"{len(absent)} images named in {notes} are missing from {folder}, e.g. "
                                  f"{absent[0]} (line {wnid_of[absent[0]][1]}); a val split missing images would "
                                  f"report on fewer images than its annotations say")
            self.paths = [os.path.join(folder, f) for f in images]
            labels = [index[wnid_of[f][0]] for f in images]
            if not self.paths:
                raise SourceError(f"no images in {folder}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_resolution, self.max_pixels = max_resolution, max_pixels


def read_class_list(path):
    """A file of wnids, one per line ('#' comments and blank lines allowed); duplicates are an error."""
    if not os.path.isfile(path):
        raise SourceError(f"class list not found: {path}")
    wnids = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if len(line.split()) != 1:
                raise SourceError(f"{path}:{line_no}: expected one wnid per line, got '{line}'")
            wnids.append(line)
    if not wnids:
        raise SourceError(f"class list {path} is empty")
    dups = sorted({w for w in wnids if wnids.count(w) > 1})
    if dups:
        raise SourceError(f"class list {path} repeats {', '.join(dups[:3])}")
    return wnids


class Synthetic:
    """Deterministic random images: a class-coloured rectangle on a smooth background, plus noise."""
    paths = None

    def __init__(self, split, n, min_size, max_size, classes, seed):
        if min_size > max_size:
            raise SourceError(f"data.synthetic_min_size={min_size} > data.synthetic_max_size={max_size}")
        self.n = n if split == "train" else max(1, n // 4)
        self.min_size, self.max_size, self.classes = min_size, max_size, classes
        self.seed = seed * 2 + SPLITS.index(split)

    def __len__(self):
        return self.n

    def label(self, i):
        return i % self.classes

    def max_shape(self):
        return self.max_size, self.max_size

    def image(self, i):
        return synthetic_image(self.seed, i, self.min_size, self.max_size, self.label(i), self.classes)


def synthetic_image(seed, i, min_size, max_size, label, classes):
    rng = np.random.default_rng([seed, i])
    h, w = rng.integers(min_size, max_size + 1, size=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    img = base + 40 * np.sin(xx[..., None] / rng.uniform(3, 9) + yy[..., None] / rng.uniform(3, 9))
    colour = np.array([np.cos(2 * np.pi * label / classes), np.sin(2 * np.pi * label / classes), 0.0]) * 100 + 128
    y0, x0 = rng.integers(0, h // 2 + 1), rng.integers(0, w // 2 + 1)
    img[y0:y0 + h // 2, x0:x0 + w // 2] = colour
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_source(cfg, split):
    source = cfg["data.source"]
    if source == "fashion_mnist":
        return FashionMNIST(cfg["data.root"], split, cfg["data.image_size"])
    if source == "synthetic":
        return Synthetic(split, cfg["data.synthetic_images"], cfg["data.synthetic_min_size"],
                         cfg["data.synthetic_max_size"], cfg["data.synthetic_classes"], cfg["writer.seed"])
    if source == "tiny_imagenet":
        return TinyImageNet(cfg["data.root"], split, cfg["writer.max_resolution"], cfg["writer.max_pixels"])
    classes = read_class_list(cfg["data.class_list"]) if source == "imagenet100" else None
    return ImageFolderTree(cfg["data.root"], split, classes, cfg["writer.max_resolution"], cfg["writer.max_pixels"])


# ---------------------------------------------------------------------------------------------------------------
# Writing.

class _Samples:
    """What FFCV's writer processes index: (image, label) for the kept indices of a source."""

    def __init__(self, source, indices, seed):
        self.source, self.indices, self.seed = source, indices, seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        np.random.seed((self.seed * 1_000_003 + i) % 2**32)  # 'proportion' draws np.random: same beton every run
        return self.source.image(i), self.source.label(i)


DISK_FULL_EXIT = 28  # a writer process's exit code for ENOSPC (errno 28), so the parent can say so in one line


class WriteError(RuntimeError):
    """The write cannot go on (a full disk, a dead writer process, a signal); the temporary file is removed."""


def _disk_full(path):
    return WriteError(f"no space left on device: cannot write {path} (free some space, or write elsewhere with "
                      f"--data.beton_dir)")


def _die_with_parent(parent_pid):
    """In a child process: the kernel kills it when its parent dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so a killed write never leaves processes writing on; Ctrl-C is the parent's to handle."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's liveness check below still runs once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _writer_process(parent_pid, work_fn, args):
    _die_with_parent(parent_pid)
    try:
        work_fn(*args)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            os._exit(DISK_FULL_EXIT)
        raise


def _make_writer_class():
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset

    class SafeDatasetWriter(DatasetWriter):
        """FFCV's writer waits forever when a writer process dies; this one raises instead. Its processes die with
        it, its shared-memory segment is unlinked as soon as they hold it, and a full disk is one WriteError."""

        def from_indexed_dataset(self, dataset, chunksize=100):
            indices = list(enumerate(range(len(dataset))))
            chunks = [indices[i:i + chunksize] for i in range(0, len(indices), chunksize)]
            self._write_checked(len(indices), chunks, worker_job_indexed_dataset, (dataset,))

        def _write_checked(self, num_samples, chunks, work_fn, extra_args):
            from tqdm import tqdm
            from ffcv.memory_allocator import MemoryAllocator
            self.num_samples = num_samples
            self.prepare()
            fork = multiprocessing.get_context("fork")  # the children inherit the metadata mapping, not its name
            procs, unlinked, queues = [], False, []
            try:
                work, allocations = queues[:] = fork.Queue(), fork.Queue()
                for chunk in chunks:
                    work.put(chunk)
                for _ in range(self.num_workers):
                    work.put(None)
                done = fork.Value(c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                        *extra_args)
                procs = [fork.Process(target=_writer_process, args=(os.getpid(), work_fn, args), daemon=True)
                         for _ in range(self.num_workers)]
                for p in procs:
                    p.start()
                self.metadata_sm.unlink()  # mapped in every process now: no /dev/shm entry outlives a SIGKILL
                unlinked = True
                allocation_list, finished = [], 0
                with tqdm(total=num_samples, desc="write", unit="img", file=sys.stderr, disable=None) as bar:
                    while finished < len(procs):
                        try:  # each process sends its allocations once, when it is done
                            allocation_list.extend(allocations.get(timeout=0.1))
                            finished += 1
                        except queue.Empty:
                            dead = [p for p in procs if p.exitcode not in (None, 0)]
                            if any(p.exitcode == DISK_FULL_EXIT for p in dead):
                                raise _disk_full(self.fname)
                            if dead:
                                raise WriteError(f"a writer process died (exit code {dead[0].exitcode}); its "
                                                 f"error is printed above")
                        bar.update(done.value - bar.n)
                for p in procs:
                    p.join()
                self.finalize(allocation_list)
            finally:
                for p in procs:  # on any error or signal: no writer goes on without us
                    if p.is_alive():
                        p.kill()
                    p.join(timeout=5)
                for q in queues:  # chunks nobody will read: don't wait at exit to flush them into the pipe
                    q.cancel_join_thread()
                self.metadata_sm.close()
                if not unlinked:
                    self.metadata_sm.unlink()

    return SafeDatasetWriter


def _fields(cfg):
    from ffcv.fields import IntField, RGBImageField
    return {"image": RGBImageField(write_mode=cfg["writer.write_mode"], max_resolution=None,
                                   smart_threshold=cfg["writer.smart_threshold"],
                                   jpeg_quality=cfg["writer.jpeg_quality"],
                                   compress_probability=cfg["writer.compress_probability"]),
            "label": IntField()}


def _write_listing(sidecar, listed):
    """<beton>.skipped.txt: one 'path<TAB>reason' line per file that is not in the beton."""
    _atomic_write_text(sidecar, "".join(f"{p}\t{why}\n" for p, why in listed))


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _remove_stale_temporaries(out, log):
    """<beton>.tmp-<pid> files whose process is gone (a write killed by SIGKILL, or a crashed machine)."""
    for path in glob.glob(glob.escape(out) + ".tmp-*"):
        pid = path.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            size = os.path.getsize(path)
            os.remove(path)
            log(f"removed {path} ({size / 2**20:.1f} MiB), left by a write that was killed (process {pid})")
        except FileNotFoundError:
            pass


class _Signalled(Exception):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_signal(signum, _frame):
    raise _Signalled(signum)


def write_split(cfg, split, log=print):
    """Writes one split and returns a summary dict. Raises SourceError/WriteError on what cannot be written; SIGTERM
    and SIGINT (in the main thread) stop it cleanly, removing the temporary file."""
    page_mib = cfg["writer.page_size_mib"]
    if page_mib & (page_mib - 1):
        raise ConfigError(f"bad value for 'writer.page_size_mib': {page_mib} (expected a power of 2)")
    out = beton_path(cfg, split)
    if os.path.exists(out) and not cfg["writer.overwrite"]:
        raise FileExistsError(f"{out} exists; pass --writer.overwrite=1 to replace it")
    t0 = time.perf_counter()
    source = make_source(cfg, split)
    workers = cfg["writer.workers"]
    keep, skipped = np.arange(len(source)), []
    t_verify = time.perf_counter()
    if source.paths is not None:  # decode every file (verify=1) or read its header (verify=0): the page size
        keep, skipped, biggest = _scan(source, workers, cfg["writer.max_resolution"], cfg["writer.max_pixels"],
                                       cfg["writer.verify"])
    else:
        biggest = source.max_shape()
    t_verify = time.perf_counter() - t_verify
    not_read = getattr(source, "not_read", [])
    listed = skipped + not_read
    sidecar = out + ".skipped.txt"
    if len(keep) == 0:
        raise SourceError(f"no readable images in {split}: all {len(skipped)} files were skipped")
    if source.paths is not None and cfg["writer.verify"]:
        empty = sorted(set(range(len(source.classes))) - set(source.labels[keep].tolist()))
        if empty:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            _write_listing(sidecar, listed)
            more = f", and {len(empty) - 1} more such classes" if len(empty) > 1 else ""
            raise SourceError(f"class folder {source.classes[empty[0]]} of {split} has no readable image (all its "
                              f"files were skipped{more}); a beton without it would have fewer classes than the "
                              f"other split; reasons in {sidecar}")
    if cfg["writer.shuffle"]:
        keep = np.random.default_rng(cfg["writer.seed"]).permutation(keep)
    page = page_bytes(cfg, biggest)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _remove_stale_temporaries(out, log)
    tmp = f"{out}.tmp-{os.getpid()}"
    writer_class = _make_writer_class()
    handlers = {}
    try:
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, _raise_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        writer = writer_class(tmp, _fields(cfg), page_size=page, num_workers=workers)
        writer.from_indexed_dataset(_Samples(source, keep, cfg["writer.seed"]), chunksize=cfg["writer.chunk_size"])
        os.replace(tmp, out)  # atomic: the final path holds either nothing (or the old beton) or a complete one
        if listed:
            _write_listing(sidecar, listed)
        elif os.path.exists(sidecar):
            os.remove(sidecar)  # stale list from an earlier write of this path
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(e.filename or tmp) from None
        raise
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        if os.path.exists(tmp):
            os.remove(tmp)
    seconds = time.perf_counter() - t0
    summary = {"split": split, "path": out, "written": int(len(keep)), "skipped": len(skipped),
               "not_read": len(not_read), "ignored_files": getattr(source, "ignored", 0),
               "bytes": os.path.getsize(out), "page_mib": page >> 20, "seconds": seconds,
               "verify_seconds": t_verify, "img_per_s": len(keep) / seconds}
    log(f"{split}: wrote {summary['written']} images, skipped {summary['skipped']}"
        + (f", did not read {len(not_read)} (dangling symlinks, files in nested sub-folders)" if not_read else "")
        + (f" (listed in {sidecar})" if listed else "")
        + (f", ignored {summary['ignored_files']} non-image files" if summary["ignored_files"] else "")
        + f", {summary['bytes'] / 2**20:.1f} MiB in {seconds:.1f} s ({summary['img_per_s']:.0f} img/s"
        + (f"; {t_verify:.1f} s of it verifying)" if t_verify > 0.05 else ")"))
    if page != page_mib << 20:
        log(f"page size {page >> 20} MiB instead of writer.page_size_mib={page_mib}: the largest image "
            f"({biggest[1]}x{biggest[0]} px) needs it")
    log(out)
    return summary


def _scan(source, workers, max_resolution, max_pixels, decode):
    """Every file once in `workers` processes: decoded (writer.verify=1: the unreadable are skipped) or its header
    only (verify=0: sizes for the page). Returns (indices to keep, [(path, reason)] skipped, largest (h, w))."""
    from tqdm import tqdm
    jobs = [(p, max_resolution, max_pixels, decode) for p in source.paths]
    chunk = max(1, min(256, len(jobs) // (workers * 8) or 1))
    with multiprocessing.get_context("fork").Pool(workers, _die_with_parent, (os.getpid(),)) as pool:
        checked = list(tqdm(pool.imap(_check_file, jobs, chunksize=chunk), total=len(jobs),
                            desc="verify" if decode else "sizes", unit="img", file=sys.stderr, disable=None))
    keep = np.array([i for i, (r, _, _) in enumerate(checked) if r is None or not decode], dtype=np.int64)
    skipped = [(source.paths[i], r) for i, (r, _, _) in enumerate(checked) if r is not None and decode]
    biggest = max(((h, w) for r, h, w in checked if r is None), key=lambda hw: hw[0] * hw[1], default=(1, 1))
    return keep, skipped, biggest


CONFIG_SECTIONS = ("data", "writer")  # what --help lists and --print-config prints


def main(argv=None):
    from config import help_text, print_config
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=help_text(CONFIG_SECTIONS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=SPLITS, help="which beton to write (required unless --print-config)")
    parser.add_argument("--config", help="YAML config (default: the embedded Fashion-MNIST default)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (data, writer) as YAML and exit")
    args, overrides = parser.parse_known_args(argv)
    quiet_numba_finalizers()
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print_config(cfg, CONFIG_SECTIONS)
            return 0
        if args.split is None:
            raise ConfigError(f"--split is required ({' or '.join(SPLITS)})")
        write_split(cfg, args.split)
    except _Signalled as e:
        print(f"write_ffcv.py: stopped by {e}; the temporary beton was removed", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, SourceError, FileExistsError, RuntimeError) as e:
        print(f"write_ffcv.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a read-only output folder
        print(f"write_ffcv.py: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
