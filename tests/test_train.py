"""train_coss.py on tiny synthetic betons: every method runs, exact resume, DDP equivalence, NaN guard, bad input."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import load_config
from conftest import CUDA, REPO, TINY, needs_cuda, quiet, run_main, tiny_cfg
import train_coss
from evaluate import feature_probe_accuracy, knn_accuracy
from analyses import plot_run
from methods import REGISTRY
from train_coss import (LARS, TrainingError, build_optimizer, lr_at, param_groups,
                        resolution_at, tau_at, train)

# every registered method, LoGo on each base it wraps, and multi-crop layouts of four families
EVERY_METHOD = [(name, 0, "") for name in REGISTRY] + [(m.name, 1, "") for m in REGISTRY.values() if m.logo_base] + \
    [("co_byol", 0, "2+4"), ("co_simclr", 0, "3+2"), ("co_moco_v3", 0, "2+2"), ("dino", 0, "2+2")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method,logo,views", EVERY_METHOD)
def test_every_method_trains_and_writes_its_run_folder(betons, tmp_path, method, logo, views):
    multi_crop = []
    if views:  # multi-crop: global + local views at 8 px
        g, n = views.split("+")
        multi_crop = [f"--augment.global_views={g}", f"--augment.local_views={n}", "--augment.local_res=8"]
    cfg = tiny_cfg(betons, tmp_path, f"--method.name={method}", f"--logo.enabled={logo}", "--optim.epochs=1",
                   *multi_crop)
    results = train(cfg, log=quiet)
    run = results["run_dir"]
    for f in ("params.json", "env.json", "log.jsonl", "checkpoint.pt", "backbone.pt"):
        assert os.path.getsize(os.path.join(run, f)) > 0, f
    assert os.listdir(os.path.join(run, "tb"))
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    if method.startswith("co_"):
        assert all("local" in r for r in rows if "loss" in r)
    if logo:
        assert all("local_local" in r and "affinity" in r for r in rows if "loss" in r)
    final = results["epoch0"]
    assert 0 <= final["knn"] <= 1 and 0 <= final["probe"] <= 1 and 0 <= final["online_probe"] <= 1
    assert json.load(open(os.path.join(run, "params.json")))["method"]["name"] == method
    png = plot_run(run)
    assert os.path.getsize(png) > 1000


@pytest.mark.parametrize("method", ["co_byol", "co_simclr"])
def test_local_representations_from_the_stage_before_the_last(betons, tmp_path, method):
    """co.local_layer=previous: the local heads read stage 3's map (twice the side, half the channels), the
    global branch still pools stage 4; the loss is finite and its local term comes from the larger map."""
    from methods import build_net
    from rf_resnet import build_backbone
    torch.manual_seed(0)
    backbone = build_backbone("resnet18_w16_cifar", width=4)
    net = build_net(backbone, method, 32, 16, 32, 16, local_layer="previous")
    last = build_net(build_backbone("resnet18_w16_cifar", width=4), method, 32, 16, 32, 16)
    x = torch.randn(3, 3, 16, 16)
    out, ref = net(x), last(x)
    assert out["P"].shape == (3, 16, 16) and ref["P"].shape == (3, 4, 16)  # 4x4 locations against 2x2
    assert net.local_projector[0].in_channels == 16 and last.local_projector[0].in_channels == 32
    torch.testing.assert_close(out["y"], backbone(x)[1])  # the pooled features are the last stage's
    torch.testing.assert_close(backbone(x, 3)[0], backbone.layer3(backbone.layer2(backbone.layer1(
        backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))))))
    cfg = tiny_cfg(betons, tmp_path, f"--method.name={method}", "--co.local_layer=previous", "--optim.epochs=1")
    rows = [json.loads(line) for line in open(os.path.join(train(cfg, log=quiet)["run_dir"], "log.jsonl"))]
    assert all(np.isfinite(r["local"]) for r in rows if "loss" in r)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method,logo,kernels,views", [("co_byol", 0, "triton", ()), ("byol", 1, "ref", ()),
                                                      ("co_simclr", 0, "ref", (3, 2))])
def test_gpu_data_path_trains_with_the_fused_ops(betons, tmp_path, method, logo, kernels, views):
    """data.decode=gpu (bytes from FFCV, views cut by kernels/crop.py) end to end, also with multi-crop (global and
    local views from the one decode); on CPU, training.kernels=triton runs the Triton kernels under the
    interpreter inside the real training step."""
    if kernels == "triton" and CUDA:
        pytest.skip("Triton on CPU tensors needs the interpreter, which is off on a CUDA machine (the CUDA test "
                    "below runs the compiled kernels)")
    multi_crop = [f"--augment.global_views={views[0]}", f"--augment.local_views={views[1]}",
                  "--augment.local_res=8"] if views else []
    cfg = tiny_cfg(betons, tmp_path, f"--method.name={method}", f"--logo.enabled={logo}", "--optim.epochs=1",
                   "--data.decode=gpu", f"--training.kernels={kernels}", *multi_crop)
    results = train(cfg, log=quiet)
    rows = [json.loads(line) for line in open(os.path.join(results["run_dir"], "log.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert 0 <= results["epoch0"]["knn"] <= 1


@needs_cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method,logo,decode", [("co_byol", 0, "gpu"), ("co_simclr", 0, "cpu"), ("byol", 1, "gpu")])
def test_trains_on_the_gpu_with_bf16_and_the_fused_ops(betons, tmp_path, method, logo, decode):
    cfg = tiny_cfg(betons, tmp_path, f"--method.name={method}", f"--logo.enabled={logo}", "--optim.epochs=1",
                   f"--data.decode={decode}", "--training.device=cuda", "--training.compile=1")
    results = train(cfg, log=quiet)
    rows = [json.loads(line) for line in open(os.path.join(results["run_dir"], "log.jsonl"))]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert "cuda" in json.load(open(os.path.join(results["run_dir"], "env.json")))["device"]


def test_relative_clip_scales_the_extra_gradient_to_a_fraction_of_the_main_one():
    from step import backward_with_relative_clip
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x = torch.randn(8, 5)
    params = list(net.parameters())
    main, extra = net(x).pow(2).mean(), 100 * net(x).sum()   # extra's gradient is much larger
    g_main = torch.autograd.grad(main, params, retain_graph=True)
    g_extra = torch.autograd.grad(extra, params, retain_graph=True)
    scale = backward_with_relative_clip(main, extra, params, 0.015)
    n = lambda gs: torch.sqrt(sum((g ** 2).sum() for g in gs))  # noqa: E731
    assert float(scale * n(g_extra)) == pytest.approx(0.015 * float(n(g_main)), rel=1e-5)
    for p, a, b in zip(params, g_main, g_extra):
        torch.testing.assert_close(p.grad, a + scale * b)
    small = 1e-6 * net(x).sum()                                   # below the clip: added unscaled
    assert float(backward_with_relative_clip(main, small, params, 0.015)) == 1.0


@pytest.mark.timeout(600)
def test_logo_with_the_relative_clip_trains(betons, tmp_path):
    cfg = tiny_cfg(betons, tmp_path, "--method.name=byol", "--logo.enabled=1", "--logo.clip=0.015",
                   "--optim.epochs=1")
    rows = [json.loads(line) for line in open(os.path.join(train(cfg, log=quiet)["run_dir"], "log.jsonl"))]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["local_local"]) for r in rows if "loss" in r)


class _Crash(Exception):
    pass


@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra", [[], ["--method.name=co_simclr", "--augment.local_views=3",
                                        "--augment.local_res=8"], ["--method.name=co_moco_v3"],
                                   ["--method.name=co_dino", "--augment.local_views=2", "--augment.local_res=8",
                                    "--dino.out_dim=32", "--dino.warmup_teacher_temp_epochs=2",
                                    "--dino.warmup_teacher_temp=0.02"],
                                   ["--method.name=moco_v2", "--logo.enabled=1", "--moco.queue_size=40"]],
                         ids=["2+0", "multi-crop 2+3", "co_moco_v3", "co_dino multi-crop", "LoGo on moco_v2"])
def test_a_killed_run_resumes_to_the_same_weights(betons, tmp_path, extra):
    ref = train(tiny_cfg(betons, tmp_path / "a", "--training.run_name=r", *extra), log=quiet)
    ref_state = torch.load(os.path.join(ref["run_dir"], "checkpoint.pt"), weights_only=False)

    def crash_at_6(step):  # 4 steps per epoch: dies in the middle of epoch 2, after epoch 1's checkpoint
        if step == 6:
            raise _Crash()
    cfg = tiny_cfg(betons, tmp_path / "b", "--training.run_name=r", *extra)
    with pytest.raises(_Crash):
        train(cfg, on_step=crash_at_6, log=quiet)
    ck = torch.load(os.path.join(tmp_path / "b" / "r" / "checkpoint.pt"), weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 4)
    train(tiny_cfg(betons, tmp_path / "b", "--training.run_name=r", "--training.resume=1", *extra), log=quiet)
    state = torch.load(os.path.join(tmp_path / "b" / "r" / "checkpoint.pt"), weights_only=False)
    assert state["step"] == ref_state["step"] == 8
    if ref_state["method_state"] is not None:  # DINO's teacher centre, MoCo v2's queue resume with the weights
        for a, b in zip(state["method_state"], ref_state["method_state"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key in ("online", "target", "probe"):
        if ref_state[key] is None:  # SimCLR family: no target network
            assert state[key] is None
            continue
        for name, tensor in ref_state[key].items():
            torch.testing.assert_close(state[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")


@pytest.mark.timeout(600)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(betons, tmp_path):
    train(tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=1"), log=quiet)
    path = tmp_path / "r" / "checkpoint.pt"
    before = path.read_bytes()
    cfg = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--training.resume=1", "--optim.lr=1e38",
                   "--optim.lars_eta=0", "--optim.epochs=3", "--training.nan_check_every=1")
    with pytest.raises(TrainingError, match="loss is (nan|inf).*last good checkpoint"):
        train(cfg, log=quiet)
    assert path.read_bytes() == before
    # checking a running flag every 3 steps (fewer host syncs): still stopped before any checkpoint is written
    lazy = tiny_cfg(betons, tmp_path, "--training.run_name=r", "--training.resume=1", "--optim.lr=1e38",
                    "--optim.lars_eta=0", "--optim.epochs=3", "--training.nan_check_every=3",
                    "--training.log_every=100")
    with pytest.raises(TrainingError, match="loss is nan/inf at a step between .*last good checkpoint"):
        train(lazy, log=quiet)
    assert path.read_bytes() == before
    with pytest.raises(TrainingError, match="already holds a run"):  # a fresh start never overwrites a run
        train(tiny_cfg(betons, tmp_path, "--training.run_name=r", "--optim.epochs=1"), log=quiet)
    assert path.read_bytes() == before




@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra,message", [
    (["--data.name=nothing"], "write it with: python write_ffcv.py --split train"),
    (["--optim.batch_size=128"], "larger than the 64 training images"),
    (["--method.name=co_byol", "--logo.enabled=1"], "LoGo's bases"),
    (["--method.name=co_moco_v3", "--logo.enabled=1"], "LoGo's bases"),
    (["--co.w_s=1.5"], "convex mixing"),
    (["--augment.global_views=1"], "'augment.global_views': '1' (expected an int >= 2)"),
    (["--augment.local_cmin=0.3", "--augment.local_cmax=0.2"], "is above augment.local_cmax"),
    (["--method.name=byol", "--logo.enabled=1", "--augment.local_views=4"], "makes its own 2 global + 2 local views"),
    (["--method.name=mocov9"], "bad value for 'method.name'"),
    (["--method.name=dino", "--method.proj_out_bn=affine"], "dino's head has its own form"),
    (["--method.name=moco_v2", "--moco.queue_size=31"], "smaller than the 32 keys one step enqueues"),
    (["--method.name=byol", "--logo.enabled=1", "--logo.local_cmax=0.04"], "not above 0.05"),
    (["--training.run_name=a/b"], "must be a plain folder name"),
    (["--optim.minutes=1e308"], "bad value for 'optim.minutes'"),
    (["--method.name=simclr", "--method.pred_out_bn=fixed"], "simclr has no predictor"),
    (["--optim.batch_sise=8"], "unknown command line key 'optim.batch_sise'"),
])
def test_bad_input_gives_one_line_and_exit_2(betons, tmp_path, extra, message):
    res = run_main("train_coss.py", *TINY, f"--data.beton_dir={betons / 'betons'}", f"--training.out_dir={tmp_path}",
                   *extra)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("train_coss.py: error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]


# --------------------------------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, port, method, x1, x2, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    loss, grads, state = _one_step(method, x1, x2, world, rank)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads, "state": state}, out)
    torch.distributed.barrier()  # neither rank leaves while the other still talks to it
    # then leave at once, as train_coss.py's main does: gloo's threads at interpreter teardown sometimes abort a
    # finished process ("terminate called without an active exception", ~1 run in 20 on a 2-core machine)
    os._exit(0)


def _one_step(method, x1, x2, world, rank):
    """One loss + backward with BN on running statistics, so that per-sample results do not depend on how the
    batch is split (SyncBN needs CUDA); gradients are what DDP leaves in .grad."""
    cfg = load_config(None, TINY + [f"--method.name={method}", "--training.device=cpu"])
    _, _, device = train_coss.setup_distributed("cpu")
    torch.manual_seed(0)
    online, target, _, _ = train_coss.build_model(cfg, 10, device)
    online.train()
    for m in list(online.modules()) + (list(target.modules()) if target is not None else []):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model = online
    if world > 1:
        model = nn.parallel.DistributedDataParallel(online)
        b = x1.shape[0] // world
        x1, x2 = x1[rank * b:(rank + 1) * b], x2[rank * b:(rank + 1) * b]
    state = (torch.zeros(1, cfg["dino.out_dim"]), torch.tensor(0.04)) if "dino" in method else None
    if method == "moco_v2":  # the same queue on every rank, as the trainer seeds it
        queue = torch.randn(cfg["moco.queue_size"], cfg["method.proj_dim"],
                            generator=torch.Generator().manual_seed(5))
        state = (F.normalize(queue, dim=1), torch.zeros((), dtype=torch.long))
    spec = train_coss.loss_spec(cfg)
    loss, _, _, _, update = train_coss.method_loss(spec, model, target, (x1, x2), None, None, state)
    train_coss.update_state(spec, state, update)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in online.named_parameters() if p.grad is not None}, state


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["co_byol", "co_simclr", "simclr", "co_moco_v3", "co_dino", "moco_v2"])
def test_two_gloo_ranks_with_half_batches_equal_one_rank(tmp_path, method):
    """Loss and gradients of 2 ranks with 4 images each equal those of 1 rank with all 8; so do the method's own
    tensors after the step: DINO's centre (all ranks' teacher mean) and MoCo v2's queue (every rank's keys, enqueued
    in rank order: the one-rank batch's order)."""
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, grads, state = _one_step(method, x1, x2, 1, 0)
    out = tmp_path / "rank0.pt"
    with socket.socket() as s:  # a free port for this spawn (a fixed one can still be held by the previous test)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, method, x1, x2, str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
    assert set(got["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(got["state"] or (), state or ()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if method == "moco_v2":  # the 2 x 8 keys entered the queue
        assert int(state[1]) == int(got["state"][1]) == 16


# --------------------------------------------------------------------------------------------------- pieces

def test_lars_groups_and_update():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = param_groups(model, 0.1)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 3])]
    assert len(groups[1]["params"]) == 3 and groups[1]["weight_decay"] == 0 and not groups[1]["lars"]
    assert all(g["lr_mult"] == 1.0 for g in groups)
    opt = LARS(groups, lr=0.5, momentum=0.9, eta=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    opt.step()
    update = torch.ones_like(w0) + 0.1 * w0
    trust = 0.01 * w0.norm() / update.norm()
    torch.testing.assert_close(model[0].weight, w0 - 0.5 * trust * update)
    torch.testing.assert_close(model[0].bias, b0 - 0.5 * torch.ones_like(b0))  # no decay, no adaptation


def test_lars_matches_the_per_parameter_formula_over_steps():
    """The foreach LARS equals the textbook per-parameter update for several steps: trust ratio on decayed weights,
    a zero weight (trust 1), a parameter without gradient (untouched), momentum carried across steps."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    with torch.no_grad():
        model[2].weight.zero_()
    groups = param_groups(model, 0.05)
    opt = LARS(groups, lr=0.3, momentum=0.8, eta=0.02)
    ref = {p: (p.detach().clone(), torch.zeros_like(p)) for p in model.parameters()}
    lars_of = {p: (gr["lars"], gr["weight_decay"]) for gr in groups for p in gr["params"]}
    for step in range(4):
        for p in model.parameters():
            p.grad = None if p is model[1].bias else torch.randn(p.shape, generator=g)
        for p, (w, buf) in ref.items():
            if p.grad is None:
                continue
            lars, wd = lars_of[p]
            u = p.grad + wd * w
            if lars and w.norm() > 0 and u.norm() > 0:
                u = 0.02 * w.norm() / u.norm() * u
            buf.mul_(0.8).add_(u)
            w.sub_(0.3 * buf)
        opt.step()
        for p, (w, _) in ref.items():
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)
    assert torch.equal(model[1].bias.detach(), torch.zeros(7))  # never had a gradient


@pytest.mark.parametrize("clip", [False, True])
def test_lars_solo_form_matches_solo_learns_update_written_out(clip):
    """solo-learn's lars.py, per parameter, written out: for a weight with ||w|| > 0 and ||g|| > 0, r = eta ||w|| /
    (||g|| + wd ||w|| + eps), with clip_lr r = min(r / lr, 1), d = (g + wd w) r; otherwise d = g (no decay);
    biases and norms (exclude_bias_n_norm): d = g; then torch's SGD momentum: buf = m buf + d, w -= lr buf. lr 0.3
    with eta 0.02 makes the clip bind on some layers and not on others."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight.zero_()
        model[3].weight.mul_(100)  # a large weight: its ratio / lr is above 1, so the clip binds there
    groups = param_groups(model, 0.01)
    opt = LARS(groups, lr=0.3, momentum=0.8, eta=0.02, form="solo", clip=clip)
    ref = {p: (p.detach().clone(), torch.zeros_like(p)) for p in model.parameters()}
    decayed = {p for gr in groups if gr["lars"] for p in gr["params"]}
    bound = []
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        for p, (w, buf) in ref.items():
            d = p.grad.clone()
            if p in decayed and w.norm() > 0 and d.norm() > 0:
                r = 0.02 * w.norm() / (d.norm() + 0.01 * w.norm() + 1e-8)
                if clip:
                    bound.append(bool(r / 0.3 > 1))
                    r = min(r / 0.3, 1.0)
                d = (d + 0.01 * w) * r
            buf.mul_(0.8).add_(d)
            w.sub_(0.3 * buf)
        opt.step()
        for p, (w, _) in ref.items():
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)
    assert not clip or (any(bound) and not all(bound))  # the test saw the clip bind and not bind


