"""The training step's switches (train_coss.Run): fused views, prefetch and torch.compile each give the step of the
per-view eager Run: the same losses and updated weights, exactly where the arithmetic is the same, within a stated
tolerance where it is not."""
import io

import pytest
import torch
import torch.nn as nn

import train_coss
from conftest import TINY, needs_cuda, tiny_cfg
from config import load_config


def _cfg(*extra):
    return load_config(None, TINY + ["--training.log_every=2", *extra])


def _batches(n, res=16, local_res=8, batch=16, seed=0, global_views=2, local_views=0):
    """Loader-format batches (the CPU path): uint8 views [B, 2, res, res, 3] and labels [B, 1]; with local views
    (LoGo's pair, multi-crop) the decoder's flat rows of global and local views (multiview_decoder.join_views)."""
    from multiview_decoder import join_views
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        views = torch.randint(0, 256, (batch, global_views, res, res, 3), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (batch, 1), generator=g)
        local = torch.randint(0, 256, (batch, local_views, local_res, local_res, 3), dtype=torch.uint8, generator=g)
        out.append((join_views(views, local if local_views else None), labels))
    return out


def _build(*extra, frozen_bn=False, double=False):
    """A Run without a loader on the CPU; double=True: networks and views in float64, so that comparisons of
    reordered arithmetic are not drowned by fp32 rounding amplified through the tiny nets' BatchNorm."""
    torch.manual_seed(0)
    run = train_coss.build_run(_cfg(*extra), torch.device("cpu"), num_classes=10)
    if double:
        for net in (run.online, run.target, run.probe, run.affinity):
            if net is not None:
                net.double()  # in place: the optimisers hold the same parameters
        if run.state is not None:  # DINO's centre and temperature, MoCo v2's queue
            run.state = tuple(t.double() if t.is_floating_point() else t for t in run.state)
        make = run.make_views
        def make_double(*args):
            views, local, labels = make(*args)
            as64 = lambda vs: tuple(v.double() for v in vs) if vs is not None else None  # noqa: E731
            return as64(views), as64(local), labels
        run.make_views = make_double
    if frozen_bn:  # BatchNorm on running statistics: per-sample results do not depend on what shares the batch
        nets = [n for n in (run.online, run.target, run.affinity) if n is not None]
        for m in (m for net in nets for m in net.modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return run


def _steps(run, batches):
    out = []
    for batch in batches:
        terms, _, _ = run.step(batch)
        out.append({k: float(v.detach()) for k, v in terms.items()})
    return out


def _assert_same(a, b, rtol, atol, state_rtol=None):
    """The logged terms agree within rtol (relative) / atol, every tensor of the state within state_rtol (default
    rtol) x its largest magnitude + atol (all 0: bit for bit)."""
    state_rtol = rtol if state_rtol is None else state_rtol
    (terms_a, run_a), (terms_b, run_b) = a, b
    assert len(terms_a) == len(terms_b)
    for ta, tb in zip(terms_a, terms_b):
        for k in ta:
            assert ta[k] == pytest.approx(tb[k], rel=rtol, abs=atol), k
    sa, sb = run_a.state_dict(), run_b.state_dict()
    for a, b in zip(sa["method_state"] or (), sb["method_state"] or ()):  # DINO's centre, MoCo v2's queue
        torch.testing.assert_close(b, a, rtol=0, atol=state_rtol * float(a.abs().max()) + atol)
    for key in ("online", "target", "probe", "affinity"):
        if sa[key] is None:
            continue
        for name, t in sa[key].items():
            scale = float(t.abs().max()) if t.is_floating_point() and t.numel() else 0.0
            torch.testing.assert_close(sb[key][name], t, rtol=0, atol=state_rtol * scale + atol,
                                       msg=lambda m, k=f"{key}.{name}": f"{k}: {m}")


METHODS = [("byol", 0), ("co_byol", 0), ("simclr", 0), ("co_simclr", 0), ("byol", 1)]
MULTI_CROP = [("co_byol", 2, 3), ("co_simclr", 3, 2), ("byol", 2, 2), ("simclr", 3, 1),  # method, global, local
              ("co_moco_v3", 2, 1), ("co_dino", 2, 2), ("moco_v2", 2, 0)]


@pytest.mark.parametrize("method,logo,views", [(m, lg, (2, 2 * lg)) for m, lg in METHODS] +
                         [(m, 0, (g, loc)) for m, g, loc in MULTI_CROP])
def test_fused_views_equal_two_forwards_when_batchnorm_uses_running_statistics(method, logo, views):
    """One forward of a V·B batch per network = V forwards of B when BatchNorm does not look at the batch (also
    with multi-crop: the global views fused, the local views fused). The convolutions of a larger batch may sum in
    another order (oneDNN picks its blocking by shape), so in float64: three steps within 1e-9 of each tensor's
    scale."""
    args = [f"--method.name={method}", f"--logo.enabled={logo}"]
    if not logo:
        args += [f"--augment.global_views={views[0]}", f"--augment.local_views={views[1]}", "--augment.local_res=8"]
    batches = _batches(3, global_views=views[0], local_views=views[1])
    per_view = _build(*args, "--training.fuse_views=0", frozen_bn=True, double=True)
    fused = _build(*args, "--training.fuse_views=1", frozen_bn=True, double=True)
    _assert_same((_steps(per_view, batches), per_view), (_steps(fused, batches), fused), 1e-9, 1e-12)


def test_fused_views_normalise_over_both_views_in_training_mode():
    """With BatchNorm on batch statistics the fused forward normalises over 2B samples: the losses differ (README
    says so), and the running statistics are those of both views together."""
    batches = _batches(1)
    per_view, fused = _build("--training.fuse_views=0"), _build("--training.fuse_views=1")
    x1, x2 = fused.make_views(batches[0], 16, fused.generator(0))[0]  # the views the first step makes
    with torch.no_grad():
        stem = fused.online.backbone.conv1(torch.cat([x1, x2]))          # before the update changes conv1
    a, b = _steps(per_view, batches), _steps(fused, batches)
    assert a[0]["loss"] != pytest.approx(b[0]["loss"], rel=1e-6)
    # the stem's BatchNorm saw both views' images at once: its running mean moved by 0.1 x their joint mean
    torch.testing.assert_close(fused.online.backbone.bn1.running_mean, 0.1 * stem.mean(dim=(0, 2, 3)), rtol=1e-4,
                               atol=1e-6)


def test_packed_views_that_lie_back_to_back_are_joined_without_a_copy():
    both = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    packed = train_coss.pack_views((both[:4], both[4:]), fuse=True)
    assert len(packed) == 1 and packed[0].data_ptr() == both.data_ptr() and torch.equal(packed[0], both)
    apart = (both[:4].clone(), both[4:].clone())
    joined = train_coss.pack_views(apart, fuse=True)[0]
    assert torch.equal(joined, both) and joined.data_ptr() != both.data_ptr()
    assert train_coss.pack_views(apart, fuse=False) == apart


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method,logo", [("co_byol", 0), ("simclr", 1)])
def test_prefetch_gives_exactly_the_steps_of_no_prefetch(betons, tmp_path, method, logo):
    """The next step's views are made by a thread while the current step runs, with that step's generator: the
    same inputs, so the same weights bit for bit, over a whole epoch of the real loader."""
    def epoch(prefetch):
        torch.manual_seed(0)
        cfg = tiny_cfg(betons, tmp_path, f"--method.name={method}", f"--logo.enabled={logo}",
                       f"--training.prefetch={prefetch}")
        path = str(betons / "betons" / "tiny_train.beton")
        run = train_coss.build_run(cfg, torch.device("cpu"), 1, path, 64)
        run.set_epoch(0)
        terms = [run.step(b)[0]["loss"].item() for b in run.batches()]
        return terms, run
    plain, ahead = epoch(0), epoch(1)
    assert len(plain[0]) == 4
    _assert_same(([{"loss": v} for v in plain[0]], plain[1]), ([{"loss": v} for v in ahead[0]], ahead[1]), 0, 0)


def test_inputs_made_for_another_step_are_refused():
    run = _build()
    batch = _batches(1)[0]
    with pytest.raises(RuntimeError, match="made for step 2 given to step 1"):
        run.step(run.prepare(batch, 1))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["co_byol", "co_simclr", "co_dino", "moco_v2"])
