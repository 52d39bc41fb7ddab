"""SimSiam (Chen & He, CVPR 2021): one network on both views, a predictor, and a stop-gradient instead of an EMA
target: L = D(p1, sg z2)/2 + D(p2, sg z1)/2 with D the negative cosine. Heads as its public code builds them
(facebookresearch/simsiam, simsiam/builder.py): a 3-layer projector, every Linear followed by BatchNorm, the last
one without affine parameters; a 2-layer bottleneck predictor without an output BatchNorm.

LoGo on SimSiam (LoGo's second base; its paper's lambda is 1e-4): L_lg = the local crops' predictions against
both global crops' projections, each pair D(p_local, sg z_global), as on BYOL."""
import torch.nn as nn

from losses import simsiam_distance, simsiam_loss
from methods.base import Method


class SimSiam(Method):
    name = family = "simsiam"
    paper = "SimSiam (Chen & He, CVPR 2021)"
    global_term = "-cos(prediction, stop-gradient projection of the other view), no EMA"
    config = "fmnist_simsiam.yaml"
    predictor = logo_base = True
    default_out_bn = "fixed"

    def projector(self, a):
        out_bn = self.out_bn(a)
        layers = [nn.Linear(a.in_dim, a.proj_hidden, bias=False), nn.BatchNorm1d(a.proj_hidden), nn.ReLU(inplace=True),
                  nn.Linear(a.proj_hidden, a.proj_hidden, bias=False), nn.BatchNorm1d(a.proj_hidden),
                  nn.ReLU(inplace=True), nn.Linear(a.proj_hidden, a.proj_dim, bias=out_bn == "none")]
        if out_bn != "none":
            layers.append(nn.BatchNorm1d(a.proj_dim, affine=out_bn == "affine"))
        return nn.Sequential(*layers)

    def other_side(self, spec, target, packed, outs):
        return [o["z"].detach() for o in outs]  # the stop-gradient: SimSiam's whole trick

    def global_loss(self, spec, crops, outs, locs, projections, state):
        return simsiam_loss([o["p"] for o in crops], projections)

    def logo_local_global(self, spec, outs, locs, projections):
        return sum(simsiam_distance(l["p"], z) for l in locs for z in projections)


METHODS = (SimSiam(),)