def test_lars_state_of_an_older_version_loads_as_byols_form():
    model = nn.Linear(3, 2)
    opt = LARS(param_groups(model, 0.1), lr=0.1, eta=0.01)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["form"], group["clip"], group["eps"]
    again = LARS(param_groups(model, 0.1), lr=0.1, eta=0.01, form="solo", clip=True)
    again.load_state_dict(state)
    assert all((gr["form"], gr["clip"]) == ("byol", False) for gr in again.param_groups)


def test_adamw_option_keeps_the_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    cfg = load_config(None, ["--optim.optimizer=adamw", "--optim.weight_decay=0.1", "--optim.momentum=0.8"])
    opt = build_optimizer(cfg, model, peak_lr=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.999) and opt.param_groups[0]["params"][0] is model[0].weight
    assert isinstance(build_optimizer(load_config(None, []), model, 0.01), LARS)


def test_schedules():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1) and lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0) and lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert tau_at(0, 100, 0.99) == pytest.approx(0.99) and tau_at(100, 100, 0.99) == pytest.approx(1.0)
    # optim.lr_schedule=constant: the same warm-up, then the peak to the end
    assert [lr_at(s, 100, 10, 1.0, "constant") for s in (0, 9, 10, 50, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0])
    assert lr_at(50, 100, 0, 0.3, "constant") == 0.3 and lr_at(50, 100, 0, 0.3) == pytest.approx(0.15)
    cfg = load_config(None, ["--augment.res=64", "--augment.res_start=32", "--augment.res_ramp_epochs=4"])
    assert [resolution_at(cfg, e) for e in range(6)] == [32, 40, 48, 56, 64, 64]


