"""CO-SSL trainer: CO-BYOL, CO-SimCLR, BYOL, SimCLR and LoGo on RF-ResNets, fed by FFCV betons.

    python train_coss.py --config configs/demo.yaml --demo       # the CPU demo, a 5-minute budget (make demo)
    torchrun --nproc_per_node=8 train_coss.py --config configs/in100.yaml
    python train_coss.py --config configs/in100.yaml --training.resume=1   # continue a killed run exactly
    python train_coss.py --plot runs/<run>                        # PNG curves of a run

Reads top to bottom in run order: distributed set-up, the checks of a config, the loop (train: the loop,
evaluations and checkpoints around a Run, on one screen; run_epoch: one epoch's steps and rows), main. The pieces
it assembles, each in a module named for it: train_data.py (betons, views, loader), step.py (the networks, each
method's loss through methods/, and Run: everything one step needs, built by build_run; the benchmarks in bench/
time the same object), optimizers.py (LARS, schedules), checkpoints.py (atomic, finite checkpoints and resume),
run_files.py (run folder, params.json, log.jsonl and TensorBoard), environment.py (env.json), errors.py. The
monitors (kNN, linear probes) are in evaluate.py, the curves (--plot) in analyses.py.
Every run folder holds params.json (resolved config), env.json (versions, devices), log.jsonl (metrics),
TensorBoard scalars (tb/) and checkpoint.pt (atomic; the last good one survives a crash or a NaN).
"""
import argparse
import json
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import methods
from beton_files import BetonError, quiet_numba_finalizers
from checkpoints import (DATA_KEYS, _clear_leftovers, _forget_after, export_backbone, kept_checkpoint,  # noqa: F401
                         resume_state, rng_state, save_checkpoint, set_rng_state)
from config import ConfigError, as_dict, help_text, load_config, print_config
from environment import environment
from errors import CheckpointWriteError, Terminated, TrainingError
from evaluate import CheckpointError, evaluate, nonfinite_tensors
from methods import MethodError, pack_views  # noqa: F401
from optimizers import (LARS, build_optimizer, lr_at, param_groups, scale_lines, tau_at)  # noqa: F401
from rf_resnet import get_layout, min_input_side
from run_files import RunLog, run_folder, shared_run_folder, write_params  # noqa: F401
from step import (Prepared, Run, build_model, build_run, calibrate, check_local_map, check_schedule,  # noqa: F401
                  inductor_cache_per_isa, loss_spec, method_loss, update_state)
from train_data import (betons, clamp_loader_workers, resolution_at, train_loader, view_maker,  # noqa: F401
                        view_plan, views_text)

DEMO_CONFIG = "configs/fmnist.yaml"
CONFIG_SECTIONS = ("data", "model", "method", "co", "logo", "moco", "dino", "augment", "optim", "training",
                   "eval")  # what train_coss reads


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; otherwise one process).

def setup_distributed(device_pref):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device=cuda but no CUDA device is visible to torch; run on the CPU with "
                            "--training.device=cpu (or auto, which takes CUDA when there is one)")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


# ---------------------------------------------------------------------------------------------------------------
# Data: FFCV betons written by write_ffcv.py with the same config.


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedules.


# ---------------------------------------------------------------------------------------------------------------
# The losses of each method (pure functions in losses.py; here: which tensors go where).


# ---------------------------------------------------------------------------------------------------------------
# The step: one Run holds everything a training step needs; the trainer and every benchmark use it.


# optim.minutes: untimed first steps (compilation, caches, and the batches the loader queued ahead while the run
# started: timing those made a 2-core run 5-15 % longer than its budget), then at most this many timed steps


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a crash never leaves a half-written one.


# ---------------------------------------------------------------------------------------------------------------
# The run.

