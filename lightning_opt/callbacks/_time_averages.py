"""TimeAverageMonitor's time averages of the tracked metrics: the Cesàro average μ_k(φ) of thesis eq. (6.3)–(6.4)
and the window average of Lemma 6.4.2, read from what the monitors and the module publish (the rules are
documented on :class:`~lightning_opt.callbacks.time_average.TimeAverageMonitor`)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_opt.callbacks._probe import step_loss
from lightning_opt.distributed.buckets import is_dist
from lightning_opt.distributed.scalars import all_gather_vector
from lightning_opt.stats.averages import CesaroAverage, WindowedAverage

__all__ = ["MetricAverages", "returned_loss"]


def returned_loss(trainer: pl.Trainer, outputs: Any) -> Tensor | None:
    """The loss of the batch as ``training_step`` computed it (float64, on its device), from what it returned."""
    loss = step_loss(outputs)
    if loss is None:
        return None
    # automatic optimisation divides the returned loss by accumulate_grad_batches
    return loss.detach().reshape(()).to(torch.float64) * trainer.accumulate_grad_batches


class MetricAverages:
    """Cesàro and ``window`` averages of the metrics ``names``, one float64 vector updated on the device per
    optimizer step (no host sync); ``loss_key`` falls back to the loss ``training_step`` returned."""

    def __init__(self, names: tuple[str, ...], loss_key: str, window: int) -> None:
        self.names, self.loss_key = names, loss_key
        self.cesaro = CesaroAverage(len(names))
        self.window = WindowedAverage(window, len(names))
        self._nan = torch.full((), math.nan, dtype=torch.float64)

    def to(self, device: torch.device) -> None:
        if self.cesaro.device != device:
            self.cesaro.to(device)
            self.window.to(device)

    def reset(self) -> None:
        self.cesaro.reset()
        self.window.reset()

    def update(self, trainer: pl.Trainer, outputs: Any) -> None:
        values = self._latest(trainer, outputs)
        self.cesaro.update(values)
        self.window.update(values)

    def _latest(self, trainer: pl.Trainer, outputs: Any) -> Tensor:
        """The latest value of every tracked metric as one float64 vector on the device (NaN = absent)."""
        cm = trainer.callback_metrics
        dev, dtype = self.cesaro.device, self.cesaro.dtype
        if self._nan.device != dev:
            self._nan = self._nan.to(dev)
        vals: list[Tensor] = []
        for name in self.names:
            v = cm.get(name)
            if v is None:
                v = cm.get(f"{name}_step")
            if v is None and name == self.loss_key:
                v = returned_loss(trainer, outputs)
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.detach().reshape(())
                vals.append(v if v.device == dev and v.dtype == dtype else v.to(dev, dtype))
            elif isinstance(v, int | float) and not isinstance(v, bool):
                vals.append(torch.tensor(float(v), dtype=dtype, device=dev))
            else:
                vals.append(self._nan)
        if not vals:
            return torch.zeros(0, dtype=dtype, device=dev)
        return torch.stack(vals)

    def local(self, which: str) -> dict[str, float]:
        """This rank's ``"cesaro"`` or ``"window"`` averages of the metrics seen (host sync)."""
        acc = self.cesaro if which == "cesaro" else self.window
        pairs = zip(self.names, acc.mean().tolist(), strict=True)
        return {n: v for n, v in pairs if math.isfinite(v)}

    def metrics(self) -> dict[str, float]:
        """``time_avg/<name>`` and ``window_avg/<name>`` averaged over ranks (NaN-aware; one all-gather), the
        absent ones left out."""
        vals = torch.cat([self.cesaro.mean(), self.window.mean()])
        if is_dist():
            vals = torch.nanmean(all_gather_vector(vals), dim=0)
        host = vals.tolist()
        m = len(self.names)
        out: dict[str, float] = {}
        for i, name in enumerate(self.names):
            if math.isfinite(host[i]):
                out[f"time_avg/{name}"] = host[i]
            if math.isfinite(host[m + i]):
                out[f"window_avg/{name}"] = host[m + i]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"avg": self.cesaro.state_dict(), "win": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cesaro.load_state_dict(state["avg"])
        self.window.load_state_dict(state["win"])
