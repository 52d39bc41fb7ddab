"""CO-SSL losses as pure functions of tensors (no config, no state). Definitions: docs/METHOD_NOTES.md §1-3, README.

Notation: B images on this rank, N on all ranks, L locations per view, D embedding dim.
  d(a, b) = 2 - 2 cos(a, b)                                  (BYOL's normalised regression)
  BYOL        L_g = mean_b d(p1, sg z2) + mean_b d(p2, sg z1)   p = online prediction, z = target projection
  CO-BYOL     L_l = mean_{b,l} d(P1[b,l], sg z2[b]) + mean_{b,l} d(P2[b,l], sg z1[b])
  SimCLR      NT-Xent over the 2N views, positive = the other view of the same image, temperature T
  CO-SimCLR   every location of view a is an anchor against the 2N global embeddings; positive = the other view's
              global embedding of the same image; the same view's global embedding of the same image is masked
              out; all other images (both views) are negatives
  mixing      'convex': (1 - w_s) L_g + w_s L_l (our default);  'additive': L_g + w_s L_l
  LoGo        L_gg + L_lg + lambda * L_ll, with L_ll the affinity f_d(z^l_1, z^l_2) that the encoder minimises,
              and f_d trained in an alternating step to score same-image local pairs above rolled pairs
Targets are always detached inside the functions (sg = stop-gradient), so callers cannot forget it.
Under DDP, pass the all-gathered embeddings (gathered *with* gradient) as `*_all` and this rank's row offset.
"""
import torch
import torch.nn.functional as F

from kernels.local_info_nce import all_or_local, check_local, local_info_nce


def _check(name, t, ndim, dim=None):
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
    if dim is not None and t.shape[-1] != dim:
        raise ValueError(f"{name} has embedding dim {t.shape[-1]}, expected {dim}")


def cosine_distance(p, z):
    """d(p, z) = 2 - 2 cos(p, z) along the last dim, z detached. Shapes broadcast ([B, L, D] against [B, 1, D])."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1, eps=1e-8)


def byol_loss(p1, p2, z1, z2):
    """Global BYOL term. p*: online predictions [B, D] of views 1/2; z*: target projections [B, D]."""
    _check("p1", p1, 2)
    for name, t in (("p2", p2), ("z1", z1), ("z2", z2)):
        _check(name, t, 2, p1.shape[-1])
    if not (p1.shape == p2.shape == z1.shape == z2.shape):
        raise ValueError(f"byol_loss shapes differ: {[tuple(t.shape) for t in (p1, p2, z1, z2)]}")
    return cosine_distance(p1, z2).mean() + cosine_distance(p2, z1).mean()


def local_global_regression(P1, P2, z1, z2, backend="auto"):
    """CO-BYOL local term. P*: local predictions [B, L, D] of views 1/2; z*: global target projections [B, D].
    backend: kernels/local_global_cosine.py's switch (auto: the fused Triton op on CUDA, the reference elsewhere)."""
    from kernels.local_global_cosine import local_global_cosine
    check_local("local_global_regression", P1, P2, z1, z2)
    return local_global_cosine(P1, z2, backend=backend) + local_global_cosine(P2, z1, backend=backend)


def mix(global_loss, local_loss, w_s, form="convex"):
    """Combine the global and local terms with weight w_s."""
    if form == "convex":
        if not 0.0 <= w_s <= 1.0:
            raise ValueError(f"convex mixing needs 0 <= w_s <= 1, got {w_s}")
        return (1 - w_s) * global_loss + w_s * local_loss
    if form == "additive":
        return global_loss + w_s * local_loss
    raise ValueError(f"unknown mixing form {form!r} (convex or additive)")