def test_knn_accuracy_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    bank = nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    query = nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    bank_y, query_y = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (20,), generator=g)
    correct = 0
    for q, y in zip(query, query_y):
        sims = bank @ q
        top = sims.argsort(descending=True)[:5]
        votes = [sum(float(torch.exp(sims[i] / 0.1)) for i in top if bank_y[i] == c) for c in range(3)]
        correct += int(np.argmax(votes) == int(y))
    assert knn_accuracy(bank, bank_y, query, query_y, 3, k=5, t=0.1, chunk=7) == pytest.approx(correct / 20)


def test_feature_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 16, generator=g) * 0.1 + nn.functional.one_hot(y, 16).float()
    assert feature_probe_accuracy(x[:300], y[:300], x[300:], y[300:], 4, iters=50) >= 0.99


@pytest.mark.timeout(600)
def test_progressive_resolution_changes_the_views(betons, tmp_path):
    cfg = tiny_cfg(betons, tmp_path, "--augment.res=24", "--augment.res_start=16", "--augment.res_ramp_epochs=1",
                   "--method.name=co_byol")  # at 8 px the tiny net's map is 1x1, which a CO method refuses
    run = train(cfg, log=quiet)["run_dir"]
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl")) if '"loss"' in line]
    assert sorted({(r["epoch"], r["res"]) for r in rows}) == [(0, 16), (1, 24)]


