"""Betons on disk, for every script that reads one: where a split lives (`beton_path`), what a file holds after
checking that it is a complete beton (`read_beton_info`, or one line naming the command that rewrites it), the
seeded subset a run trains or evaluates on, and the numba patch that keeps FFCV's loaders quiet at shutdown.
write_ffcv.py writes the files; train_coss.py, evaluate.py and the benchmarks read them through this module."""
import os

import numpy as np


def beton_path(cfg, split):
    """Where `split` of this config lives; the trainer reads the same path."""
    return os.path.join(cfg["data.beton_dir"], f"{cfg['data.name']}_{split}.beton")


def quiet_numba_finalizers():
    """numba 0.68 releases a collected dispatcher's code by iterating its OrderedDict of overloads, which FFCV's
    loader threads may be filling at that moment (compiling the same function for another Loader): the iteration
    raises KeyError, printed as 'Exception ignored in: <finalize object ...>' in the middle of successful runs.
    Scripts call this once: the finalizer then releases a snapshot of the overloads, which is what it means to do."""
    from numba.core import dispatcher, utils
    if getattr(dispatcher._DispatcherBase, "_coss_quiet", False):
        return

    def _make_finalizer(self):
        overloads, targetctx = self.overloads, self.targetctx

        def finalizer(shutting_down=utils.shutting_down):
            if shutting_down():
                return
            for key in list(dict.keys(overloads)):  # the plain dict's keys: no linked-list walk to break
                cres = dict.get(overloads, key)
                try:
                    if cres is not None:
                        targetctx.remove_user_function(cres.entry_point)
                except KeyError:
                    pass
        return finalizer
    dispatcher._DispatcherBase._make_finalizer = _make_finalizer
    dispatcher._DispatcherBase._coss_quiet = True


class BetonError(ValueError):
    """A beton that is missing or cannot be read (one line for the user, naming the command that rewrites it)."""


def write_command(cfg, split, overwrite=False):
    """The write_ffcv.py command that (re)writes `split` of this config, with the user's --data.* overrides."""
    parts = ["python write_ffcv.py", f"--split {split}"]
    if getattr(cfg, "source_file", None):
        parts.append(f"--config {cfg.source_file}")
    parts += [f"--{k}={v}" for k, v in getattr(cfg, "overrides", {}).items() if k.startswith("data.")]
    return " ".join(parts + (["--writer.overwrite=1"] if overwrite else []))


def seeded_subset(total, n, seed):
    """Indices of an N-image subset of a beton of `total` images: all of them when n is 0 or >= total, else n drawn
    without replacement by a generator seeded with `seed` (the same subset on every rank and on resume), sorted so
    that a sequential read stays in file order. Never the first n: a class-ordered beton (every ImageFolder
    source) would give the first classes only."""
    if not n or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def read_beton_info(cfg, split):
    """(path, number of images, number of classes) of `split`, after checking that the file is a complete beton
    with image and label fields: a missing, empty, truncated or foreign file raises BetonError (one line)."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType
    path = beton_path(cfg, split)
    if not os.path.isfile(path):
        raise BetonError(f"beton not found: {path} — write it with: {write_command(cfg, split)}")
    size = os.path.getsize(path)

    def bad(why):
        return BetonError(f"{path} is not a readable beton ({why}) — rewrite it with: "
                          f"{write_command(cfg, split, overwrite=True)}")
    if size < HeaderType.itemsize:
        raise bad(f"{size} bytes: empty or truncated")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise bad("no FFCV header: a foreign file or a damaged start")
    if not HeaderType.itemsize < int(header["alloc_table_ptr"]) < size:
        raise bad(f"truncated: the file's {size} bytes end before its allocation table")
    try:
        reader = Reader(path)
    except Exception as e:  # a foreign or damaged header: FFCV raises AssertionError, ValueError, KeyError, ...
        raise bad(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable header'}") from None
    if not {"image", "label"} <= set(reader.field_names):
        raise bad(f"fields {reader.field_names}, expected image and label")
    n = int(reader.num_samples)
    if n == 0 or len(reader.metadata) != n or (size - int(header["alloc_table_ptr"])) % ALLOC_TABLE_TYPE.itemsize:
        raise bad("truncated: header, metadata and allocation table do not fit the file's "
                  f"{size} bytes")
    table = reader.alloc_table
    if int((table["ptr"] + table["size"]).max()) > size:
        raise bad("truncated: samples point past the end of the file")
    image_ptrs = reader.metadata[f"f{reader.field_names.index('image')}"]["data_ptr"]
    if not np.isin(image_ptrs, table["ptr"]).all():
        raise bad("truncated: some images are missing from the allocation table")
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    if labels.min() < 0:
        raise bad("negative labels")
    return path, n, int(labels.max()) + 1
