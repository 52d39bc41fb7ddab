"""What a method is to the trainer: its heads, its state, its loss terms, what runs after the backward, and its own
refusals. A family module (byol.py, simclr.py, ...) subclasses Method once; its CO variant is `co_variant(Base)`:
the same class with local heads and the local term switched on, not a copy.

The trainer's step (train_coss.method_loss) runs, for every method:
    outs = online(global views), locs = online(local views)     (dicts: y pooled, z projection, p prediction,
                                                                 P local [B, L, D] on global views of CO variants)
    ctx  = method.other_side(spec, target, packed, outs)         the targets / keys / teacher and what they share
    loss = method.global_loss(spec, crops, outs, locs, ctx, state)
    CO:    loss = mix(loss, method.local_loss(spec, outs, ctx, state), w_s, mixing)
    LoGo:  loss += method.logo_local_global(spec, outs, locs, ctx) + lambda L_ll
    update = method.state_update(spec, ctx)                      inside the compiled graph
then, after the backward and outside the graph, method.apply_update(spec, state, update) and
method.after_backward(run). Everything here is a pure function of tensors and constants (LossSpec), so the loss
stays inside torch.compile's graph.
"""
from typing import NamedTuple

import torch

from config import Choice, Param, StrictFloat, StrictInt
from models import local_mlp, mlp


def co_section():
    """The CO variants' keys (co.*): how the local term is made and mixed."""
    return ("co", "CO variants: the local term (co_byol, co_simclr, co_moco_v3, co_dino)", dict(
        w_s=Param(StrictFloat(0.0), "weight of the local term (0.2: the CPU demo; in100 configs: 0.5)", default=0.2),
        mixing=Param(Choice("convex", "additive"), "(1-w_s) L_g + w_s L_l, or L_g + w_s L_l", default="convex"),
        local_grid=Param(StrictInt(0), "adaptive-avg-pool the map to n x n before the local heads; 0 = native",
                         default=0),
        local_layer=Param(Choice("last", "previous"), "the local representations are the map of the backbone's "
                          "last stage, or of the stage before it (twice the side, half the channels of a ResNet); "
                          "the global branch always pools the last stage", default="last"),
        local_hidden=Param(StrictInt(1), "local head hidden width (1x1 convs)", default=256)))


def pack_views(views, fuse):
    """The views as the networks take them: per view (a tuple of V tensors), or fused (a 1-tuple holding one batch
    of V·B). Views that already lie back to back in one buffer (the GPU path cuts them so) are joined without a
    copy. Runs outside the compiled region (it looks at storage addresses)."""
    if not fuse or len(views) == 1:
        return tuple(views)
    first = views[0]
    B = first.shape[0]
    stride = first.stride()
    adjacent = all(v.shape == first.shape and v.stride() == stride and v.dtype == first.dtype and
                   v.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and
                   v.storage_offset() == first.storage_offset() + i * B * stride[0] for i, v in enumerate(views))
    if adjacent and stride[0] == first[0].numel():
        return (first.as_strided((len(views) * B, *first.shape[1:]), stride, first.storage_offset()),)
    return (torch.cat(views),)


def forward_views(net, packed, n_views, **kwargs):
    """net over the packed views (pack_views) -> one output per view. A fused batch is one forward whose outputs are
    split back: BatchNorm then normalises over all views' statistics together (docs/training.md, 'The step')."""
    if len(packed) == n_views:
        return [net(x, **kwargs) for x in packed]
    out = net(packed[0], **kwargs)
    if isinstance(out, dict):
        parts = {k: v.chunk(n_views) for k, v in out.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n_views)]
    return list(out.chunk(n_views))


class MethodError(ValueError):
    """A setting this method refuses; the trainer prints its message as one line."""


