"""The trainer's and evaluator's "nothing lost" promises: no poisoned checkpoint, the last epoch never lost to
evaluation, unreadable inputs as one line and exit 2, torchrun end to end, messages that don't mislead."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import train_coss
from config import ConfigError, load_config
from conftest import REPO, TINY, quiet, run_main, run_script, tiny_cfg
from evaluate import CheckpointError, read_checkpoint
from train_coss import TrainingError, train


def _one_error_line(res, script):
    """Exit 2, exactly one line '<script>: error: ...' on stderr, no traceback; returns that line."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), res.stderr[-3000:]
    return lines[0]


def _quiet_stderr(res):
    """What a successful run may print on stderr: no tracebacks, no numba finaliser noise."""
    assert res.returncode == 0, res.stderr[-3000:]
    for noise in ("Traceback", "KeyError", "Exception ignored"):
        assert noise not in res.stderr, res.stderr[-3000:]


@pytest.fixture
def own_betons(betons, tmp_path):
    """A private copy of the tiny betons, for tests that damage them."""
    shutil.copytree(betons / "betons", tmp_path / "betons")
    return tmp_path / "betons"


def _finite_checkpoint(path):
    return read_checkpoint(str(path))  # raises CheckpointError if anything in it is NaN/inf


# --------------------------------------------------------------------------------- a NaN guard that keeps no poison

def _poison_after(monkeypatch, at_step):
    """From step `at_step` (1-based) on, the update drives a BatchNorm running_var to inf while the loss stays
    finite: what lr=1e6 does to the predictor's BN (the issue's reproduction), but at a chosen step."""
    real = train_coss.Run.step
    calls = {"n": 0}

    def step(run, *args, **kwargs):
        out = real(run, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= at_step:
            run.online.backbone.bn1.running_var.fill_(float("inf"))
        return out
    monkeypatch.setattr(train_coss.Run, "step", step)


@pytest.mark.timeout(600)
def test_a_poisoned_update_after_a_checkpoint_stops_the_run_and_keeps_that_checkpoint(betons, tmp_path, monkeypatch):
    cfg = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=3")
    _poison_after(monkeypatch, 6)  # 4 steps per epoch: epoch 0 is clean and checkpointed, epoch 1 is poisoned
    with pytest.raises(TrainingError, match=r"NaN/inf in \d+ tensors .*after epoch 1.*bn1\.running_var.*not saved: "
                                            r"the last good checkpoint is kept"):
        train(cfg, log=quiet)
    ck = _finite_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert (ck["epoch"], ck["step"]) == (1, 4)
    assert not os.path.exists(tmp_path / "r" / "backbone.pt")
    monkeypatch.undo()
    done = train(tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=3", "--training.resume=1"),
                 log=quiet)  # the kept checkpoint resumes and finishes
    assert "epoch2" in done and torch.isfinite(torch.tensor(done["epoch2"]["knn"]))


@pytest.mark.timeout(600)
def test_a_nan_before_any_checkpoint_does_not_claim_one_is_kept(betons, tmp_path):
    """The issue's reproduction: width 8, lr 1e6 (BatchNorm statistics overflow while the loss is still finite)."""
    cfg = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--model.width=8", "--optim.lr=1e6",
                   "--training.train_images=128", "--optim.epochs=2")
    with pytest.raises(TrainingError, match="no checkpoint had been written yet") as err:
        train(cfg, log=quiet)
    assert "kept" not in str(err.value)
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")


@pytest.mark.timeout(600)
def test_nan_messages_and_log_rows_count_steps_the_same_way(betons, tmp_path):
    cfg = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.lr=1e38", "--optim.lars_eta=0",
                   "--optim.warmup_epochs=0.5", "--training.nan_check_every=1")
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step (\d+) ") as err:
        train(cfg, log=quiet)
    bad_step = int(str(err.value).split(" at step ")[1].split()[0])
    logged = [json.loads(line)["step"] for line in open(tmp_path / "r" / "log.jsonl") if '"loss"' in line]
    assert logged == list(range(1, bad_step))  # every step before it logged as 1..k-1, the bad one refused


@pytest.mark.timeout(600)
def test_evaluate_refuses_a_non_finite_checkpoint(betons, tmp_path):
    run = train(tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=1"), log=quiet)["run_dir"]
    ck = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    ck["online"]["backbone.bn1.running_var"][0] = float("nan")
    torch.save(ck, os.path.join(run, "checkpoint.pt"))
    line = _one_error_line(run_main("evaluate.py", "--ckpt", run), "evaluate.py")
    assert "NaN/inf" in line and "backbone.bn1.running_var" in line
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}",
                                    f"--training.out_dir={tmp_path}", "--training.run_name=r", "--training.resume=1",
                                    "--optim.epochs=2"), "train_coss.py")
    assert "cannot resume" in line and "NaN/inf" in line


