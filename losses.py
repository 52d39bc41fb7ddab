"""CO-SSL losses as pure functions of tensors (no config; the only state, DINO's centre and MoCo v2's queue, is
passed in and updated in place by dino_center_update and enqueue). Definitions: docs/METHOD_NOTES.md §1-3, docs/training.md.

Notation: B images on this rank, N on all ranks, L locations per view, D embedding dim.
  d(a, b) = 2 - 2 cos(a, b)                                  (BYOL's normalised regression)
  BYOL        L_g = mean_b d(p1, sg z2) + mean_b d(p2, sg z1)   p = online prediction, z = target projection
  CO-BYOL     L_l = mean_{b,l} d(P1[b,l], sg z2[b]) + mean_{b,l} d(P2[b,l], sg z1[b])
  SimCLR      NT-Xent over the 2N views, positive = the other view of the same image, temperature T
  CO-SimCLR   every location of view a is an anchor against the 2N global embeddings; positive = the other view's
              global embedding of the same image; the same view's global embedding of the same image is masked
              out; all other images (both views) are negatives
  MoCo v3     ctr(q, k) = 2T · CE(<q, k_j>/T over the N momentum keys k_j of the batch, all ranks; positive: the
              same image's key), q, k unit;  L_g = ctr(q1, sg k2) + ctr(q2, sg k1)
              (q = online predictor(projector), k = momentum projector; the public ResNet recipe)
  CO-MoCo v3  L_l = ctr_l(Q1, sg k2) + ctr_l(Q2, sg k1): ctr with every location of Q [B, L, D] (local 1x1 heads) as
              a query against the other view's N global momentum keys, mean over the B·L queries
  DINO        H(t, s) = -sum_k softmax((t - c)/T_t)_k log softmax(s/T_s)_k, t = teacher (EMA) logits, s = student
              logits over K prototypes, c the teacher centre; L_g = 1/|P| sum_{(v,g) in P} mean_b H(sg t_g, s_v)
              (DINO's average over its pairs; with 2 views (H(t1, s2) + H(t2, s1)) / 2);
              after each step c <- m c + (1 - m) mean of the teacher's global logits over all ranks and views
  CO-DINO     L_l = 1/|P_G| sum_{(v,g) in P_G} mean_{b,l} H(sg t_g[b], S_v[b,l]): every location's student
              distribution (local heads) against the teacher's centred, sharpened global one of the other view
  SimSiam     D(p, z) = -cos(p, sg z), p = predictor(projector(y)), z = projector(y), the same network on both
              views (no EMA); L_g = D(p1, z2)/2 + D(p2, z1)/2 (multi-crop: the mean over P). LoGo on it:
              L_lg = sum over the 2 local x 2 global crops of D(p_local, z_global)
  MoCo v2     nce(q, k) = CE([<q, k>, <q, n_1>, ..., <q, n_K>] / T, label 0), unit vectors, k = the same image's
              momentum key (sg), n_j the queue of earlier steps' keys (all ranks); symmetrised:
              L_g = (nce(q1, k2) + nce(q2, k1)) / 2 (multi-crop: the mean over P); then both views' keys enter the
              queue (the oldest leave). LoGo on it (its public code): L_gg and L_lg in one mean over the 2 + 4
              pairs of its 2 global and 2 local crops, i.e. the multi-crop rule, plus its L_ll
  mixing      'convex': (1 - w_s) L_g + w_s L_l (our default);  'additive': L_g + w_s L_l
  LoGo        L_gg + L_lg + lambda * L_ll, with L_ll the affinity f_d(z^l_1, z^l_2) that the encoder minimises,
              and f_d trained in an alternating step to score same-image local pairs above rolled pairs
Multi-crop (G global views at augment.res, then L local views; V = G + L; targets come from global views only):
  pairs       P = {(v, g) : v < V, g < G, g != v}: every view against every global view but itself,
              |P| = G(G-1) + L·G;  P_G = the pairs with v < G (global views only), |P_G| = G(G-1)
  BYOL        L_g = 2/|P| sum_{(v,g) in P} mean_b d(p_v, sg z_g)        (the factor 2 keeps BYOL's symmetric sum:
              with G = 2, L = 0 this is the BYOL line above, exactly)
  CO-BYOL     L_g as BYOL;  L_l = 2/|P_G| sum_{(v,g) in P_G} mean_{b,l} d(P_v[b,l], sg z_g[b])
  SimCLR      candidates: the G·N global embeddings; the term of pair (v, g) at image b is
              -log softmax(<z_v[b], c> / T over candidates c, without z_v[b] itself when v < G)[z_g[b]];
              L_g = mean over P and b (G = 2, L = 0: NT-Xent above)
  MoCo v3     L_g = 2/|P| sum_{(v,g) in P} ctr(q_v, sg k_g);  CO-MoCo v3: L_l = 2/|P_G| sum_{P_G} ctr_l(Q_v, sg k_g)
              (G = 2, L = 0: the MoCo v3 lines above, exactly)
  CO-SimCLR   L_l = the SimCLR rule with every location of a global view's map as the anchor:
              mean over P_G, b and l of -log softmax(<P_v[b,l], c> / T, without z_v[b])[z_g[b]]
  Local views enter the global terms only: a small crop's feature map has few locations whose receptive fields each
  cover the whole crop (docs/training.md, 'Multi-crop'). LoGo keeps its own rule (L_gg on the two global views, its L_lg, L_ll;
  on MoCo v2 its public code's mean over the 6 pairs, which is the multi-crop rule).
Targets are always detached inside the functions (sg = stop-gradient), so callers cannot forget it.
Under DDP, pass the all-gathered embeddings (gathered *with* gradient) as `*_all` and this rank's row offset.
"""
import torch
import torch.nn.functional as F

