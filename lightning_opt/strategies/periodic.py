"""The periodic-synchronisation base that Local SGD, LSGD, Lookahead and EASGD share: a thin Lightning adapter.

It is a :class:`~pytorch_lightning.strategies.DDPStrategy` that never wraps the module in
``DistributedDataParallel``: gradients stay local, except on the steps that average them (``warmup_steps``,
Lookahead ``mode="sync"``), where the bucket sums overlap with backward
(:class:`~lightning_opt.distributed.overlap.OverlappedGradSum`). Each concern has its own file:

* when to sync (step counters, next sync, period schedule): ``strategies/_clock.py``;
* agreeing across ranks under the non-finite policy (``nonfinite="raise" | "drop"``):
  :func:`lightning_opt.distributed.consensus.agree`;
* which tensors a sync touches, and when a non-finite value is corruption: ``distributed/buffers.py``;
* every rank's own state in checkpoints (exact resume): ``strategies/_checkpoint.py``;
* process lifetime: ``distributed/lifecycle.py``;
* Lightning's per-batch SIGTERM broadcast, kept only on steps that communicate: ``strategies/_sigterm.py``.

This file connects them to Lightning's hooks: it counts optimizer steps and runs the subclass's :meth:`_sync`
when the clock says so; evaluation, ``trainer.fit``'s final weights and checkpoints see the *consensus* weights
(subclass-defined) without touching the training trajectory. A subclass implements :meth:`_sync`, may override
:meth:`_consensus`, :meth:`_before_local_step` and :meth:`_after_inner_step`, and declares its checkpointed state
once in ``_shared_state`` / ``_rank_state``.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt._ownership import RankLocal
from lightning_opt._trainer_steps import log_scalars, logs_this_step
from lightning_opt._validation import as_timeout, check_bool, check_choice, check_float, check_int
from lightning_opt.distributed import CommMeter, broadcast_flat, is_dist
from lightning_opt.distributed.buffers import BufferRules
from lightning_opt.distributed.consensus import POLICIES
from lightning_opt.distributed.lifecycle import LaunchRecord
from lightning_opt.distributed.overlap import OverlappedGradSum
from lightning_opt.strategies._averaging import SyncAveraging
from lightning_opt.strategies._checkpoint import (
    CKPT_KEY,
    SavedRun,
    declared_state,
    gather_ranks,
    load_declared_state,
    named_tensors,
    saved_run,
)
from lightning_opt.strategies._clock import SyncClock
from lightning_opt.strategies._sigterm import broadcast_sigterm_only_when
from lightning_opt.strategies.errors import NonFiniteError
from lightning_opt.strategies.schedules import PeriodSchedule, as_schedule

__all__ = ["DEFAULT_TIMEOUT", "NonFiniteError", "PeriodicSyncStrategy"]

#: Collective timeout (seconds) unless given: long enough for a sync of a large model over a slow link, short
#: enough that a dead or stuck rank reads as an error ("Timed out waiting 600000ms ...") rather than a hang.
DEFAULT_TIMEOUT = 600.0


class PeriodicSyncStrategy(RankLocal, SyncAveraging, DDPStrategy):
    """Base class; see the module docstring. Every strategy takes these arguments (the subclasses add their
    method's own and pass these through):

    Args:
        period: optimizer steps between synchronisations (int ≥ 1) or a
            :class:`~lightning_opt.strategies.schedules.PeriodSchedule` (e.g. ``ConstantHorizon``).
        warmup_steps: steps with per-step gradient averaging (DDP-equivalent) before local steps start.
        average_buffers: average floating-point buffers (BatchNorm statistics) at a sync; integer buffers are always
            taken from rank 0 so they stay consistent.
        nonfinite: ``"raise"`` (default): a non-finite value on any rank at a sync raises :class:`NonFiniteError` on
            every rank, naming the ranks and the step, before anything is written; ``"drop"``: such ranks are left
            out, reset to the consensus (as each strategy defines it) and their optimizer state is cleared.
        bucket_cap_mb: size of the flat buckets (one collective per bucket).
        timeout: collective timeout (seconds or ``timedelta``, default 600 s); a dead or stuck rank surfaces as an
            error after it, and ranks Lightning launched end with the launching rank.
        start_method: ``"popen"`` (e.g. ``local_sgd``), ``"spawn"`` (``local_sgd_spawn``), ``"fork"``
            (``local_sgd_notebook``) or ``"forkserver"``, as in ``DDPStrategy``.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin, process_group_backend:
            as for Lightning's ``DDPStrategy``.
    """

    #: True for strategies whose inner steps are DDP steps (Lookahead ``mode="sync"``): gradients are averaged
    #: after every backward, not only during warmup.
    average_gradients_every_step: bool = False
    #: Whether every rank's module holds the consensus right after a sync (averaging: yes; an elastic or partial
    #: pull, EASGD or LSGD with λ < 1: no, so evaluation must still build it).
    _sync_reaches_consensus: bool = True
    #: False: each optimizer syncs its own parameters on its own step count. True: one sync of every optimizer's
    #: parameters after the last optimizer's step (LSGD: one leader for the whole x).
    _one_sync_for_all_optimizers: bool = False
    #: Checkpointed subclass state, ``{checkpoint key: attribute name}``: identical on every rank (saved once, under
    #: ``checkpoint["lightning_opt"]["strategy"]["extra"]``) ...
    _shared_state: ClassVar[Mapping[str, str]] = {}
    #: ... and each rank's own (saved for every rank, under ``["ranks"][r]["strategy_local"]``).
    _rank_state: ClassVar[Mapping[str, str]] = {}
    _in_sync: bool

    def __init__(self, period: int | PeriodSchedule = 1, warmup_steps: int = 0, average_buffers: bool = True,
                 nonfinite: str = "raise", bucket_cap_mb: float = 25.0, timeout: timedelta | float = DEFAULT_TIMEOUT,
                 start_method: str = "popen", accelerator: Any = None,
                 parallel_devices: list[torch.device] | None = None, cluster_environment: Any = None,
                 checkpoint_io: Any = None, precision_plugin: Precision | None = None,
                 process_group_backend: str | None = None) -> None:
        self.clock = SyncClock(as_schedule(period), check_int("warmup_steps", warmup_steps, 0))
        self.average_buffers = check_bool("average_buffers", average_buffers)
        self.nonfinite = check_choice("nonfinite", nonfinite, POLICIES)
        self.bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0.0, 1e6, low_open=True)
        check_choice("start_method", start_method, ("popen", "spawn", "fork", "forkserver"))
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=as_timeout(timeout), start_method=start_method)
        self.meter = CommMeter()
        self._trainer: pl.Trainer | None = None  # from `setup`
        self._settle(True)  # `_in_sync`: every rank's module holds the consensus weights
        self._stash: list[Tensor] | None = None  # the local weights while the consensus is swapped in
        self._restored: SavedRun | None = None
        self._grad_sums: dict[int, OverlappedGradSum] = {}
        self._param_views: dict[int, tuple[tuple, list[Tensor], int]] = {}  # see SyncAveraging._param_view
        self._buffer_rules = BufferRules()
        self._step_buffers: list[Tensor] | None = None  # see `_averaged_step_buffers`
        self._launch_record = LaunchRecord()
        self._undo_sigterm: Callable[[], None] | None = None  # set in `setup` (a lambda here would not pickle)

    @property
    def schedule(self) -> PeriodSchedule:
        return self.clock.schedule

    @property
    def warmup_steps(self) -> int:
        return self.clock.warmup_steps

    # ------------------------------------------------------------------ setup and teardown
    def _configure_launcher(self) -> None:
        self._launch_record.before_launch()
        super()._configure_launcher()

    def setup_environment(self) -> None:
        created_group = not (dist.is_available() and dist.is_initialized())
        super().setup_environment()
        started_by_launcher = (multiprocessing.parent_process() is not None  # spawn / fork: every rank
                               or (self.local_rank > 0  # popen: local rank 0 re-ran the script for this rank
                                   and type(self.cluster_environment).__name__ == "LightningEnvironment"))
        self._launch_record.after_group_setup(created_group, self.world_size, started_by_launcher)

    def setup(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        self._undo_sigterm = broadcast_sigterm_only_when(trainer, lambda: self.clock.next_step_communicates(
            len(self.optimizers), self.average_gradients_every_step))
        super().setup(trainer)

    def configure_ddp(self) -> None:
        """No DDP wrapper (so no per-step gradient all-reduce); start every rank from rank 0's weights."""
        self._check_supported()
        self._step_buffers = None  # listed again in every fit
        if is_dist():
            broadcast_flat(self._module_tensors(), src=0, cap_mb=self.bucket_cap_mb)
        self._buffer_rules.reset(self.lightning_module)

    def teardown(self) -> None:
        for summer in self._grad_sums.values():
            summer.remove()
        self._grad_sums.clear()
        self._step_buffers = None
        if self._undo_sigterm is not None:
            self._undo_sigterm()
            self._undo_sigterm = None
        super().teardown()
        self._launch_record.undo()

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Restore after `configure_ddp`'s broadcast, so each rank's local weights survive a resume.
        return True

    # ------------------------------------------------------------------ tensors
    def _opt_index(self, optimizer: Optimizer) -> int:
        for i, opt in enumerate(self.optimizers):
            if opt is optimizer or getattr(opt, "_optimizer", None) is optimizer:
                return i
        return 0

    def _lr(self, idx: int) -> float:
        return float(self.optimizers[idx].param_groups[0]["lr"])

    # ------------------------------------------------------------------ step counting
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        idx = self._opt_index(optimizer)
        self._param_view(idx)  # param groups changed since the last step: realign per-parameter state first
        step = self.clock.upcoming(idx)
        warmup = self.clock.in_warmup(step)
        averaged = (warmup or self.average_gradients_every_step) and is_dist()
        if not warmup:
            self._before_local_step(idx, step)
        if averaged:
            closure = self._averaging_closure(closure, idx, step)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.clock.count(idx, step)
        self._after_inner_step(idx, step, output)
        self.meter.ddp_bytes += self._param_view(idx)[1]
        if averaged and idx == 0:
            # DDP broadcasts buffers from rank 0 before each forward; doing it after the step is equivalent.
            broadcast_flat(self._averaged_step_buffers(), src=0, meter=self.meter)
        synced = not warmup and self._sync_if_due(idx, step)
        self._settle(warmup or (synced and self._sync_reaches_consensus))
        if idx == 0 and self._trainer is not None and logs_this_step(self._trainer):
            self._log_metrics(self.comm_stats)  # Lightning's step and log_every_n_steps cadence, warm-up included
        return output

    def _averaged_step_buffers(self) -> list[Tensor]:
        """The module's buffers, listed once per fit as DDP lists them once: walking the module tree at every
        averaged step cost more than the broadcast for models of many small modules (benchmarks/RESULTS.md)."""
        if self._step_buffers is None:
            self._step_buffers = list(self.lightning_module.buffers())
        return self._step_buffers

    def _sync_if_due(self, idx: int, step: int) -> bool:
        """Run :meth:`_sync` if optimizer ``idx``'s step ``step`` ends a period; whether it did."""
        if self._one_sync_for_all_optimizers and idx != len(self.optimizers) - 1:
            return False
        if not self.clock.scheduled(idx):
            self._schedule_next(idx, step - 1)  # local training starts: its first period
        if not self.clock.due(idx, step):
            return False
        with self.meter.sync():
            self._sync(idx, step)
        self._schedule_next(idx, step)
        return True

    def _schedule_next(self, idx: int, step: int) -> None:
        self.clock.schedule_next(idx, step, self._lr(idx), self._trainer)

    def _settle(self, in_sync: bool) -> None:
        """The one place ``_in_sync`` is written: after every optimizer step, when ``fit`` hands back the consensus
        and on restore. While it is True, evaluation and checkpoints need no consensus collective."""
        self._in_sync = in_sync

    def _before_local_step(self, idx: int, step: int) -> None:
        """Hook before every post-warmup optimizer step (e.g. record the anchor where local training starts)."""

    def _after_inner_step(self, idx: int, step: int, output: Any) -> None:
        """Hook after every optimizer step, before any sync; ``output`` is the closure's loss (automatic
        optimisation) or whatever ``optimizer.step`` returned."""

    def _sync(self, idx: int, step: int) -> None:
        """Synchronise optimizer ``idx``'s parameters (all optimizers' with ``_one_sync_for_all_optimizers``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ consensus weights
    def _fitting(self) -> bool:
        return self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING

    def _swap_in_consensus(self) -> None:
        if self._in_sync or self._stash is not None or self.lightning_module is None:
            return
        tensors = self._module_tensors()
        with self.meter.as_eval():
            consensus = self._consensus()
        self._stash = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            torch._foreach_copy_(tensors, consensus)

    def _swap_back(self) -> None:
        if self._stash is None:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._module_tensors(), self._stash)
        self._stash = None

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._fitting():
            self._swap_in_consensus()

    def on_validation_end(self) -> None:
        self._swap_back()
        super().on_validation_end()

    def on_train_end(self) -> None:
        # `trainer.fit` hands back the consensus model (training is over, so the trajectory is unaffected).
        if not self._in_sync:
            self._swap_in_consensus()
            self._stash = None
            self._settle(True)
        super().on_train_end()

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        if self._in_sync or not self._fitting():
            return state
        names = {id(t): n for n, t in named_tensors(self.lightning_module)}
        with self.meter.as_eval():
            consensus = self._consensus()
        for t, c in zip(self._module_tensors(), consensus):
            name = names.get(id(t))
            if name in state:
                state[name] = c
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Collective on every rank (as ``Trainer.save_checkpoint`` calls it): gathers each rank's local weights
        and optimizer states into the checkpoint that rank 0 writes."""
        ranks = gather_ranks(self.lightning_module, checkpoint, declared_state(self, self._rank_state))
        checkpoint[CKPT_KEY] = {"world_size": self.world, "strategy": self.strategy_state_dict(), "ranks": ranks,
                                "strategy_name": self.strategy_name, "strategy_repr": repr(self)}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except (EOFError, KeyError, pickle.UnpicklingError, RuntimeError) as err:
            raise ValueError(f"not a checkpoint: {checkpoint_path} ({type(err).__name__}: {err})") from err
        module = self.lightning_module
        names = {n for n, _ in module.named_parameters()} if module is not None else set()
        self._restored = saved_run(checkpoint, checkpoint_path, names, self.strategy_name, repr(self))
        entry = self._own_entry(warn=False)
        if entry is not None and entry.get("callbacks") is not None:
            checkpoint["callbacks"] = entry["callbacks"]
        return checkpoint

    def _own_entry(self, warn: bool = True) -> dict[str, Any] | None:
        """This rank's entry of the checkpoint being restored into a fit (``None``: use what Lightning loaded)."""
        if self._restored is None or not self._fitting():
            return None
        return self._restored.entry_for(self.rank, self.world, warn)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        if self._restored is None or not self._fitting():
            return
        saved = self._restored.strategy  # None: written under another strategy (see _checkpoint.saved_run)
        if saved is not None:
            self.load_strategy_state_dict(saved)
        entry = self._own_entry()
        if entry is not None:
            self.lightning_module.load_state_dict(entry["module"], strict=strict)
            load_declared_state(self, self._rank_state, entry.get("strategy_local") or {}, self.root_device)
        # Every rank holds the saved consensus, or its own weights (in sync if they were when saved).
        self._settle(entry is None or (saved is not None and bool(saved["in_sync"])))

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        entry = self._own_entry()
        if entry is not None and entry.get("optimizer_states") is not None:
            checkpoint = {**checkpoint, "optimizer_states": entry["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    def strategy_state_dict(self) -> dict[str, Any]:
        """Counters, schedule, comm meter and the subclass's shared state (identical on every rank)."""
        return {**self.clock.state_dict(), "in_sync": self._in_sync, "meter": self.meter.state_dict(),
                "extra": declared_state(self, self._shared_state)}

    def load_strategy_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.load_state_dict(state)
        self._settle(bool(state["in_sync"]))
        self.meter.load_state_dict(state["meter"])
        load_declared_state(self, self._shared_state, state["extra"], self.root_device)

    # ------------------------------------------------------------------ what the strategy publishes
    @property
    def steps_to_next_sync(self) -> int | str:
        """Optimizer steps (of the first optimizer) until the next synchronisation; ``"warmup"`` during warmup."""
        return self.clock.steps_to_next_sync(self._lr(0) if self.optimizers else 0.0)

    @property
    def comm_stats(self) -> dict[str, float]:
        """Cumulative communication figures (also logged as ``comm/*`` on logging steps)."""
        return {**self.meter.metrics(), "comm/period": float(self.clock.current_period)}

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Log ``metrics`` (rank 0's) at the step Lightning logs this batch at; kept out of ``callback_metrics``,
        which must agree across ranks, while ``comm/sync_seconds`` is each rank's own."""
        if self._trainer is not None:
            log_scalars(self._trainer, metrics, callback_metrics=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(period={self.schedule!r}, warmup_steps={self.warmup_steps})"
