"""DINO (Caron et al. 2021; its ResNet setting) and CO-DINO: the student's distribution over K prototypes against
the EMA teacher's centred, sharpened one of the other global views; CO-DINO matches every location's student
distribution (local heads) with it. Its state: the teacher centre [1, K] and the teacher temperature of the epoch
(warm-up schedule). Its last layer (the prototypes) stays as initialised for dino.freeze_last_layer epochs."""
import torch

from config import Param, StrictBool, StrictFloat, StrictInt
from distributed import gather_with_grad
from losses import dino_center_update, dino_local_loss, dino_loss, dino_teacher_temp
from methods.base import Method, co_variant, forward_views
from models import DINOHead, NormedLinear


def section():
    return ("dino", "DINO and CO-DINO: head size, temperatures, centre, frozen last layer", dict(
        out_dim=Param(StrictInt(2), "prototypes K of the head's weight-normalised last layer (the head: "
                      "method.proj_hidden-wide 3-layer MLP to a method.proj_dim bottleneck, L2-normalised)",
                      default=4096),
        student_temp=Param(StrictFloat(1e-4), "student temperature", default=0.1),
        teacher_temp=Param(StrictFloat(1e-4), "teacher temperature after its warm-up", default=0.04),
        warmup_teacher_temp=Param(StrictFloat(1e-4), "teacher temperature at epoch 0", default=0.04),
        warmup_teacher_temp_epochs=Param(StrictInt(0), "epochs of the teacher temperature's linear warm-up (per "
                                         "epoch, as DINO)", default=0),
        center_momentum=Param(StrictFloat(0.0, 1.0), "momentum of the teacher centre", default=0.9),
        freeze_last_layer=Param(StrictInt(0), "epochs during which the last layer gets no update", default=1),
        head_bn=Param(StrictBool(), "a BatchNorm after each hidden layer of the head (DINO's use_bn_in_head; off in "
                      "its ResNet setting, on in lightly's small-image benchmarks)", default=False)))


def teacher_temp(cfg, epoch):
    """DINO's teacher temperature in `epoch` (losses.dino_teacher_temp)."""
    return dino_teacher_temp(epoch, cfg["dino.warmup_teacher_temp"], cfg["dino.teacher_temp"],
                             cfg["dino.warmup_teacher_temp_epochs"])


class DINO(Method):
    name = family = "dino"
    paper = "DINO (Caron et al., ICCV 2021)"
    global_term = "CE(teacher's centred, sharpened distribution over K prototypes, student's)"
    config = "in100_dino.yaml"
    ema_target = own_head_form = True
    state_names = ("center", "teacher_temp")

    def projector(self, a):
        return DINOHead(a.in_dim, a.proj_hidden, a.proj_dim, a.dino_out_dim, bn=a.dino_head_bn)

    def local_projector(self, a):
        return DINOHead(a.local_in_dim, a.local_hidden, a.proj_dim, a.dino_out_dim, local=True, bn=a.dino_head_bn)

    def init_state(self, cfg, device):
        return (torch.zeros(1, cfg["dino.out_dim"], device=device),
                torch.full((), teacher_temp(cfg, 0), device=device))

    def set_epoch(self, run, epoch):
        run.state[1].fill_(teacher_temp(run.cfg, epoch))

    def other_side(self, spec, target, packed, outs):
        return forward_views(target, packed, spec.n_global)

    def global_loss(self, spec, crops, outs, locs, teacher, state):
        center, temp = state
        return dino_loss([o["z"] for o in crops], teacher, center, spec.dino_student_temp, temp)

    def local_loss(self, spec, outs, teacher, state):
        center, temp = state
        return dino_local_loss([o["P"] for o in outs], teacher, center, spec.dino_student_temp, temp)

    def state_update(self, spec, teacher):
        logits = torch.cat(teacher)  # averaged in fp32 at least (bf16 under autocast)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return gather_with_grad(logits.mean(0, keepdim=True)).mean(0, keepdim=True)

    def apply_update(self, spec, state, update):
        dino_center_update(state[0], update, spec.dino_center_momentum)

    def after_backward(self, run):
        if run.epoch < run.cfg["dino.freeze_last_layer"]:  # the last layer stays as initialised
            for m in run.online.modules():
                if isinstance(m, NormedLinear):
                    m.weight.grad = None


METHODS = (DINO(), co_variant(DINO, "CE: every location's student distribution against the other view's teacher",
                              "in100_co_dino.yaml")())
