"""TimeAverageMonitor's plateau test (thesis Thm 6.4.1, 6.5.1): the per-step gain has vanished while the gradient
norm stays away from 0; optionally followed by an lr decay (the rule is documented on
:class:`~lightning_opt.callbacks.time_average.TimeAverageMonitor`)."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

from lightning_opt.callbacks._common import current_lr, log_text
from lightning_opt.callbacks._gain import GainStatistics

__all__ = ["PlateauTest"]

# the monitor's module name: where users configured this logger before the test had a file of its own
log = logging.getLogger("lightning_opt.callbacks.time_average")


class PlateauTest:
    """The checks, their counters and the plateaus found (``events``).

    Args:
        mode: ``"off"``, ``"log"`` or ``"decay_lr"`` (with ``"off"`` the monitor never calls :meth:`check`).
        patience, cooldown, gain_tol, grad_tol, decay_factor, min_lr: as on the monitor.
    """

    def __init__(self, mode: str, *, patience: int, cooldown: int, gain_tol: float, grad_tol: float,
                 decay_factor: float, min_lr: float) -> None:
        self.mode = mode
        self.patience, self.cooldown = patience, cooldown
        self.gain_tol, self.grad_tol = gain_tol, grad_tol
        self.decay_factor, self.min_lr = decay_factor, min_lr
        self.consecutive = 0
        self.armed = True  # a plateau is reported once, then only after a negative check
        self.cooldown_left = 0
        self.detected_since_log = False
        self.events: list[dict[str, Any]] = []

    def rearm(self) -> None:
        self.consecutive = 0
        self.armed = True

    def take_detected(self) -> float:
        """``plateau/detected`` for this logging step: 1.0 when a plateau was found since the last one."""
        detected, self.detected_since_log = self.detected_since_log, False
        return 1.0 if detected else 0.0

    def check(self, trainer: pl.Trainer, gain: GainStatistics) -> None:
        """One check, after a gain sample was added (skipped until the gain window is full and during a
        cooldown); on the ``patience``-th consecutive positive check, report the plateau (and decay the lr)."""
        if not gain.window.full:
            return
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return
        mean, lo, hi = gain.last_ci
        band = lo <= self.gain_tol and hi >= -self.gain_tol
        gn_win, gn_recent, gn_run = gain.grad_norm_levels()
        away = gn_win > 0 and gn_recent >= self.grad_tol * gn_win and gn_win >= self.grad_tol * gn_run
        if not (band and away):
            self.rearm()
            return
        self.consecutive += 1
        if self.consecutive < self.patience or not self.armed:
            return
        self.armed = False
        self.detected_since_log = True
        lr_before = lr_after = current_lr(trainer)
        if self.mode == "decay_lr" and lr_before > self.min_lr:
            self._decay_lr(trainer)
            lr_after = current_lr(trainer)
            # the gain statistics restart now; the Cesàro averages restart at the next batch if
            # reset_on_lr_change (on_train_batch_start sees the new lr)
            gain.reset_window()
            self.rearm()
            self.cooldown_left = self.cooldown
        event = {"step": int(trainer.global_step), "gain_mean": mean, "gain_lo": lo, "gain_hi": hi,
                 "grad_norm_window": gn_win, "grad_norm_recent": gn_recent, "grad_norm_run": gn_run,
                 "lr_before": lr_before, "lr_after": lr_after}
        self.events.append(event)
        self._report(trainer, event)

    def _report(self, trainer: pl.Trainer, e: dict[str, Any]) -> None:
        msg = (f"plateau at step {e['step']}: gain CI [{e['gain_lo']:.4g}, {e['gain_hi']:.4g}] (mean "
               f"{e['gain_mean']:.4g}) meets [-{self.gain_tol:.3g}, {self.gain_tol:.3g}] while the gradient norm "
               f"stays away from 0 (window {e['grad_norm_window']:.4g}, last batch {e['grad_norm_recent']:.4g}, "
               f"run average {e['grad_norm_run']:.4g}); lr {e['lr_before']:.4g} -> {e['lr_after']:.4g}")
        if trainer.is_global_zero:
            log.info(msg)
            log_text(trainer, "plateau/event", msg, trainer.global_step)

    def _decay_lr(self, trainer: pl.Trainer) -> None:
        """lr ← max(lr · decay_factor, min_lr) in every param group, and the same for schedulers' base_lrs."""
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = max(float(group["lr"]) * self.decay_factor, self.min_lr)
        for cfg in trainer.lr_scheduler_configs:
            base = getattr(cfg.scheduler, "base_lrs", None)
            if isinstance(base, list):
                cfg.scheduler.base_lrs = [max(float(b) * self.decay_factor, self.min_lr) for b in base]

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "armed": self.armed, "cooldown_left": self.cooldown_left,
                "detected_since_log": self.detected_since_log, "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.armed = bool(state["armed"])
        self.cooldown_left = int(state["cooldown_left"])
        self.detected_since_log = bool(state["detected_since_log"])
        self.events = [dict(e) for e in state["events"]]
