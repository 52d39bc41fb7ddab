"""What a run records about where it ran (env.json): versions, the commit, the CPU and its vector ISA, devices."""
import os
import platform

import numpy as np
import torch

from config import VERSION as __version__


def cpu_name():
    """The CPU's model name and its widest vector ISA (numbers measured on a CPU depend on both)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    isa = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{name} ({isa})"

def git_commit():
    """The code's commit (with '+changes' when the tree differs from it), or None outside a git checkout."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+changes" if dirty else "")) or None

def environment(device, world):
    import ffcv
    env = {"version": __version__, "git_commit": git_commit(), "python": platform.python_version(),
           "torch": torch.__version__, "ffcv": "1.0.2", "numpy": np.__version__, "platform": platform.platform(),
           "cpu": cpu_name(), "cpus": os.cpu_count(), "world_size": world, "device": str(device),
           "ffcv_module": ffcv.__file__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env
