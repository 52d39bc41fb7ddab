"""BYOL (Grill et al. 2020) and CO-BYOL: the online prediction regresses the EMA target's projection of the other
view, d(p, z) = 2 - 2 cos(p, z); CO-BYOL adds every location's local prediction against the other view's target
projection. LoGo on BYOL: L_lg = the local crops' predictions against both global targets."""
from losses import cosine_distance, multicrop_byol, multicrop_local_regression
from methods.base import Method, co_variant, forward_views


class BYOL(Method):
    name = family = "byol"
    paper = "BYOL (Grill et al., NeurIPS 2020)"
    global_term = "2 - 2cos(online prediction, EMA target projection of the other view)"
    config = "in100_byol.yaml"
    ema_target = predictor = logo_base = True

    def other_side(self, spec, target, packed, outs):
        return forward_views(target, packed, spec.n_global)

    def global_loss(self, spec, crops, outs, locs, targets, state):
        return multicrop_byol([o["p"] for o in crops], targets)

    def local_loss(self, spec, outs, targets, state):
        return multicrop_local_regression([o["P"] for o in outs], targets, spec.kernels)

    def logo_local_global(self, spec, outs, locs, targets):
        return sum(cosine_distance(l["p"], t).mean() for l in locs for t in targets)


METHODS = (BYOL(), co_variant(BYOL, "2 - 2cos(every location's local prediction, the other view's target)",
                                 "in100.yaml")())
