"""Gathering rows across torchrun processes with gradients: what the losses of SimCLR, MoCo v3 and DINO need to see
every rank's batch. One process (or no process group) is the identity. Imports nothing of ours."""
import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """all_gather with a backward (torch.distributed.nn.functional.all_gather does this too, but warns that it is
    deprecated): forward concatenates every rank's rows; backward sums the gradient of the whole gathered tensor over
    ranks and hands each rank the rows of its own input."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """All ranks' rows of x, concatenated in rank order, with gradient flowing back to each rank's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


def gather_views(xs):
    """Every rank's rows of each view in xs (gather_with_grad), and this rank's first row in them."""
    gathered = [gather_with_grad(x) for x in xs]
    offset = dist.get_rank() * xs[0].shape[0] if gathered[0].shape[0] != xs[0].shape[0] else 0
    return gathered, offset