class HeadArgs(NamedTuple):
    """The sizes the heads are built from (method.* keys), and the channels they read."""
    in_dim: int          # backbone channels of the pooled vector
    local_in_dim: int    # channels of the map the local heads read (co.local_layer)
    proj_hidden: int
    proj_dim: int
    pred_hidden: int
    local_hidden: int
    dino_out_dim: int
    proj_out_bn: str     # auto / none / affine / fixed
    pred_out_bn: str
    dino_head_bn: bool = False  # dino.head_bn


class Method:
    name = None          # the registry name (method.name)
    family = None        # the base method's name; a CO variant shares it
    paper = ""           # for the methods table
    config = ""          # its config in configs/ (the methods table)
    global_term = ""
    local_term = ""      # CO variants: what every location of the map is matched with
    local = False        # CO variant: local heads on the global views and the local term
    ema_target = False   # an EMA copy of backbone + projector gives the other side
    predictor = False    # a predictor after the projector on the online side
    logo_base = False    # LoGo may wrap it (logo_local_global says how)
    own_head_form = False  # the projector has its paper's form: method.proj_out_bn is refused
    default_out_bn = "none"  # the projector's output BatchNorm when method.proj_out_bn=auto

    # -- heads (built in this order: projector, predictor, local projector, local predictor; the order fixes which
    #    draws of the seeded generator each layer's initial weights take)

    def out_bn(self, a):
        return self.default_out_bn if a.proj_out_bn == "auto" else a.proj_out_bn

    def pred_bn(self, a):
        return "none" if a.pred_out_bn == "auto" else a.pred_out_bn

    def projector(self, a):
        return mlp(a.in_dim, a.proj_hidden, a.proj_dim, self.out_bn(a))

    def predictor_head(self, a):
        return mlp(a.proj_dim, a.pred_hidden, a.proj_dim, self.pred_bn(a)) if self.predictor else None

    def local_projector(self, a):
        return local_mlp(a.local_in_dim, a.local_hidden, a.proj_dim, self.out_bn(a))

    def local_predictor(self, a):
        return local_mlp(a.proj_dim, a.local_hidden, a.proj_dim, self.pred_bn(a)) if self.predictor else None

    # -- state: the method's own tensors, part of the checkpoint (a tuple, in state_names order), or None

    state_names = ()

    def init_state(self, cfg, device):
        return None

    def set_epoch(self, run, epoch):
        """At the start of every epoch (DINO: the teacher temperature of that epoch)."""

    # -- the loss

    def other_side(self, spec, target, packed, outs):
        """What the online views are matched with (the EMA target's projections, keys, the teacher's logits, or
        the online projections gathered over ranks)."""
        raise NotImplementedError

    def global_loss(self, spec, crops, outs, locs, ctx, state):
        raise NotImplementedError

    def local_loss(self, spec, outs, ctx, state):
        raise NotImplementedError

    def logo_local_global(self, spec, outs, locs, ctx):
        """LoGo's L_lg on this base, or None when global_loss already holds it (MoCo v2, as LoGo's code)."""
        raise MethodError(f"logo.enabled=1 is not defined on {self.name}")

    def state_update(self, spec, ctx):
        """The state's update, computed in the graph (applied by apply_update after the backward), or None."""
        return None

    def apply_update(self, spec, state, update):
        """After the backward, outside any compiled graph (torch.compile read an input mutated inside its graph
        stale, torch 2.14.1 CPU): in place, no host sync."""

    def after_backward(self, run):
        """Between the backward and the optimiser step (DINO: the frozen prototypes' gradients dropped)."""

    # -- refusals

    def check(self, cfg, world):
        """Raises MethodError for a setting this method cannot run."""


def co_variant(base_cls, local_term, config):
    """The CO variant of a base method: the same class with local heads and the local term on."""
    return type(f"CO{base_cls.__name__}", (base_cls,), {"name": f"co_{base_cls.name}", "local": True,
                                                        "logo_base": False, "local_term": local_term,
                                                        "config": config, "paper": "CO-SSL, on " + base_cls.paper})
