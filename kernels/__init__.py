"""Triton kernels, one op per file: <op>.py holds <op>_ref (plain PyTorch), the kernels, the launcher, an
autograd.Function and the public <op>. Public functions take backend="auto" (Triton on CUDA tensors, the reference
elsewhere), "triton" (forced: on CPU it needs TRITON_INTERPRET=1 set before the kernels are imported) or "ref"."""

BACKENDS = ("auto", "triton", "ref")


def use_triton(backend, *tensors):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return all(t.is_cuda for t in tensors)
    return backend == "triton"


POISON = False  # tests set this: every output buffer starts as NaN, so an element a kernel forgets to write fails


def empty(*shape, **kwargs):
    """torch.empty for kernel outputs (NaN-filled when POISON is set)."""
    import torch
    out = torch.empty(*shape, **kwargs)
    return out.fill_(float("nan")) if POISON else out
