"""Shared fixtures: tiny synthetic data, image trees, and an FFCV-independent beton reader."""
import importlib
import io
import os
import signal
import subprocess
import sys
import zlib
from contextlib import redirect_stderr, redirect_stdout

import cv2
import numpy as np
import pytest
import torch

# Triton kernels run on CPU tensors under Triton's interpreter (fp32); it must be on before kernels/ is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs on the device machine)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import load_config  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _fast_ffcv():
    """Numba compilation of FFCV pipelines costs 13-26 s per Loader; decoding still runs in C without it."""
    from ffcv.pipeline.compiler import Compiler
    Compiler.set_enabled(False)
    yield


@pytest.fixture
def poison():
    """Kernel output buffers start as NaN for the test, so an element a kernel forgets to write fails it."""
    import kernels
    kernels.POISON = True
    yield
    kernels.POISON = False


def make_cfg(tmp_path, **overrides):
    """A validated config writing to tmp_path; overrides as section__key=value."""
    args = [f"--data.beton_dir={tmp_path / 'betons'}", "--writer.workers=2"]
    args += [f"--{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, args)


def read_beton(path):
    """(images, labels) read straight from the file with FFCV's Reader and its allocation table (no Loader)."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    raw = np.fromfile(path, dtype=np.uint8)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    images, labels = [], []
    image_f, label_f = (f"f{reader.field_names.index(n)}" for n in ("image", "label"))  # metadata fields are f0, f1
    for row in reader.metadata:
        meta = row[image_f]
        h, w, ptr = int(meta["height"]), int(meta["width"]), int(meta["data_ptr"])
        data = raw[ptr:ptr + sizes[ptr]]
        if meta["mode"] == 1:  # raw
            img = data[:h * w * 3].reshape(h, w, 3)
        else:  # jpg (encoded from RGB by OpenCV as BGR)
            img = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            assert img.shape == (h, w, 3)
        images.append(img)
        labels.append(int(row[label_f]))
    return images, labels


# A tiny training set-up: 64 synthetic images, width-4 nets, 16 px views (trainer and evaluation tests).
TINY = ["--data.source=synthetic", "--data.synthetic_images=96", "--data.synthetic_min_size=20",
        "--data.synthetic_max_size=40", "--data.name=tiny", "--model.width=4", "--method.proj_hidden=32",
        "--method.proj_dim=16", "--method.pred_hidden=32", "--co.local_hidden=16", "--augment.res=16",
        "--augment.workers=1", "--optim.batch_size=16", "--optim.epochs=2", "--training.train_images=64",
        "--training.log_every=1", "--eval.bank_images=48", "--eval.val_images=24", "--eval.probe_iters=20",
        "--eval.random_init=0", "--logo.local_res=8", "--training.threads=1",
        "--training.device=cpu"]  # CPU even on a GPU machine: exact resume and DDP-vs-one-rank need determinism


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """Tiny synthetic train/val betons for trainer and evaluation tests (one pair per test module)."""
    from write_ffcv import write_split
    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(None, TINY + [f"--data.beton_dir={root / 'betons'}"])
    for split in ("train", "val"):
        write_split(cfg, split, log=lambda *_: None)
    return root


def tiny_cfg(betons, tmp_path, *extra):
    return load_config(None, TINY + [f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                                     *extra])


def quiet(*_):
    pass


def bench_module(name):
    """bench/<name>.py imported as a module (bench/ is scripts, not a package), for tests of a harness's own logic."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, env=None, timeout=300):
    """`python <script> <args>` as a new process in the repository, output captured: for what only a real process
    shows (the __main__ wrapper's exit, numba's finalisers at shutdown, signals, a kill, a full disk)."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


def run_main(script, *args):
    """`python <script> <args>` run in this process through the script's own main(argv): the same parsing, error
    handling and exit code as the command, without a new interpreter's 2-5 s of imports. Returns a
    CompletedProcess. An exception main() does not turn into its one line propagates and fails the test (the
    command would have printed a traceback). What only a real process shows (the __main__ wrapper's exit, numba's
    finalisers at shutdown, signals, torchrun) is tested with subprocesses elsewhere."""
    module = importlib.import_module(script[:-len(".py")])
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # train_coss.main installs its own; pytest keeps its
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = module.main(argv)
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess([script, *argv], code or 0, out.getvalue(), err.getvalue())


def save_image(path, array, **kwargs):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


def wnid_colour(wnid):
    """A colour that identifies a class folder, so a test can check which folder an image came from."""
    h = zlib.crc32(wnid.encode())
    return np.array([h & 255, (h >> 8) & 255, (h >> 16) & 255], dtype=np.uint8)
