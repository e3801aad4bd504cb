"""Small collectives for scalars and short vectors (the monitors' cross-rank statistics)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt.distributed.buckets import is_dist


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def rank(group: Any = None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def all_gather_vector(x: Tensor, group: Any = None) -> Tensor:
    """Gather a same-shaped tensor from every rank of ``group``: returns ``[world, *x.shape]``."""
    if not is_dist():
        return x.unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)
