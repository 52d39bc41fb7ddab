"""No graph break in the compiled step: for every registered method, LoGo on each base it wraps, and multi-crop,
torch._dynamo traces the step's loss function (the one Run.forward_loss compiles under training.compile: online and
target networks, the loss terms, the state's update) as one graph. A break would split a GPU run's step into
several graphs per resolution, with Python between them. CPU only: dynamo's trace, no inductor code is generated."""
import pytest
import torch

import methods
import train_coss
from config import load_config
from conftest import TINY

LAYOUTS = [(name, []) for name in methods.NAMES] + \
    [(m.name, ["--logo.enabled=1"]) for m in methods.REGISTRY.values() if m.logo_base] + \
    [("co_byol", ["--augment.local_views=2", "--augment.local_res=8"]),
     ("co_dino", ["--augment.global_views=3", "--augment.local_views=1", "--augment.local_res=8"]),
     ("co_simclr", ["--training.fuse_views=0"])]


@pytest.mark.parametrize("name,extra", LAYOUTS, ids=[f"{n}{''.join(e)}" for n, e in LAYOUTS])
def test_the_step_loss_is_one_graph(name, extra):
    cfg = load_config(None, TINY + [f"--method.name={name}", "--training.compile=0", *extra])
    torch.manual_seed(0)
    run = train_coss.build_run(cfg, torch.device("cpu"), num_classes=10)
    plan = train_coss.view_plan(cfg)
    views = [torch.randn(4, 3, 16, 16) for _ in range(plan.n_global)]
    local = [torch.randn(4, 3, 8, 8) for _ in range(plan.n_local)] or None
    packed = train_coss.pack_views(views, run.fuse)
    local_packed = train_coss.pack_views(local, run.fuse) if local else None
    noise = run.logo_noise(local) if run.affinity is not None else None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(run.forward_loss)(packed, local_packed, run.state, noise)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