def test_compiled_step_equals_the_eager_step(method):
    """training.compile=1 (online and target networks, losses and their backward in one graph): inductor reorders
    and fuses the arithmetic, so the steps equal eager up to rounding. In fp32 BatchNorm's backward over 16 samples
    of a width-4 net amplifies rounding to 3e-3 of a weight's update in one step (measured), which would hide real
    errors; in float64 two steps agree within 1e-9 of each tensor's scale. DINO's centre and MoCo v2's queue, which
    the compiled graph updates in place, too."""
    batches = _batches(2)
    eager = _build(f"--method.name={method}", "--training.compile=0", double=True)
    compiled = _build(f"--method.name={method}", "--training.compile=1", double=True)
    _assert_same((_steps(eager, batches), eager), (_steps(compiled, batches), compiled), 1e-9, 1e-12)


def test_inductor_cache_is_kept_per_cpu_capability(monkeypatch):
    """Kernels compiled for AVX-512 and reused under ATEN_CPU_CAPABILITY=avx2 gave wrong losses (torch 2.14.1): each
    capability gets its own cache folder, unless the user chose one."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = train_coss.inductor_cache_per_isa()
    assert folder.endswith("cpu-" + torch.backends.cpu.get_cpu_capability().lower())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")
    assert train_coss.inductor_cache_per_isa() == "/somewhere/mine"


def test_state_dict_round_trip_continues_identically():
    """run.state_dict() saved and loaded into a fresh Run: its next steps are those of the original."""
    batches = _batches(4)
    a = _build("--method.name=co_byol")
    _steps(a, batches[:2])
    buffer = io.BytesIO()  # through bytes, as a checkpoint file (a state_dict holds the live tensors)
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    b = _build("--method.name=co_byol")
    b.load_state_dict(state)
    assert b.global_step == 2
    _assert_same((_steps(a, batches[2:]), a), (_steps(b, batches[2:]), b), 0, 0)


@needs_cuda
@pytest.mark.parametrize("method,logo", [("co_byol", 0), ("co_simclr", 0), ("byol", 1)])
def test_the_steady_state_step_never_waits_for_the_gpu(betons, tmp_path, method, logo):
    """Between log rows (and away from an epoch's end) run.step issues no synchronising CUDA call: the host runs
    ahead of the device. (Making the views may wait, for pageable uploads and nvJPEG; with training.prefetch that
    happens in its own thread, on a side stream.)"""
    cfg = tiny_cfg(betons, tmp_path, "--training.device=cuda", f"--method.name={method}", f"--logo.enabled={logo}",
                   "--training.log_every=100", "--optim.batch_size=8")
    run = train_coss.build_run(cfg, torch.device("cuda"), 1, str(betons / "betons" / "tiny_train.beton"), 64)
    run.set_epoch(0)
    it = iter(run.loader)
    items = [run.prepare(next(it), s) for s in range(6)]
    del it
    for item in items[:3]:  # warm-up: allocations, cuDNN plans, Triton compilation
        run.step(item)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for item in items[3:]:
            run.step(item)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert run.global_step == 6