def test_run_folder_names(tmp_path):
    cfg = load_config(None, [f"--training.out_dir={tmp_path}"])
    first = train_coss.run_folder(cfg)
    assert os.path.basename(first).startswith("co_byol_resnet18_w16_cifar_s0_")
    for name in ("co_byol_resnet18_w16_cifar_s0_20260101-000000", "co_byol_resnet18_w16_cifar_s0_20260102-000000",
                 "byol_resnet18_w16_cifar_s0_20270101-000000"):
        os.makedirs(tmp_path / name)
    resumed = train_coss.run_folder(load_config(None, [f"--training.out_dir={tmp_path}", "--training.resume=1"]))
    assert os.path.basename(resumed) == "co_byol_resnet18_w16_cifar_s0_20260102-000000"  # newest of this method
    named = load_config(None, [f"--training.out_dir={tmp_path}", "--training.run_name=mine"])
    assert train_coss.run_folder(named) == os.path.join(str(tmp_path), "mine")


def test_start_lines_name_total_batch_peak_lr_optimiser_and_batchnorm():
    cfg = load_config(os.path.join(REPO, "configs", "in100.yaml"), ["--training.written_for=8", "--training.sync_bn=1"])
    lines = train_coss.scale_lines(cfg, 2, torch.device("cpu"))
    b, lr = cfg["optim.batch_size"], cfg["optim.lr"]
    assert f"total batch {2 * b} ({b} x 2 processes), peak lr {lr * 2 * b / 256:.4g}" in lines[0]
    assert f"LARS ({cfg['optim.lars_form']} form, eta {cfg['optim.lars_eta']:g}" in lines[0]
    assert "per-process BatchNorm" in lines[0]
    assert lines[1].startswith(f"note: this config was written for 8 processes (total batch {8 * b}, ")
    assert f"set optim.batch_size={4 * b}" in lines[1]
    assert lines[2].startswith("warning: training.sync_bn=1, but torch cannot sync BatchNorm on the CPU")
    same = train_coss.scale_lines(load_config(None, ["--training.written_for=1"]), 1, torch.device("cpu"))
    assert len(same) == 1 and "SGD" in same[0]  # nothing to say: the count it was written for, no sync asked