from kernels.local_info_nce import all_or_local, check_local, local_info_nce, local_key_info_nce


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


def crop_pairs(n_global, n_views):
    """The multi-crop pairs (v, g): view v is predicted against global view g (g != v), in (v, g) order."""
    if n_global < 2 or n_views < n_global:
        raise ValueError(f"multi-crop needs at least 2 global views and no fewer views than that, got {n_global} "
                         f"global of {n_views}")
    return [(v, g) for v in range(n_views) for g in range(n_global) if g != v]


def _check_views(name, views, ndim):
    for i, t in enumerate(views):
        _check(f"{name}[{i}]", t, ndim, views[0].shape[-1])
        if t.shape[0] != views[0].shape[0]:
            raise ValueError(f"{name}: view {i} has {t.shape[0]} images, view 0 has {views[0].shape[0]}")


def multicrop_byol(preds, targets):
    """BYOL with multi-crop. preds: the V views' online predictions [B, D] (global views first); targets: the G
    global views' target projections [B, D]. 2/|P| sum over the pairs (losses.py's table); byol_loss when V = G = 2."""
    pairs = crop_pairs(len(targets), len(preds))
    _check_views("preds", list(preds) + list(targets), 2)
    return (2 / len(pairs)) * sum(cosine_distance(preds[v], targets[g]).mean() for v, g in pairs)


def simsiam_distance(p, z):
    """SimSiam's D(p, z) = -cos(p, sg z), mean over the batch ([B, D] each)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(preds, projections):
    """SimSiam (Chen & He 2021, Algorithm 1) with multi-crop. preds: the V views' predictions [B, D] (global views
    first); projections: the G global views' projections [B, D], gradient stopped here. D(p, z) = -cos(p, sg z);
    1/|P| sum over the pairs, i.e. D(p1, z2)/2 + D(p2, z1)/2 when V = G = 2."""
    pairs = crop_pairs(len(projections), len(preds))
    _check_views("preds", list(preds) + list(projections), 2)
    return sum(simsiam_distance(preds[v], projections[g]) for v, g in pairs) / len(pairs)


def multicrop_local_regression(P, targets, backend="auto"):
    """CO-BYOL's local term with G >= 2 global views. P: their local predictions [B, L, D]; targets: their target
    projections [B, D]. 2/|P_G| sum over the global pairs; local_global_regression when G = 2."""
    from kernels.local_global_cosine import local_global_cosine
    if len(P) != len(targets):
        raise ValueError(f"{len(P)} local maps for {len(targets)} global views")
    pairs = crop_pairs(len(targets), len(P))
    for v, g in pairs:
        check_local("multicrop_local_regression", P[v], P[g], targets[v], targets[g])
    return (2 / len(pairs)) * sum(local_global_cosine(P[v], targets[g], backend=backend) for v, g in pairs)


def _candidates(zs, n_global, gathered, offset):
    """The G·N global embeddings as candidates (normalised), N and this rank's offset."""
    if gathered is None:
        gathered, offset = zs[:n_global], 0
    if len(gathered) != n_global:
        raise ValueError(f"gathered holds {len(gathered)} views, expected the {n_global} global ones")
    _check_views("gathered", gathered, 2)
    N = gathered[0].shape[0]
    if gathered[0].shape[-1] != zs[0].shape[-1] or not 0 <= offset <= N - zs[0].shape[0]:
        raise ValueError(f"gathered [{N}, {gathered[0].shape[-1]}] does not hold this rank's {zs[0].shape[0]} rows "
                         f"at offset {offset}")
    return F.normalize(torch.cat(list(gathered)), dim=1), N, offset


