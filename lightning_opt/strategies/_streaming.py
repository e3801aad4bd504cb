"""Streaming DiLoCo's outer loop for one optimizer (Douillard et al. 2025, arXiv 2501.18512): fragments synced at
staggered steps, each fragment's outer gradient averaged while training goes on, then merged. Pure torch; the
strategy (:class:`~lightning_opt.strategies.local_sgd.LocalSGDStrategy`) calls it after every local step.

* **Fragments** (§2.2): the parameters, in module order, are cut into ``P`` contiguous blocks of about equal bytes
  (:func:`partition`). Fragment p syncs after local steps :math:`o_p + k\\tau` (:func:`offsets`,
  :math:`o_p = \\tau - (P-1-p)\\lfloor\\tau/P\\rfloor`: the last fragment on the period's end, the others evenly
  before it), so one sync moves about 1/P of the model.
* **Overlap** (§2.3): at fragment p's sync its outer gradient :math:`\\Delta_p = a_p - x_p` (anchor minus local
  weights) leaves with ``async_op=True``; ``overlap_steps`` (d) local steps later the mean :math:`\\bar\\Delta_p`
  is applied: the outer optimizer steps the anchor, :math:`a_p \\leftarrow \\mathrm{OuterOpt}(a_p, \\bar\\Delta_p)`,
  and the local weights merge, :math:`x_p \\leftarrow (1-m)\\,x_p + m\\,a_p` (``merge_mix`` m; m = 1 replaces them).
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


def partition(sizes: list[int], fragments: int) -> list[list[int]]:
    """Indices of ``sizes`` (bytes per parameter, in module order) cut into ``fragments`` contiguous non-empty
    blocks; block p ends at the first parameter whose running total reaches (p + 1)/P of the whole."""
    if not 1 <= fragments <= len(sizes):
        raise ValueError(f"invalid fragments={fragments}; expected 1 ≤ fragments ≤ {len(sizes)} (the parameters)")
    total, cuts, running = sum(sizes), [], 0
    for i, size in enumerate(sizes):
        running += size
        left = len(sizes) - i - 1  # parameters after this one
        wanted = fragments - 1 - len(cuts)  # cuts still to make
        if wanted and (running * fragments >= total * (len(cuts) + 1) or left == wanted):
            cuts.append(i + 1)
    bounds = [0, *cuts, len(sizes)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


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
        self.parts: list[list[int]] | None = None
        self._opts: dict[int, Optimizer] = {}
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
            self.parts = partition([p.numel() * p.element_size() for p in params], self.fragments)
        for p in sorted(f for f, (at, _) in self.flying.items() if at == local_step):
            start = time.perf_counter()
            self._apply(p, params, anchors, policy, local_step)
            self.meter.sync_seconds += time.perf_counter() - start
        launched = self.due(local_step)
        for p in launched:
            idx = self.parts[p]
            with self.meter.sync():  # one sync per fragment: its bytes are the peak's candidate
                delta = torch.sub(flatten([anchors[i] for i in idx], torch.float32),
                                  flatten([params[i] for i in idx], torch.float32))
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
            start = time.perf_counter()
            data = data.wait()
            self.meter.overlap_wait_seconds += time.perf_counter() - start
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
            for i in self.parts[p]:
                x, a = params[i], anchors[i].to(params[i].dtype)
                x.copy_(a) if self.mix == 1.0 else x.lerp_(a, self.mix)

    @torch.no_grad()
    def _outer_step(self, p: int, anchors: list[Tensor], arrived: Arrived) -> None:
        frag = [anchors[i] for i in self.parts[p]]  # type: ignore[index]
        grads = [torch.empty_like(a) for a in frag]
        unflatten_into(arrived.mean(), grads)
        for a, g in zip(frag, grads):
            a.grad = g
        self._optimizer(p, frag).step()
        for a in frag:
            a.grad = None

    def _optimizer(self, p: int, frag: list[Tensor]) -> Optimizer:
        opt = self._opts.get(p)
        if opt is None or opt.param_groups[0]["params"][0] is not frag[0]:
            opt = self._opts[p] = self.outer(frag)
            if p in self._saved_opts:
                opt.load_state_dict(self._saved_opts.pop(p))
        return opt

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Outer-optimizer states and the outer gradients in flight, waited for (identical on every rank: the
        result, not the pending collective, is saved, and is applied at the same step after a resume)."""
        flying = {}
        for p, (at, data) in self.flying.items():
            arrived = data.wait() if isinstance(data, InFlight) else data
            self.flying[p] = (at, arrived)
            flying[p] = {"at": at, "total": arrived.total, "bad": arrived.bad, "world": arrived.world}
        opts = {p: opt.state_dict() for p, opt in self._opts.items()}
        return {"outer": {**self._saved_opts, **opts}, "flying": flying, "parts": self.parts}

    def load_state_dict(self, state: dict[str, Any], rank: int, world: int) -> None:
        """Restore. An outer gradient saved in flight is applied at its step as saved; this rank is reset as a
        dropped rank only if it is the same rank of the same world size."""
        self._opts, self._saved_opts = {}, dict(state["outer"])
        self.parts = state["parts"]
        self.flying = {}
        for p, f in state["flying"].items():
            bad, saved_world = [int(r) for r in f["bad"]], int(f["world"])
            arrived = Arrived(f["total"], bad, saved_world == world and rank in bad, saved_world)
            self.flying[int(p)] = (int(f["at"]), arrived)