# --------------------------------------------------------------------------- the last epoch never lost to evaluation

@pytest.mark.timeout(600)
def test_a_failing_final_evaluation_keeps_the_trained_weights(own_betons, tmp_path):
    val = own_betons / "tiny_val.beton"

    def truncate_val(step):  # the val beton is damaged while the run trains (start-up found it intact)
        if step == 2:
            data = val.read_bytes()
            val.write_bytes(data[:len(data) // 2])
    cfg = load_config(None, TINY + [f"--data.beton_dir={own_betons}", f"--training.out_dir={tmp_path}",
                                    "--training.run_name=r", "--optim.epochs=1"])
    with pytest.raises(TrainingError, match="evaluation failed: .*tiny_val.beton.*truncated.*trained weights are "
                                            "safe.*checkpoint.pt.*backbone.pt") as err:
        train(cfg, on_step=truncate_val, log=quiet)
    assert "\n" not in str(err.value)
    ck = _finite_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert ck["step"] == 4 and ck["epoch"] == 1
    backbone = torch.load(tmp_path / "r" / "backbone.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in backbone.values() if t.is_floating_point())


@pytest.mark.timeout(600)
def test_a_damaged_val_beton_stops_the_run_at_start_up(own_betons, tmp_path):
    val = own_betons / "tiny_val.beton"
    val.write_bytes(val.read_bytes()[:5000])
    res = run_main("train_coss.py", *TINY, f"--data.beton_dir={own_betons}", f"--training.out_dir={tmp_path}",
                   "--training.run_name=r")
    line = _one_error_line(res, "train_coss.py")
    assert "tiny_val.beton is not a readable beton (truncated" in line and "--writer.overwrite=1" in line
    assert not os.path.exists(tmp_path / "r")  # nothing started


# ------------------------------------------------------------------------- unreadable inputs: one line, exit 2

def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) * 2 // 3])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "random-bytes":
        path.write_bytes(os.urandom(len(data) if len(data) < 1 << 20 else 1 << 20))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("how", ["truncated", "zero-byte", "random-bytes"])
def test_an_unreadable_beton_is_one_line_and_exit_2(own_betons, tmp_path, split, how):
    _damage(own_betons / f"tiny_{split}.beton", how)
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={own_betons}",
                                    f"--training.out_dir={tmp_path}"), "train_coss.py")
    assert f"tiny_{split}.beton is not a readable beton" in line


@pytest.fixture(scope="module")
def trained_run(betons, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run = train(tiny_cfg(betons, out, "--training.run_name=r", "--optim.epochs=1"), log=quiet)["run_dir"]
    return run


@pytest.mark.timeout(600)
@pytest.mark.parametrize("how,message", [
    ("truncated", "cannot be read as a checkpoint"), ("zero-byte", "is empty"),
    ("random-bytes", "cannot be read as a checkpoint"), ("text", "cannot be read as a checkpoint"),
    ("foreign", "not a complete train_coss.py checkpoint (missing"),
    ("backbone", "an exported backbone.pt"),
])
def test_an_unreadable_checkpoint_is_one_line_and_exit_2_in_evaluate_and_on_resume(betons, trained_run, tmp_path,
                                                                                  how, message):
    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    ck = run / "checkpoint.pt"
    if how == "text":
        ck.write_text("model: resnet18\n")
    elif how == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, ck)
    elif how == "backbone":
        shutil.copyfile(run / "backbone.pt", ck)
    else:
        _damage(ck, how)
    assert message in _one_error_line(run_main("evaluate.py", "--ckpt", run), "evaluate.py")
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}",
                                    f"--training.out_dir={tmp_path}", "--training.run_name=r", "--training.resume=1",
                                    "--optim.epochs=2"), "train_coss.py")
    assert line.startswith("train_coss.py: error: cannot resume:") and message in line
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_checkpoint(str(ck))


def test_an_exported_backbone_given_to_evaluate_says_what_to_give(trained_run):
    line = _one_error_line(run_main("evaluate.py", "--ckpt", os.path.join(trained_run, "backbone.pt")), "evaluate.py")
    assert "exported backbone.pt" in line and "give the run folder" in line


