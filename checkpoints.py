"""Checkpoints and resume: written whole and finite or not at all (serialised in memory, written to a temporary
file with fsync, renamed), RNG states, the exported backbone, what a resume must match (model, method, data), and
what dead processes leave in a run folder."""
import io
import json
import os
import random
import shutil

import numpy as np
import torch

from config import as_dict
from errors import CheckpointWriteError, TrainingError
from evaluate import nonfinite_tensors, read_checkpoint


def kept_checkpoint(path):
    """What a stopped run leaves to resume from, for its last message."""
    if os.path.isfile(path):
        return f"the last good checkpoint is kept at {path}"
    return f"no checkpoint had been written yet ({path} would hold the first, at the end of an epoch)"

def save_checkpoint(path, state, when):
    """Writes state atomically, and only if every tensor in it is finite: a run never replaces a good checkpoint
    with a poisoned one (NaN/inf in a weight, a BatchNorm statistic, the EMA target or the optimiser state)."""
    bad = nonfinite_tensors(state)
    if bad:
        raise TrainingError(f"NaN/inf in {len(bad)} tensors of the state {when} (e.g. {', '.join(bad[:3])}); "
                            f"not saved: {kept_checkpoint(path)}")
    buf = io.BytesIO()
    torch.save(state, buf)  # serialised in memory first: a failing disk then raises a plain OSError with its errno
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise CheckpointWriteError(f"could not write the checkpoint {when} ({e.strerror or e}; it needs "
                            f"{buf.getbuffer().nbytes / 2**20:.0f} MiB{free}); the previous one is untouched: "
                            f"{kept_checkpoint(path)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])

def export_backbone(online, path):
    """The backbone as a torchvision-loadable state_dict (standard layouts) for linear evaluation elsewhere."""
    from rf_resnet import export_torchvision_state_dict
    backbone = online.module.backbone if hasattr(online, "module") else online.backbone
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(export_torchvision_state_dict(backbone), tmp)
    os.replace(tmp, path)

DATA_KEYS = {  # what the data is, per source (beton_dir and decode may change; a key a source ignores may too)
    "synthetic": ("source", "name", "synthetic_images", "synthetic_classes", "synthetic_min_size",
                  "synthetic_max_size"),
    "fashion_mnist": ("source", "name", "root", "image_size"),
    "imagenet100": ("source", "name", "root", "class_list"),
    "imagefolder": ("source", "name", "root"),
    "tiny_imagenet": ("source", "name", "root"),
}

METHOD_SECTIONS = ("model", "method", "co", "logo", "moco", "dino")  # what the networks and the loss are


def resume_state(cfg, ckpt_path, data=None):
    """The checkpoint to continue from: complete, finite, and written with this run's model, method and data
    settings; data = {"train_images", "classes"} of the betons this run reads (checked against the checkpoint's)."""
    ck = read_checkpoint(ckpt_path)
    then_data, now_data = ck["config"].get("data", {}), as_dict(cfg)["data"]
    differ = [f"data.{k}: {then_data.get(k)!r} in the checkpoint, {now_data[k]!r} now"
              for k in DATA_KEYS[now_data["source"]] if k in then_data and then_data[k] != now_data[k]]
    if data is not None:
        held = ck.get("data") or {}
        classes = held.get("classes", ck["probe"]["weight"].shape[0] if ck.get("probe") else None)
        if classes is not None and classes != data["classes"]:
            differ.append(f"{classes} classes in the checkpoint's data, {data['classes']} now")
        if held.get("train_images") not in (None, data["train_images"]):
            differ.append(f"{held['train_images']} train images in the checkpoint's data, {data['train_images']} "
                          f"now")
    if differ:
        raise TrainingError(f"{ckpt_path} was trained on other data ({'; '.join(differ[:3])}); refusing to resume "
                            f"it on this data (give another training.run_name, or the data it was trained on)")
    now = as_dict(cfg)
    # a key the checkpoint's version did not have yet reads as its default (which is that version's behaviour)
    defaults = {".".join(key): param.default for key, param in cfg.entries.items()}
    if ck["config"].get("method", {}).get("name") in ("moco_v3", "co_moco_v3"):
        defaults["method.pred_out_bn"] = "fixed"  # before 0.7.0 MoCo v3's predictor ended in a fixed BatchNorm
    then = {(section, k): ck["config"].get(section, {}).get(k, defaults[f"{section}.{k}"])
            for section in METHOD_SECTIONS for k in now[section]}
    then_batch = ck["config"].get("optim", {}).get("batch_size")
    if then_batch not in (None, cfg["optim.batch_size"]):
        raise TrainingError(f"{ckpt_path} was trained at optim.batch_size={then_batch}, now {cfg['optim.batch_size']}: "
                            f"the lr, tau and step schedules were laid out in that batch's steps, and another batch "
                            f"would end them early or late; resume with --optim.batch_size={then_batch}")
    differ = [f"{section}.{k}: {then[section, k]!r} in the checkpoint, {v!r} now"
              for section in METHOD_SECTIONS for k, v in now[section].items()
              if then[section, k] != v and f"{section}.{k}" != "model.init"]  # init: step 0's weights only
    if differ:
        raise TrainingError(f"{ckpt_path} was written with other settings ({'; '.join(differ[:4])}"
                            f"{'; ...' if len(differ) > 4 else ''}); refusing to resume")
    return ck


def _clear_leftovers(run_dir, fresh, log=print):
    """What dead processes left in a run folder: `*.tmp-<pid>` files of processes that no longer run, and, when the
    run starts fresh (no checkpoint to resume), the log rows and TensorBoard events of an earlier attempt that was
    killed before its first checkpoint (kept, they would show steps 1..k twice)."""
    for name in os.listdir(run_dir):
        pid = name.rpartition(".tmp-")[2]
        if ".tmp-" in name and pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(run_dir, name))
    if fresh:
        gone = [n for n in ("log.jsonl", "tb") if os.path.exists(os.path.join(run_dir, n))]
        for name in gone:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if gone:
            log(f"{run_dir} held {' and '.join(gone)} of an earlier attempt that wrote no checkpoint: removed, "
                f"this run starts at step 1")

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True

def _forget_after(log_path, step):
    """On resume: drop the log rows of steps after the checkpoint (they are run again), atomically."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as fh:
        rows = fh.readlines()
    keep = []
    for line in rows:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut by the crash
            pass
    tmp = f"{log_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, log_path)
