"""CPU smoke tests of bench/throughput.py (end-to-end benchmark) and bench/profile_step.py (step profiler)."""
import math
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))


@pytest.mark.timeout(600)
def test_throughput_benchmark_runs_on_cpu(tmp_path):
    import throughput
    rows = throughput.main(["--device=cpu", "--images=48", "--backbone=resnet18_w16_cifar", "--res=16",
                            "--batch=8", "--steps=2", "--warmup=1", "--workers=1", "--compile=0",
                            "--method", "co_byol", "logo", "--local-res=8", "--decode", "cpu", "gpu",
                            f"--data={tmp_path}", "--set", "training.nan_check_every=2"])
    assert [(r["method"], r["decode"], r["views"]) for r in rows] == [
        ("co_byol", "cpu", "2+0"), ("co_byol", "gpu", "2+0"), ("logo", "cpu", "2+2"), ("logo", "gpu", "2+2")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["loader_img_per_s"] > 0 and r["tflops_per_image"] > 0
        assert math.isclose(r["in100_epoch_s"], 126_689 / r["img_per_s"])


@pytest.mark.timeout(600)
def test_step_profiler_runs_on_cpu(tmp_path):
    import profile_step
    profile_step.main(["--device=cpu", "--images=48", "--backbone=resnet18_w16_cifar", "--res=16", "--batch=8",
                       "--steps=1", "--warmup=1", "--workers=1", "--compile=0", f"--data={tmp_path}",
                       f"--out={tmp_path / 'prof'}"])
    text = open(tmp_path / "prof" / "profile.txt").read()
    assert "ms per step wall" in text and "Name" in text
    assert os.path.getsize(tmp_path / "prof" / "trace.json") > 1000
