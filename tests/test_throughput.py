"""bench/throughput.py's CPU smoke test: the end-to-end benchmark runs on tiny sizes and reports sane numbers."""
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
                            "--method", "co_byol", "logo", "--decode", "cpu", "gpu", f"--data={tmp_path}"])
    assert [(r["method"], r["decode"]) for r in rows] == [("co_byol", "cpu"), ("co_byol", "gpu"), ("logo", "cpu"),
                                                         ("logo", "gpu")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["loader_img_per_s"] > 0 and r["tflops_per_image"] > 0
        assert math.isclose(r["in100_epoch_s"], 126_689 / r["img_per_s"])