def _pair_log_softmax_mean(anchors, candidates, temperature, v, n_global, pairs_of_v, own, N):
    """Mean over the anchors [B, L, D] of view v and the positives g in pairs_of_v of -log softmax(<a, c> / T)[g, b],
    view v's own global embedding masked when v is a global view. Returns the sum over the pairs of those means."""
    B = anchors.shape[0]
    logits = F.normalize(anchors, dim=-1) @ candidates.T / temperature     # [B, L, G·N]
    if v < n_global:
        logits = logits.masked_fill(F.one_hot(own + v * N, n_global * N).bool()[:, None, :], float("-inf"))
    logp = logits.log_softmax(-1)
    total = 0.0
    for g in pairs_of_v:
        total = total - logp.gather(-1, (own + g * N).view(B, 1, 1).expand(B, logp.shape[1], 1)).mean()
    return total


def multicrop_nt_xent(zs, n_global, temperature, gathered=None, offset=0):
    """SimCLR with multi-crop. zs: the V views' embeddings [B, D] on this rank (global views first); gathered: the
    G global views' embeddings of every rank [N, D] (gathered with gradient) or None; offset: this rank's first
    row in them. Mean over the pairs and images (losses.py's table); nt_xent itself when V = G = 2."""
    pairs = crop_pairs(n_global, len(zs))
    _check_views("zs", zs, 2)
    if len(zs) == n_global == 2:
        c = gathered if gathered is not None else (None, None)
        return nt_xent(zs[0], zs[1], temperature, c[0], c[1], offset)
    candidates, N, offset = _candidates(zs, n_global, gathered, offset)
    own = torch.arange(zs[0].shape[0], device=zs[0].device) + offset
    total = sum(_pair_log_softmax_mean(z[:, None], candidates, temperature, v, n_global,
                                       [g for w, g in pairs if w == v], own, N) for v, z in enumerate(zs))
    return total / len(pairs)


def multicrop_local_info_nce(P, zs, temperature, gathered=None, offset=0, backend="auto"):
    """CO-SimCLR's local term with G >= 2 global views. P: their local embeddings [B, L, D]; zs: their global
    embeddings [B, D]; gathered / offset as multicrop_nt_xent. Mean over the global pairs, images and locations;
    local_global_info_nce (the fused kernel) when G = 2."""
    if len(P) != len(zs):
        raise ValueError(f"{len(P)} local maps for {len(zs)} global views")
    pairs = crop_pairs(len(zs), len(P))
    if len(zs) == 2:
        c = gathered if gathered is not None else (None, None)
        return local_global_info_nce(P[0], P[1], zs[0], zs[1], temperature, c[0], c[1], offset, backend)
    for v, g in pairs:
        check_local("multicrop_local_info_nce", P[v], P[g], zs[v], zs[g])
    candidates, N, offset = _candidates(zs, len(zs), gathered, offset)
    own = torch.arange(zs[0].shape[0], device=zs[0].device) + offset
    total = sum(_pair_log_softmax_mean(P[v], candidates, temperature, v, len(zs), [g for w, g in pairs if w == v],
                                       own, N) for v in range(len(P)))
    return total / len(pairs)


def _keys_of(keys, keys_all, offset):
    """Every rank's keys of each global view (or this rank's) and this rank's offset in them."""
    if keys_all is None:
        return list(keys), 0
    if len(keys_all) != len(keys):
        raise ValueError(f"keys_all holds {len(keys_all)} views, expected {len(keys)}")
    return list(keys_all), offset


def moco_ctr(q, keys, temperature, offset=0):
    """MoCo v3's contrastive term: 2T x cross_view_info_nce of the queries q [B, D] against the momentum keys
    [N, D] of every rank (this rank's rows start at offset)."""
    return cross_view_info_nce(q, keys, temperature, offset) * (2 * temperature)


