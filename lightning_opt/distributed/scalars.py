"""Small collectives for scalars and short vectors (monitors, leader scores, non-finite flags)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt.distributed.buckets import is_dist


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def all_gather_vector(x: Tensor, group=None) -> Tensor:
    """Gather a same-shaped tensor from every rank of ``group``: returns ``[world, *x.shape]``."""
    if not is_dist():
        return x.unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def mean_max(x: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """Mean and max of a scalar over ranks with one all-gather (monitors log both)."""
    gathered = all_gather_vector(x.detach().float().reshape(1), group).reshape(-1)
    return gathered.mean(), gathered.max()


def nonfinite_ranks(local_bad: bool | Tensor, device: torch.device, group=None) -> list[int]:
    """Every rank learns which ranks (indices within ``group``) flagged non-finite values: one tiny all-reduce."""
    n = world_size(group)
    flags = torch.zeros(n, device=device)
    flags[rank(group)] = float(bool(local_bad))
    if is_dist():
        dist.all_reduce(flags, group=group)
    return [int(i) for i in torch.nonzero(flags).flatten().tolist()]
