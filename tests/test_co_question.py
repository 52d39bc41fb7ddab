"""bench/co_question.py's own arithmetic (issue 21, point 5): what it reads from a run folder (steps, monitors,
training time from the log rows, the suite's robustness) and the seed-for-seed differences of its table, on run
folders written here by hand (no training)."""
import json
import os

import pytest
import torch

from conftest import bench_module, run_script


cq = bench_module("co_question")


def _run(folder, steps, knn, probe, linear, noise, masked, seconds):
    """A run folder as train_coss.py and evaluate.py leave it, with only what co_question reads."""
    os.makedirs(folder / "eval")
    torch.save({"step": steps, "epoch": 2, "results": {"epoch1": {"knn": knn, "probe": probe}}},
               folder / "checkpoint.pt")
    with open(folder / "log.jsonl", "w") as fh:  # step rows every 10 steps from step 10, then the evaluation row
        for step in range(10, steps + 1, 10):
            fh.write(json.dumps({"time": 1000.0 + seconds * (step - 10) / steps, "step": step, "lr": 0.1}) + "\n")
        fh.write(json.dumps({"time": 2000.0 + seconds, "step": steps, "knn": knn}) + "\n")
    corruptions = {name: {"1": noise + 0.02, "2": noise - 0.02} for name in cq.NOISE}
    corruptions["contrast"] = {"1": 0.0}  # not noise: left out of the noise column
    rob = {"clean": linear, "corruptions": corruptions, "masking": {"0": linear, "0.25": masked, "0.5": masked / 2,
                                                                  "0.75": masked / 4}}
    json.dump({"linear": {"top1": linear}, "robustness": rob}, open(folder / "eval" / "eval.json", "w"))
    return str(folder)


def test_a_row_reads_steps_monitors_time_and_robustness(tmp_path):
    r = cq.row(_run(tmp_path / "a", 100, 0.8, 0.85, 0.84, 0.5, 0.6, 60.0), [])
    assert (r["steps"], r["kNN"], r["probe"], r["linear"], r["clean"]) == (100, 0.8, 0.85, 0.84, 0.84)
    assert r["train min"] == pytest.approx(1.0)  # 60 s over the 100 steps, the 10 before the first row included
    assert r["noise"] == pytest.approx(0.5) and r["masked 0.5"] == pytest.approx(0.3)


def test_the_table_gives_each_arm_its_seed_for_seed_difference_to_the_base(tmp_path):
    base = [cq.row(_run(tmp_path / f"b{s}", 100, 0.80 + s / 100, 0.85, 0.84, 0.5, 0.6, 60.0), []) for s in range(3)]
    co = [cq.row(_run(tmp_path / f"c{s}", 80, 0.79 + s / 50, 0.85, 0.84, 0.5, 0.6, 60.0), []) for s in range(3)]
    md = cq.table({"base": base, "wall": co}, {"base": "B", "wall": "C, equal time"})
    diff = [line for line in md.splitlines() if line.startswith("| C, equal time − B |")]
    assert len(diff) == 1
    cells = [c.strip() for c in diff[0].strip("|").split("|")]
    assert cells[1] == "-20"                              # steps, per seed 80 - 100
    assert cells[3] == "+0.0 (-1.0 to +1.0)"              # kNN points: -1, 0, +1 at seeds 0, 1, 2
    assert cells[4] == "+0.0 (+0.0 to +0.0)"
    labelled = cq.table({"base": base[:1], "wall": co[:1]}, {"base": "B", "wall": "C, equal time"}, seeds=[2])
    assert [line.split("|")[2].strip() for line in labelled.splitlines() if line.startswith("| B |")][0] == "2"


def test_bad_arguments_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--wall has 1 runs for 2 base runs"):
        cq.main(["--base", "x", "y", "--wall", "z", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds has 1 seeds for 2 base runs"):
        cq.main(["--base", "x", "y", "--wall", "z", "w", "--seeds", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="has no checkpoint.pt"):
        cq.main(["--base", str(tmp_path), "--wall", str(tmp_path), "--out", str(tmp_path)])
    res = run_script("bench/co_question.py", "--base", tmp_path, "--wall", tmp_path, "--out", tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"co_question.py: error: {tmp_path} has no checkpoint.pt (a "
                                               "train_coss.py run folder?)"]
