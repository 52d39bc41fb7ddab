"""LoGo (Zhang et al., CVPR 2022) as a wrapper around the bases it supports (each base's logo_local_global says
its L_lg): 2 global + 2 local crops, L_gg + L_lg + lambda L_ll, with the affinity MLP f_d (models.affinity_mlp)
trained in an alternating step (losses.logo_affinity_losses). Its keys: logo.*."""
from config import Param, StrictBool, StrictFloat, StrictInt


def section():
    return ("logo", "LoGo on a base method (logo.enabled; the bases: python train_coss.py --methods)", dict(
        enabled=Param(StrictBool(), "LoGo: 2 global + 2 local crops, L_gg + L_lg + lambda L_ll", default=False),
        **{"lambda": Param(StrictFloat(0.0), "weight of L_ll", default=1e-4)},
        local_res=Param(StrictInt(8), "side of the local crops, px", default=16),
        global_cmin=Param(StrictFloat(0.01, 1.0), "global crop scale (r_g, 1)", default=0.4),
        local_cmax=Param(StrictFloat(0.01, 1.0), "local crop scale (0.05, r_l)", default=0.4),
        affinity_lr=Param(StrictFloat(0.0), "Adam lr of the affinity MLP", default=1e-3),
        clip=Param(StrictFloat(0.0), "instead of lambda, clip L_ll's gradient norm to this x the main loss's (the "
                   "public MoCo code: 0.015); 0 = off", default=0.0)))
