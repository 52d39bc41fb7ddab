"""The CO-SSL networks around a backbone: global projector/predictor, local (1x1) heads, EMA target, LoGo's
affinity MLP. Plain arguments, no config: train_coss.py builds them.

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

BYOL_FAMILY = ("byol", "co_byol")
SIMCLR_FAMILY = ("simclr", "co_simclr")
MOCO_V3_FAMILY = ("moco_v3", "co_moco_v3")
DINO_FAMILY = ("dino", "co_dino")
MOCO_V2 = ("moco_v2",)
MOMENTUM_FAMILY = BYOL_FAMILY + MOCO_V3_FAMILY  # a momentum (EMA) target and a predictor on the online side
TARGET_FAMILY = MOMENTUM_FAMILY + DINO_FAMILY + MOCO_V2  # an EMA target (no predictor for DINO and MoCo v2)
METHODS = BYOL_FAMILY + SIMCLR_FAMILY + MOCO_V3_FAMILY + DINO_FAMILY + MOCO_V2


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
    """DINO's head (ResNet setting, no BatchNorm): Linear -> GELU -> Linear -> GELU -> Linear to the bottleneck,
    L2 normalisation, then the prototypes layer (NormedLinear, out_dim logits). local=True: the same as 1x1
    convolutions over a feature map ([B, C, h, w] -> [B, out_dim, h, w])."""

    def __init__(self, d_in, hidden, bottleneck, out_dim, local=False):
        super().__init__()

        def layer(a, b):
            m = nn.Conv2d(a, b, 1) if local else nn.Linear(a, b)
            nn.init.trunc_normal_(m.weight, std=0.02)  # DINO's initialisation of its head's MLP
            nn.init.zeros_(m.bias)
            return m
        self.mlp = nn.Sequential(layer(d_in, hidden), nn.GELU(), layer(hidden, hidden), nn.GELU(),
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
    def __init__(self, backbone, method, proj_hidden, proj_dim, pred_hidden, local_hidden, local_grid=0,
                 local_layer="last", dino_out_dim=4096, proj_out_bn="auto", pred_out_bn="auto"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
        if local_layer not in ("last", "previous"):
            raise ValueError(f"local_layer must be 'last' or 'previous', got {local_layer!r}")
        self.method, self.local_grid = method, local_grid
        # where the local representations come from: the last stage's map, or the stage before it (the paper's
        # appendix studies intermediate layers); the global branch always pools the last stage
        self.map_stage = backbone.num_stages - 1 if local_layer == "previous" else None
        self.backbone = backbone
        C = backbone.num_features
        moco = method in MOCO_V3_FAMILY  # MoCo v3's projector ends in a BatchNorm without affine parameters
        dino = method in DINO_FAMILY     # DINO: the head ends in out_dim prototypes (z: logits)
        if proj_out_bn != "auto" and (dino or method in MOCO_V2):
            raise ValueError(f"proj_out_bn={proj_out_bn!r}: {method}'s head has its own form; leave it 'auto'")
        out_bn = ("fixed" if moco else "none") if proj_out_bn == "auto" else proj_out_bn
        self.projector = DINOHead(C, proj_hidden, proj_dim, dino_out_dim) if dino else \
            moco_v2_head(C, proj_hidden, proj_dim) if method in MOCO_V2 else mlp(C, proj_hidden, proj_dim, out_bn)
        pred_bn = "none" if pred_out_bn == "auto" else pred_out_bn  # MoCo v3's ResNet predictor: no output BN
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim, pred_bn) if method in MOMENTUM_FAMILY else None
        self.has_local = method.startswith("co_")
        if self.has_local:
            C_local = backbone.stage_channels(self.map_stage) if self.map_stage else C
            self.local_projector = DINOHead(C_local, local_hidden, proj_dim, dino_out_dim, local=True) if dino \
                else local_mlp(C_local, local_hidden, proj_dim, out_bn)
            self.local_predictor = local_mlp(proj_dim, local_hidden, proj_dim, pred_bn) \
                if method in MOMENTUM_FAMILY else None

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
