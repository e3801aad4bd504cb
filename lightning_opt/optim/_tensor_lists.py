"""Tensor-list plumbing of the optimizers' functional cores (pure torch): the (device, dtype) buckets a
multi-tensor kernel runs on, the parameters in state precision, and the global 2-norm of a gradient."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_opt._tensors import accumulation_dtype

__all__ = ["as_state_precision", "by_device_and_dtype", "scratch_or_new", "state_precision", "total_norm"]


def by_device_and_dtype(*tensor_lists: Sequence[Tensor] | None) -> Iterator[tuple[list[Tensor], ...]]:
    """The parallel ``tensor_lists`` cut into buckets of equal (device, dtype) of the first list: one
    ``torch._foreach_*`` kernel call runs on one bucket (``torch.optim`` groups its foreach paths the same way).
    A ``None`` list (absent state, e.g. momentum buffers without momentum) yields ``None`` for every bucket."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensor_lists[0] or ()):
        buckets[(t.device, t.dtype)].append(i)
    for idx in buckets.values():
        yield tuple(None if ts is None else [ts[i] for i in idx] for ts in tensor_lists)  # type: ignore[misc]


def as_state_precision(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters in state precision (``accumulation_dtype``): the tensors themselves, or float32 copies of
    half-precision ones."""
    return [p if accumulation_dtype(p.dtype) == p.dtype else p.detach().to(accumulation_dtype(p.dtype))
            for p in params]


def scratch_or_new(scratch: list[Tensor] | None, like: Sequence[Tensor]) -> list[Tensor]:
    """The caller's reusable work buffers (one per tensor of ``like``), or fresh ones when it keeps none."""
    return scratch if scratch is not None else [torch.empty_like(t) for t in like]


@contextmanager
def state_precision(params: Sequence[Tensor], *, foreach: bool) -> Iterator[list[Tensor]]:
    """The parameters to update in place, in state precision; float32 working copies of half-precision ones are
    rounded into the parameters once on exit, so a step rounds once rather than after every operation."""
    work = as_state_precision(params)
    yield work
    pairs = [(p, w) for p, w in zip(params, work, strict=True) if p is not w]
    if pairs and foreach:
        torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])
    else:
        for p, w in pairs:
            p.copy_(w)


def total_norm(tensor_lists: Iterable[tuple[Sequence[Tensor], bool]]) -> Tensor | None:
    """Global 2-norm of all tensors in ``(tensors, foreach)`` pairs, a 0-d tensor on the first tensor's device;
    ``None`` when there is no tensor. Computed in at least float32 (float64 when any tensor is float64)."""
    norms: list[Tensor] = []
    for tensors, foreach in tensor_lists:
        if not tensors:
            continue
        if foreach:
            for (bucket,) in by_device_and_dtype(tensors):
                norms.extend(torch._foreach_norm(bucket))
        else:
            norms.extend(torch.linalg.vector_norm(t) for t in tensors)
    if not norms:
        return None
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]))
