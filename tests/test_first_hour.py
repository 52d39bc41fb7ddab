"""A researcher's first hour: self-describing CLIs, runs that say where they are, Ctrl-C and resume, a training
budget in minutes, errors that name the fix, model.init and backbone.pt with torchvision, the version."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torchvision

import train_coss
from config import VERSION, load_config
from conftest import REPO, TINY, quiet, run_main, tiny_cfg
from rf_resnet import build_backbone
from train_coss import TrainingError, build_run, calibrate, train


def _error_line(res, script):
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), res.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ self-describing CLIs

@pytest.mark.parametrize("script, key, default", [("write_ffcv.py", "--writer.page_size_mib", "default 4"),
                                                  ("train_coss.py", "--optim.minutes", "default 0.0"),
                                                  ("train_coss.py", "--augment.c_min", "default 0.3"),
                                                  ("evaluate.py", "--linear.knn_k", "default 20,200")])
def test_help_lists_every_key_with_its_type_and_default(script, key, default):
    res = run_main(script, "--help")
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stdout.splitlines() if line.strip().startswith(key + " "))
    assert default in line and "(" in line
    listed = set(re.findall(r"^\s+--(\w+\.\w+)\s", res.stdout, re.M))
    sections = {"write_ffcv.py": ("data", "writer"), "train_coss.py": train_coss.CONFIG_SECTIONS}.get(script)
    if sections:
        wanted = {".".join(k) for k in load_config().entries if k[0] in sections}
        assert listed == wanted


def test_print_config_is_the_resolved_config_and_loads_back(tmp_path):
    res = run_main("train_coss.py", "--config", os.path.join(REPO, "configs/in100.yaml"), "--print-config",
                   "--optim.epochs=7")
    assert res.returncode == 0, res.stderr
    path = tmp_path / "resolved.yaml"
    path.write_text(res.stdout)
    again = load_config(str(path))
    direct = load_config(os.path.join(REPO, "configs/in100.yaml"), ["--optim.epochs=7"])
    for key in direct.entries:
        if key[0] in train_coss.CONFIG_SECTIONS:
            assert again[key] == direct[key], key
    assert again["optim.epochs"] == 7 and again["model.backbone"] == "resnet18"


# ------------------------------------------------------------------------------------ runs that say where they are

def test_a_run_names_its_folder_at_start_and_end_and_gives_an_eta_per_epoch(betons, tmp_path):
    lines = []
    train(tiny_cfg(betons, tmp_path, "--training.run_name=r"), log=lines.append)
    run = str(tmp_path / "r")
    start = next(line for line in lines if line.startswith("run "))
    assert run in start and "cpu" in start and "64 train images" in start and "4 steps/epoch" in start
    assert "compile off" in start and "batch 16" in start and "2 views of 16 px" in start
    epochs = [line for line in lines if re.match(r"epoch \d done \(\d/2\): loss \d", line)]
    assert len(epochs) == 2 and "ETA" in epochs[0] and "img/s" in epochs[0] and "training done" in epochs[1]
    assert lines[-1].startswith("done in ") and run in lines[-1]
    env = json.load(open(tmp_path / "r" / "env.json"))
    assert env["version"] == VERSION and "cpu" in env
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+changes)?", env["git_commit"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted;"),
                                            (signal.SIGTERM, 143, "terminated (SIGTERM);")])
def test_ctrl_c_or_sigterm_exits_with_the_command_that_resumes(betons, tmp_path, sig, code, words):
    args = [sys.executable, os.path.join(REPO, "train_coss.py"), *TINY, f"--data.beton_dir={betons / 'betons'}",
            f"--training.out_dir={tmp_path}", "--training.run_name=r", "--optim.epochs=400"]
    # a terminal's Ctrl-C reaches a foreground process; when the suite itself runs as a background job of a
    # non-interactive shell (`make test &`), SIGINT is ignored and that disposition is inherited: restore it
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = tmp_path / "r" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert ckpt.exists(), "no checkpoint within 4 minutes"
    proc.send_signal(sig)
    try:  # the loader's threads finish their batch first: seconds, more on a loaded 2-core machine
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no exit within 300 s of {signal.Signals(sig).name}; stderr: {err[-2000:]}") from None
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"train_coss.py: {words}") and "resume with: python train_coss.py" in line
    assert f"--training.out_dir={tmp_path}" in line and "--training.run_name=r" in line
    assert line.endswith("--training.resume=1")


def test_resume_1_without_a_checkpoint_is_an_error_and_auto_starts_fresh_then_resumes(betons, tmp_path):
    res = run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                   "--training.run_name=r", "--training.resume=1")
    line = _error_line(res, "train_coss.py")
    assert "no checkpoint to resume" in line and "training.resume=auto" in line
    lines = []
    train(tiny_cfg(betons, tmp_path, "--training.run_name=a", "--training.resume=auto", "--optim.epochs=1"),
          log=lines.append)
    assert any("training.resume=auto: no checkpoint" in line and "starting fresh" in line for line in lines)
    lines.clear()
    done = train(tiny_cfg(betons, tmp_path, "--training.run_name=a", "--training.resume=auto"), log=lines.append)
    assert any(line.startswith("training.resume=auto: resuming") for line in lines)
    assert "epoch1" in done and torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["step"] == 8


# ------------------------------------------------------------------------------------- a training budget in minutes

def test_calibration_undoes_its_steps_and_sets_the_length(betons):
    cfg = tiny_cfg(betons, betons, "--optim.minutes=0.05")
    path = str(betons / "betons" / "tiny_train.beton")
    run = build_run(cfg, torch.device("cpu"), train_path=path, num_train=64)
    before = {k: v.clone() for k, v in run.online.state_dict().items()}
    rng = torch.get_rng_state()
    lines = []
    rate = calibrate(run, 0.05, lines.append)
    assert rate > 0 and run.global_step == 0 and run.budgeted
    assert abs(run.total_steps - max(1, int(0.05 * 60 * rate / 16))) <= 1
    for k, v in run.online.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert lines and lines[0].startswith("optim.minutes=0.05:") and "undone" in lines[0]


def test_a_budgeted_run_ends_at_its_step_count_with_whole_schedules_and_resumes_with_it(betons, tmp_path,
                                                                                        monkeypatch):
    def fixed(run, minutes, log=print):  # the measured length, made deterministic: 6 steps (1.5 epochs)
        run.set_total_steps(6)
    monkeypatch.setattr(train_coss, "calibrate", fixed)
    train(tiny_cfg(betons, tmp_path, "--training.run_name=m", "--optim.minutes=1"), log=quiet)
    ck = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 6 and ck["budget_steps"] == 6 and ck["epoch"] == 2 and "epoch1" in ck["results"]
    rows = [json.loads(line) for line in open(tmp_path / "m" / "log.jsonl")]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["lr"] < 0.1 * max(r["lr"] for r in steps)  # the cosine ran to its end at step 6

    def boom(*_):
        raise AssertionError("a resumed budgeted run must not measure again")
    monkeypatch.setattr(train_coss, "calibrate", boom)
    ck["epoch"], ck["step"] = 1, 4  # pretend the run stopped after epoch 0 (its first 4 steps)
    torch.save(ck, tmp_path / "m" / "checkpoint.pt")
    train(tiny_cfg(betons, tmp_path, "--training.run_name=m", "--optim.minutes=1", "--training.resume=1"),
          log=quiet)
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=False)["step"] == 6


def test_a_run_of_fixed_steps_ends_there_with_whole_schedules_and_resumes_with_it(betons, tmp_path):
    """optim.steps=6 on 4 steps per epoch: 6 updates over 2 epochs (the second partial), the cosine run to its end,
    a resume after epoch 0 ends at the same step; optim.steps with optim.minutes is refused."""
    train(tiny_cfg(betons, tmp_path, "--training.run_name=s", "--optim.steps=6", "--optim.warmup_epochs=0.25"),
          log=quiet)
    ck = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 6 and ck["budget_steps"] is None and ck["epoch"] == 2 and "epoch1" in ck["results"]
    steps = [r for r in map(json.loads, open(tmp_path / "s" / "log.jsonl")) if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["lr"] < 0.1 * max(r["lr"] for r in steps)
    ck["epoch"], ck["step"] = 1, 4
    torch.save(ck, tmp_path / "s" / "checkpoint.pt")
    train(tiny_cfg(betons, tmp_path, "--training.run_name=s", "--optim.steps=6", "--optim.warmup_epochs=0.25",
                   "--training.resume=1"), log=quiet)
    assert torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=False)["step"] == 6
    with pytest.raises(TrainingError, match=r"optim.steps=6 and optim.minutes=1 both set the run's length"):
        train(tiny_cfg(betons, tmp_path, "--optim.steps=6", "--optim.minutes=1"), log=quiet)


# ------------------------------------------------------------------------------------------ errors that name the fix

def test_a_warm_up_longer_than_the_run_is_refused_or_under_a_budget_shrunk_with_a_warning(betons, tmp_path,
                                                                                         monkeypatch):
    with pytest.raises(TrainingError, match=r"optim.warmup_epochs=3 is 12 steps, but the run has only 8.*lower"):
        train(tiny_cfg(betons, tmp_path, "--optim.warmup_epochs=3"), log=quiet)
    monkeypatch.setattr(train_coss, "calibrate", lambda run, minutes, log=print: run.set_total_steps(20))
    lines = []
    train(tiny_cfg(betons, tmp_path, "--optim.warmup_epochs=6", "--optim.minutes=1", "--training.run_name=b"),
          log=lines.append)
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "optim.warmup_epochs=6 is 24 steps" in warning[0] and "first 2 steps" in warning[0]
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "b" / "log.jsonl") if '"lr"' in line]
    assert len(lrs) == 20 and lrs[1] == max(lrs)  # peak at step 2, then the cosine


@pytest.mark.parametrize("extra, message", [(["--augment.res=8"], "1x1 feature map"),
                                            (["--co.local_grid=1"], "local_grid=1")])
def test_a_co_method_on_a_1x1_feature_map_is_refused(betons, tmp_path, extra, message):
    with pytest.raises(TrainingError, match=f"co_byol needs a feature map of at least 2x2.*{message}"):
        train(tiny_cfg(betons, tmp_path, *extra), log=quiet)
    train(tiny_cfg(betons, tmp_path, "--method.name=byol", "--augment.res=8", "--optim.epochs=1"), log=quiet)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_suggests_the_cpu(betons, tmp_path):
    res = run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                   "--training.device=cuda")
    assert "--training.device=cpu" in _error_line(res, "train_coss.py")


def test_more_loader_workers_than_cores_is_one_warning_and_the_run_goes_on(betons, tmp_path):
    import numba
    lines = []
    most = numba.config.NUMBA_NUM_THREADS
    train(tiny_cfg(betons, tmp_path, f"--augment.workers={most + 5}", "--optim.epochs=1"), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and f"augment.workers={most + 5}" in warnings[0] and f"using {most}" in warnings[0]


# ------------------------------------------------------------------------------ torchvision in, torchvision out

def test_model_init_starts_from_torchvision_weights_and_backbone_pt_loads_back_strictly(betons, tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")  # with fc.*: dropped on purpose
    cfg = tiny_cfg(betons, tmp_path, f"--model.init={tmp_path / 'tv.pt'}", "--model.backbone=resnet18",
                   "--model.width=0", "--method.name=byol")
    online, target, _, _ = train_coss.build_model(cfg, 10, torch.device("cpu"))
    tv.fc = nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(online.backbone.eval()(x)[1], tv(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target.backbone.eval()(x)[1], tv(x), rtol=1e-5, atol=1e-5)  # the target too
    train_coss.export_backbone(online, str(tmp_path / "backbone.pt"))
    back = torchvision.models.resnet18(weights=None)
    back.fc = nn.Identity()  # README: the exported backbone has no classifier
    back.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), tv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(600)
def test_a_run_started_from_model_init_resumes_after_the_init_file_is_gone(betons, tmp_path):
    """A resume restores every weight from the checkpoint: model.init is neither read (the file may be gone) nor a
    setting whose absence refuses the resume."""
    import shutil
    width = ["--model.backbone=resnet18", "--model.width=8", "--method.name=byol", "--training.run_name=r"]
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    torch.save(build_backbone("resnet18", width=8).state_dict(), init)
    full = train_coss.train(tiny_cfg(betons, tmp_path / "full", *width, f"--model.init={init}"), log=lambda *_: None)

    class Killed(Exception):
        pass

    def kill_at_6(step):  # 4 steps per epoch: dies in epoch 2, after epoch 1's checkpoint
        if step == 6:
            raise Killed()
    with pytest.raises(Killed):
        train_coss.train(tiny_cfg(betons, tmp_path / "cut", *width, f"--model.init={init}"), on_step=kill_at_6,
                         log=lambda *_: None)
    init.unlink()
    lines = []
    again = train_coss.train(tiny_cfg(betons, tmp_path / "cut", *width, "--training.resume=1"), log=lines.append)
    assert any(line.startswith("resumed ") for line in lines)
    a = torch.load(os.path.join(full["run_dir"], "checkpoint.pt"), weights_only=False)["online"]
    b = torch.load(os.path.join(again["run_dir"], "checkpoint.pt"), weights_only=False)["online"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(tmp_path / "full")


def test_model_init_that_does_not_fit_is_one_line(betons, tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    res = run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                   "--model.backbone=resnet18", "--model.width=0", f"--model.init={tmp_path / 'r34.pt'}")
    assert "does not fit model.backbone" in _error_line(res, "train_coss.py")


def test_the_version_is_the_same_everywhere():
    pyproject = open(os.path.join(REPO, "pyproject.toml")).read()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == VERSION
    changelog = open(os.path.join(REPO, "CHANGELOG.md")).read()
    assert re.search(r"^## (\S+)", changelog, re.M).group(1) == VERSION
    assert os.path.isfile(os.path.join(REPO, "LICENSE"))


@pytest.mark.parametrize("what,message", [
    ("nan", "holds non-finite values (NaN or inf) in 1 tensor(s), first conv1.weight"),
    ("checkpoint", "is a training checkpoint of train_coss.py; give its run's backbone.pt instead"),
    ("folder", "is a folder; give the weights file"),
    ("text", "is not a torch state_dict"),
])
def test_a_bad_model_init_is_one_line_naming_the_file(betons, tmp_path, what, message):
    path = tmp_path / "init.pt"
    if what == "nan":
        state = torchvision.models.resnet18(weights=None).state_dict()
        state["conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, path)
    elif what == "checkpoint":
        torch.save({"online": {}, "config": {}, "epoch": 1, "step": 4}, path)
    elif what == "folder":
        path.mkdir()
    else:
        path.write_text("weights: none\n")
    res = run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                   "--model.backbone=resnet18", "--model.width=0", f"--model.init={path}")
    line = _error_line(res, "train_coss.py")
    assert message in line and str(path) in line and "\x1b[" not in line
