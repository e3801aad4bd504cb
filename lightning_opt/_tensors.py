"""Tensor helpers shared by every pure-torch layer (optim, stats, distributed): one spelling each."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._utils import _unflatten_dense_tensors

__all__ = ["LOW_PRECISION", "accumulation_copy", "accumulation_dtype", "flatten", "unflatten_into"]

#: dtypes whose sums and running statistics are accumulated in float32
LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate ``dtype`` values in: float32 for half precision (whose 8- or 11-bit mantissa loses
    small increments), else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def accumulation_copy(t: Tensor) -> Tensor:
    """A detached copy of ``t`` in its :func:`accumulation_dtype` (anchors, centres: state summed into over time)."""
    return t.detach().to(accumulation_dtype(t.dtype)).clone()


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """One detached 1-D vector from ``tensors`` (optionally cast to ``dtype``)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return flat if dtype is None else flat.to(dtype)


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (casting to each tensor's dtype): one multi-tensor
    copy, as the per-tensor loop cost a few microseconds of Python per tensor (felt at hundreds of tensors)."""
    if not tensors:
        return
    dst = list(tensors)
    with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
        # the views shaped like each tensor come from one C++ call (torch's own bucketing helper, as DDP uses)
        torch._foreach_copy_(dst, list(_unflatten_dense_tensors(flat.detach(), dst)))
