"""Agreeing across ranks under the non-finite policy: :func:`agree` is the one place where every strategy decides
what a non-finite value on some rank means. Never imports Lightning.

One call sums the tensors over ranks in flat buckets (or only compares, ``total=False``); every rank's non-finite
flag rides at the end of the last bucket (with ``total=False`` it is the one tiny all-reduce), so every rank takes
the same decision at no extra collective:

* ``policy="raise"``: :class:`NonFiniteError` on every rank, naming the ranks and the optimizer step, before
  anything is written;
* ``policy="drop"``: the bad ranks contribute zeros; the returned :class:`Agreement` names them, and the caller
  resets them (to the consensus, a healthy rank or a leader, as the strategy defines);
* every rank bad: :class:`NonFiniteError` whatever the policy (there is nothing to fall back to).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt._validation import check_choice
from lightning_opt.distributed.buckets import (
    DEFAULT_BUCKET_CAP_MB,
    all_finite,
    all_reduce_counted,
    all_reduce_flat,
    is_dist,
    write_back,
)
from lightning_opt.distributed.meter import CommMeter
from lightning_opt.distributed.overlap import OverlappedGradSum

POLICIES = ("raise", "drop")


class NonFiniteError(RuntimeError):
    """Raised on every rank when some rank holds non-finite values at a synchronisation."""


@dataclass
class Agreement:
    """What every rank learned from :func:`agree` (the same on every rank except ``local_bad``)."""

    world: int
    #: ranks that held non-finite values (left out under ``"drop"``)
    bad: list[int]
    #: whether this rank is one of them
    local_bad: bool
    #: ``[(indices into the tensors, summed flat buffer)]`` over the healthy ranks (empty with ``total=False``)
    buckets: list[tuple[list[int], Tensor]]
    #: the ``payload`` vector summed over ranks (empty without one)
    payload: Tensor
    #: each tensor's place in ``buckets``, shaped like it, when the sums are those launched during backward
    #: (:meth:`OverlappedGradSum.views`): writing back is then one multi-tensor copy with no views to build
    views: list[Tensor] | None = None

    @property
    def healthy(self) -> int:
        return self.world - len(self.bad)

    @property
    def first_healthy(self) -> int:
        return min(set(range(self.world)) - set(self.bad))

    def write(self, out: Sequence[Tensor], *, mean: bool = True) -> None:
        """Write the healthy ranks' mean (or, ``mean=False``, their sum) into ``out``, shaped like the tensors."""
        write_back(self.buckets, out, 1.0 / self.healthy if mean else 1.0, views=self.views)


def agree(
    tensors: Sequence[Tensor],
    *,
    policy: str,
    what: str,
    step: int,
    corrupt: Callable[[Sequence[Tensor]], bool] | None = None,
    total: bool = True,
    payload: Tensor | None = None,
    summed: OverlappedGradSum | None = None,
    meter: CommMeter | None = None,
    cap_mb: float = DEFAULT_BUCKET_CAP_MB,
) -> Agreement:
    """Agree on ``tensors`` across the default process group (see the module docstring).

    ``corrupt`` judges this rank's tensors (default: any non-finite value, judged per bucket when ``summed``);
    ``what`` and ``step`` name them in the error. ``total``: sum the tensors (not written back: see
    :meth:`Agreement.write`). ``payload``: a vector summed along with the flags (per-tensor gradient counts; a
    rank's entry of a per-rank vector, which the sum turns into a gather). ``summed``: the sums were launched
    during backward (``tensors`` are its parameters' gradients); they are redone here only if a rank is dropped or
    a gradient changed after its bucket left. On a single process nothing is communicated and the decision is this
    rank's own.
    """
    check_choice("policy", policy, POLICIES)
    if corrupt is not None:
        local_bad = corrupt(tensors)
    else:  # the buckets launched during backward are judged whole, not tensor by tensor
        local_bad = not (summed.local_finite() if summed is not None else all_finite(tensors))
    drop = local_bad and policy == "drop"
    src = [torch.zeros_like(t) for t in tensors] if drop else list(tensors)
    world, me = (dist.get_world_size(), dist.get_rank()) if is_dist() else (1, 0)
    extra = torch.zeros(0) if payload is None else payload.reshape(-1)
    # [one flag per rank | with total: "a gradient changed after its bucket left" | the payload]; with total it
    # rides at the end of the last bucket (no collective of its own), else it is the one collective
    flags = torch.zeros(world + int(total) + extra.numel(), device=(tensors[0] if tensors else extra).device,
                        dtype=torch.promote_types(extra.dtype, torch.float32))
    flags[me] = float(local_bad)
    if total:
        flags[world] = float(summed is not None and summed.late)
    flags[world + int(total):] = extra
    buckets = []
    if total and summed is not None:
        buckets = summed.finish(trailer=flags)
    elif total:
        buckets = all_reduce_flat(src, meter=meter, cap_mb=cap_mb, trailer=flags)
    elif is_dist():
        all_reduce_counted(flags, meter=meter)
    bad = [int(r) for r in torch.nonzero(flags[:world]).flatten().tolist()]
    views = summed.views() if summed is not None else None
    if summed is not None and ((bad and policy == "drop") or flags[world] > 0):
        buckets, views = all_reduce_flat(src, meter=meter, cap_mb=cap_mb), None
    if bad and policy == "raise":
        raise NonFiniteError(
            f"non-finite {what} on rank(s) {bad} at optimizer step {step}; refusing to use them on any rank "
            "(nothing was written). Pass nonfinite='drop' to leave such ranks out and reset them.")
    if len(bad) == world:
        raise NonFiniteError(f"non-finite {what} on every rank at optimizer step {step}; nothing to reset them to")
    return Agreement(world, bad, local_bad, buckets, flags[world + int(total):], views)
