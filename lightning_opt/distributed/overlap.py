"""Gradient sums over ranks that overlap with backward, as DDP's reducer does, without wrapping the module.

Why: the periodic strategies average gradients on some steps only (warm-up, Lookahead ``mode="sync"``). A flat
all-reduce after backward leaves the network idle during backward and the CPU idle during the all-reduce; DDP
hides most of it by reducing buckets while backward still runs. :class:`OverlappedGradSum` does the same with
per-parameter ``post_accumulate_grad`` hooks, and only while armed (inside the closure of a step that averages),
so local steps pay nothing. Measured so far only on 2 CPU processes over loopback, where it gained nothing (the
all-reduce needs the cores backward uses; ``benchmarks/RESULTS.md``); its case is a real network or NCCL.

Buckets are built over the parameters in reverse order (gradients become ready roughly from the last layer to
the first) and launched strictly in bucket order, so every rank issues the same collectives in the same order
whatever order its hooks fire in. The gradients themselves are not touched: each is *copied* into its bucket,
so the caller can still inspect the local values (non-finite checks) and reduce them again if needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt._tensors import accumulation_dtype
from lightning_opt.distributed.buckets import bucket_indices, nbytes
from lightning_opt.distributed.meter import CommMeter

#: DDP's choice: a small first bucket so the first all-reduce starts early in backward.
FIRST_BUCKET_MB = 1.0


class OverlappedGradSum:
    """Sum the gradients of ``params`` over the default process group while backward runs.

    Usage per averaged step: :meth:`arm` before the forward/backward, :meth:`finish` after it; ``finish``
    returns ``[(indices into params, summed flat buffer)]`` like
    :func:`~lightning_opt.distributed.buckets.all_reduce_flat`. Parameters without a gradient contribute zeros.
    Call :meth:`remove` to detach the hooks.
    """

    def __init__(self, params: Sequence[Tensor], cap_mb: float, meter: CommMeter | None = None) -> None:
        self.params = list(params)
        self.meter = meter
        order = list(reversed(range(len(self.params))))
        first = bucket_indices([self.params[i] for i in order], int(FIRST_BUCKET_MB * 2**20))[:1]
        taken = {order[j] for j in first[0]} if first else set()
        rest = [i for i in order if i not in taken]
        rest_buckets = bucket_indices([self.params[i] for i in rest], int(cap_mb * 2**20))
        self.buckets: list[list[int]] = [[order[j] for j in b] for b in first]
        self.buckets += [[rest[j] for j in b] for b in rest_buckets]
        self._slot: dict[int, tuple[int, int]] = {}
        for b, idx in enumerate(self.buckets):
            offset = 0
            for i in idx:
                self._slot[i] = (b, offset)
                offset += self.params[i].numel()
        self._flat: list[Tensor | None] = [None] * len(self.buckets)
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        self._armed = False
        self._ready: list[set[int]] = []
        self._launched = 0
        self._works: list[tuple[int, Any]] = []
        self.late = False  # a gradient changed after its bucket was launched (then finish() reduces again)

    def _buffer(self, b: int) -> Tensor:
        flat = self._flat[b]
        if flat is None:
            first = self.params[self.buckets[b][0]]
            n = sum(self.params[i].numel() for i in self.buckets[b])
            flat = self._flat[b] = torch.empty(n, dtype=accumulation_dtype(first.dtype), device=first.device)
        return flat

    def arm(self) -> None:
        self._armed = True
        self._ready = [set() for _ in self.buckets]
        self._launched = 0
        self._works = []
        self.late = False

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if not self._armed or p.grad is None:
                return
            b, offset = self._slot[i]
            if b < self._launched:
                self.late = True
                return
            self._buffer(b)[offset:offset + p.numel()].copy_(p.grad.detach().reshape(-1))
            self._ready[b].add(i)
            self._launch_complete()

        return hook

    def _launch_complete(self) -> None:
        while self._launched < len(self.buckets) and len(self._ready[self._launched]) == len(
                self.buckets[self._launched]):
            self._launch(self._launched)

    def _launch(self, b: int) -> None:
        self._works.append((b, dist.all_reduce(self._buffer(b), async_op=True)))
        self._launched += 1

    @torch.no_grad()
    def _fill(self, b: int) -> None:
        """Copy the gradients (zeros where missing) of a bucket whose hooks did not all fire."""
        flat, offset = self._buffer(b), 0
        for i in self.buckets[b]:
            p, n = self.params[i], self.params[i].numel()
            if i not in self._ready[b]:
                if p.grad is None:
                    flat[offset:offset + n].zero_()
                else:
                    flat[offset:offset + n].copy_(p.grad.detach().reshape(-1))
            offset += n

    def finish(self) -> list[tuple[list[int], Tensor]]:
        """Launch what backward left (unused parameters), wait for every bucket and return the sums."""
        self._armed = False
        for b in range(self._launched, len(self.buckets)):
            self._fill(b)
            self._launch(b)
        for b, work in self._works:
            work.wait()
            if self.meter is not None:
                self.meter.add(nbytes([self._flat[b]]))
        return [(idx, self._flat[b]) for b, idx in enumerate(self.buckets)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._armed = False