@pytest.mark.timeout(600)
def test_resuming_with_other_model_settings_names_the_differing_keys(betons, trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "r")
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}",
                                    f"--training.out_dir={tmp_path}", "--training.run_name=r", "--training.resume=1",
                                    "--optim.epochs=2", "--model.width=8", "--method.proj_dim=8"), "train_coss.py")
    assert "model.width: 4 in the checkpoint, 8 now" in line and "method.proj_dim: 16 in the checkpoint, 8 now" in line


def test_a_checkpoint_without_a_newer_key_resumes_with_that_version_behaviour(tmp_path, monkeypatch):
    """Keys added since a checkpoint was written read as what that version did: MoCo v3's predictor ended in a
    fixed BatchNorm before 0.7.0, so such a checkpoint resumes with method.pred_out_bn=fixed and is refused (one
    line naming the key) with the new default."""
    from config import as_dict
    for method, ok, refused in (("moco_v3", ["--method.pred_out_bn=fixed"], []), ("byol", [], None)):
        old = as_dict(load_config(None, TINY + [f"--method.name={method}"]))
        del old["method"]["pred_out_bn"], old["method"]["proj_out_bn"]
        monkeypatch.setattr(checkpoints, "read_checkpoint", lambda path: {"config": old})
        train_coss.resume_state(load_config(None, TINY + [f"--method.name={method}", *ok]), "ck.pt")
        if refused is not None:
            with pytest.raises(train_coss.TrainingError, match="method.pred_out_bn: 'fixed' in the checkpoint, "
                                                               "'auto' now"):
                train_coss.resume_state(load_config(None, TINY + [f"--method.name={method}", *refused]), "ck.pt")


@pytest.mark.parametrize("content,message", [
    (b"optim:\n  lr: 0.1\n  batch_size: \xff\xfe\n", "is not UTF-8 text (byte 0xff"),
    (bytes(range(256)) * 4, "is a binary file, not YAML text"),
    (b"optim: 3\n", "config key 'optim' must be a section holding 'key: value' lines"),
])
def test_a_bad_yaml_file_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(str(path))
    for script, args in (("train_coss.py", []), ("write_ffcv.py", ["--split", "train"])):
        assert message in _one_error_line(run_main(script, "--config", path, *args), script)


# ----------------------------------------------------------------------------------------- torchrun end to end

@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["co_byol", "co_simclr"])  # co_simclr gathers embeddings across ranks
def test_torchrun_with_two_gloo_processes_completes_with_a_complete_run_folder(betons, tmp_path, method):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={port}",
                          os.path.join(REPO, "train_coss.py"), *TINY, f"--data.beton_dir={betons / 'betons'}",
                          f"--training.out_dir={tmp_path}", "--training.run_name=ddp", f"--method.name={method}",
                          "--demo"],
                         capture_output=True, text=True, timeout=500, cwd=REPO)
    _quiet_stderr(res)
    for warning in ("DeprecationWarning", "FutureWarning", "UserWarning"):  # none from our calls under torchrun
        assert warning not in res.stderr, res.stderr[-3000:]
    run = tmp_path / "ddp"
    ck = _finite_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 4 and ck["epoch"] == 2  # 64 images / (16 x 2 ranks) = 2 steps per epoch
    assert "epoch1" in ck["results"]
    assert (run / "backbone.pt").stat().st_size > 0
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert any("knn" in r and r["epoch"] == 1 for r in rows)
    assert json.load(open(run / "env.json"))["world_size"] == 2
    assert [line for line in res.stdout.splitlines() if line.startswith("demo: knn=")]  # rank 0's line, once


# --------------------------------------------------------------------------------- messages that don't mislead

def test_the_missing_beton_hint_carries_the_data_overrides(tmp_path):
    res = run_main("train_coss.py", "--data.source=synthetic", "--data.name=mine", f"--data.beton_dir={tmp_path}/b",
                   "--optim.epochs=1")
    line = _one_error_line(res, "train_coss.py")
    assert (f"write it with: python write_ffcv.py --split train --data.source=synthetic --data.name=mine "
            f"--data.beton_dir={tmp_path}/b") in line and "optim" not in line


