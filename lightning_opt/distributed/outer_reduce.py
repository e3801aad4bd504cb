"""One fragment's outer gradient averaged while training goes on, optionally in low precision (Streaming DiLoCo,
Douillard et al. 2025, §2.2–2.4). Never imports Lightning.

:class:`InFlight` launches the collective (``async_op=True``) and :meth:`InFlight.wait` returns what arrived:

* ``comm_dtype="float32"``: one all-reduce of ``[outer gradient | one flag per rank]``;
* ``"bfloat16"``, ``"float16"``, ``"int8"``: each rank encodes its outer gradient once, and one all-gather moves the
  encoded bytes (plus the per-block scales and the flag); every rank then decodes every rank's payload and sums them
  in float32, in rank order, so every rank holds the same bits (a low-precision all-reduce would sum in the wire
  type, in an order that depends on the algorithm). ``int8`` and ``float16`` scale each block of
  :data:`QUANT_BLOCK` values by its largest magnitude (int8: round to nearest of 127 levels; float16: no overflow and
  no subnormals); ``bfloat16`` has float32's range and needs no scale.

``comm/bytes`` counts what this rank puts on the wire: its encoded payload (4, 2 or 1 byte per value, plus 4 bytes
per block scale and 4 per flag). With two ranks an all-gather moves as much as an all-reduce of the same payload;
with W ranks each rank receives W − 1 payloads, so low precision saves less as W grows.

A rank whose outer gradient is not finite contributes zeros and raises its flag; the caller applies its non-finite
policy to :attr:`Arrived.bad` (see :mod:`lightning_opt.distributed.consensus`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt.distributed.buckets import all_finite, is_dist
from lightning_opt.distributed.meter import CommMeter

COMM_DTYPES = ("float32", "bfloat16", "float16", "int8")
#: values sharing one scale in the scaled encodings (a 0.1 % overhead for int8)
QUANT_BLOCK = 4096
_WIRE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
_LEVELS = {"int8": 127.0, "float16": 1.0}  # a block's largest magnitude maps to this


def encode(flat: Tensor, comm_dtype: str) -> tuple[Tensor, Tensor]:
    """``(payload, scales)``: ``flat`` (float32) in ``comm_dtype``, with one float32 scale per block (empty for
    float32 and bfloat16)."""
    if comm_dtype in ("float32", "bfloat16"):
        return flat.to(_WIRE.get(comm_dtype, torch.float32)), flat.new_zeros(0)
    blocks = _blocks(flat)
    scales = blocks.abs().amax(dim=1) / _LEVELS[comm_dtype]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = blocks / scales[:, None]
    if comm_dtype == "int8":
        scaled = scaled.round().clamp_(-127, 127)
    return scaled.reshape(-1)[:flat.numel()].to(_WIRE[comm_dtype]), scales


def decode(payload: Tensor, scales: Tensor, comm_dtype: str) -> Tensor:
    """The float32 values that ``(payload, scales)`` from :func:`encode` stand for."""
    values = payload.to(torch.float32)
    if scales.numel() == 0:
        return values
    return (_blocks(values) * scales[:, None]).reshape(-1)[:values.numel()]


def _blocks(flat: Tensor) -> Tensor:
    pad = (-flat.numel()) % QUANT_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QUANT_BLOCK)


@dataclass
class Arrived:
    """An averaged outer gradient (identical on every rank, except ``local_bad``)."""

    #: the sum over the healthy ranks, float32, flat
    total: Tensor
    #: ranks whose outer gradient was not finite (they contributed zeros)
    bad: list[int]
    local_bad: bool
    world: int

    def mean(self) -> Tensor:
        return self.total / (self.world - len(self.bad))


class InFlight:
    """The collective for one outer gradient, launched at construction; :meth:`wait` returns :class:`Arrived`."""

    def __init__(self, flat: Tensor, comm_dtype: str, meter: CommMeter | None = None) -> None:
        self.comm_dtype = comm_dtype
        self.world, me = (dist.get_world_size(), dist.get_rank()) if is_dist() else (1, 0)
        self.local_bad = not all_finite([flat])
        if self.local_bad:
            flat = torch.zeros_like(flat)
        self.numel = flat.numel()
        flags = flat.new_zeros(self.world)
        flags[me] = float(self.local_bad)
        self._work = None
        if comm_dtype == "float32":
            self._buf = torch.cat([flat, flags])
            if is_dist():
                self._work = dist.all_reduce(self._buf, async_op=True)
        else:
            payload, scales = encode(flat, comm_dtype)
            self._nscales = scales.numel()
            # the float32 metadata first, so that every part starts aligned for its dtype
            self._buf = torch.cat([torch.cat([scales, flags]).view(torch.uint8), payload.view(torch.uint8)])
            self._parts = [torch.empty_like(self._buf) for _ in range(self.world)] if is_dist() else [self._buf]
            if is_dist():
                self._work = dist.all_gather(self._parts, self._buf, async_op=True)
        if meter is not None:
            meter.add(self._buf.numel() * self._buf.element_size())
        self._arrived: Arrived | None = None
        #: seconds this rank blocked in :meth:`wait` for the collective to finish
        self.waited = 0.0

    def wait(self) -> Arrived:
        if self._arrived is None:
            start = time.perf_counter()
            if self._work is not None:
                self._work.wait()
            self.waited = time.perf_counter() - start
            total, flags = self._sum()
            bad = [int(r) for r in torch.nonzero(flags).flatten().tolist()]
            self._arrived = Arrived(total, bad, self.local_bad, self.world)
            self._buf = self._parts = None  # type: ignore[assignment]
        return self._arrived

    def _sum(self) -> tuple[Tensor, Tensor]:
        if self.comm_dtype == "float32":
            return self._buf[:self.numel], self._buf[self.numel:]
        wire = _WIRE[self.comm_dtype]
        cut = 4 * (self._nscales + self.world)
        total = torch.zeros(self.numel, dtype=torch.float32, device=self._buf.device)
        flags = torch.zeros(self.world, dtype=torch.float32, device=self._buf.device)
        for part in self._parts:  # rank order: the same sum on every rank
            meta = part[:cut].view(torch.float32)
            total += decode(part[cut:].view(wire), meta[:self._nscales], self.comm_dtype)
            flags += meta[self._nscales:]
        return total, flags
