"""How a periodic strategy averages across ranks under its non-finite policy (pure torch, no Lightning).

Gradients on the steps that average them (warm-up, Lookahead ``mode="sync"``: the closure's backward all-reduces
the buckets as DDP's reducer does), parameters and buffers at a sync, and the consensus weights for evaluation all
go through :func:`~lightning_opt.distributed.consensus.agree`, so a non-finite value means the same everywhere:
``raise`` stops every rank before anything is written; ``drop`` leaves the bad ranks out of the mean, and a rank
dropped from a parameter average loses its optimizer state (its weights are reset to the consensus).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_opt._tensors import accumulation_dtype
from lightning_opt.distributed import Agreement, CommMeter, agree, broadcast_flat, is_dist, nbytes
from lightning_opt.distributed.buffers import BufferRules
from lightning_opt.distributed.consensus import NonFiniteError
from lightning_opt.distributed.overlap import OverlappedGradSum
from lightning_opt.strategies._clock import SyncClock


def realign(values: list[Tensor], old: list[Tensor], new: list[Tensor],
            fresh: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """Per-parameter ``values`` (aligned with ``old``) re-aligned with ``new``: kept for parameters in both,
    ``fresh(p)`` for a parameter that joined."""
    by_id = {id(p): v for p, v in zip(old, values)}
    return [by_id[id(p)] if id(p) in by_id else fresh(p) for p in new]


class SyncAveraging:
    """Mixin of :class:`~lightning_opt.strategies.periodic.PeriodicSyncStrategy`: the averaging a sync (or an
    averaged step) uses. It reads the strategy settings and state annotated below."""

    warmup_steps: int
    average_gradients_every_step: bool
    nonfinite: str
    bucket_cap_mb: float
    average_buffers: bool
    meter: CommMeter
    optimizers: list[Any]
    lightning_module: nn.Module
    _buffer_rules: BufferRules
    _grad_sums: dict[int, OverlappedGradSum]
    _param_views: dict[int, tuple[tuple, list[Tensor], int]]
    clock: SyncClock

    @property
    def world(self) -> int:
        return dist.get_world_size() if is_dist() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if is_dist() else 0

    def _opt_params(self, idx: int) -> list[Tensor]:
        """Optimizer ``idx``'s parameters, each once, in param-group order."""
        return self._param_view(idx)[0]

    def _param_view(self, idx: int) -> tuple[list[Tensor], int]:
        """Optimizer ``idx``'s parameters and the bytes of those that train (DDP's per-step payload), rebuilt only
        when its param groups change: a per-step rebuild costs Python time that grows with the parameters."""
        groups = self.optimizers[idx].param_groups
        key = (id(self.optimizers[idx]), *((id(g["params"]), len(g["params"])) for g in groups))
        cached = self._param_views.get(idx)
        if cached is None or cached[0] != key:
            params = list({id(p): p for group in groups for p in group["params"]}.values())
            if cached is not None:
                self._params_changed(idx, cached[1], params)
            cached = self._param_views[idx] = (key, params, nbytes([p for p in params if p.requires_grad]))
        return cached[1], cached[2]

    def _params_changed(self, idx: int, old: list[Tensor], new: list[Tensor]) -> None:
        """Optimizer ``idx``'s parameters changed mid-fit (a param group added, e.g. a backbone unfrozen): realign
        per-parameter state with :func:`realign`."""

    def _module_tensors(self) -> list[Tensor]:
        module = self.lightning_module
        return list(module.parameters()) + list(module.buffers())

    def _buffers_to_sync(self) -> list[Tensor]:
        """Persistent buffers that differ between ranks (a collective; see ``distributed/buffers.py``)."""
        return self._buffer_rules.to_sync(self.lightning_module)

    def _check_supported(self) -> None:
        """Fail at setup, naming the feature, for what the strategy cannot synchronise."""
        averages_grads = self.warmup_steps > 0 or self.average_gradients_every_step
        sparse = [name for name, m in self.lightning_module.named_modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
        if averages_grads and sparse:
            raise ValueError(
                f"{type(self).__name__}: sparse gradients (nn.Embedding(sparse=True) in {sparse}) cannot be averaged "
                "on the DDP-like steps (warmup_steps > 0, Lookahead mode='sync'); use sparse=False, or warmup_steps=0 "
                "with a strategy that averages parameters (Local SGD, Lookahead mode='local', LSGD, EASGD)")

    def _consensus(self) -> list[Tensor]:
        """Consensus values for ``_module_tensors()`` (default: the world average; a collective)."""
        tensors = self._module_tensors()
        averaged = self._consensus_ids()
        floats = [t for t in tensors if t.is_floating_point() and id(t) in averaged]
        means = iter(self._world_mean(floats, "weights", self.clock.steps.get(0, 0)) if floats else [])
        return [next(means).to(t.dtype) if t.is_floating_point() and id(t) in averaged else t.detach().clone()
                for t in tensors]

    def _consensus_ids(self) -> set[int]:
        """Tensors the consensus averages (a collective): parameters and the persistent buffers that differ between
        ranks; the others are identical on every rank or derived (see ``distributed/buffers.py``)."""
        return {id(p) for p in self.lightning_module.parameters()} | {id(b) for b in self._buffers_to_sync()}

    def _clear_optimizer_states(self) -> None:
        for opt in self.optimizers:
            opt.state.clear()

    def _averaging_closure(self, closure: Callable[[], Any], idx: int, step: int) -> Callable[[], Any]:
        summer = self._grad_sum(idx)

        def wrapped() -> Any:
            summer.arm()  # buckets are all-reduced while backward runs (see distributed/overlap.py)
            try:
                out = closure()
            except BaseException:
                # Issue the collectives every rank issues (same sizes), flagged bad, before raising: the other
                # ranks then refuse this step (raise) or leave this rank out (drop) instead of mixing half a sum.
                with contextlib.suppress(NonFiniteError):
                    self._average_grads(step, summer, failed=True)
                raise
            self._average_grads(step, summer)
            return out

        return wrapped

    def _grad_sum(self, idx: int) -> OverlappedGradSum:
        params = [p for p in self._opt_params(idx) if p.requires_grad]
        summer = self._grad_sums.get(idx)
        if summer is None or len(summer.params) != len(params) or any(
                a is not b for a, b in zip(summer.params, params)):
            if summer is not None:
                summer.remove()
            summer = self._grad_sums[idx] = OverlappedGradSum(params, self.bucket_cap_mb, self.meter)
        return summer

    def _average_grads(self, step: int, summer: OverlappedGradSum, failed: bool = False) -> None:
        """Every rank's gradients become the healthy ranks' mean, before the optimizer (and the monitors) see them.
        ``failed``: this rank's closure raised; it takes part in the collectives as a bad rank."""
        params = summer.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        # gradients are judged strictly (no buffer rules), on the buckets unless this rank's closure failed
        judge = (lambda _: True) if failed else None
        agreement = self._average(grads, "gradients", step, payload=has_grad, summed=summer, corrupt=judge)
        agreement.write(grads)
        for p, g, c in zip(params, grads, agreement.payload.tolist()):
            if p.grad is None and c > 0:
                p.grad = g

    def _agree(self, tensors: list[Tensor], what: str, step: int, **kwargs: Any) -> Agreement:
        """:func:`~lightning_opt.distributed.consensus.agree` under this strategy's policy, judged by the buffer
        rules (a buffer's by-design non-finite entries are no corruption), counted on its meter."""
        kwargs.setdefault("corrupt", self._buffer_rules.corrupt)
        return agree(tensors, policy=self.nonfinite, what=what, step=step, meter=self.meter,
                     cap_mb=self.bucket_cap_mb, **kwargs)

    def _average(self, tensors: list[Tensor], what: str, step: int, **kwargs: Any) -> Agreement:
        """Sum over ranks (:meth:`_agree`); a dropped rank is told so and, unless only its gradients were replaced,
        loses its optimizer state (the caller resets its weights to the consensus)."""
        agreement = self._agree(tensors, what, step, **kwargs)
        if agreement.local_bad and what == "gradients":
            # Only the gradient is replaced (by the healthy ranks' average): weights and optimizer state stay
            # identical to the other ranks', so nothing else needs resetting.
            warnings.warn(f"rank {self.rank}: non-finite {what} at optimizer step {step}; excluded from the "
                          "average (this rank steps with the healthy ranks' mean gradient)", stacklevel=2)
        elif agreement.local_bad:
            warnings.warn(f"rank {self.rank}: non-finite {what} at optimizer step {step}; excluded from the "
                          "average and reset to the consensus (its optimizer state is cleared)", stacklevel=2)
            self._clear_optimizer_states()
        return agreement

    def _world_mean(self, tensors: list[Tensor], what: str, step: int) -> list[Tensor]:
        """Mean over ranks of ``tensors`` (new tensors, half precision in fp32; inputs untouched), under the policy."""
        out = [torch.empty_like(t, dtype=accumulation_dtype(t.dtype)) for t in tensors]
        if not is_dist():
            for o, t in zip(out, tensors):
                o.copy_(t)
            return out
        self._average(tensors, what, step).write(out)
        return out

    def _average_buffers_now(self, step: int) -> None:
        """Float buffers that differ between ranks averaged (if ``average_buffers``), integer ones taken from rank 0;
        buffers identical on every rank (masks, tables, counters) are left alone."""
        if not is_dist():
            return
        buffers = self._buffers_to_sync()
        floats = [b for b in buffers if b.is_floating_point()] if self.average_buffers else []
        if floats:
            torch._foreach_copy_(floats, self._world_mean(floats, "buffers", step))
        ints = [b for b in buffers if not b.is_floating_point()]
        if ints:
            broadcast_flat(ints, src=0, meter=self.meter)
