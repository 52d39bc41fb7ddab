"""The CO question (issue 21, point 5): a CO variant against its base, seed by seed, at equal wall-clock (both runs
under the same optim.minutes) and at equal steps (the CO variant run with optim.steps = its base's step count), on
the monitors (kNN, probe) and on evaluate.py's suite (offline linear top-1, robustness to noise and masked cells).

    python bench/co_question.py --out reports/co_question/simclr \
        --base runs/p4/fmnist_simclr_s{0,1,2} --wall runs/p4/fmnist_co_simclr_s{0,1,2} \
        [--steps runs/p5/fmnist_co_simclr_steps_s{0,1,2}] [--names SimCLR CO-SimCLR] [--seeds 0 1 2]

The i-th run of each list is the i-th seed's (--seeds labels them in the table; default 0, 1, ...). A run
without its evaluation (<run>/eval/eval.json) is evaluated first by `evaluate.py --ckpt <run>` (the whole suite,
the run's own config; --eval-set key=value overrides, as evaluate.py takes them). Writes <out>/co_question.md:
one row per run, then per arm the mean over seeds and the mean and spread of its difference to the base, seed for
seed. Noise: the mean top-1 over the severities of gaussian, shot and impulse noise; masked: top-1 with that
fraction of cells masked."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
COLUMNS = ("steps", "train min", "kNN", "probe", "linear", "clean", "noise", "masked 0.25", "masked 0.5",
           "masked 0.75")


def evaluate_if_needed(run, overrides):
    path = os.path.join(run, "eval", "eval.json")
    if not os.path.isfile(path):
        print(f"evaluating {run} ...", flush=True)
        done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", run,
                               *[f"--{o}" for o in overrides]])
        if done.returncode:
            raise SystemExit(f"co_question.py: error: evaluate.py --ckpt {run} failed (exit {done.returncode}; its "
                             "message is above)")
    with open(path) as fh:
        return json.load(fh)


def row(run, overrides):
    """The numbers of one run: its checkpoint's steps and final monitors, its log's training time, its suite."""
    import torch
    ck = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    final = ck["results"][f"epoch{ck['epoch'] - 1}"]
    steps = [r for r in map(json.loads, open(os.path.join(run, "log.jsonl"))) if "lr" in r]  # step rows
    # training time: the span of the step rows, stretched over the steps before the first row
    seconds = ((steps[-1]["time"] - steps[0]["time"]) * steps[-1]["step"] / (steps[-1]["step"] - steps[0]["step"])
               if len(steps) > 1 else float("nan"))
    ev = evaluate_if_needed(run, overrides)
    rob = ev["robustness"]
    noise = [v for name in NOISE for v in rob["corruptions"].get(name, {}).values()]
    return {"steps": ck["step"], "train min": seconds / 60,
            "kNN": final["knn"], "probe": final.get("probe", float("nan")), "linear": ev["linear"]["top1"],
            "clean": rob["clean"], "noise": float(np.mean(noise)) if noise else float("nan"),
            **{f"masked {f}": rob["masking"].get(f, float("nan")) for f in ("0.25", "0.5", "0.75")}}


def fmt(v, col):
    if col == "steps":
        return f"{v:,.0f}"
    return f"{v:.1f}" if col == "train min" else f"{v:.4f}"


def table(arms, names, seeds=None):
    """arms: {arm: [row per seed]}; the base arm first; seeds: the rows' seed labels (default 0, 1, ...)."""
    base = arms["base"]
    seeds = list(range(len(base))) if seeds is None else seeds
    head = "| arm | seed | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(COLUMNS)]
    for arm, rows in arms.items():
        for seed, r in zip(seeds, rows):
            lines.append(f"| {names[arm]} | {seed} | " + " | ".join(fmt(r[c], c) for c in COLUMNS) + " |")
    lines += ["", "Mean over the seeds, and the difference to the base seed for seed (mean, and min to max over the "
              "seeds; accuracies in points):", "", "| arm | " + " | ".join(COLUMNS) + " |",
              "|---|" + "---:|" * len(COLUMNS)]
    for arm, rows in arms.items():
        lines.append(f"| {names[arm]} | " + " | ".join(fmt(np.mean([r[c] for r in rows]), c) for c in COLUMNS) + " |")
        if arm == "base":
            continue
        cells = []
        for c in COLUMNS:
            d = [r[c] - b[c] for r, b in zip(rows, base)]
            scale = 1 if c in ("steps", "train min") else 100
            d = [x * scale for x in d]
            cells.append(f"{np.mean(d):+.1f} ({min(d):+.1f} to {max(d):+.1f})" if c != "steps" else
                         f"{np.mean(d):+,.0f}")
        lines.append(f"| {names[arm]} − {names['base']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", nargs="+", required=True, help="the base method's runs, seed 0 first")
    p.add_argument("--wall", nargs="+", required=True, help="the CO variant's runs at the base's optim.minutes")
    p.add_argument("--steps", nargs="+", default=[], help="the CO variant's runs at the base's step count")
    p.add_argument("--names", nargs=2, default=["base", "CO"], help="labels of the base and the CO variant")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="the runs' seeds, in their order (labels)")
    p.add_argument("--out", required=True)
    p.add_argument("--eval-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="evaluate.py overrides for runs not yet evaluated, e.g. robust.pgd_eps=1")
    a = p.parse_args(argv)
    for arm in ("wall", "steps"):
        got = getattr(a, arm)
        if got and len(got) != len(a.base):
            raise SystemExit(f"co_question.py: error: --{arm} has {len(got)} runs for {len(a.base)} base runs "
                             "(one per seed)")
    if a.seeds is not None and len(a.seeds) != len(a.base):
        raise SystemExit(f"co_question.py: error: --seeds has {len(a.seeds)} seeds for {len(a.base)} base runs")
    for run in a.base + a.wall + a.steps:
        if not os.path.isfile(os.path.join(run, "checkpoint.pt")):
            raise SystemExit(f"co_question.py: error: {run} has no checkpoint.pt (a train_coss.py run folder?)")
    arms = {"base": [row(r, a.eval_set) for r in a.base], "wall": [row(r, a.eval_set) for r in a.wall]}
    if a.steps:
        arms["steps"] = [row(r, a.eval_set) for r in a.steps]
    names = {"base": a.names[0], "wall": f"{a.names[1]}, equal time", "steps": f"{a.names[1]}, equal steps"}
    os.makedirs(a.out, exist_ok=True)
    md = table(arms, names, a.seeds)
    with open(os.path.join(a.out, "co_question.md"), "w") as fh:
        fh.write(f"# {a.names[1]} against {a.names[0]}\n\nRuns: {' '.join(a.base + a.wall + a.steps)}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # our refusals carry their one line: print it, exit 2 (no traceback), as bench/parity.py
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
