"""Collectives on flat buckets with byte accounting, and small scalar collectives. Never imports Lightning."""

from lightning_opt.distributed.buckets import (
    DEFAULT_BUCKET_CAP_MB,
    CommMeter,
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
from lightning_opt.distributed.scalars import all_gather_vector, mean_max, nonfinite_ranks, rank, world_size

__all__ = [
    "DEFAULT_BUCKET_CAP_MB",
    "CommMeter",
    "all_finite",
    "all_gather_vector",
    "all_reduce_flat",
    "broadcast_flat",
    "bucket_indices",
    "flatten",
    "is_dist",
    "mean_max",
    "nbytes",
    "nonfinite_ranks",
    "rank",
    "unflatten_into",
    "world_size",
    "write_back",
]