def test_sync_bn_converts_online_and_target_on_cuda_only():
    cfg = load_config(None, TINY + ["--method.name=byol", "--training.sync_bn=1"])
    online, target, _, _ = train_coss.build_model(cfg, 10, torch.device("cpu"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in list(online.modules()) + list(target.modules()))
    if torch.cuda.is_available():
        online, target, _, _ = train_coss.build_model(cfg, 10, torch.device("cuda"))
        for net in (online, target):
            bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)


def _calibrate_worker(rank, world, port, beton_dir, out):
    """One rank of a 2-rank calibration whose clocks disagree: rank 1's runs 1,000x fast, so on its own it would
    time all 40 steps while rank 0 stops after 5 (the hang: one rank in a broadcast, the other in the next step)."""
    import time as time_module
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = load_config(None, TINY + [f"--data.beton_dir={beton_dir}", "--training.device=cpu"])
    _, _, device = train_coss.setup_distributed("cpu")
    train_path, _, total, classes = train_coss.betons(cfg)
    run = train_coss.build_run(cfg, device, world, train_path, 64, classes, total)
    real = time_module.perf_counter
    start = real()
    fast = (lambda: start + (real() - start) / 1000) if rank == 1 else (lambda: start + (real() - start) * 1000)
    train_coss.time.perf_counter = fast  # rank 0: every step looks like 30 s and more; rank 1: like nothing
    train_coss.calibrate(run, 1.0, log=lambda *_: None)
    train_coss.time.perf_counter = real
    torch.save({"total": run.total_steps}, f"{out}.{rank}")
    torch.distributed.barrier()
    os._exit(0)


@pytest.mark.timeout(600)
def test_calibration_under_two_ranks_with_disagreeing_clocks_ends_with_one_step_count(betons, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "total"
    torch.multiprocessing.spawn(_calibrate_worker, args=(2, port, str(betons / "betons"), str(out)), nprocs=2)
    totals = [torch.load(f"{out}.{r}", weights_only=False)["total"] for r in (0, 1)]
    assert totals[0] == totals[1] > 0


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    cfg = load_config(None, TINY + [f"--training.out_dir={tmp_path / 'runs'}"])
    with pytest.raises(train_coss.TrainingError, match="is a file, not a folder"):
        train_coss.check_options(cfg, 64, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_triton_kernels_without_cuda_or_the_interpreter_are_one_line(monkeypatch):
    cfg = load_config(None, TINY + ["--training.kernels=triton"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(train_coss.TrainingError, match="training.kernels=triton needs CUDA"):
        train_coss.check_options(cfg, 64, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the suite's way of running them on the CPU
    train_coss.check_options(cfg, 64, 1)
