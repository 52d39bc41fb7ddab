"""The CO-SSL networks around a backbone: global projector/predictor, local (1x1) heads, EMA target, LoGo's
affinity MLP. Plain arguments, no config: methods/ builds them.

Shapes (B images, C backbone channels, h x w map, L = h*w or n*n locations, D = proj_dim):
  backbone(x)            -> F [B, C, h, w], y [B, C]
  global: z = g(y) [B, D], p = q(z) [B, D]                       (q only for the BYOL and MoCo v3 families)
  DINO:   z = the head's logits over dino_out_dim prototypes (D = dino_out_dim), P likewise per location
  local:  P = q2(g2(F)) as [B, L, D] (1x1 convs, so one MLP shared by every location; q2 as q)
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F



def moco_v2_head(dim_in, hidden, dim_out):
    """MoCo v2's head: Linear -> ReLU -> Linear (no BatchNorm)."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))


class NormedLinear(nn.Module):
    """DINO's last layer with norm_last_layer: a weight-normalised linear map whose norms are fixed to 1, i.e. x @
    normalise(W, rows).T; over the channels of a [B, C, h, w] map when `local` (a 1x1 convolution)."""

    def __init__(self, d_in, d_out, local=False):
        super().__init__()
        self.local = local
        self.weight = nn.Parameter(nn.Linear(d_in, d_out, bias=False).weight.detach().clone())

    def forward(self, x):
        w = F.normalize(self.weight, dim=1)
        if self.local:
            return F.conv2d(x, w[:, :, None, None])
        return F.linear(x, w)


class DINOHead(nn.Module):
    """DINO's head: Linear -> GELU -> Linear -> GELU -> Linear to the bottleneck, L2 normalisation, then the
    prototypes layer (NormedLinear, out_dim logits). bn: a BatchNorm after each hidden Linear (DINO's
    use_bn_in_head; its ResNet setting has none, the small-image benchmarks of lightly put one there). local=True:
    the same as 1x1 convolutions over a feature map ([B, C, h, w] -> [B, out_dim, h, w])."""

    def __init__(self, d_in, hidden, bottleneck, out_dim, local=False, bn=False):
        super().__init__()

        def layer(a, b):
            m = nn.Conv2d(a, b, 1) if local else nn.Linear(a, b)
            nn.init.trunc_normal_(m.weight, std=0.02)  # DINO's initialisation of its head's MLP
            nn.init.zeros_(m.bias)
            return m
        def norm():
            return [(nn.BatchNorm2d if local else nn.BatchNorm1d)(hidden)] if bn else []
        self.mlp = nn.Sequential(layer(d_in, hidden), *norm(), nn.GELU(), layer(hidden, hidden), *norm(), nn.GELU(),
                                 layer(hidden, bottleneck))
        self.prototypes = NormedLinear(bottleneck, out_dim, local=local)

    def forward(self, x):
        return self.prototypes(F.normalize(self.mlp(x), dim=1))


OUT_BN = ("none", "affine", "fixed")  # a head's output BatchNorm: none, with scale and shift, without


def mlp(dim_in, hidden, dim_out, last_bn=False):
    """BYOL's head: Linear -> BN -> ReLU -> Linear. last_bn (MoCo v3's heads): the last Linear without bias and a
    BatchNorm on the output, without affine parameters (True or "fixed") or with them ("affine": SimCLR v2's
    head, lightly's SimCLRProjectionHead)."""
    out_bn = _out_bn(last_bn)
    layers = [nn.Linear(dim_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
              nn.Linear(hidden, dim_out, bias=out_bn == "none")]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(dim_out, affine=out_bn == "affine")] if out_bn != "none" else []))


def local_mlp(dim_in, hidden, dim_out, last_bn=False):
    """The same head as 1x1 convolutions: applied at every location of a feature map."""
    out_bn = _out_bn(last_bn)
    layers = [nn.Conv2d(dim_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
              nn.Conv2d(hidden, dim_out, 1, bias=out_bn == "none")]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(dim_out, affine=out_bn == "affine")] if out_bn != "none" else []))


def _out_bn(last_bn):
    out_bn = {False: "none", True: "fixed"}.get(last_bn, last_bn)
    if out_bn not in OUT_BN:
        raise ValueError(f"a head's output BatchNorm is one of {', '.join(OUT_BN)}, got {last_bn!r}")
    return out_bn


class SSLNet(nn.Module):
    """A backbone and the heads a method declares (methods.build_net builds it): projector, predictor (or None),
    and for a CO variant the local projector and predictor, 1x1 convolutions over the feature map."""

    def __init__(self, backbone, method, projector, predictor=None, local_projector=None, local_predictor=None,
                 local_grid=0, map_stage=None):
        super().__init__()
        self.method, self.local_grid = method, local_grid
        # where the local representations come from: the last stage's map, or the stage before it (the paper's
        # appendix studies intermediate layers); the global branch always pools the last stage
        self.map_stage = map_stage
        self.backbone = backbone
        self.projector, self.predictor = projector, predictor
        self.has_local = local_projector is not None
        if self.has_local:
            self.local_projector, self.local_predictor = local_projector, local_predictor

    def forward(self, x, local=True):
        """Returns dict: y (pooled features), z (projection), p (prediction, BYOL family), P (local, [B, L, D])."""
        fmap, y = self.backbone(x, self.map_stage) if self.map_stage and self.has_local and local else \
            self.backbone(x)
        z = self.projector(y)
        out = {"y": y, "z": z, "p": self.predictor(z) if self.predictor is not None else z}
        if self.has_local and local:
            if self.local_grid:
                fmap = F.adaptive_avg_pool2d(fmap, self.local_grid)
            P = self.local_projector(fmap)
            if self.local_predictor is not None:
                P = self.local_predictor(P)
            out["P"] = P.flatten(2).transpose(1, 2)  # [B, L, D]; a view, no copy for channels-last maps
        return out


class TargetNet(nn.Module):
    """BYOL's target / MoCo v3's momentum encoder: an EMA copy of the online backbone and projector (no predictor,
    no local heads)."""

    def __init__(self, online):
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x):
        return self.projector(self.backbone(x)[1])

    def online_part(self, online):
        """The online modules this target tracks, in the same parameter order."""
        return nn.ModuleList([online.backbone, online.projector])

    def tracked(self):
        return nn.ModuleList([self.backbone, self.projector])


def affinity_mlp(dim, hidden=256):
    """LoGo's f_d: [B, 2D] -> [B, 1] (256 -> 256 -> 1 with BN + ReLU, as the public LoGo code)."""
    return nn.Sequential(nn.Linear(2 * dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, 1))
