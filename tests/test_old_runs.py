"""Old runs keep working: run folders written by version 0.7.0 (before the method registry, methods/) are held in
tests/data/ (a CO-BYOL and a DINO run of the tiny synthetic data, one epoch each: checkpoint, params.json,
log.jsonl, env.json). Today's trainer resumes each for another epoch, and evaluate.py evaluates the result."""
import json
import os
import shutil

import pytest
import torch

from conftest import REPO, TINY, run_main

DATA = os.path.join(REPO, "tests", "data")
WRITTEN_WITH = ["--dino.out_dim=64", "--logo.local_res=16"]  # besides TINY, as the runs were written
OLD_RUNS = {"co_byol_0.7.0": ["--method.name=co_byol", *WRITTEN_WITH],
            "dino_0.7.0": ["--method.name=dino", *WRITTEN_WITH]}


@pytest.mark.parametrize("name", sorted(OLD_RUNS))
def test_a_run_of_version_0_7_0_resumes_and_evaluates(betons, tmp_path, name):
    shutil.copytree(os.path.join(DATA, name), tmp_path / name)
    before = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert before["epoch"] == 1 and json.load(open(tmp_path / name / "env.json"))["version"] == "0.7.0"
    res = run_main("train_coss.py", *TINY, *OLD_RUNS[name], f"--data.beton_dir={betons / 'betons'}",
                   f"--training.out_dir={tmp_path}", f"--training.run_name={name}", "--training.resume=1",
                   "--optim.epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    after = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert after["epoch"] == 2 and after["step"] == 2 * before["step"]
    moved = [k for k, v in before["online"].items() if v.is_floating_point() and not torch.equal(v, after["online"][k])]
    assert moved, "the resumed epoch did not train"
    if before["method_state"] is not None:  # DINO's centre and teacher temperature came back and moved on
        assert len(after["method_state"]) == len(before["method_state"])
    res = run_main("evaluate.py", "--ckpt", tmp_path / name, "--robust.images=16", "--robust.severities=1",
                   "--robust.pgd_eps=1", "--analysis.pairs=8", "--linear.epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(tmp_path / name / "eval" / "eval.json"))["knn"]
