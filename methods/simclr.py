"""SimCLR (Chen et al. 2020) and CO-SimCLR: NT-Xent over every rank's views; CO-SimCLR makes every location of a
view's map an anchor against all global embeddings (positive: the other view's of the same image). LoGo on SimCLR:
L_lg = InfoNCE of each local crop against each global crop (in-batch negatives)."""
from distributed import gather_views
from losses import cross_view_info_nce, multicrop_local_info_nce, multicrop_nt_xent
from methods.base import Method, co_variant


class SimCLR(Method):
    name = family = "simclr"
    paper = "SimCLR (Chen et al., ICML 2020)"
    global_term = "NT-Xent over the 2N views (all ranks), temperature T"
    config = "in100_simclr.yaml"
    logo_base = True

    def other_side(self, spec, target, packed, outs):
        return gather_views([o["z"] for o in outs])  # (every rank's global embeddings, this rank's first row)

    def global_loss(self, spec, crops, outs, locs, ctx, state):
        gathered, offset = ctx
        return multicrop_nt_xent([o["z"] for o in crops], spec.n_global, spec.temperature, gathered, offset)

    def local_loss(self, spec, outs, ctx, state):
        gathered, offset = ctx
        return multicrop_local_info_nce([o["P"] for o in outs], [o["z"] for o in outs], spec.temperature, gathered,
                                        offset, backend=spec.kernels)

    def logo_local_global(self, spec, outs, locs, ctx):
        return sum(cross_view_info_nce(l["z"], g["z"], spec.temperature) for l in locs for g in outs)


METHODS = (SimCLR(), co_variant(SimCLR, "InfoNCE: every location against the 2N global embeddings",
                                   "in100_co_simclr.yaml")())