@pytest.mark.timeout(600)
def test_after_a_resume_logs_hold_each_step_once_and_params_record_the_resume(betons, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Crash(Exception):
        pass

    def crash_at_7(step):  # epoch 1 (steps 5-8) dies after logging steps 5-7; epoch 0's checkpoint is at step 4
        if step == 7:
            raise Crash()
    with pytest.raises(Crash):
        train(tiny_cfg(betons, tmp_path, "--training.run_name=r"), on_step=crash_at_7, log=quiet)
    # TensorBoard reads event files in name order, which starts with the second a file was opened (then pid and a
    # per-process counter that sorts as text): a real resume is a later process, so open its file a second later
    time.sleep(1.1)
    train(tiny_cfg(betons, tmp_path, "--training.run_name=r", "--training.resume=1", "--eval.k=5"), log=quiet)
    run = tmp_path / "r"
    steps = [json.loads(line)["step"] for line in open(run / "log.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 9))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 9))
    params = json.load(open(run / "params.json"))
    assert params["eval"]["k"] == 20 and params["training"]["resume"] is False  # the original config
    assert len(params["resumes"]) == 1
    resume = params["resumes"][0]
    assert (resume["epoch"], resume["step"]) == (1, 4)
    assert resume["changed"] == {"training.resume": [False, True], "eval.k": [20, 5]}


@pytest.mark.timeout(600)
def test_successful_runs_of_every_script_print_no_numba_noise(betons, tmp_path):
    out = tmp_path / "b"
    _quiet_stderr(run_script("write_ffcv.py", "--split", "val", *TINY, f"--data.beton_dir={out}"))
    res = run_script("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                     "--training.run_name=r", "--optim.epochs=1")
    _quiet_stderr(res)
    _quiet_stderr(run_script("evaluate.py", "--ckpt", tmp_path / "r", "--robust.images=16", "--robust.severities=1",
                             "--robust.pgd_eps=1", "--analysis.pairs=8", "--linear.epochs=2"))


@pytest.mark.timeout(600)
def test_a_restart_after_a_kill_before_the_first_checkpoint_logs_each_step_once(betons, tmp_path):
    """Killed before its first checkpoint, then started again with resume=auto: the old attempt's log rows and
    TensorBoard events go (they would show steps 1..k twice), and so do tmp files of dead processes."""
    class Killed(Exception):
        pass

    def kill_at_3(step):
        if step == 3:
            raise Killed()
    cfg = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=1", "--training.checkpoint_every=1")
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_3, log=quiet)
    run_dir = tmp_path / "r"
    assert not (run_dir / "checkpoint.pt").exists() and (run_dir / "log.jsonl").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / f"checkpoint.pt.tmp-{dead.pid}").write_bytes(b"half a checkpoint")
    lines = []
    train(tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=1", "--training.resume=auto"),
          log=lines.append)
    steps = [json.loads(line)["step"] for line in open(run_dir / "log.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 5))  # 4 steps per epoch, each once
    assert not list(run_dir.glob("*.tmp-*"))
    assert any("of an earlier attempt that wrote no checkpoint: removed" in line for line in lines)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("other,message", [
    (["--training.train_images=48"], "64 train images in the checkpoint's data, 48 now"),
    (["--data.synthetic_classes=7"], "data.synthetic_classes: "),
])
def test_resuming_onto_other_data_is_refused_with_one_line(betons, trained_run, tmp_path, other, message):
    """resume=auto on other data would continue an old run on it, printing only "resuming": refused instead."""
    shutil.copytree(trained_run, tmp_path / "r")
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}",
                                    f"--training.out_dir={tmp_path}", "--training.run_name=r", "--training.resume=auto",
                                    "--optim.epochs=2", *other), "train_coss.py")
    assert "was trained on other data" in line and message in line, line


@pytest.mark.timeout(600)
def test_plot_over_a_cut_log_row_skips_and_counts_it_and_a_missing_log_is_one_line(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "r")
    with open(tmp_path / "r" / "log.jsonl", "a") as fh:
        fh.write('{"step": 99, "loss": 1.2, "l')  # a row cut by a crash
    res = run_main("train_coss.py", "--plot", str(tmp_path / "r"))
    assert res.returncode == 0 and os.path.getsize(tmp_path / "r" / "curves.png") > 2000, res.stderr[-2000:]
    assert "skipped 1 unreadable row(s)" in res.stderr and "Traceback" not in res.stderr
    line = _one_error_line(run_main("train_coss.py", "--plot", str(tmp_path / "nothing")), "train_coss.py")
    assert "log.jsonl does not exist" in line


def test_read_jsonl_skips_and_counts_what_is_not_a_row(tmp_path):
    from evaluate import read_jsonl
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n[1, 2]\n\xff\xfe\n{"step": 2}\n{"step": 3, "lo')
    rows, bad = read_jsonl(str(path))
    assert [r["step"] for r in rows] == [1, 2] and bad == 3


@pytest.mark.timeout(600)
def test_resuming_with_another_batch_size_is_refused_with_one_line(betons, trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "r")
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}",
                                    f"--training.out_dir={tmp_path}", "--training.run_name=r", "--training.resume=1",
                                    "--optim.epochs=2", "--optim.batch_size=8"), "train_coss.py")
    assert "was trained at optim.batch_size=16, now 8" in line and "--optim.batch_size=16" in line


