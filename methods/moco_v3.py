"""MoCo v3 (Chen, Xie, He 2021; the ResNet recipe) and CO-MoCo v3: ctr(q, k) = 2T CE(q k^T / T) of the online
predictions against the momentum encoder's keys of the batch (all ranks); CO-MoCo v3 makes every location's local
prediction a query against the other view's keys."""
from distributed import gather_views
from losses import multicrop_local_key_info_nce, multicrop_moco_v3
from methods.base import Method, co_variant, forward_views


class MoCoV3(Method):
    name = family = "moco_v3"
    paper = "MoCo v3 (Chen et al., ICCV 2021)"
    global_term = "2T CE(online predictions against the momentum keys of the batch, all ranks)"
    config = "in100_moco_v3.yaml"
    ema_target = predictor = True
    default_out_bn = "fixed"  # the projector ends in a BatchNorm without affine parameters (MoCo v3's code)

    def other_side(self, spec, target, packed, outs):
        keys = forward_views(target, packed, spec.n_global)
        keys_all, offset = gather_views(keys)
        return keys, keys_all, offset

    def global_loss(self, spec, crops, outs, locs, ctx, state):
        keys, keys_all, offset = ctx
        return multicrop_moco_v3([o["p"] for o in crops], keys, spec.temperature, keys_all, offset)

    def local_loss(self, spec, outs, ctx, state):
        keys, keys_all, offset = ctx
        return multicrop_local_key_info_nce([o["P"] for o in outs], keys, spec.temperature, keys_all, offset,
                                            backend=spec.kernels)


METHODS = (MoCoV3(), co_variant(MoCoV3, "2T CE: every location's query against the other view's N keys",
                                   "in100_co_moco_v3.yaml")())
