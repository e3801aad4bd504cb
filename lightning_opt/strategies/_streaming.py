"""Streaming DiLoCo's outer loop for one optimizer (Douillard et al. 2025, arXiv 2501.18512): fragments synced at
staggered steps, each fragment's outer gradient averaged while training goes on, then merged. Pure torch; the
strategy (:class:`~lightning_opt.strategies.local_sgd.LocalSGDStrategy`) calls it after every local step.

* **Fragments** (§2.2): the parameters, in module order and flattened end to end, are cut into ``P`` contiguous
  ranges of equal bytes (:func:`partition`; a layer larger than 1/P of the model is shared between fragments, so one
  sync moves 1/P of the model even when a few layers hold most of it). Fragment p syncs after local steps
  :math:`o_p + k\\tau` (:func:`offsets`, :math:`o_p = \\tau - (P-1-p)\\lfloor\\tau/P\\rfloor`: the last fragment on
  the period's end, the others evenly before it). The paper's fragments are whole layers (sequential or strided);
  equal-byte ranges keep every sync at 1/P of the model where the layers differ in size.
* **Overlap** (§2.3): at fragment p's sync its outer gradient :math:`\\Delta_p = a_p - x_p` (anchor minus local
  weights) leaves with ``async_op=True``; ``overlap_steps`` (d) local steps later the mean :math:`\\bar\\Delta_p`
  is applied: the outer optimizer steps the anchor, :math:`a_p \\leftarrow \\mathrm{OuterOpt}(a_p, \\bar\\Delta_p)`,
  and the local weights merge, :math:`x_p \\leftarrow (1-m)\\,x_p + m\\,a_p` (``merge_mix`` m; m = 1 replaces them).
  The paper writes the merge with α weighting the local weights (α = 1 − m) and runs its experiments at α = 0.5;
  torchft's ``fragment_update_alpha`` is the same α, default 0 (m = 1, our default).
* **Low precision** (§2.4): see :mod:`lightning_opt.distributed.outer_reduce`.

The consensus (evaluation, checkpoints' weights, ``fit``'s result) is the anchors: the global weights after the
last outer step that *arrived*; an outer gradient still in flight is not in it yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt._tensors import flatten, unflatten_into
from lightning_opt.distributed import CommMeter, NonFiniteError
from lightning_opt.distributed.outer_reduce import Arrived, InFlight

OuterFactory = Callable[[list[Tensor]], Optimizer]


Slice = tuple[int, int, int]  # (parameter index, first element, end element) of the parameter flattened


def partition(numels: list[int], sizes: list[int], fragments: int, atomic: frozenset[int] = frozenset()
              ) -> list[list[Slice]]:
    """The parameters (``numels`` elements of ``sizes`` bytes each, in module order) flattened end to end and cut
    into ``fragments`` contiguous non-empty ranges of about equal bytes: cut p falls at p/P of the bytes, inside a
    parameter if need be (a layer larger than 1/P of the model is shared by two fragments), except inside a parameter
    in ``atomic`` (one whose memory is not one contiguous run: the cut moves to its end)."""
    total_elems = sum(numels)
    if not 1 <= fragments <= total_elems:
        raise ValueError(f"invalid fragments={fragments}; expected 1 ≤ fragments ≤ {total_elems} (parameter "
                         "elements)")
    elem_start, byte_start = [0], [0]
    for n, e in zip(numels, sizes):
        elem_start.append(elem_start[-1] + n)
        byte_start.append(byte_start[-1] + n * e)
    cuts: list[int] = []
    for p in range(1, fragments):
        target = byte_start[-1] * p // fragments
        i = next(i for i in range(len(numels)) if byte_start[i + 1] > target)
        cut = elem_start[i + 1] if i in atomic else elem_start[i] + (target - byte_start[i]) // sizes[i]
        cuts.append(min(max(cut, (cuts[-1] if cuts else 0) + 1), total_elems - (fragments - p)))
    bounds = [0, *cuts, total_elems]
    return [[(i, max(a, elem_start[i]) - elem_start[i], min(b, elem_start[i + 1]) - elem_start[i])
             for i in range(len(numels)) if elem_start[i] < b and elem_start[i + 1] > a]
            for a, b in zip(bounds, bounds[1:])]


def views(tensors: list[Tensor], fragment: list[Slice]) -> list[Tensor]:
    """The fragment's pieces of ``tensors``: each whole tensor, or a view of a slice of its flattened elements;
    writing into a piece writes the tensor."""
    out = []
    for i, lo, hi in fragment:
        t = tensors[i].detach()
        out.append(t if (lo, hi) == (0, t.numel()) else t.view(-1)[lo:hi])
    return out


def offsets(period: int, fragments: int) -> list[int]:
    """The local step (1-based, within a period) after which each fragment syncs."""
    gap = period // fragments
    return [period - (fragments - 1 - p) * gap for p in range(fragments)]


class FragmentStream:
    """The streamed outer loop of one optimizer: fragments, their outer optimizers and the gradients in flight."""

    def __init__(self, *, period: int, fragments: int, overlap_steps: int, merge_mix: float, comm_dtype: str,
                 outer: OuterFactory, meter: CommMeter, on_dropped: Callable[[int, int], None]) -> None:
        self.period, self.fragments, self.overlap = period, fragments, overlap_steps
        self.mix, self.comm_dtype, self.outer, self.meter = merge_mix, comm_dtype, outer, meter
        self.on_dropped = on_dropped  # (fragment, local step): this rank was left out and reset to the consensus
        self.parts: list[list[Slice]] | None = None
        self._opts: dict[int, tuple[Optimizer, list[Tensor]]] = {}  # per fragment: its optimizer, the anchor pieces
        self._saved_opts: dict[int, Any] = {}  # restored outer-optimizer states, loaded when the optimizer is built
        self.flying: dict[int, tuple[int, InFlight | Arrived]] = {}  # fragment -> (local step to apply at, data)

    def due(self, local_step: int) -> list[int]:
        """Fragments whose sync falls after local step ``local_step`` (1-based)."""
        at = (local_step - 1) % self.period + 1
        return [p for p, o in enumerate(offsets(self.period, self.fragments)) if o == at]

    def steps_to_next(self, local_step: int) -> int:
        """Local steps from ``local_step`` until the next fragment sync."""
        at = local_step % self.period
        return min((o - at) % self.period or self.period for o in offsets(self.period, self.fragments))

    def step(self, local_step: int, params: list[Tensor], anchors: list[Tensor], policy: str) -> list[int]:
        """After local step ``local_step``: apply what is due, then launch the fragments whose sync this is.
        Returns the fragments launched."""
        if self.parts is None:
            atomic = frozenset(i for i, p in enumerate(params) if not p.is_contiguous())
            self.parts = partition([p.numel() for p in params], [p.element_size() for p in params], self.fragments,
                                   atomic)
        for p in sorted(f for f, (at, _) in self.flying.items() if at == local_step):
            start = time.perf_counter()
            self._apply(p, params, anchors, policy, local_step)
            self.meter.sync_seconds += time.perf_counter() - start
        launched = self.due(local_step)
        for p in launched:
            with self.meter.sync():  # one sync per fragment: its bytes are the peak's candidate
                delta = torch.sub(flatten(views(anchors, self.parts[p]), torch.float32),
                                  flatten(views(params, self.parts[p]), torch.float32))
                self.flying[p] = (local_step + self.overlap, InFlight(delta, self.comm_dtype, self.meter))
                if self.overlap == 0:
                    self._apply(p, params, anchors, policy, local_step)
        return launched

    def flush(self, anchors: list[Tensor], policy: str) -> None:
        """Apply every outer gradient still in flight to the anchors (training is over: no merge)."""
        for p in sorted(self.flying):
            self._outer_step(p, anchors, self._arrive(p, policy, self.flying[p][0]))
            del self.flying[p]

    def _arrive(self, p: int, policy: str, at: int) -> Arrived:
        _, data = self.flying[p]
        if isinstance(data, InFlight):
            flight, data = data, data.wait()
            self.meter.overlap_wait_seconds += flight.waited  # the blocked time only, not the decoding
        if data.bad and (policy == "raise" or len(data.bad) == data.world):
            raise NonFiniteError(
                f"non-finite outer gradient of fragment {p} on rank(s) {data.bad} (arriving after local step {at}); "
                "refusing to use it on any rank (nothing was written)" + (
                    ". Pass nonfinite='drop' to leave such ranks out and reset them." if policy == "raise" else ""))
        return data

    def _apply(self, p: int, params: list[Tensor], anchors: list[Tensor], policy: str, at: int) -> None:
        arrived = self._arrive(p, policy, at)
        del self.flying[p]
        self._outer_step(p, anchors, arrived)
        assert self.parts is not None
        if arrived.local_bad:  # dropped: this rank restarts from the consensus (every fragment's anchor)
            with torch.no_grad():
                torch._foreach_copy_(params, [a.to(x.dtype) for a, x in zip(anchors, params)])
            self.on_dropped(p, at)
            return
        with torch.no_grad():
            for x, a in zip(views(params, self.parts[p]), views(anchors, self.parts[p])):
                a = a.to(x.dtype)
                x.copy_(a) if self.mix == 1.0 else x.lerp_(a, self.mix)

    def _outer_step(self, p: int, anchors: list[Tensor], arrived: Arrived) -> None:
        opt, frag = self._optimizer(p, anchors)
        grads = [torch.empty_like(a) for a in frag]
        with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions (docs/TESTING.md)
            unflatten_into(arrived.mean(), grads)
            for a, g in zip(frag, grads):
                a.grad = g
            opt.step()
        for a in frag:
            a.grad = None

    def _optimizer(self, p: int, anchors: list[Tensor]) -> tuple[Optimizer, list[Tensor]]:
        """Fragment p's outer optimizer and the anchor pieces it steps, built at its first outer step (with the
        restored state after a restore, which starts a new stream on the restored anchors). The anchors are never
        replaced otherwise: a change of the optimizer's parameters is refused by the strategy."""
        if p not in self._opts:
            frag = views(anchors, self.parts[p])  # type: ignore[index]
            opt = self.outer(frag)
            if p in self._saved_opts:
                opt.load_state_dict(self._saved_opts.pop(p))
            self._opts[p] = (opt, frag)
        return self._opts[p]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Outer-optimizer states and the outer gradients in flight, waited for (identical on every rank: the
        result, not the pending collective, is saved, and is applied at the same step after a resume)."""
        flying = {}
        for p, (at, data) in self.flying.items():
            arrived = data.wait() if isinstance(data, InFlight) else data
            self.flying[p] = (at, arrived)
            flying[p] = {"at": at, "total": arrived.total, "bad": arrived.bad, "world": arrived.world}
        opts = {p: opt.state_dict() for p, (opt, _) in self._opts.items()}
        return {"outer": {**self._saved_opts, **opts}, "flying": flying, "parts": self.parts}

    def load_state_dict(self, state: dict[str, Any], rank: int, world: int) -> None:
        """Restore. An outer gradient saved in flight is applied at its step as saved; this rank is reset as a
        dropped rank only if it is the same rank of the same world size."""
        self._opts, self._saved_opts = {}, dict(state["outer"])
        self.parts = [[tuple(piece) for piece in part] for part in state["parts"]] if state["parts"] else None
        self.flying = {}
        for p, f in state["flying"].items():
            bad, saved_world = [int(r) for r in f["bad"]], int(f["world"])
            arrived = Arrived(f["total"], bad, saved_world == world and rank in bad, saved_world)
            self.flying[int(p)] = (int(f["at"]), arrived)
