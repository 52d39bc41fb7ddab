"""MoCo v2 (Chen et al. 2020; solo-learn's symmetric MoCo V2+): InfoNCE of the online projections against the
momentum encoder's key of the other view and a queue of earlier steps' keys (every rank's). Its state: the queue
[K, D] (random unit keys at first, as MoCo's code) and its pointer. LoGo on MoCo v2 (its public code): the local
crops are queries in the same average, so L_lg is inside the global loss."""
import torch
import torch.nn.functional as F

from distributed import gather_views
from losses import enqueue, multicrop_moco_v2
from config import Param, StrictInt
from methods.base import Method, MethodError, forward_views
from models import moco_v2_head


def section():
    return ("moco", "MoCo v2's queue", dict(
        queue_size=Param(StrictInt(1), "keys in the queue of negatives (MoCo v2: 65536; LoGo's code: 4096)",
                         default=4096)))


class MoCoV2(Method):
    name = family = "moco_v2"
    paper = "MoCo v2 (Chen et al., 2020)"
    global_term = "InfoNCE against the other view's momentum key and a queue of earlier keys"
    config = "in100_moco_v2.yaml"
    ema_target = logo_base = own_head_form = True
    state_names = ("queue", "queue_ptr")

    def projector(self, a):
        return moco_v2_head(a.in_dim, a.proj_hidden, a.proj_dim)

    def init_state(self, cfg, device):
        g = torch.Generator().manual_seed(cfg["training.seed"])
        queue = F.normalize(torch.randn(cfg["moco.queue_size"], cfg["method.proj_dim"], generator=g), dim=1)
        return queue.to(device), torch.zeros((), dtype=torch.long, device=device)

    def other_side(self, spec, target, packed, outs):
        return forward_views(target, packed, spec.n_global)

    def global_loss(self, spec, crops, outs, locs, targets, state):
        # with LoGo, its 2 global + 2 local crops in one average of the 2 global-global and 4 local-global terms,
        # as LoGo's public MoCo code (L_lg inside, not added); otherwise the multi-crop rule
        queue, _ = state
        return multicrop_moco_v2([o["z"] for o in outs + locs], targets, queue, spec.temperature)

    def logo_local_global(self, spec, outs, locs, targets):
        return None  # inside global_loss

    def state_update(self, spec, targets):
        return torch.cat(gather_views(targets)[0])  # this step's keys, every rank's, enter the queue

    def apply_update(self, spec, state, update):
        enqueue(state[0], state[1], update)

    def check(self, cfg, world):
        keys = cfg["augment.global_views"] * cfg["optim.batch_size"] * world
        if cfg["moco.queue_size"] < keys:
            raise MethodError(f"moco.queue_size={cfg['moco.queue_size']} is smaller than the {keys} keys one step "
                              f"enqueues ({cfg['augment.global_views']} views x batch {cfg['optim.batch_size']} x "
                              f"{world} process(es)); the queue would hold duplicate rows; use at least {keys}")


METHODS = (MoCoV2(),)