def multicrop_moco_v3(queries, keys, temperature, keys_all=None, offset=0):
    """MoCo v3 with multi-crop. queries: the V views' online predictions [B, D] (global views first); keys: the G
    global views' momentum keys [B, D]; keys_all: every rank's [N, D] of each (or None); 2/|P| sum over the pairs of
    ctr(q_v, sg k_g) (losses.py's table); with V = G = 2 MoCo v3's ctr(q1, k2) + ctr(q2, k1)."""
    pairs = crop_pairs(len(keys), len(queries))
    _check_views("queries", list(queries) + list(keys), 2)
    every, offset = _keys_of(keys, keys_all, offset)
    return (2 / len(pairs)) * sum(moco_ctr(queries[v], every[g], temperature, offset) for v, g in pairs)


def multicrop_local_key_info_nce(Q, keys, temperature, keys_all=None, offset=0, backend="auto"):
    """CO-MoCo v3's local term with G >= 2 global views. Q: their local queries [B, L, D]; keys: their momentum keys
    [B, D] (keys_all / offset as multicrop_moco_v3); 2/|P_G| sum over the global pairs of 2T x the mean over the
    B·L queries of the InfoNCE against the other view's keys (the fused kernel of kernels/local_info_nce.py)."""
    if len(Q) != len(keys):
        raise ValueError(f"{len(Q)} local maps for {len(keys)} global views")
    pairs = crop_pairs(len(keys), len(Q))
    every, offset = _keys_of(keys, keys_all, offset)
    return (2 / len(pairs)) * sum(
        local_key_info_nce(Q[v], keys[g], temperature, every[g], offset, backend=backend) * (2 * temperature)
        for v, g in pairs)


