"""Helpers shared by the monitoring callbacks: argument validation, rank-zero logging, state snapshots."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from lightning_opt._trainer_steps import log_scalars  # noqa: F401  (re-exported for the callbacks)

# ----------------------------------------------------------------------------------------------- validation


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int in [minimum, maximum], else raise ValueError naming argument and
    range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
        maximum is not None and value > maximum
    ):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected an int {rng}")
    return value


def check_optional_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected None or an int >= {minimum}")
    return value


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` if it lies in the interval (brackets per ``*_open``), else raise ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        rng = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected a number in {rng}")
    return float(value)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not accepted; expected one of {choices}")
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name}={value!r} is not accepted; expected True or False")
    return value


# -------------------------------------------------------------------------------------------------- logging


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """SummaryWriters of the TensorBoard loggers among ``trainer.loggers`` on global rank 0 (empty
    elsewhere)."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> bool:
    """``add_histogram`` on every TensorBoard logger (rank 0). Returns whether anything was written."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return False
    data = values.detach().double().cpu()
    data = data[torch.isfinite(data)]
    if data.numel() == 0:
        return False
    for w in writers:
        w.add_histogram(tag, data.numpy(), global_step=step)
    return True


# ------------------------------------------------------------------------------------------ state snapshots


@dataclass
class _Snapshot:
    torch_rng: Tensor
    cuda_rng: list[Tensor] | None
    python_rng: object
    numpy_rng: object | None
    buffers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    modes: list[tuple[torch.nn.Module, bool]] = field(default_factory=list)
    grads: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    metrics: list[tuple[torch.nn.Module, dict[str, Any]]] = field(default_factory=list)


_METRIC_ATTRS = ("_update_count", "_computed", "_forward_cache")


def _metric_state(m: torch.nn.Module) -> dict[str, Any] | None:
    """Copy of a torchmetrics ``Metric``'s accumulators (they are attributes, not buffers), else None."""
    defaults = getattr(m, "_defaults", None)
    if not isinstance(defaults, dict):
        return None
    state = {name: copy.deepcopy(getattr(m, name)) for name in defaults}
    state.update({a: copy.deepcopy(getattr(m, a)) for a in _METRIC_ATTRS if hasattr(m, a)})
    return state


class TrajectoryGuard:
    """Context manager that makes a side computation invisible to training.

    On entry it records the torch CPU and CUDA RNG states, Python's and NumPy's RNG states (data transforms
    may draw from them), a copy of every buffer of ``module`` (BatchNorm running statistics,
    ``num_batches_tracked``, …), every submodule's ``training`` flag, a copy of every existing ``.grad`` and
    the accumulators of every torchmetrics ``Metric`` submodule (a ``training_step`` that updates a metric
    would otherwise count probe batches); on exit it restores all of them exactly. Other attributes a
    ``training_step`` may set are not tracked. Copying the buffers (rather than, e.g., setting BatchNorm
    momentum to 0) also covers cumulative-average BatchNorm and any custom module that updates buffers in
    ``forward``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._snap: _Snapshot | None = None

    def __enter__(self) -> TrajectoryGuard:
        cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda = torch.cuda.get_rng_state_all() if cuda_on else None
        try:
            import numpy as np

            np_state = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy ships with torch wheels
            np_state = None
        self._snap = _Snapshot(
            torch_rng=torch.get_rng_state(),
            cuda_rng=cuda,
            python_rng=random.getstate(),
            numpy_rng=np_state,
            buffers=[(b, b.detach().clone()) for b in self.module.buffers()],
            modes=[(m, m.training) for m in self.module.modules()],
            grads=[(p, None if p.grad is None else p.grad.detach().clone())
                   for p in self.module.parameters()],
        )
        for m in self.module.modules():
            st = _metric_state(m)
            if st is not None:
                self._snap.metrics.append((m, st))
        return self

    def __exit__(self, *exc: object) -> None:
        s = self._snap
        assert s is not None
        with torch.no_grad():
            for b, saved in s.buffers:
                b.copy_(saved)
            for p, g in s.grads:
                if g is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
        for m, mode in s.modes:
            m.training = mode
        for m, st in s.metrics:
            for name, value in st.items():
                object.__setattr__(m, name, value)
        torch.set_rng_state(s.torch_rng)
        if s.cuda_rng is not None:
            torch.cuda.set_rng_state_all(s.cuda_rng)
        random.setstate(s.python_rng)
        if s.numpy_rng is not None:
            import numpy as np

            np.random.set_state(s.numpy_rng)
        self._snap = None