def check_options(cfg, num_train, world):
    name = cfg["method.name"]
    method = methods.get(name)
    if cfg["logo.enabled"] and not method.logo_base:
        bases = " or ".join(m.name for m in methods.REGISTRY.values() if m.logo_base)
        raise TrainingError(f"logo.enabled=1 needs method.name {bases} (LoGo's bases), got {name}")
    if cfg["method.proj_out_bn"] != "auto" and method.own_head_form:
        raise TrainingError(f"method.proj_out_bn={cfg['method.proj_out_bn']}: {name}'s head has its own form; "
                            "leave it auto")
    if cfg["method.pred_out_bn"] != "auto" and not method.predictor:
        raise TrainingError(f"method.pred_out_bn={cfg['method.pred_out_bn']}: {name} has no predictor; leave it auto")
    try:
        method.check(cfg, world)
    except MethodError as e:
        raise TrainingError(str(e)) from None
    if cfg["co.mixing"] == "convex" and cfg["co.w_s"] > 1:
        raise TrainingError(f"co.w_s={cfg['co.w_s']} > 1 with convex mixing; use co.mixing=additive")
    if cfg["augment.local_cmin"] > cfg["augment.local_cmax"]:
        raise TrainingError(f"augment.local_cmin={cfg['augment.local_cmin']} is above augment.local_cmax="
                            f"{cfg['augment.local_cmax']}")
    if cfg["logo.enabled"] and (cfg["augment.global_views"] != 2 or cfg["augment.local_views"]):
        raise TrainingError("logo.enabled=1 makes its own 2 global + 2 local views (logo.local_res, "
                            "logo_global_cmin, logo_local_cmax); leave augment.global_views=2 and local_views=0")
    if cfg["logo.clip"] and world > 1:
        raise TrainingError("logo.clip is single-process only for now; use logo.lambda under torchrun")
    if cfg["logo.enabled"] and cfg["logo.local_cmax"] <= 0.05:
        raise TrainingError(f"logo.local_cmax={cfg['logo.local_cmax']} is not above 0.05, LoGo's "
                            f"smallest local crop scale (its local crops take scale (0.05, logo_local_cmax))")
    if cfg["optim.steps"] and cfg["optim.minutes"]:
        raise TrainingError(f"optim.steps={cfg['optim.steps']} and optim.minutes={cfg['optim.minutes']:g} both set "
                            "the run's length; keep one (optim.minutes=0 or optim.steps=0)")
    check_view_sizes(cfg)
    out_dir, run_name = cfg["training.out_dir"], cfg["training.run_name"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainingError(f"training.out_dir={out_dir} is a file, not a folder; give a folder for the runs")
    if "/" in run_name or "\\" in run_name or run_name in (".", ".."):
        raise TrainingError(f"training.run_name={run_name!r} must be a plain folder name (no '/'); put the path in "
                            f"training.out_dir")
    if cfg["training.kernels"] == "triton" and not torch.cuda.is_available() and \
            os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter runs them on the CPU (the suite does)
        raise TrainingError("training.kernels=triton needs CUDA (the Triton ops run on the GPU, or on the CPU "
                            "under TRITON_INTERPRET=1); use training.kernels=auto or ref on the CPU")
    if cfg["optim.batch_size"] * world > num_train:
        raise TrainingError(f"batch of {cfg['optim.batch_size']} x {world} process(es) is larger than the "
                            f"{num_train} training images")


def check_view_sizes(cfg):
    """Every view the run makes (global, the resolution ramp's start, multi-crop's and LoGo's local views, and the
    evaluation's centre crops at augment.res) must be large enough for the backbone: BagNet's unpadded
    convolutions need at least its receptive field (33 px); smaller views would fail inside the first forward."""
    layout = get_layout(cfg["model.backbone"])
    need = min_input_side(layout)
    views = [("augment.res", cfg["augment.res"]), ("augment.res_start", cfg["augment.res_start"])]
    if cfg["augment.local_views"]:
        views.append(("augment.local_res", cfg["augment.local_res"]))
    if cfg["logo.enabled"]:
        views.append(("logo.local_res", cfg["logo.local_res"]))
    small = [f"{key}={res}" for key, res in views if res and res < need]
    if small:
        raise TrainingError(f"model.backbone={cfg['model.backbone']} needs views of at least {need} px (its unpadded "
                            f"convolutions leave nothing of a smaller one), but {' and '.join(small)}; raise "
                            f"{'them' if len(small) > 1 else 'it'} to {need} or more, or choose a padded backbone "
                            f"(python rf_resnet.py --list)")


def _evaluate(cfg, online, probe, device, num_classes, final, train_path, val_path, ckpt_path):
    """The monitors; a failure (e.g. a val beton damaged during the run) is one line that says the weights are safe."""
    try:
        betons(cfg)  # re-checked: cheap, and FFCV hangs on a damaged file instead of raising
        return evaluate(cfg, online.backbone, probe, device, num_classes, cfg["augment.res"], final, train_path,
                        val_path)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainingError(f"evaluation failed: {why}; the trained weights are safe: {kept_checkpoint(ckpt_path)}"
                            + (f" and {os.path.join(os.path.dirname(ckpt_path), 'backbone.pt')}" if final else "")
                            + f" (evaluate them with: python evaluate.py --ckpt {os.path.dirname(ckpt_path)})") \
            from None


def train(cfg, on_step=None, log=print):
    """Runs (or resumes) a training run: the loop, evaluations and checkpoints around a Run (build_run). Returns the
    final metrics (rank 0; other ranks get only run_dir and rank). `on_step(step)` is called after every step."""
    t_start = time.perf_counter()
    rank, world, device = setup_distributed(cfg["training.device"])
    is_main = rank == 0
    say = log if is_main else (lambda *_: None)  # lines every rank reaches but only rank 0 prints
    seed_and_threads(cfg, say)

    # data (both betons checked before anything else happens), then everything a step needs
    train_path, val_path, total_train, num_classes = betons(cfg)
    num_train = min(cfg["training.train_images"], total_train) if cfg["training.train_images"] else total_train
    data = {"train_images": num_train, "classes": num_classes}
    check_options(cfg, num_train, world)
    run_dir = cfg.run_dir = shared_run_folder(cfg, world)  # cfg.run_dir: for main's resume line after Ctrl-C
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    resuming = resume_wanted(cfg, run_dir, ckpt_path, log)
    # a resumed run takes every weight from its checkpoint: model.init is not read (its file may be gone)
    run = build_run(cfg, device, world, train_path, num_train, num_classes, total_train, init=not resuming)
    check_local_map(cfg, run.online, device)
    run.kept = lambda: kept_checkpoint(ckpt_path)

    # random-init baseline (before any step), or the checkpoint to continue from
    results, ck, eval_seconds = {}, None, 0.0
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        _clear_leftovers(run_dir, fresh=not resuming, log=log)
    if resuming:
        ck = resume_run(run, cfg, ckpt_path, data, is_main, log)
        results = ck.get("results", {})
    elif is_main and cfg["eval.random_init"]:
        t_eval = time.perf_counter()
        results["random_init"] = evaluate(cfg, run.online.backbone, None, device, num_classes, cfg["augment.res"],
                                          True, train_path, val_path)
        eval_seconds = time.perf_counter() - t_eval
        log(f"random init: knn={results['random_init']['knn']:.4f} probe={results['random_init'].get('probe', 0):.4f} "
            f"({eval_seconds:.0f} s)")
    if cfg["optim.minutes"] and ck is None:
        if cfg["training.compile"]:
            log("compiling the step (the first steps wait for it; a minute or more on a CPU) ...")
        calibrate(run, cfg["optim.minutes"], say)
    check_schedule(run, say)
    epochs = run.epochs
    if is_main:
        announce(cfg, run, run_dir, device, world, num_train, log)
        write_params(run_dir, cfg, ck)
        with open(os.path.join(run_dir, "env.json"), "w") as fh:
            json.dump(environment(device, world), fh, indent=1)
    runlog = RunLog(run_dir, run.global_step + 1 if ck is not None else None) if is_main else None

    def checkpoint(epoch, when):
        save_checkpoint(ckpt_path, {**run.state_dict(), "epoch": epoch + 1, "config": as_dict(cfg),
                                    "results": results, "data": data}, when)

    def report(epoch, final):  # the monitors; their row and line; the results reach the next checkpoint
        metrics = results[f"epoch{epoch}"] = _evaluate(cfg, run.online, run.probe, device, num_classes, final,
                                                       train_path, val_path, ckpt_path)
        runlog.row({"epoch": epoch, "step": run.global_step, **metrics}, run.global_step)
        log(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    timing = {"steps": 0, "seconds": 0.0, "eval_seconds": eval_seconds}
    try:  # a crash still leaves what was logged on disk
        for epoch in range(0 if ck is None else ck["epoch"], epochs):
            run_epoch(cfg, run, epoch, runlog, timing, on_step, is_main, world, log)
            # the weights first (only if finite), then the evaluation: a failing evaluation never costs the epoch
            last = epoch == epochs - 1
            if is_main and ((epoch + 1) % cfg["training.checkpoint_every"] == 0 or last):
                checkpoint(epoch, f"after epoch {epoch} (step {run.global_step})")
            elif is_main and nonfinite_tensors(run.state_dict()):  # caught now rather than at the next checkpoint
                raise TrainingError(f"NaN/inf in the state after epoch {epoch} (step {run.global_step}); "
                                    f"{kept_checkpoint(ckpt_path)}")
            if is_main and not last and cfg["eval.every"] and (epoch + 1) % cfg["eval.every"] == 0:
                report(epoch, final=False)
        if is_main and f"epoch{epochs - 1}" not in results:
            # the final evaluation, once the last checkpoint is on disk (also when a resume finds the run trained but
            # not evaluated); then the same weights are saved again with its results
            export_backbone(run.online, os.path.join(run_dir, "backbone.pt"))
            report(epochs - 1, final=True)
            checkpoint(epochs - 1, "with the final evaluation")
    finally:
        if runlog:
            runlog.close()
    results["run_dir"], results["rank"] = run_dir, rank
    if is_main:
        log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; run folder {run_dir} (checkpoint.pt, "
            f"backbone.pt, log.jsonl, params.json, env.json, tb/; curves: python train_coss.py --plot {run_dir})")
    return results


def run_epoch(cfg, run, epoch, runlog, timing, on_step, is_main, world, log):
    """One epoch of steps (the last one partial under optim.minutes), its log rows and closing line. Steps count from
    1 in logs and messages: "step k" is the k-th update (log rows carry the same k)."""
    run.set_epoch(epoch)
    t_epoch, seen, row = time.perf_counter(), 0, {}
    in_epoch = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
    bar = tqdm(total=in_epoch, desc=f"epoch {epoch}", unit="step", file=sys.stderr,
               disable=None if is_main else True)  # None: shown on a terminal only
    batches = run.batches()
    for i, batch in enumerate(batches):
        terms, probe_logits, labels = run.step(batch)
        step = run.global_step
        seen += len(labels) * world
        if is_main and (step % cfg["training.log_every"] == 0 or i == in_epoch - 1):
            rate = seen / (time.perf_counter() - t_epoch)  # metrics read here only: the steady state has no host
            lr = run.lr(step - 1)                           # sync of its own
            row = {"epoch": epoch, "step": step, "lr": lr, "res": run.res, "img_per_s": rate,
                   "probe_train_acc": float((probe_logits.argmax(1) == labels).float().mean()),
                   **{k: float(v.detach()) for k, v in terms.items()}}
            runlog.row(row, step)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_per_s=f"{rate:.0f}", refresh=False)
            if bar.disable:  # no terminal: a plain log line instead of the bar
                log(f"epoch {epoch} step {step}/{run.total_steps} loss {row['loss']:.4f} lr {lr:.3g} {rate:.0f} img/s")
        bar.update(1)
        if on_step is not None:
            on_step(step)
        if i == in_epoch - 1:
            break
    batches.close()  # a partial last epoch ends the loader's epoch early
    bar.close()
    seconds = time.perf_counter() - t_epoch
    timing["steps"] += in_epoch
    timing["seconds"] += seconds
    if is_main:
        left = (run.total_steps - run.global_step) * timing["seconds"] / timing["steps"]
        ending = f", then the final evaluation (~{timing['eval_seconds']:.0f} s)" if timing["eval_seconds"] else ""
        log(f"epoch {epoch} done ({epoch + 1}/{run.epochs}): loss {row.get('loss', float('nan')):.4f}, "
            f"{seen / seconds:.0f} img/s, {seconds:.0f} s; "
            f"{'training done' if left == 0 else f'ETA {left / 60:.1f} min of training'}{ending}")


def seed_and_threads(cfg, say):
    clamp_loader_workers(cfg, say)
    if cfg["training.threads"]:
        torch.set_num_threads(cfg["training.threads"])
    seed = cfg["training.seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_wanted(cfg, run_dir, ckpt_path, log):
    """Whether this run continues the checkpoint in run_dir; refuses a run folder that holds a run without
    training.resume, and training.resume=1 without a checkpoint."""
    resume, exists = cfg["training.resume"], os.path.isfile(ckpt_path)
    if exists and not resume:
        raise TrainingError(f"{run_dir} already holds a run; pass --training.resume=1 to continue it, or choose "
                            f"another training.run_name")
    if resume is True and not exists:
        raise TrainingError(f"training.resume=1 but there is no checkpoint to resume ({ckpt_path} does not exist); "
                            f"drop training.resume to start this run, or pass training.resume=auto to resume when "
                            f"there is a checkpoint and start fresh otherwise")
    if resume == "auto":
        log("training.resume=auto: " + (f"resuming {ckpt_path}" if exists else
                                        f"no checkpoint in {run_dir}, starting fresh"))
    return bool(resume) and exists


def resume_run(run, cfg, ckpt_path, data, is_main, log):
    """Loads the checkpoint into the Run (resume_state checks it first); log.jsonl drops the rows after it."""
    try:
        ck = resume_state(cfg, ckpt_path, data)
    except CheckpointError as e:
        raise TrainingError(f"cannot resume: {e}") from None
    run.load_state_dict(ck)
    if is_main:
        _forget_after(os.path.join(os.path.dirname(ckpt_path), "log.jsonl"), run.global_step)
    log(f"resumed {ckpt_path} at epoch {ck['epoch']}, step {run.global_step} ({cfg['method.name']}, "
        f"{cfg['model.backbone']}, data {cfg['data.name']}: {data['train_images']} train images, "
        f"{data['classes']} classes)")
    return ck


def announce(cfg, run, run_dir, device, world, num_train, log):
    """The start line: where, what data, steps, batch, views, compile; then what the recipe is at this scale."""
    log(f"run {run_dir}: {device}, {num_train} train images, {run.steps_per_epoch} steps/epoch x {run.epochs} epochs "
        f"({run.total_steps} steps, from step {run.global_step}), batch {cfg['optim.batch_size']}"
        f"{f' x {world} processes' if world > 1 else ''}, {views_text(cfg)}, "
        f"compile {'on' if cfg['training.compile'] else 'off'}")
    for line in scale_lines(cfg, world, device):
        log(line)
    if cfg["training.compile"] and not cfg["optim.minutes"]:
        log("compiling the step (the first step waits for it; a minute or more on a CPU) ...")


def resume_hint(cfg, argv):
    """After Ctrl-C: what is kept, and the command that continues the run."""
    run_dir = getattr(cfg, "run_dir", None) if cfg is not None else None
    if run_dir is None:
        return "stopped before the run started; nothing to resume"
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        return f"{kept_checkpoint(ckpt)}; nothing to resume yet"
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith(("--training.resume", "--training.run_name", "--training.out_dir"))]
    args += [f"--training.out_dir={os.path.dirname(run_dir) or '.'}",
             f"--training.run_name={os.path.basename(run_dir)}", "--training.resume=1"]
    return f"{kept_checkpoint(ckpt)}; resume with: python train_coss.py {' '.join(args)}"


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=help_text(CONFIG_SECTIONS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default: the built-in defaults = {DEMO_CONFIG})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--plot", metavar="RUN_DIR", help="write RUN_DIR/curves.png and exit")
    parser.add_argument("--methods", action="store_true", help="list the registered methods (methods/) and exit")
    parser.add_argument("--demo", action="store_true", help="end with the one-line demo summary")
    parser.add_argument("--dry-run", action="store_true", help="build the run as on --dry-run-processes processes, "
                        "take 5 CPU steps on synthetic images at the recipe's peak lr, print each parameter group's "
                        "update-to-weight ratios and the loss; exit 2 where a ratio is far above the references' "
                        "(dry_run.py)")
    parser.add_argument("--dry-run-processes", type=int, default=0, metavar="N",
                        help="processes (GPUs) the dry run assumes (default: training.written_for, else 1)")
    args, overrides = parser.parse_known_args(argv)
    if threading.current_thread() is threading.main_thread():  # a scheduler's SIGTERM ends a run as Ctrl-C does
        signal.signal(signal.SIGTERM, _terminate)
    if args.methods:
        print(methods.table())
        return 0
    if args.plot:
        try:
            from analyses import plot_run
            print(plot_run(args.plot))
        except FileNotFoundError as e:
            print(f"train_coss.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    quiet_numba_finalizers()
    t0, cfg = time.perf_counter(), None
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:  # the same refusals the run would give, before printing what it would run
            check_options(cfg, sys.maxsize, 1)
            print_config(cfg, CONFIG_SECTIONS)
            return 0
        if args.dry_run:
            from dry_run import dry_run
            dry_run(cfg, args.dry_run_processes)
            return 0
        results = train(cfg)
    except CheckpointWriteError as e:
        hint = resume_hint(cfg, argv)
        then = hint.split("; ")[-1] if "resume with: " in hint else "start the run again"
        print(f"train_coss.py: error: {e}; once there is room, {then}", file=sys.stderr)
        return 2
    except (ConfigError, TrainingError, BetonError) as e:
        print(f"train_coss.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "DryRunError":
            raise
        print(f"train_coss.py: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"\ntrain_coss.py: terminated (SIGTERM); {resume_hint(cfg, argv)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"\ntrain_coss.py: interrupted; {resume_hint(cfg, argv)}", file=sys.stderr)
        return 130
    if results["rank"] != 0:  # only rank 0 evaluates and holds results
        return 0
    final = [v for k, v in results.items() if k.startswith("epoch")][-1]
    if args.demo:
        rnd = results.get("random_init", {})
        print(f"demo: knn={final['knn']:.4f} probe={final.get('probe', float('nan')):.4f} "
              f"(random init: knn={rnd.get('knn', float('nan')):.4f} probe={rnd.get('probe', float('nan')):.4f}) "
              f"in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    code = main()
    # numba's dispatcher finalisers (compiled FFCV pipelines) raise KeyErrors at interpreter shutdown and would
    # bury the last line; everything is written and closed by now, so leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
