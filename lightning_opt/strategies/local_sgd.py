"""Local SGD with warmup and an optional outer optimizer (SlowMo / DiLoCo)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt._tensors import accumulation_copy, accumulation_dtype
from lightning_opt._validation import check_bool, check_choice, check_float, check_int, invalid
from lightning_opt.distributed import is_dist
from lightning_opt.distributed.outer_reduce import COMM_DTYPES
from lightning_opt.strategies._averaging import realign
from lightning_opt.strategies._streaming import FragmentStream
from lightning_opt.strategies.periodic import PeriodicSyncStrategy
from lightning_opt.strategies.schedules import PeriodSchedule


class LocalSGDStrategy(PeriodicSyncStrategy):
    r"""Local SGD: each of N workers takes ``period`` (τ) optimizer steps on its own shard, then
    :math:`z = \frac1N \sum_i x_i` and every worker restarts from z (curvature paper, Alg. 2).

    With an outer optimizer the averaged displacement from the last anchor :math:`a` is a pseudo-gradient
    :math:`\Delta = a - \frac1N\sum_i x_i`, and an outer SGD step is taken on it (SlowMo, Wang et al. 2020;
    DiLoCo, Douillard et al. 2023):

    .. math:: m \leftarrow \mu m + \Delta,\quad d = \Delta + \mu m \text{ (Nesterov) or } m,\quad
              a \leftarrow a - \eta_{out} d,\quad x_i \leftarrow a.

    ``outer_lr=1, outer_momentum=0`` is plain averaging (and takes the exact averaging path). Presets:
    SlowMo ``outer_momentum=0.5`` (outer_lr 1.0); DiLoCo ``outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True``.
    Anchor and momentum are kept in fp32 (or the parameter dtype if wider) and saved in checkpoints.

    **Streaming DiLoCo** (Douillard et al. 2025, arXiv 2501.18512; see :mod:`lightning_opt.strategies._streaming`):
    ``fragments=P`` syncs 1/P of the model at a time, fragment p after local steps :math:`o_p + k\tau`;
    ``overlap_steps=d`` sends each fragment's outer gradient while training goes on and applies it d steps later,
    merging :math:`x_p \leftarrow (1-m)x_p + m\,a_p` (``merge_mix`` m); ``comm_dtype`` sends outer gradients in
    bfloat16, float16 or int8 (summed in float32 on every rank). Any of these, or an ``outer_optimizer``, takes the
    streamed path, where the anchor is always kept (also for plain averaging) and the consensus is the anchors.

    Args:
        period: optimizer steps between synchronisations (int ≥ 1) or a
            :class:`~lightning_opt.strategies.schedules.PeriodSchedule` (e.g. ``ConstantHorizon``; an int on the
            streamed path).
        outer_lr, outer_momentum, outer_nesterov: the outer optimizer on the pseudo-gradient (SGD shorthand).
        outer_optimizer: any torch optimizer for the outer step, as a callable taking the anchors (e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)``; from YAML a ``class_path``/``init_args`` mapping). The
            pseudo-gradient is set as the anchors' ``.grad`` and ``step()`` runs; one optimizer per fragment, its
            state checkpointed. Not together with the shorthand.
        fragments: P ≥ 1 fragments, at most ``period``.
        overlap_steps: d in [0, period): local steps between a fragment's send and its merge.
        merge_mix: m in (0, 1]: the weight of the global weights in the merge. 1 (the default, torchft's
            ``fragment_update_alpha=0``) replaces the local weights; the paper's α weights the *local* weights and
            its experiments use α = 0.5, i.e. ``merge_mix=0.5``.
        comm_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"`` (per-block scale).
        **kwargs: ``warmup_steps``, ``average_buffers``, ``nonfinite`` (``"drop"``: a rank with non-finite
            parameters at a sync is left out of the average and reset to the consensus), ``bucket_cap_mb``,
            ``timeout``, ``start_method`` and Lightning's ``DDPStrategy`` arguments: see
            :class:`~lightning_opt.strategies.periodic.PeriodicSyncStrategy`.

    Evaluation, ``fit``'s final weights and saved ``state_dict`` use the consensus: the current world average
    (plain averaging) or the anchor (with an outer optimizer). Training continues from the local weights.
    """

    strategy_name = "local_sgd"
    _outer_optimizer_rule: str | None = None  # a subclass whose outer step is fixed says so here
    # fp32 anchors and outer momenta per optimizer; the streamed path's outer-optimizer states and what is in flight
    _shared_state = {"anchor": "_anchor", "momentum": "_momentum", "stream": "_stream_state"}

    def __init__(self, period: int | PeriodSchedule = 1, *, outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 outer_nesterov: bool = False, outer_optimizer: Callable[[Iterable[Tensor]], Optimizer] | None = None,
                 fragments: int = 1, overlap_steps: int = 0, merge_mix: float = 1.0, comm_dtype: str = "float32",
                 **kwargs: Any) -> None:
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0, 100.0, low_open=True)
        self.outer_momentum = check_float("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        self.outer_nesterov = check_bool("outer_nesterov", outer_nesterov)
        if self.outer_nesterov and self.outer_momentum == 0:
            raise invalid("outer_nesterov", True, "False with outer_momentum=0 (Nesterov needs momentum in (0, 1))")
        if outer_optimizer is not None and self._outer_optimizer_rule:
            raise invalid("outer_optimizer", outer_optimizer, self._outer_optimizer_rule)
        self.outer_optimizer = _check_outer_optimizer(outer_optimizer, self.outer_lr != 1.0 or self.outer_momentum > 0)
        self.fragments = check_int("fragments", fragments, 1)
        self.overlap_steps = check_int("overlap_steps", overlap_steps, 0)
        self.merge_mix = check_float("merge_mix", merge_mix, 0.0, 1.0, low_open=True)
        self.comm_dtype = check_choice("comm_dtype", comm_dtype, COMM_DTYPES)
        super().__init__(period=period, **kwargs)
        if self.streams:
            _check_stream_period(period, self.fragments, self.overlap_steps)
        self._anchor: dict[int, list[Tensor]] = {}
        self._momentum: dict[int, list[Tensor]] = {}
        self._streams: dict[int, FragmentStream] = {}

    @property
    def streams(self) -> bool:
        """Whether syncs take the streamed path (fragments, overlap, a merge, low precision or an outer optimizer)."""
        return (self.fragments > 1 or self.overlap_steps > 0 or self.merge_mix != 1.0 or self.comm_dtype != "float32"
                or self.outer_optimizer is not None)

    @property
    def uses_outer(self) -> bool:
        return self.streams or not (self.outer_lr == 1.0 and self.outer_momentum == 0.0)

    def _before_local_step(self, idx: int, step: int) -> None:
        # The anchor is where local training starts: the initial (or post-warmup) weights.
        if self.uses_outer and idx not in self._anchor:
            self._anchor[idx] = [accumulation_copy(p) for p in self._opt_params(idx)]

    def _params_changed(self, idx: int, old: list[Tensor], new: list[Tensor]) -> None:
        if self.streams and idx in self._anchor:
            raise ValueError("LocalSGDStrategy: the optimizer's parameters changed mid-fit; the streamed path "
                             "(fragments, overlap_steps, merge_mix, comm_dtype, outer_optimizer) keeps fixed fragments "
                             "and does not support that. Use fragments=1 with the outer_lr/outer_momentum shorthand.")
        # A parameter that joins mid-fit starts its outer step from where it joins, with no momentum.
        if idx in self._anchor:
            self._anchor[idx] = realign(self._anchor[idx], old, new, accumulation_copy)
        if idx in self._momentum:
            self._momentum[idx] = realign(self._momentum[idx], old, new,
                                          lambda p: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)))

    def _sync(self, idx: int, step: int) -> None:
        params = self._opt_params(idx)
        if not is_dist() and not self.uses_outer:
            return
        means = self._world_mean(params, "parameters", step)
        new = self._outer_step(idx, means) if self.uses_outer else means
        with torch.no_grad():
            torch._foreach_copy_(params, new)
        if idx == 0:
            self._average_buffers_now(step)

    def _outer_step(self, idx: int, means: list[Tensor]) -> list[Tensor]:
        anchor = self._anchor[idx]
        delta = torch._foreach_sub(anchor, [m.to(a.dtype) for m, a in zip(means, anchor)])
        if self.outer_momentum > 0:
            if idx not in self._momentum:
                self._momentum[idx] = [torch.zeros_like(a) for a in anchor]
            buf = self._momentum[idx]
            torch._foreach_mul_(buf, self.outer_momentum)
            torch._foreach_add_(buf, delta)
            direction = torch._foreach_add(delta, buf, alpha=self.outer_momentum) if self.outer_nesterov else buf
        else:
            direction = delta
        torch._foreach_add_(anchor, direction, alpha=-self.outer_lr)
        return anchor

    def _consensus(self) -> list[Tensor]:
        values = super()._consensus()
        if not self.uses_outer:
            return values
        by_id = {id(p): a for idx, anchors in self._anchor.items()
                 for p, a in zip(self._opt_params(idx), anchors)}
        return [by_id[id(t)].to(t.dtype) if id(t) in by_id else v for t, v in zip(self._module_tensors(), values)]

    # ------------------------------------------------------------------ the streamed path
    def _sync_if_due(self, idx: int, step: int) -> bool:
        if not self.streams:
            return super()._sync_if_due(idx, step)
        if not self.clock.scheduled(idx):
            self._schedule_next(idx, step - 1)
        if self.clock.due(idx, step):  # the clock keeps counting periods (progress bar, SIGTERM cadence)
            self._schedule_next(idx, step)
        launched = self._stream(idx).step(step - self.warmup_steps, self._opt_params(idx), self._anchor[idx],
                                          self.nonfinite)
        if idx == 0 and self.fragments - 1 in launched:  # buffers once per period, with the last fragment
            self._average_buffers_now(step)
        # Every rank holds the consensus only when the whole model was just replaced by the anchors.
        return len(launched) == self.fragments and self.overlap_steps == 0 and self.merge_mix == 1.0

    def _stream(self, idx: int) -> FragmentStream:
        if idx not in self._streams:
            outer = self.outer_optimizer or functools.partial(
                torch.optim.SGD, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.outer_nesterov)
            self._streams[idx] = FragmentStream(
                period=int(self.schedule.next_period(0, 0.0, None)),  # an int period (checked at __init__)
                fragments=self.fragments, overlap_steps=self.overlap_steps, merge_mix=self.merge_mix,
                comm_dtype=self.comm_dtype, outer=outer, meter=self.meter, on_dropped=self._dropped)
        return self._streams[idx]

    def _dropped(self, fragment: int, local_step: int) -> None:
        warnings.warn(f"rank {self.rank}: non-finite outer gradient of fragment {fragment} after local step "
                      f"{local_step}; excluded from the average and reset to the consensus (its optimizer state is "
                      "cleared)", stacklevel=2)
        self._clear_optimizer_states()

    @property
    def _stream_state(self) -> dict[int, Any]:
        return {idx: stream.state_dict() for idx, stream in self._streams.items()}

    @_stream_state.setter
    def _stream_state(self, state: dict[int, Any]) -> None:
        self._streams = {}
        for idx, saved in state.items():
            self._stream(int(idx)).load_state_dict(saved, self.rank, self.world)

    def on_train_end(self) -> None:
        for idx, stream in self._streams.items():  # what is in flight reaches the anchors, so the consensus
            stream.flush(self._anchor[idx], self.nonfinite)
        super().on_train_end()

    @property
    def steps_to_next_sync(self) -> int | str:
        if not self.streams or 0 not in self._streams:
            return super().steps_to_next_sync
        step = self.clock.steps.get(0, 0)
        return "warmup" if step < self.warmup_steps else self._streams[0].steps_to_next(step - self.warmup_steps)

    def _stream_repr(self) -> str:
        """The streamed path's settings for ``__repr__`` (empty on the classic path)."""
        return (f", fragments={self.fragments}, overlap_steps={self.overlap_steps}, merge_mix={self.merge_mix}, "
                f"comm_dtype={self.comm_dtype!r}" if self.streams else "")

    def __repr__(self) -> str:
        stream = (f", outer_optimizer={self.outer_optimizer!r}" if self.streams else "") + self._stream_repr()
        return (f"LocalSGDStrategy(period={self.schedule!r}, warmup_steps={self.warmup_steps}, "
                f"outer_lr={self.outer_lr}, outer_momentum={self.outer_momentum}, "
                f"outer_nesterov={self.outer_nesterov}{stream})")


def _check_outer_optimizer(outer: Any, shorthand: bool) -> Callable[[Iterable[Tensor]], Optimizer] | None:
    if outer is not None and not callable(outer):
        raise invalid("outer_optimizer", outer, "None or a callable taking the anchors and returning a torch "
                      "Optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True))")
    if outer is not None and shorthand:
        raise invalid("outer_optimizer", outer, "None when outer_lr/outer_momentum/outer_nesterov are set (they are "
                      "the SGD shorthand for it)")
    return outer


def _check_stream_period(period: Any, fragments: int, overlap_steps: int) -> None:
    if not isinstance(period, int):
        raise invalid("period", period, "an int with fragments > 1, overlap_steps > 0, comm_dtype other than "
                      "'float32' or an outer_optimizer (a schedule would move the fragments' sync steps)")
    if fragments > period:
        raise invalid("fragments", fragments, f"an int in [1, period={period}] (each fragment syncs at its own step)")
    if overlap_steps >= period:
        raise invalid("overlap_steps", overlap_steps, f"an int in [0, period={period}) (a fragment's outer gradient "
                      "must arrive before its next sync)")
