"""The periodic-synchronisation base that Local SGD, LSGD and Lookahead share.

It is a :class:`~pytorch_lightning.strategies.DDPStrategy` that never wraps the module in
``DistributedDataParallel``: gradients stay local, except during ``warmup_steps`` where they are averaged every
step (DDP-equivalent). After optimizer step ``warmup + τ``, ``warmup + τ + τ'``, … (1-based, one counter per
optimizer) it calls the subclass's :meth:`_sync`. The base also provides

* flat-bucket averaging with a non-finite policy (``nonfinite="raise" | "drop"``) and byte accounting; on the
  steps that average gradients the buckets are all-reduced while backward runs
  (:class:`~lightning_opt.distributed.overlap.OverlappedGradSum`),
* evaluation, ``trainer.fit``'s final weights and checkpoints on the *consensus* weights (subclass-defined)
  without touching the training trajectory,
* exact resume: the strategy's own state plus every rank's local weights and optimizer states travel in the
  checkpoint (gathered to rank 0 on save; each rank picks its own entry on load).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt._ownership import RankLocal
from lightning_opt._trainer_steps import logging_step, logs_this_step
from lightning_opt._validation import as_timeout, check_bool, check_choice, check_float, check_int
from lightning_opt.distributed import (
    CommMeter,
    all_reduce_flat,
    broadcast_flat,
    is_dist,
    nbytes,
    write_back,
)
from lightning_opt.distributed.buffers import BufferRules
from lightning_opt.distributed.lifecycle import die_with_parent, release_at_exit
from lightning_opt.distributed.overlap import OverlappedGradSum
from lightning_opt.strategies.errors import NonFiniteError
from lightning_opt.strategies.schedules import PeriodSchedule, as_schedule

_CKPT_KEY = "lightning_opt"
#: Collective timeout (seconds) unless given: long enough for a sync of a large model over a slow link, short
#: enough that a dead or stuck rank reads as an error ("Timed out waiting 600000ms ...") rather than a hang.
DEFAULT_TIMEOUT = 600.0


#: What Lightning's launcher writes into the main process's environment.
_LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


class PeriodicSyncStrategy(RankLocal, DDPStrategy):
    """Base class; see the module docstring. Subclasses implement :meth:`_sync` and may override
    :meth:`_consensus`, :meth:`_extra_state_dict` and :meth:`_load_extra_state_dict`."""

    #: True for strategies whose inner steps are DDP steps (Lookahead ``mode="sync"``): gradients are averaged
    #: after every backward, not only during warmup.
    average_gradients_every_step: bool = False

    def __init__(
        self,
        period: int | PeriodSchedule = 1,
        warmup_steps: int = 0,
        average_buffers: bool = True,
        nonfinite: str = "raise",
        bucket_cap_mb: float = 25.0,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
    ) -> None:
        self.schedule = as_schedule(period)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.average_buffers = check_bool("average_buffers", average_buffers)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("raise", "drop"))
        self.bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0.0, 1e6, low_open=True)
        check_choice("start_method", start_method, ("popen", "spawn", "fork", "forkserver"))
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=as_timeout(timeout),
            start_method=start_method,
        )
        self.meter = CommMeter()
        self._steps: dict[int, int] = {}
        self._next_sync: dict[int, int] = {}
        self._period_now: dict[int, int] = {}
        self._in_sync = True
        self._restored: dict[str, Any] | None = None
        self._stash: list[Tensor] | None = None
        self._grad_sums: dict[int, OverlappedGradSum] = {}
        self._buffer_rules = BufferRules()
        self._env_before_launch: dict[str, str | None] = {}  # the launch variables as they were (see teardown)
        self._owns_group = False

    # ------------------------------------------------------------------ setup
    def _configure_launcher(self) -> None:
        self._env_before_launch = {k: os.environ.get(k) for k in _LAUNCH_VARIABLES}
        super()._configure_launcher()

    def setup_environment(self) -> None:
        fresh = not (dist.is_available() and dist.is_initialized())
        super().setup_environment()
        # A one-process fit leaves its group and the launcher's LOCAL_RANK / NODE_RANK / MASTER_* / OMP_NUM_THREADS
        # behind. A later two-process fit in the same script would then take the process for an externally launched
        # rank and start no other rank, or fork ranks that hang in OpenMP: both are undone at teardown.
        self._owns_group = fresh and self.world_size == 1 and dist.is_initialized()
        release_at_exit()  # gloo groups alive at interpreter exit can abort the process (see lifecycle.py)
        started_by_lightning = (multiprocessing.parent_process() is not None  # spawn / fork: every rank
                                or (self.local_rank > 0  # popen: local rank 0 re-ran the script for this rank
                                    and type(self.cluster_environment).__name__ == "LightningEnvironment"))
        if started_by_lightning:
            die_with_parent()  # end with the process that launched this rank: never an orphan

    def configure_ddp(self) -> None:
        """No DDP wrapper (so no per-step gradient all-reduce); start every rank from rank 0's weights."""
        self._check_supported()
        if is_dist():
            broadcast_flat(self._module_tensors(), src=0, cap_mb=self.bucket_cap_mb)
        self._buffer_rules.reset(self.lightning_module)

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

    def teardown(self) -> None:
        for summer in self._grad_sums.values():
            summer.remove()
        self._grad_sums.clear()
        super().teardown()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
            for key, value in self._env_before_launch.items():
                if value is None:
                    os.environ.pop(key, None)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Restore after `configure_ddp`'s broadcast, so each rank's local weights survive a resume.
        return True

    # ------------------------------------------------------------------ tensors
    def _module_tensors(self) -> list[Tensor]:
        module = self.lightning_module
        return list(module.parameters()) + list(module.buffers())

    def _buffers_to_sync(self) -> list[Tensor]:
        """Persistent buffers that differ between ranks (a collective; see ``distributed/buffers.py``)."""
        return self._buffer_rules.to_sync(self.lightning_module)

    def _opt_index(self, optimizer: Optimizer) -> int:
        for i, opt in enumerate(self.optimizers):
            if opt is optimizer or getattr(opt, "_optimizer", None) is optimizer:
                return i
        return 0

    def _opt_params(self, idx: int) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for group in self.optimizers[idx].param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _lr(self, idx: int) -> float:
        return float(self.optimizers[idx].param_groups[0]["lr"])

    @property
    def world(self) -> int:
        return dist.get_world_size() if is_dist() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if is_dist() else 0

    # ------------------------------------------------------------------ step counting
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Any = None,
        **kwargs: Any,
    ) -> Any:
        idx = self._opt_index(optimizer)
        step = self._steps.get(idx, 0) + 1
        in_warmup = step <= self.warmup_steps
        ddp_like = in_warmup or self.average_gradients_every_step
        if not in_warmup:
            self._before_local_step(idx, step)
        if ddp_like and is_dist():
            closure = self._averaging_closure(closure, idx, step)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._steps[idx] = step
        self._after_inner_step(idx, step, output)
        self.meter.extra["ddp_bytes"] = self.meter.extra.get("ddp_bytes", 0) + nbytes(
            [p for p in self._opt_params(idx) if p.requires_grad])
        if ddp_like and is_dist() and idx == 0:
            # DDP broadcasts buffers from rank 0 before each forward; doing it after the step is equivalent.
            broadcast_flat(list(self.lightning_module.buffers()), src=0, meter=self.meter)
        if in_warmup:
            self._in_sync = True
            if idx == 0:
                self._maybe_log()
            return output
        self._in_sync = False
        if self._has_own_sync(idx):
            if idx not in self._next_sync:
                self._schedule_next(idx, step - 1)
            if step == self._next_sync[idx]:
                start = time.perf_counter()
                self._sync(idx, step)
                self.meter.syncs += 1
                self.meter.extra["sync_seconds"] = self.meter.extra.get("sync_seconds", 0.0) + (
                    time.perf_counter() - start)
                self._in_sync = self._weights_are_consensus_after_sync()
                self._schedule_next(idx, step)
        if idx == 0:
            self._maybe_log()
        return output

    def _schedule_next(self, idx: int, step: int) -> None:
        trainer = getattr(self.lightning_module, "_trainer", None)
        period = int(self.schedule.next_period(step, self._lr(idx), trainer))
        if period < 1:
            raise ValueError(f"period schedule {self.schedule!r} returned period {period} < 1")
        self._period_now[idx] = period
        self._next_sync[idx] = step + period

    def _after_inner_step(self, idx: int, step: int, output: Any) -> None:
        """Hook after every optimizer step, before any sync; ``output`` is the closure's loss (automatic
        optimisation) or whatever ``optimizer.step`` returned."""

    def _before_local_step(self, idx: int, step: int) -> None:
        """Hook before a post-warmup optimizer step (e.g. record the anchor where local training starts)."""

    def _sync(self, idx: int, step: int) -> None:
        raise NotImplementedError

    def _has_own_sync(self, idx: int) -> bool:
        """Whether optimizer ``idx`` syncs on its own schedule (default: every optimizer does, for its own
        parameters). Strategies whose sync must see all parameters at once (LSGD: one leader for the whole x)
        sync on one optimizer's schedule only (LSGD: the last optimizer's)."""
        return True

    def _weights_are_consensus_after_sync(self) -> bool:
        """Whether every rank's module holds the consensus weights right after a sync (averaging strategies:
        yes; pull-based ones like LSGD with λ < 1: no, so evaluation must still build the consensus)."""
        return True

    # ------------------------------------------------------------------ warmup gradient averaging
    def _averaging_closure(self, closure: Callable[[], Any], idx: int, step: int) -> Callable[[], Any]:
        summer = self._grad_sum(idx)

        def wrapped() -> Any:
            summer.arm()  # buckets are all-reduced while backward runs (see distributed/overlap.py)
            try:
                out = closure()
            except BaseException:
                summer.finish()  # every rank issued the same collectives: complete them before raising
                raise
            self._average_grads(idx, step, summer)
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

    def _average_grads(self, idx: int, step: int, summer: OverlappedGradSum) -> None:
        params = summer.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        good, buckets, counts = self._reduce_with_flags(grads, "gradients", step, payload=has_grad, summed=summer)
        write_back(buckets, grads, 1.0 / good)
        for p, g, c in zip(params, grads, counts.tolist()):
            if p.grad is None and c > 0:
                p.grad = g

    # ------------------------------------------------------------------ averaging with the non-finite policy
    def _reduce_with_flags(
        self, tensors: list[Tensor], what: str, step: int, payload: Tensor | None = None,
        summed: OverlappedGradSum | None = None,
    ) -> tuple[int, list, Tensor]:
        """Sum ``tensors`` over ranks in flat buckets (not written back) with one extra tiny all-reduce carrying
        the per-rank non-finite flags (and an optional ``payload`` vector, summed). Applies the policy: ``raise``
        raises :class:`NonFiniteError` on every rank naming the ranks and step; ``drop`` excludes those ranks'
        contributions. ``summed``: the sums were already launched during backward (``tensors`` are its
        parameters' gradients); they are redone here only if some rank must be excluded or a gradient changed
        after its bucket left. Returns (number of contributing ranks, buckets, summed payload)."""
        device = tensors[0].device
        local_bad = self._buffer_rules.corrupt(tensors)
        contribute = not (local_bad and self.nonfinite == "drop")
        src = tensors if contribute else [torch.zeros_like(t) for t in tensors]
        buckets = summed.finish() if summed is not None else all_reduce_flat(src, meter=self.meter,
                                                                             cap_mb=self.bucket_cap_mb)
        flags = torch.zeros(self.world + 1 + (0 if payload is None else payload.numel()), device=device)
        flags[self.rank] = float(local_bad)
        flags[self.world] = float(summed is not None and summed.late)
        if payload is not None:
            flags[self.world + 1:] = payload
        dist.all_reduce(flags)
        self.meter.add(flags.numel() * flags.element_size(), 0.0)
        bad = [int(r) for r in torch.nonzero(flags[: self.world]).flatten().tolist()]
        if summed is not None and ((bad and self.nonfinite == "drop") or flags[self.world] > 0):
            buckets = all_reduce_flat(src, meter=self.meter, cap_mb=self.bucket_cap_mb)
        if bad and self.nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {what} on rank(s) {bad} at optimizer step {step}; refusing to average them into "
                "every rank. Pass nonfinite='drop' to exclude such ranks and reset them to the consensus."
            )
        good = self.world - len(bad)
        if good == 0:
            raise NonFiniteError(f"non-finite {what} on every rank at optimizer step {step}")
        if local_bad and what == "gradients":
            # Only the gradient is replaced (by the healthy ranks' average): weights and optimizer state stay
            # identical to the other ranks', so nothing else needs resetting.
            warnings.warn(f"rank {self.rank}: non-finite {what} at optimizer step {step}; excluded from the "
                          "average (this rank steps with the healthy ranks' mean gradient)", stacklevel=2)
        elif local_bad:
            warnings.warn(f"rank {self.rank}: non-finite {what} at optimizer step {step}; excluded from the "
                          "average and reset to the consensus (its optimizer state is cleared)", stacklevel=2)
            self._on_dropped()
        return good, buckets, flags[self.world + 1:]

    def _on_dropped(self) -> None:
        for opt in self.optimizers:
            opt.state.clear()

    def _world_mean(self, tensors: list[Tensor], what: str, step: int) -> list[Tensor]:
        """Mean over ranks of ``tensors`` (new tensors; inputs untouched), with the non-finite policy."""
        out = [torch.empty_like(t, dtype=_mean_dtype(t.dtype)) for t in tensors]
        if not is_dist():
            for o, t in zip(out, tensors):
                o.copy_(t)
            return out
        good, buckets, _ = self._reduce_with_flags(tensors, what, step)
        write_back(buckets, out, 1.0 / good)
        return out

    def _average_buffers_now(self, step: int) -> None:
        """Float buffers that differ between ranks averaged (if ``average_buffers``), integer ones taken from rank 0;
        buffers identical on every rank (masks, tables, counters) are left alone."""
        if not is_dist():
            return
        buffers = self._buffers_to_sync()
        floats = [b for b in buffers if b.is_floating_point()] if self.average_buffers else []
        if floats:
            means = self._world_mean(floats, "buffers", step)
            torch._foreach_copy_(floats, means)
        ints = [b for b in buffers if not b.is_floating_point()]
        if ints:
            broadcast_flat(ints, src=0, meter=self.meter)

    # ------------------------------------------------------------------ consensus weights
    def _consensus(self) -> list[Tensor]:
        """Consensus values for ``_module_tensors()`` (default: the world average; a collective)."""
        tensors = self._module_tensors()
        averaged = self._consensus_ids()
        floats = [t for t in tensors if t.is_floating_point() and id(t) in averaged]
        means = iter(self._world_mean(floats, "weights", self._steps.get(0, 0)) if floats else [])
        return [next(means).to(t.dtype) if t.is_floating_point() and id(t) in averaged else t.detach().clone()
                for t in tensors]

    def _consensus_ids(self) -> set[int]:
        """Tensors the consensus averages (a collective): parameters and the persistent buffers that differ between
        ranks; the others are identical on every rank or derived (see ``distributed/buffers.py``)."""
        return {id(p) for p in self.lightning_module.parameters()} | {id(b) for b in self._buffers_to_sync()}

    @contextmanager
    def _eval_accounting(self) -> Iterator[None]:
        """Bytes moved to build consensus weights for evaluation / checkpoints are not training communication:
        book them under ``comm/eval_bytes`` so ``comm/bytes`` compares with DDP's gradient traffic."""
        bytes_before, calls_before, seconds_before = self.meter.bytes, self.meter.calls, self.meter.seconds
        try:
            yield
        finally:
            self.meter.extra["eval_bytes"] = self.meter.extra.get("eval_bytes", 0) + self.meter.bytes - bytes_before
            self.meter.bytes, self.meter.calls, self.meter.seconds = bytes_before, calls_before, seconds_before

    def _fitting(self) -> bool:
        trainer = getattr(self.lightning_module, "_trainer", None)
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING

    def _swap_in_consensus(self) -> None:
        if self._in_sync or self._stash is not None or self.lightning_module is None:
            return
        tensors = self._module_tensors()
        with self._eval_accounting():
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
            self._in_sync = True
        super().on_train_end()

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        if self._in_sync or not self._fitting():
            return state
        names = {id(t): n for n, t in _named_tensors(self.lightning_module)}
        with self._eval_accounting():
            consensus = self._consensus()
        for t, c in zip(self._module_tensors(), consensus):
            name = names.get(id(t))
            if name in state:
                state[name] = c
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Collective on every rank (as ``Trainer.save_checkpoint`` calls it): gathers each rank's local weights
        and optimizer states into the checkpoint that rank 0 writes."""
        local = {
            "module": {n: t.detach().cpu().clone() for n, t in _named_tensors(self.lightning_module)},
            "optimizer_states": _to_cpu(checkpoint.get("optimizer_states")),
            "strategy_local": _to_cpu(self._local_state_dict()),
            # Lightning saves rank 0's callback states only; per-rank accumulators (e.g. each rank's own loss
            # averages) would otherwise restart from rank 0's values on the other ranks.
            "callbacks": _to_cpu(checkpoint.get("callbacks")),
        }
        if is_dist():
            ranks: list[Any] = [None] * self.world
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        checkpoint[_CKPT_KEY] = {"world_size": self.world, "strategy": self.strategy_state_dict(), "ranks": ranks,
                                 "strategy_name": self.strategy_name, "strategy_repr": repr(self)}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except (EOFError, KeyError, pickle.UnpicklingError, RuntimeError) as err:
            raise ValueError(f"not a checkpoint: {checkpoint_path} ({type(err).__name__}: {err})") from err
        self._restored = _restored_entry(checkpoint, checkpoint_path, self)
        entry = self._local_entry(warn=False)
        if entry is not None and entry.get("callbacks") is not None:
            checkpoint["callbacks"] = entry["callbacks"]
        return checkpoint

    def _local_entry(self, warn: bool = True) -> dict[str, Any] | None:
        saved = self._restored
        if saved is None or not self._fitting():
            return None
        if saved["world_size"] != self.world:
            if not warn:
                return None
            warnings.warn(
                f"checkpoint was written with world size {saved['world_size']}, resuming with {self.world}: every "
                "rank restarts from the consensus weights and rank 0's optimizer state", stacklevel=2)
            return None
        return saved["ranks"][self.rank]

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        if self._restored is None or not self._fitting():
            return
        if self._restored["strategy"] is not None:  # None: written under another strategy (see _restored_entry)
            self.load_strategy_state_dict(self._restored["strategy"])
        else:
            self._in_sync = False  # the ranks' weights may differ: evaluation builds the consensus
        entry = self._local_entry()
        if entry is not None:
            self.lightning_module.load_state_dict(entry["module"], strict=strict)
            self._load_local_state_dict(entry.get("strategy_local") or {})
        else:
            self._in_sync = True

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        entry = self._local_entry()
        if entry is not None and entry.get("optimizer_states") is not None:
            checkpoint = {**checkpoint, "optimizer_states": entry["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    def strategy_state_dict(self) -> dict[str, Any]:
        """Counters, schedule, comm meter and the subclass's extra state (identical on every rank)."""
        return {
            "steps": dict(self._steps),
            "next_sync": dict(self._next_sync),
            "period_now": dict(self._period_now),
            "in_sync": self._in_sync,
            "schedule": self.schedule.state_dict(),
            "meter": self.meter.state_dict(),
            "extra": self._extra_state_dict(),
        }

    def load_strategy_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = {int(k): int(v) for k, v in state["steps"].items()}
        self._next_sync = {int(k): int(v) for k, v in state["next_sync"].items()}
        self._period_now = {int(k): int(v) for k, v in state["period_now"].items()}
        self._in_sync = bool(state["in_sync"])
        self.schedule.load_state_dict(state["schedule"])
        self.meter.load_state_dict(state["meter"])
        self._load_extra_state_dict(state["extra"])

    def _extra_state_dict(self) -> dict[str, Any]:
        """Strategy state that is identical on every rank (saved once)."""
        return {}

    def _local_state_dict(self) -> dict[str, Any]:
        """Strategy state that differs per rank (saved for every rank, e.g. LSGD's score windows)."""
        return {}

    def _load_local_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _load_extra_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ logging
    @property
    def steps_to_next_sync(self) -> int | str:
        """Optimizer steps (of the first optimizer) until the next synchronisation; ``"warmup"`` during warmup."""
        step = self._steps.get(0, 0)
        if step < self.warmup_steps:
            return "warmup"
        if 0 not in self._next_sync:
            return self.schedule.next_period(step, self._lr(0) if self.optimizers else 0.0, None)
        return self._next_sync[0] - step

    @property
    def comm_stats(self) -> dict[str, float]:
        """Cumulative communication figures (also logged as ``comm/*`` on logging steps)."""
        return {
            "comm/bytes": float(self.meter.bytes),
            "comm/syncs": float(self.meter.syncs),
            "comm/sync_seconds": float(self.meter.extra.get("sync_seconds", 0.0)),
            "comm/ddp_bytes": float(self.meter.extra.get("ddp_bytes", 0.0)),
            "comm/eval_bytes": float(self.meter.extra.get("eval_bytes", 0.0)),
            "comm/period": float(self._period_now.get(0, next(iter(self._period_now.values()), 0))),
        }

    def _maybe_log(self) -> None:
        """``comm/*`` at Lightning's step and ``log_every_n_steps`` cadence (warm-up included)."""
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None and logs_this_step(trainer):
            self._log_metrics(self.comm_stats)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Write ``metrics`` to every logger (global rank 0) at the step Lightning logs this batch at."""
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is None or not trainer.loggers or not self.is_global_zero:
            return
        step = logging_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(period={self.schedule!r}, warmup_steps={self.warmup_steps})"


def _restored_entry(checkpoint: dict[str, Any], path: Any, strategy: PeriodicSyncStrategy) -> dict[str, Any] | None:
    """Our checkpoint entry, checked: non-finite parameters anywhere in the file are refused (every rank checks
    every entry, so all ranks refuse together); a file from another strategy, or with no entry, resumes with a
    warning saying what is reused and what starts afresh."""
    names = {n for n, _ in strategy.lightning_module.named_parameters()} if strategy.lightning_module else set()
    saved = checkpoint.get(_CKPT_KEY)
    tables = [("the saved weights", checkpoint.get("state_dict") or {})]
    tables += [(f"rank {r}'s weights", e["module"]) for r, e in enumerate((saved or {}).get("ranks") or [])
               if isinstance(e, dict) and isinstance(e.get("module"), dict)]
    for where, table in tables:
        bad = [n for n in sorted(names & set(table)) if isinstance(table[n], Tensor)
               and table[n].is_floating_point() and not bool(torch.isfinite(table[n]).all())]
        if bad:
            raise ValueError(f"{path}: non-finite values in {where} ({', '.join(bad[:4])}"
                             f"{', ...' if len(bad) > 4 else ''}); the file is damaged, refusing to resume from it")
    if saved is None:
        warnings.warn(f"{path} has no lightning_opt entry (written by another strategy, e.g. plain DDP): every rank "
                      "starts from the saved weights, and the sync schedule, counters and outer state start afresh",
                      stacklevel=3)
        return None
    name = saved.get("strategy_name", strategy.strategy_name)
    if name != strategy.strategy_name:
        dropped = ", ".join(sorted((saved.get("strategy") or {}).get("extra") or {})) or "none"
        warnings.warn(f"{path} was written under {saved.get('strategy_repr', name)}; resuming under {strategy!r}: "
                      f"its strategy state is dropped (sync counters, schedule, extra state: {dropped}) and the "
                      "schedule starts afresh; every rank's weights and optimizer state are reused", stacklevel=3)
        return {**saved, "strategy": None}
    return saved


def _mean_dtype(dtype: torch.dtype) -> torch.dtype:
    """Means of half-precision tensors are kept in fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
