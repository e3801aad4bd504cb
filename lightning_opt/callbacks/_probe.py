"""Running a probe without touching training state: the one mechanism behind every monitor's extra passes.

A *probe* is a computation a monitor runs through the training module besides the training step itself
(GradientNoiseMonitor's M gradients, SharpnessMonitor's Hessian-vector products, TimeAverageMonitor's loss
re-evaluation). :class:`TrajectoryGuard` records everything such passes can change and puts it back, so a run with
monitors follows the trajectory of the run without them bit for bit.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RngState", "TrajectoryGuard", "probe_loss", "step_loss"]

_LOG_METHODS = ("log", "log_dict")
#: torchmetrics ``Metric`` bookkeeping besides the registered states (``_defaults``)
_METRIC_ATTRS = ("_update_count", "_computed", "_forward_cache")


@dataclass
class RngState:
    """The generators a ``training_step`` or a data transform may draw from: torch's CPU generator, every CUDA
    device's (when CUDA is initialised), Python's ``random`` and NumPy's global one (when NumPy is imported)."""

    torch_cpu: Tensor
    cuda: list[Tensor] | None
    python: object
    numpy: object | None

    @classmethod
    def capture(cls) -> RngState:
        cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
        np = sys.modules.get("numpy")  # never imported: nothing can have drawn from it
        return cls(torch_cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if cuda_on else None,
                   python=random.getstate(), numpy=None if np is None else np.random.get_state())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _metric_state(m: nn.Module) -> dict[str, Any] | None:
    """Copy of a torchmetrics ``Metric``'s accumulators (they are attributes, not buffers), else None."""
    defaults = getattr(m, "_defaults", None)
    if not isinstance(defaults, dict):
        return None
    state = {name: copy.deepcopy(getattr(m, name)) for name in defaults}
    state.update({a: copy.deepcopy(getattr(m, a)) for a in _METRIC_ATTRS if hasattr(m, a)})
    return state


class TrajectoryGuard:
    """Context manager that makes a probe through ``module`` invisible to training.

    On entry it records the RNG states (:class:`RngState`; data transforms may draw from them too), a copy of every
    buffer of ``module`` (BatchNorm running statistics, ``num_batches_tracked``, …), every submodule's
    ``training`` flag, a copy of every existing ``.grad`` (``grads=True``) and the accumulators of every
    torchmetrics ``Metric`` submodule (a ``training_step`` that updates a metric would otherwise count probe
    batches), and it mutes ``module.log`` / ``module.log_dict`` (probe losses never reach the training metrics).
    On exit it restores all of them exactly. :meth:`reset` puts the RNG states and buffers back to the entry state
    mid-probe, so repeated forwards draw the same dropout masks and see the same batch statistics. Other
    attributes a ``training_step`` may set are not tracked. Copying the buffers (rather than, e.g., setting
    BatchNorm momentum to 0) also covers cumulative-average BatchNorm and any custom module that updates buffers
    in ``forward``.

    ``grads=False`` skips the copy of the gradients (a parameter-sized copy) for probes that cannot write
    ``.grad``: passes under ``torch.no_grad`` or through ``torch.autograd.grad`` with explicit inputs.
    """

    def __init__(self, module: nn.Module, *, grads: bool = True) -> None:
        self.module = module
        self.grads = grads

    def __enter__(self) -> TrajectoryGuard:
        m = self.module
        self._rng = RngState.capture()
        self._buffers = [(b, b.detach().clone()) for b in m.buffers()]
        self._modes = [(sub, sub.training) for sub in m.modules()]
        self._grads = ([(p, None if p.grad is None else p.grad.detach().clone()) for p in m.parameters()]
                       if self.grads else [])
        self._metrics = [(sub, st) for sub in m.modules() if (st := _metric_state(sub)) is not None]
        self._own_log = {k: m.__dict__[k] for k in _LOG_METHODS if k in m.__dict__}
        for k in _LOG_METHODS:
            object.__setattr__(m, k, _noop)  # an instance attribute shadows the LightningModule method
        return self

    def reset(self) -> None:
        """RNG states and buffers as they were on entry."""
        self._rng.restore()
        with torch.no_grad():
            for b, saved in self._buffers:
                b.copy_(saved)

    def __exit__(self, *exc: object) -> None:
        self.reset()
        with torch.no_grad():
            for p, g in self._grads:
                if g is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
        for sub, mode in self._modes:
            sub.training = mode
        for sub, st in self._metrics:
            for name, value in st.items():
                object.__setattr__(sub, name, value)
        for k in _LOG_METHODS:
            if k in self._own_log:
                object.__setattr__(self.module, k, self._own_log[k])
            else:
                object.__delattr__(self.module, k)


def step_loss(out: Any) -> Tensor | None:
    """The loss in what ``training_step`` (or a ``loss_fn``) returned: a one-element tensor, or the ``"loss"``
    entry of a returned mapping; None when there is none."""
    loss = out.get("loss") if isinstance(out, Mapping) else out
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


def probe_loss(trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int,
               loss_fn: Callable[[Any, Any], Any] | None = None) -> Tensor | None:
    """:func:`step_loss` of ``training_step(batch, batch_idx)`` (or ``loss_fn(pl_module, batch)``) run inside the
    precision plugin's train-step context, i.e. under the same autocast as the training step. Run it inside a
    :class:`TrajectoryGuard`."""
    with trainer.precision_plugin.train_step_context():
        out = loss_fn(pl_module, batch) if loss_fn is not None else pl_module.training_step(batch, batch_idx)
    return step_loss(out)
