"""A run folder and what the trainer writes into it besides checkpoints: its name, params.json (the config the run
started with, and each resume), and the metrics (log.jsonl rows, the same scalars to TensorBoard)."""
import json
import os
import time

import torch.distributed as dist

from config import as_dict


def run_folder(cfg):
    """<out_dir>/<run_name>; with no run_name, <method>_<backbone>_s<seed>_<start time>, and on resume the newest
    such folder."""
    out, name = cfg["training.out_dir"], cfg["training.run_name"]
    if name:
        return os.path.join(out, name)
    base = (f"{cfg['method.name']}{'_logo' if cfg['logo.enabled'] else ''}_{cfg['model.backbone']}"
            f"_s{cfg['training.seed']}_")
    if cfg["training.resume"] and os.path.isdir(out):
        earlier = sorted(d for d in os.listdir(out) if d.startswith(base))
        if earlier:
            return os.path.join(out, earlier[-1])
    return os.path.join(out, base + time.strftime("%Y%m%d-%H%M%S"))


def shared_run_folder(cfg, world):
    """run_folder, decided on rank 0 and the same for all ranks (its default name holds rank 0's start time)."""
    run_dir = run_folder(cfg)
    if world > 1:
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    return run_dir


def write_params(run_dir, cfg, resumed_from=None):
    """params.json holds the config the run started with; a resume appends when, where and what changed."""
    path = os.path.join(run_dir, "params.json")
    now = json.loads(json.dumps(as_dict(cfg)))  # tuples as lists, as they come back from the file
    if resumed_from is not None and os.path.isfile(path):
        try:
            params = json.load(open(path))
        except ValueError:
            params = {}
        original = {k: v for k, v in params.items() if k != "resumes"} or resumed_from["config"]
        changed = {f"{sec}.{k}": [original.get(sec, {}).get(k), v] for sec, keys in now.items() for k, v in keys.items()
                   if original.get(sec, {}).get(k) != v}
        params = {**original, "resumes": params.get("resumes", []) + [
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": resumed_from["epoch"],
             "step": resumed_from["step"], "changed": changed}]}
    else:
        params = now
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(params, fh, indent=1)
    os.replace(tmp, path)


class RunLog:
    """log.jsonl (one JSON row per logged step or evaluation, appended and flushed) and TensorBoard scalars (tb/);
    on resume TensorBoard hides the events of steps after the checkpoint (purge_step), as log.jsonl drops their rows
    (checkpoints.forget_after)."""

    def __init__(self, run_dir, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter
        self.file = open(os.path.join(run_dir, "log.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def row(self, row, step):
        self.file.write(json.dumps({"time": time.time(), **row}) + "\n")
        self.file.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, step)

    def close(self):
        self.file.close()
        self.tb.close()
