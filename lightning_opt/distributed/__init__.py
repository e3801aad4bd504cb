"""Collectives on flat buckets with byte accounting, the non-finite consensus, small scalar collectives.
Never imports Lightning."""

from lightning_opt.distributed.buckets import (
    DEFAULT_BUCKET_CAP_MB,
    all_finite,
    all_reduce_flat,
    broadcast_flat,
    bucket_indices,
    flatten,
    is_dist,
    nbytes,
    unflatten_into,
    write_back,
)
from lightning_opt.distributed.consensus import Agreement, NonFiniteError, agree
from lightning_opt.distributed.meter import CommMeter
from lightning_opt.distributed.scalars import all_gather_vector, rank, world_size

__all__ = [
    "DEFAULT_BUCKET_CAP_MB",
    "Agreement",
    "CommMeter",
    "NonFiniteError",
    "agree",
    "all_finite",
    "all_gather_vector",
    "all_reduce_flat",
    "broadcast_flat",
    "bucket_indices",
    "flatten",
    "is_dist",
    "nbytes",
    "rank",
    "unflatten_into",
    "world_size",
    "write_back",
]