def nt_xent(z1, z2, temperature, z1_all=None, z2_all=None, offset=0):
    """SimCLR's NT-Xent. z*: this rank's embeddings [B, D]; z*_all: every rank's [N, D] (gathered with gradient),
    this rank's rows starting at `offset`. Mean over this rank's 2B anchors."""
    _check("z1", z1, 2)
    _check("z2", z2, 2, z1.shape[-1])
    if z1.shape != z2.shape:
        raise ValueError(f"nt_xent: z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} differ")
    c1, c2, offset = all_or_local(z1, z2, z1_all, z2_all, offset)
    B, N = z1.shape[0], c1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)                     # [2B, D]
    candidates = F.normalize(torch.cat([c1, c2]), dim=1)                  # [2N, D]
    logits = anchors @ candidates.T / temperature                          # [2B, 2N]
    own = torch.arange(B, device=z1.device) + offset                       # this rank's images in the global batch
    self_idx = torch.cat([own, own + N])
    pos_idx = torch.cat([own + N, own])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * N).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def local_global_info_nce(P1, P2, z1, z2, temperature, z1_all=None, z2_all=None, offset=0, backend="auto"):
    """CO-SimCLR local term. P*: local embeddings [B, L, D] of views 1/2 (anchors); z*: this rank's global
    embeddings [B, D]; z*_all: all ranks' [N, D]. Mean over the 2·B·L anchors. The reference and the fused op
    both live in kernels/local_info_nce.py; backend: its switch (auto: Triton on CUDA, the reference elsewhere)."""
    return local_info_nce(P1, P2, z1, z2, temperature, z1_all, z2_all, offset, backend=backend)


def cross_view_info_nce(anchors, targets, temperature):
    """InfoNCE of anchors [B, D] against detached targets [B, D]: anchor b's positive is targets[b], the other
    rows are negatives (LoGo's L_lg on the SimCLR base)."""
    _check("anchors", anchors, 2)
    _check("targets", targets, 2, anchors.shape[-1])
    if anchors.shape != targets.shape:
        raise ValueError(f"cross_view_info_nce: {tuple(anchors.shape)} vs {tuple(targets.shape)}")
    logits = F.normalize(anchors, dim=1) @ F.normalize(targets.detach(), dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=anchors.device))


def logo_affinity_losses(affinity, zl1, zl2):
    """LoGo's L_ll. affinity: a module [B, 2D] -> [B, 1]; zl*: local-crop embeddings [B, D] (online, with grad).
    Returns (encoder_term, affinity_loss):
      encoder_term  = mean f_d(zl1, zl2), which the encoder minimises (f_d's parameters get no gradient from it);
      affinity_loss = softplus(-f_d(same-image pairs)) + softplus(f_d(pairs rolled by one image)), on detached
                      embeddings, which the alternating step minimises over f_d's parameters."""
    _check("zl1", zl1, 2)
    _check("zl2", zl2, 2, zl1.shape[-1])
    if zl1.shape != zl2.shape or zl1.shape[0] < 2:
        raise ValueError(f"logo_affinity_losses needs two equal [B>=2, D] batches, got {tuple(zl1.shape)}, "
                         f"{tuple(zl2.shape)}")
    params = list(affinity.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        encoder_term = affinity(torch.cat([zl1, zl2], dim=1)).mean()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    a, b = zl1.detach(), zl2.detach()
    positive = affinity(torch.cat([a, b], dim=1))
    negative = affinity(torch.cat([a, b.roll(1, dims=0)], dim=1))
    affinity_loss = F.softplus(-positive).mean() + F.softplus(negative).mean()
    return encoder_term, affinity_loss


@torch.no_grad()
def ema_update(target, online, tau):
    """target <- tau * target + (1 - tau) * online, for every parameter. Buffers (BN running statistics) are left
    to the target's own forward passes, as in BYOL."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"EMA tau must be in [0, 1], got {tau}")
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params) or any(a.shape != b.shape for a, b in zip(t_params, o_params)):
        raise ValueError("EMA target and online networks have different parameters")
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, o_params, alpha=1 - tau)
