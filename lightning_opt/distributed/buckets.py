"""Flat-bucket collectives: pack many tensors into a few contiguous buffers, one collective per bucket.

Why: one all-reduce of a 25 MB buffer costs far less latency than hundreds of per-parameter calls, and the byte
count of each call is known exactly, which is what the strategies report as ``comm/bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt._tensors import accumulation_dtype, flatten, unflatten_into
from lightning_opt.distributed.meter import CommMeter

__all__ = ["DEFAULT_BUCKET_CAP_MB", "CommMeter", "all_finite", "all_reduce_flat", "broadcast_flat", "bucket_indices",
           "ddp_bucket_indices", "all_reduce_counted", "flatten", "is_dist", "nbytes", "rides_with", "unflatten_into",
           "write_back"]

DEFAULT_BUCKET_CAP_MB = 25.0


def is_dist() -> bool:
    """True when a default process group exists and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def bucket_indices(tensors: Sequence[Tensor], cap_bytes: int) -> list[list[int]]:
    """Group tensor indices into buckets of one dtype and device, each at most ``cap_bytes`` (a single larger
    tensor gets a bucket of its own). Order is preserved within a (dtype, device) key, so every rank builds the
    same buckets from the same tensor list."""
    open_buckets: dict[tuple, list[int]] = {}
    sizes: dict[tuple, int] = {}
    done: list[list[int]] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key in open_buckets and sizes[key] + nbytes > cap_bytes:
            done.append(open_buckets.pop(key))
        bucket = open_buckets.setdefault(key, [])
        sizes[key] = (sizes.get(key, 0) if bucket else 0) + nbytes
        bucket.append(i)
    done.extend(open_buckets.values())
    return done


def ddp_bucket_indices(tensors: Sequence[Tensor], first_limit: int, limit: int) -> list[list[int]]:
    """Group tensor indices into gradient buckets by DDP's rule (its reducer's ``compute_bucket_assignment_by_size``):
    per dtype and device, tensors join the open bucket in order and it closes as soon as it holds at least its limit
    in bytes: ``first_limit`` for the first bucket of that key, ``limit`` for the later ones. A bucket is thus never
    below its limit except a key's last, and the tensor that crosses the limit travels in the early bucket: with the
    small first limit, the first all-reduce carries as much as it may and still leaves early in backward (closing
    *before* that tensor, as :func:`bucket_indices` does, can send a few kilobytes early and leave the rest for the
    end of backward). Buckets are ordered by their first index."""
    open_buckets: dict[tuple, list[int]] = {}
    sizes: dict[tuple, int] = {}
    started: set[tuple] = set()  # keys whose first bucket has closed
    done: list[list[int]] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        open_buckets.setdefault(key, []).append(i)
        sizes[key] = sizes.get(key, 0) + t.numel() * t.element_size()
        if sizes[key] >= (limit if key in started else first_limit):
            done.append(open_buckets.pop(key))
            sizes[key] = 0
            started.add(key)
    done.extend(open_buckets.values())
    return sorted(done)  # disjoint lists of increasing indices: ordered by their first


def all_reduce_flat(
    tensors: Sequence[Tensor],
    *,
    meter: CommMeter | None = None,
    group=None,
    cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    trailer: Tensor | None = None,
) -> list[tuple[list[int], Tensor]]:
    """Sum ``tensors`` over the group in flat buckets and return ``[(indices, reduced_flat)]`` without writing
    back, so the caller can inspect the result (e.g. for non-finite values) before committing it. Half-precision
    buckets are summed in fp32 (a sum over many ranks overflows fp16 and loses bf16 precision). On a single
    process the sum is the tensors themselves (no collective).

    ``trailer``: a small vector (flags, counts) summed over the group *in place*; it rides at the end of the last
    bucket when that bucket's dtype holds it exactly (see :func:`rides_with`), so it costs no collective of its
    own."""
    out = []
    buckets = bucket_indices(tensors, int(cap_mb * 2**20))
    for b, idx in enumerate(buckets):
        dtype = accumulation_dtype(tensors[idx[0]].dtype)
        parts = [tensors[i] for i in idx]
        ride = trailer is not None and b == len(buckets) - 1 and rides_with(trailer, dtype, parts[0].device)
        flat = flatten([*parts, trailer] if ride else parts, dtype=dtype)
        if is_dist():
            all_reduce_counted(flat, meter=meter, group=group)
        if ride:
            n = flat.numel() - trailer.numel()
            trailer.copy_(flat[n:])
            flat = flat[:n]
            trailer = None
        out.append((idx, flat))
    if trailer is not None and is_dist():
        all_reduce_counted(trailer, meter=meter, group=group)
    return out


def all_reduce_counted(tensor: Tensor, *, meter: CommMeter | None = None, group=None) -> None:
    """Sum ``tensor`` over the group in place (synchronously) and count its bytes on ``meter``."""
    dist.all_reduce(tensor, group=group)
    _count(meter, tensor)


def rides_with(trailer: Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``trailer`` can travel inside a bucket of ``dtype`` on ``device`` without losing a bit: a
    floating-point bucket at least as wide as the trailer."""
    return (dtype.is_floating_point and trailer.device == device
            and torch.promote_types(dtype, trailer.dtype) == dtype)


def write_back(buckets: list[tuple[list[int], Tensor]], tensors: Sequence[Tensor], scale: float, *,
               views: Sequence[Tensor] | None = None) -> None:
    """Write reduced buckets back into ``tensors``, multiplied by ``scale`` (e.g. 1/world for a mean). ``views``:
    each tensor's place in the buckets, shaped like it, when the caller keeps them (one copy, no views built)."""
    with torch.no_grad():  # not a decorator: mutmut skips decorated functions
        for idx, flat in buckets:
            if scale != 1.0:
                flat.mul_(scale)
            if views is None:
                unflatten_into(flat, [tensors[i] for i in idx])
        if views is not None and tensors:
            torch._foreach_copy_(list(tensors), list(views))


def broadcast_flat(
    tensors: Sequence[Tensor], src: int, *, meter: CommMeter | None = None, group=None,
    cap_mb: float = DEFAULT_BUCKET_CAP_MB,
) -> None:
    """Broadcast ``tensors`` from global rank ``src`` in flat buckets, in place."""
    for idx in bucket_indices(tensors, int(cap_mb * 2**20)):
        chunk = [tensors[i] for i in idx]
        flat = flatten(chunk)
        dist.broadcast(flat, src=src, group=group)
        _count(meter, flat)
        unflatten_into(flat, chunk)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite (one host sync per device). Fast path: a finite 2-norm
    implies finite elements (a NaN or an infinity makes it non-finite), and a norm reads the tensor without writing
    a same-sized mask as ``isfinite`` does; only a non-finite norm (possibly a mere overflow) is checked element by
    element."""
    floats: dict[torch.device, list[Tensor]] = {}
    for t in tensors:  # integers and booleans are always finite
        if t.is_floating_point() or t.is_complex():
            floats.setdefault(t.device, []).append(t)
    with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
        for group in floats.values():
            # one multi-tensor kernel call per device, not one reduction per tensor (Python per tensor is what
            # models of hundreds of tensors pay); a norm is finite iff every element is, barring overflow
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(group))).all()) and not bool(
                    torch.stack([torch.isfinite(t).all() for t in group]).all()):
                return False
    return True


def nbytes(tensors: Sequence[Tensor]) -> int:
    """Payload size of ``tensors`` in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _count(meter: CommMeter | None, buf: Tensor) -> None:
    if meter is not None:
        meter.add(nbytes([buf]))
