"""The first steps' update-to-weight ratios of every config in docs/reference_recipes.yaml at its intended world size
(training.written_for), beside its reference recipe's: the dry run of each (dry_run.py), collected in one table.

    python bench/recipe_ratios.py --out reports/recipes        # -> reports/recipes/ratios.md
"""
import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def main(argv=None):
    import torch
    import yaml
    from config import VERSION, load_config
    from dry_run import REFERENCE_TABLE, DryRunError, dry_run
    from environment import cpu_name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/recipes")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    table = yaml.safe_load(open(REFERENCE_TABLE))
    rows = ["| config | recipe | GPUs | total batch | peak lr | weights, step 1 / step N: ours | reference | "
            "predictor weights: ours | reference | dry run |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for recipe, entry in table["recipes"].items():
        for name in entry["configs"]:
            cfg = load_config(os.path.join(ROOT, "configs", name))
            n = cfg["training.written_for"]
            total = cfg["optim.batch_size"] * n
            try:
                ratios, verdict = dry_run(cfg, steps=args.steps, log=lambda *_: None), "ok"
            except DryRunError as e:
                ratios, verdict = {}, str(e)

            def cell(group, which):
                r = ratios.get(group, (None, None))[which]
                return f"{r[0]:.4f} / {r[-1]:.4f}" if r else "—"
            rows.append(f"| {name} | {recipe} | {n} | {total} | {cfg['optim.lr'] * total / 256:.4g} | "
                        f"{cell('weights (conv, linear)', 0)} | {cell('weights (conv, linear)', 1)} | "
                        f"{cell('predictor weights', 0)} | {cell('predictor weights', 1)} | {verdict} |")
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    head = (f"# First update-to-weight ratios of each ImageNet config beside its reference recipe\n\n"
            f"`python bench/recipe_ratios.py` ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {platform.machine()}, "
            f"torch {torch.__version__}, version {VERSION}): the dry run of each config of "
            f"`docs/reference_recipes.yaml` at its `training.written_for` processes, {args.steps} CPU steps on "
            f"synthetic 64 px images, batch 16, at the recipe's peak lr (the reference recipe at its own). Each cell "
            f"is the largest ||update|| / ||weight|| of a layer at step 1 / step {args.steps}.\n\n")
    with open(os.path.join(args.out, "ratios.md"), "w") as fh:
        fh.write(head + "\n".join(rows) + "\n")
    print(f"recipe_ratios: wrote {args.out}/ratios.md")


if __name__ == "__main__":
    main()