def dino_teacher_temp(epoch, warmup_temp, temp, warmup_epochs):
    """DINO's teacher temperature at `epoch`: a linear ramp over the warm-up epochs (numpy's linspace from warmup_temp
    to temp, both ends included), then temp."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp if warmup_epochs == 1 else warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def _dino_targets(teacher, center, teacher_temp):
    return [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]


def dino_loss(student, teacher, center, student_temp, teacher_temp):
    """DINO with multi-crop. student: the V views' student logits [B, K] (global views first); teacher: the G
    global views' teacher logits [B, K] (detached here); center [1, K]. Mean over the pairs of losses.py's table of
    the cross-entropy H(softmax((t_g - c)/T_t), log_softmax(s_v/T_s)), mean over images."""
    pairs = crop_pairs(len(teacher), len(student))
    _check_views("student", list(student) + list(teacher), 2)
    targets = _dino_targets(teacher, center, teacher_temp)
    logp = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    return sum(-(targets[g] * logp[v]).sum(-1).mean() for v, g in pairs) / len(pairs)


def dino_local_loss(student_local, teacher, center, student_temp, teacher_temp):
    """CO-DINO's local term. student_local: the G global views' per-location student logits [B, L, K]; teacher:
    their teacher logits [B, K]. Mean over the global pairs, images and locations of H(sg t_g[b], S_v[b, l])."""
    if len(student_local) != len(teacher):
        raise ValueError(f"{len(student_local)} local maps for {len(teacher)} global views")
    pairs = crop_pairs(len(teacher), len(student_local))
    for v, g in pairs:
        check_local("dino_local_loss", student_local[v], student_local[g], teacher[v], teacher[g])
    targets = _dino_targets(teacher, center, teacher_temp)
    logp = [F.log_softmax(S / student_temp, dim=-1) for S in student_local]
    return sum(-(targets[g][:, None, :] * logp[v]).sum(-1).mean() for v, g in pairs) / len(pairs)


@torch.no_grad()
def dino_center_update(center, teacher_mean, momentum):
    """c <- m c + (1 - m) teacher_mean, in place; teacher_mean [1, K]: the mean of the teacher's global logits over
    every view and image of the step (all ranks)."""
    center.mul_(momentum).add_(teacher_mean.detach(), alpha=1 - momentum)


def moco_info_nce(q, k, queue, temperature):
    """MoCo's InfoNCE. q: queries [B, D]; k: their positive keys [B, D] (detached); queue: negative keys [K, D];
    the logits [B, 1 + K] are [<q, k>, <q, queue>] / T of unit vectors, the label 0; mean over the B queries."""
    _check("q", q, 2)
    _check("k", k, 2, q.shape[-1])
    _check("queue", queue, 2, q.shape[-1])
    q = F.normalize(q, dim=1)
    k, queue = F.normalize(k.detach(), dim=1), F.normalize(queue.detach().to(q.dtype), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def multicrop_moco_v2(queries, keys, queue, temperature):
    """MoCo v2, symmetrised, with multi-crop: the mean over the pairs (v, g) of losses.py's table of
    moco_info_nce(q_v, k_g, queue); with two views (nce(q1, k2) + nce(q2, k1)) / 2."""
    pairs = crop_pairs(len(keys), len(queries))
    _check_views("queries", list(queries) + list(keys), 2)
    return sum(moco_info_nce(queries[v], keys[g], queue, temperature) for v, g in pairs) / len(pairs)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """MoCo's queue, in place and without a host sync: the unit keys [n, D] overwrite rows ptr, ptr + 1, ... (mod K,
    the oldest keys), and ptr [] moves on by n."""
    K, n = queue.shape[0], keys.shape[0]
    rows = (ptr + torch.arange(n, device=queue.device)) % K
    queue.index_copy_(0, rows, F.normalize(keys.detach(), dim=1).to(queue.dtype))
    ptr.copy_((ptr + n) % K)


def cross_view_info_nce(anchors, targets, temperature, offset=None):
    """InfoNCE of unit anchors [B, D] against detached unit targets: anchor b's positive is targets[b], the other
    rows are negatives (LoGo's L_lg on the SimCLR base; targets [B, D]). With offset: targets [N, D] of every rank,
    this rank's rows from offset, the positive of anchor b targets[offset + b] (MoCo v3's keys, moco_ctr)."""
    _check("anchors", anchors, 2)
    _check("targets", targets, 2, anchors.shape[-1])
    if offset is None:
        if anchors.shape != targets.shape:
            raise ValueError(f"cross_view_info_nce: {tuple(anchors.shape)} vs {tuple(targets.shape)}")
        offset = 0
    elif not 0 <= offset <= targets.shape[0] - anchors.shape[0]:
        raise ValueError(f"targets [{targets.shape[0]}] do not hold this rank's {anchors.shape[0]} rows at offset "
                         f"{offset}")
    logits = F.normalize(anchors, dim=1) @ F.normalize(targets.detach(), dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=anchors.device) + offset)


def logo_affinity_losses(affinity, zl1, zl2, noise=None):
    """LoGo's L_ll as its public code computes it. affinity: f_d, a module [n, 2D] -> [n, 1]; zl*: the two local
    crops' embeddings [B, D] (online, with grad), L2-normalised here before f_d sees them; noise: (n1, n2) [B, D]
    added to the positives' embeddings for f_d's training (the code: Gaussian, std 0.3 / sqrt(D)), or None.
    Returns (encoder_term, affinity_loss):
      encoder_term  = mean softplus(f_d(u1, u2)), which the encoder minimises (f_d's parameters get no gradient);
      affinity_loss = softplus(-f_d(positives)) + softplus(f_d(negatives)), means, on detached embeddings, over both
                      orderings of each pair: positives (u1 + n1, u2 + n2) and (u2 + n2, u1 + n1), negatives each
                      crop against the other crop of the flipped batch, (u1, flip(u2)) and (u2, flip(u1)); the
                      alternating step minimises it over f_d's parameters."""
    _check("zl1", zl1, 2)
    _check("zl2", zl2, 2, zl1.shape[-1])
    if zl1.shape != zl2.shape or zl1.shape[0] < 2:
        raise ValueError(f"logo_affinity_losses needs two equal [B>=2, D] batches, got {tuple(zl1.shape)}, "
                         f"{tuple(zl2.shape)}")
    u1, u2 = F.normalize(zl1, dim=1), F.normalize(zl2, dim=1)
    # f_d with its parameters detached (a functional call, not requires_grad_ toggles: those split the compiled
    # graph): the encoder's gradient flows through f_d's input only
    frozen = {name: p.detach() for name, p in affinity.named_parameters()}
    encoder_term = F.softplus(torch.func.functional_call(affinity, frozen, (torch.cat([u1, u2], dim=1),))).mean()
    a, b = u1.detach(), u2.detach()
    na, nb = (noise[0].to(a.dtype), noise[1].to(a.dtype)) if noise is not None else (0.0, 0.0)
    positive = affinity(torch.cat([torch.cat([a + na, b + nb], dim=1), torch.cat([b + nb, a + na], dim=1)]))
    negative = affinity(torch.cat([torch.cat([a, b.flip(0)], dim=1), torch.cat([b, a.flip(0)], dim=1)]))
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
