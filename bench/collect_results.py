"""Summarise finished runs as a Markdown table (for RESULTS.md).

    python bench/collect_results.py runs/co_byol_s0 runs/byol_s0 ...

Per run: method, seed, final kNN and feature-probe accuracy, the random-init numbers of the same network, epochs and
wall time from the first to the last log line; then the mean ± sd per method over the runs given.
"""
import json
import os
import statistics
import sys

import torch


def summarise(run):
    params = json.load(open(os.path.join(run, "params.json")))
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    results = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)["results"]
    final = [v for k, v in results.items() if k.startswith("epoch")][-1]
    rnd = results.get("random_init", {})
    method = params["method"]["name"] + ("+logo" if params["method"]["logo"] else "")
    return {"run": os.path.basename(run.rstrip("/")), "method": method, "seed": params["training"]["seed"],
            "knn": final["knn"], "probe": final.get("probe"), "rand_knn": rnd.get("knn"),
            "rand_probe": rnd.get("probe"), "epochs": params["optim"]["epochs"],
            "minutes": (rows[-1]["time"] - rows[0]["time"]) / 60}


def main(runs):
    out = [summarise(r) for r in runs]
    print("| run | method | seed | kNN | probe | random-init kNN | random-init probe | train+eval min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in out:
        print(f"| {r['run']} | {r['method']} | {r['seed']} | {r['knn']:.4f} | {r['probe']:.4f} | "
              f"{r['rand_knn']:.4f} | {r['rand_probe']:.4f} | {r['minutes']:.1f} |")
    print("\n| method | runs | kNN mean ± sd | probe mean ± sd |")
    print("|---|---:|---:|---:|")
    for method in dict.fromkeys(r["method"] for r in out):
        k = [r["knn"] for r in out if r["method"] == method]
        p = [r["probe"] for r in out if r["method"] == method]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        print(f"| {method} | {len(k)} | {statistics.mean(k):.4f} ± {sd(k):.4f} | "
              f"{statistics.mean(p):.4f} ± {sd(p):.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