def test_print_config_refuses_what_the_run_refuses():
    line = _one_error_line(run_main("train_coss.py", "--print-config", "--method.name=byol", "--logo.enabled=1",
                                    "--logo.local_cmax=0.04"), "train_coss.py")
    assert "not above 0.05" in line


@pytest.mark.parametrize("extra,key", [(["--augment.res=16"], "augment.res=16"),
                                       (["--augment.res=48", "--augment.local_views=2", "--augment.local_res=8"],
                                        "augment.local_res=8"),
                                       (["--augment.res=48", "--logo.enabled=1", "--logo.local_res=16"],
                                        "logo.local_res=16")])
def test_views_too_small_for_the_backbone_are_one_line(betons, tmp_path, extra, key):
    """BagNet-33's unpadded convolutions fail inside the first forward on views under 33 px (global, multi-crop's
    local or LoGo's local): refused before any work, naming the key and the size it needs."""
    line = _one_error_line(run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}",
                                    f"--training.out_dir={tmp_path}", "--model.backbone=bagnet33", "--method.name=byol",
                                    *extra), "train_coss.py")
    assert "needs views of at least 33 px" in line and key in line


def test_a_checkpoint_the_disk_refuses_keeps_the_previous_one_in_process(betons, tmp_path, monkeypatch):
    """ENOSPC while the second checkpoint is written (after half of it): one TrainingError naming the errno, the
    size needed and the kept checkpoint, which is byte-for-byte the first one; no temporary file is left."""
    import builtins
    import errno
    cfg = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=3")
    ckpt = tmp_path / "r" / "checkpoint.pt"
    real_save, real_open, seen = train_coss.save_checkpoint, builtins.open, {}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(path, state, when):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 2:
            seen["before"] = ckpt.read_bytes()
            monkeypatch.setattr(builtins, "open", lambda p, *a, **k: FullDisk(real_open(p, *a, **k))
                                if ".tmp-" in str(p) else real_open(p, *a, **k))
        try:
            return real_save(path, state, when)
        finally:
            monkeypatch.setattr(builtins, "open", real_open)

    monkeypatch.setattr(train_coss, "save_checkpoint", save)
    with pytest.raises(train_coss.CheckpointWriteError) as e:
        train(cfg, log=quiet)
    msg = str(e.value)
    assert "No space left on device" in msg and "MiB" in msg and "previous one is untouched" in msg, msg
    assert ckpt.read_bytes() == seen["before"]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 1
    assert not [p for p in os.listdir(ckpt.parent) if ".tmp-" in p]


def test_a_real_write_failure_is_one_line_with_the_resume_command_and_the_run_resumes(betons, tmp_path):
    """The trainer as users run it, where the OS refuses the second checkpoint's bytes (a file-size limit set
    after the first, RLIMIT_FSIZE: the kernel's EFBIG in the real write path, as ENOSPC would come); exit 2 with
    one line, the first checkpoint intact, and the printed resume command finishes the run."""
    code = ("import resource, signal, sys; sys.argv[0] = 'train_coss.py'; import train_coss\n"
            "real, calls = train_coss.save_checkpoint, []\n"
            "def save(path, state, when):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2:\n"
            "        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            "    return real(path, state, when)\n"
            "train_coss.save_checkpoint = save\n"
            "code = train_coss.main(sys.argv[1:]); sys.stderr.flush(); train_coss.os._exit(code)\n")
    args = [*TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
            "--training.run_name=r", "--optim.epochs=3"]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    line = _one_error_line(res, "train_coss.py")
    assert "could not write the checkpoint after epoch 1" in line and "File too large" in line, line
    assert "once there is room, resume with: python train_coss.py" in line and "--training.resume=1" in line, line
    ckpt = tmp_path / "r" / "checkpoint.pt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 1
    assert not [p for p in os.listdir(ckpt.parent) if ".tmp-" in p]
    resume = line.split("resume with: python train_coss.py ")[1].split()
    _quiet_stderr(run_script("train_coss.py", *resume))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 3
