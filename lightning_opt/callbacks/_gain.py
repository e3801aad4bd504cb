"""TimeAverageMonitor's per-step gain: measuring gain_t = L_B(θ_t) − L_B(θ_{t+1}) on the step's batch (thesis
Thm 6.4.1, 6.4.6) with the gradient norm of the step, and their statistics — Cesàro means of the phase, the
batch-means interval over the last window, the gradient-norm levels the plateau test reads (see
:class:`~lightning_opt.callbacks.time_average.TimeAverageMonitor`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_opt.callbacks._probe import RngState, TrajectoryGuard, probe_loss
from lightning_opt.distributed.buckets import is_dist
from lightning_opt.distributed.scalars import all_gather_vector
from lightning_opt.stats.averages import BatchMeansWindow

__all__ = ["GainStatistics", "grad_norm", "measure_gain"]

_NAN3 = (math.nan, math.nan, math.nan)


def grad_norm(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The 2-norm of the (dense) gradients ``optimizer`` is about to use, as a float64 tensor on their device (no
    host sync); None without gradients."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]
             if p.grad is not None and not p.grad.is_sparse]
    if not grads:
        return None
    dev = grads[0].device
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.to(dev, torch.float64) for n in norms]))


def _loss_after(trainer: Any, module: nn.Module, batch: Any, batch_idx: int, rng: RngState | None,
                loss_fn: Callable[[Any, Any], Any] | None) -> Tensor | None:
    """L_B(θ_{t+1}) on the step's batch, replaying the step's randomness (``rng``: the states at its start),
    without touching the trajectory."""
    with TrajectoryGuard(module, grads=False), torch.no_grad():  # under no_grad nothing reaches .grad
        if rng is not None:
            rng.restore()
        loss = probe_loss(trainer, module, batch, batch_idx, loss_fn)
    return None if loss is None else loss.detach().reshape(()).to(torch.float64)


def measure_gain(trainer: Any, module: pl.LightningModule, batch: Any, batch_idx: int, *, before: Tensor | None,
                 rng: RngState | None, step_grad_norm: Tensor | None,
                 loss_fn: Callable[[Any, Any], Any] | None) -> tuple[float, float]:
    """(gain, gradient norm) of this step, each the mean over ranks (NaN where a rank has none): ``before`` is
    L_B(θ_t), the loss the step returned, ``step_grad_norm`` what :func:`grad_norm` read before the step. Every
    rank reaches this on the same step: one all-gather, so every rank takes the same decisions."""
    dev = module.device
    nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
    gain = nan
    if before is not None:
        after = _loss_after(trainer, module, batch, batch_idx, rng, loss_fn)
        if after is not None:
            gain = before.to(dev) - after.to(dev)
    vec = torch.stack([gain, step_grad_norm.to(dev) if step_grad_norm is not None else nan])
    if is_dist():
        vec = all_gather_vector(vec).mean(0)
    g, n = (float(x) for x in vec.tolist())
    return g, n


class GainStatistics:
    """Rank-averaged gain samples and gradient norms.

    ``window`` (``gain_window``) gains feed a :class:`BatchMeansWindow` of ``batches`` batches; the Cesàro sums
    cover the phase (since the last lr change), the gradient norm's ``run`` sums the whole run (never reset).
    """

    def __init__(self, window: int, batches: int) -> None:
        self.batches = batches
        self.window = BatchMeansWindow(window, batches)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.gain_sum, self.gain_n, self.skipped = 0.0, 0, 0
        self.gn_sum, self.gn_n = 0.0, 0
        self.gn_run_sum, self.gn_run_n = 0.0, 0
        #: (mean, lo, hi) of the gain window's batch-means interval after the last sample
        self.last_ci: tuple[float, float, float] = _NAN3

    def add(self, gain: float, grad_norm: float, confidence: float) -> bool:
        """One gain step's (rank-averaged) values; a non-finite gain is dropped (counted in ``skipped``).
        Returns whether the sample was kept."""
        if not math.isfinite(gain):
            self.skipped += 1
            return False
        self.gain_sum += gain
        self.gain_n += 1
        self.window.update(gain)
        if math.isfinite(grad_norm):
            self.gn_sum += grad_norm
            self.gn_n += 1
            self.gn_run_sum += grad_norm
            self.gn_run_n += 1
            self.grad_norms.append(grad_norm)
        self.last_ci = self.window.ci(confidence)
        return True

    def reset_phase(self) -> None:
        self.gain_sum, self.gain_n = 0.0, 0
        self.gn_sum, self.gn_n = 0.0, 0
        self.reset_window()

    def reset_window(self) -> None:
        self.window.reset()
        self.grad_norms.clear()
        self.last_ci = _NAN3

    def grad_norm_levels(self) -> tuple[float, float, float]:
        """Gradient norm averaged over the gain window, over its last batch, and over the whole run."""
        if not self.grad_norms:
            return _NAN3
        vals = list(self.grad_norms)
        m = max(1, len(vals) // self.batches)
        win = math.fsum(vals) / len(vals)
        recent = math.fsum(vals[-m:]) / m
        run = self.gn_run_sum / self.gn_run_n if self.gn_run_n else math.nan
        return win, recent, run

    def statistics(self) -> dict[str, float]:
        mean, lo, hi = self.last_ci
        win, recent, run = self.grad_norm_levels()
        return {
            "mean": self.gain_sum / self.gain_n if self.gain_n else math.nan,
            "window_mean": mean, "lo": lo, "hi": hi,
            "n": float(self.gain_n), "window_n": float(len(self.window)),
            "grad_norm_window": win, "grad_norm_recent": recent,
            "grad_norm_phase": self.gn_sum / self.gn_n if self.gn_n else math.nan,
            "grad_norm_run": run,
        }

    def metrics(self) -> dict[str, float]:
        """The logged gain values that exist: ``time_avg/gain`` and the window's mean and interval."""
        if not self.gain_n:
            return {}
        out = {"time_avg/gain": self.gain_sum / self.gain_n}
        mean, lo, hi = self.last_ci
        if math.isfinite(mean):
            out["window_avg/gain"] = mean
        if math.isfinite(lo) and math.isfinite(hi):
            out["time_avg/gain_lo"] = lo
            out["time_avg/gain_hi"] = hi
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"gain_win": self.window.state_dict(), "gn_win": list(self.grad_norms),
                "gain_sum": self.gain_sum, "gain_n": self.gain_n, "gain_skipped": self.skipped,
                "gn_sum": self.gn_sum, "gn_n": self.gn_n, "gn_run_sum": self.gn_run_sum, "gn_run_n": self.gn_run_n,
                "last_ci": list(self.last_ci)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["gain_win"])
        self.grad_norms = deque((float(v) for v in state["gn_win"]), maxlen=self.grad_norms.maxlen)
        self.gain_sum, self.gain_n = float(state["gain_sum"]), int(state["gain_n"])
        self.skipped = int(state["gain_skipped"])
        self.gn_sum, self.gn_n = float(state["gn_sum"]), int(state["gn_n"])
        self.gn_run_sum, self.gn_run_n = float(state["gn_run_sum"]), int(state["gn_run_n"])
        lo_hi = state["last_ci"]
        self.last_ci = (float(lo_hi[0]), float(lo_hi[1]), float(lo_hi[2]))
