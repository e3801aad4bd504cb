"""Gradient sums over ranks that overlap with backward, as DDP's reducer does, without wrapping the module.

Why: the periodic strategies average gradients on some steps only (warm-up, Lookahead ``mode="sync"``). A flat
all-reduce after backward leaves the network idle during backward and the CPU idle during the all-reduce; DDP
hides most of it by reducing buckets while backward still runs. :class:`OverlappedGradSum` does the same with
per-parameter ``post_accumulate_grad`` hooks, and only while armed (inside the closure of a step that averages):
on local steps a hook returns at once (about 0.02 ms a step for 320 tensors, measured). The overlap itself is
measured so far only on 2 CPU processes over loopback, where it gained nothing (the all-reduce needs the cores
backward uses; ``benchmarks/RESULTS.md``); its case is a real network or NCCL.

Buckets are built over the parameters in reverse order (gradients become ready roughly from the last layer to
the first) and launched strictly in bucket order, so every rank issues the same collectives in the same order
whatever order its hooks fire in. The last bucket (the first layers, ready only as backward ends) is launched by
:meth:`finish`, so a trailer of flags decided after backward (non-finite gradients, late changes) rides in it and
the step needs no collective beyond the buckets, as in DDP. The gradients themselves are not touched: each is
*copied* into its bucket, so the caller can still inspect the local values and reduce them again if needed.
Whether they are finite is judged on the buckets (:meth:`local_finite`: one norm per bucket, taken before it
leaves), not tensor by tensor: a per-tensor check is a kernel call per tensor, which models of hundreds of tensors
pay in Python time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt._tensors import accumulation_dtype
from lightning_opt.distributed.buckets import all_finite, all_reduce_counted, ddp_bucket_indices, nbytes, rides_with
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
        cuts = ddp_bucket_indices([self.params[i] for i in order], int(FIRST_BUCKET_MB * 2**20), int(cap_mb * 2**20))
        self.buckets: list[list[int]] = [[order[j] for j in b] for b in cuts]
        self._slot: dict[int, tuple[int, int]] = {}
        for b, idx in enumerate(self.buckets):
            offset = 0
            for i in idx:
                self._slot[i] = (b, offset)
                offset += self.params[i].numel()
        self._sizes = [sum(self.params[i].numel() for i in idx) for idx in self.buckets]
        self._flat: list[Tensor | None] = [None] * len(self.buckets)
        self._norms: list[Tensor | None] = [None] * len(self.buckets)  # each bucket's local norm, before it left
        self._views: dict[int, Tensor] = {}
        self._bucket_views: dict[int, list[Tensor]] = {}  # bucket -> its gradients' views, in bucket order
        self._spare = 0  # room for a trailer at the end of the last bucket's buffer
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
        self._armed = False
        self._ready: list[set[int]] = []
        self._launched = 0
        self._works: list[tuple[Any, Tensor]] = []
        self.late = False  # a gradient changed after its bucket was launched (then finish() reduces again)

    def _buffer(self, b: int) -> Tensor:
        flat = self._flat[b]
        if flat is None:
            first = self.params[self.buckets[b][0]]
            n = self._sizes[b] + (self._spare if b == len(self.buckets) - 1 else 0)
            flat = self._flat[b] = torch.empty(n, dtype=accumulation_dtype(first.dtype), device=first.device)
            for i in self.buckets[b]:  # each gradient's place in the buffer, shaped like it (built once)
                offset, p = self._slot[i][1], self.params[i]
                self._views[i] = flat[offset:offset + p.numel()].view(p.shape)
            self._bucket_views[b] = [self._views[i] for i in self.buckets[b]]
        return flat

    def _make_room(self, spare: int) -> None:
        """Grow the last bucket's buffer to hold a trailer of ``spare`` elements (once; its gradients are kept)."""
        if spare <= self._spare:
            return
        self._spare = spare
        last, old = len(self.buckets) - 1, self._flat[-1]
        self._flat[last] = None
        if old is not None:
            self._buffer(last)[:old.numel()].copy_(old)

    def arm(self) -> None:
        self._armed = True
        self._ready = [set() for _ in self.buckets]
        self._norms = [None] * len(self.buckets)
        self._launched = 0
        self._works = []
        self.late = False

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        b = self._slot[i][0]
        size = len(self.buckets[b])

        # Runs once per parameter and backward, in Python (DDP's reducer is C++): only bookkeeping; the gradients
        # are copied a bucket at a time (one multi-tensor copy, not a copy call per tensor).
        def hook(p: Tensor) -> None:
            if not self._armed:
                return
            if self._norms[b] is not None:  # its bucket was already copied (and maybe sent): the sums are redone
                self.late = True
                return
            ready = self._ready[b]
            ready.add(i)
            if b == self._launched and len(ready) == size:
                self._launch_complete()

        return hook

    def _launch_complete(self) -> None:
        # The last bucket waits for finish(), where its trailer is known.
        while self._launched < len(self.buckets) - 1 and len(self._ready[self._launched]) == len(
                self.buckets[self._launched]):
            self._launch(self._launched)

    def _launch(self, b: int) -> None:
        self._launch_slice(self._seal(b))

    def _seal(self, b: int) -> Tensor:
        """Copy bucket ``b``'s gradients in (once) and take its local norm while they are this rank's own."""
        flat = self._buffer(b)[:self._sizes[b]]
        if self._norms[b] is None:
            self._fill(b)
            self._norms[b] = torch.linalg.vector_norm(flat)
        return flat

    def _launch_slice(self, flat: Tensor) -> None:
        self._works.append((dist.all_reduce(flat, async_op=True), flat))
        self._launched += 1

    def _fill(self, b: int) -> None:
        """Copy the bucket's gradients into its buffer, zeros for a parameter without one."""
        views = self._bucket_views[b]
        grads = [self.params[i].grad for i in self.buckets[b]]
        with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
            if all(g is not None for g in grads):
                torch._foreach_copy_(views, grads)
                return
            for view, grad in zip(views, grads):
                view.zero_() if grad is None else view.copy_(grad)

    def local_finite(self) -> bool:
        """Whether every gradient of ``params`` on this rank is finite (one host sync). Call it after backward,
        before :meth:`finish`. A finite norm per bucket implies finite elements; a non-finite one (possibly an
        overflow of finite values), or a gradient changed after its bucket left, is checked tensor by tensor."""
        if not self.late:
            for b in range(self._launched, len(self.buckets)):
                self._seal(b)
            if all(math.isfinite(norm.item()) for norm in self._norms):  # a host sync per bucket, not per tensor
                return True
        return all_finite([p.grad for p in self.params if p.grad is not None])

    def views(self) -> list[Tensor]:
        """Each parameter's place in its bucket, shaped like it (after :meth:`finish`: the sums)."""
        return [self._views[i] for i in range(len(self.params))]

    def finish(self, trailer: Tensor | None = None) -> list[tuple[list[int], Tensor]]:
        """Launch what backward left (unused parameters, the last bucket), wait for every bucket and return the
        sums. ``trailer``: a small vector summed over ranks in place, inside the last bucket when its dtype holds it
        exactly (else in a collective of its own), as in
        :func:`~lightning_opt.distributed.buckets.all_reduce_flat`."""
        self._armed = False
        last = len(self.buckets) - 1
        ride = trailer is not None and rides_with(trailer, self._buffer(last).dtype, self._buffer(last).device)
        if ride:
            self._make_room(trailer.numel())
        for b in range(self._launched, last):
            self._launch(b)
        if self._launched == last:  # the last bucket leaves here only, with the trailer when it rides
            self._seal(last)  # a no-op where local_finite() did it
            flat, n = self._buffer(last), self._sizes[last]
            if ride:
                flat[n:n + trailer.numel()].copy_(trailer)
            self._launch_slice(flat[:n + trailer.numel()] if ride else flat[:n])
        for work, flat in self._works:
            work.wait()
            if self.meter is not None:
                self.meter.add(nbytes([flat]))
        if ride:
            n = self._sizes[last]
            trailer.copy_(self._buffer(last)[n:n + trailer.numel()])
        elif trailer is not None:
            all_reduce_counted(trailer, meter=self.meter)
        return [(idx, self._buffer(b)[:self._sizes[b]]) for b, idx in enumerate(self.buckets)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._armed = False
