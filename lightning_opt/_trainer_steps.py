"""Publishing scalars at Lightning's own step numbering, read from the trainer (never imports Lightning).

Lightning logs the metrics of training batch ``k`` (counting batches that stepped an optimizer, from 0) at step
``k``, on batches where ``(k + 1) % log_every_n_steps == 0``. Everything lightning-opt logs uses the same step and
cadence, so a TensorBoard chart of ``comm/bytes`` or ``curvature/lambda_max`` lines up with ``train/loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def logging_step(trainer: Any) -> int:
    """The step Lightning logs the current training batch's metrics at (also from ``on_train_batch_end``, after
    the optimizer stepped and ``global_step`` already moved on)."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:  # pragma: no cover - a trainer-like object without Lightning's fit loop
        return int(trainer.global_step)


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes this training batch's metrics to the loggers (``log_every_n_steps`` cadence)."""
    every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
    return every > 0 and (logging_step(trainer) + 1) % every == 0


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int | None = None, *,
                callback_metrics: bool = True) -> None:
    """The one way lightning-opt publishes scalars: into ``trainer.callback_metrics`` (0-d tensors, on every rank
    that calls this, so ``ModelCheckpoint`` / ``EarlyStopping`` can monitor them; ``callback_metrics=False`` for
    values that differ between ranks) and, on global rank 0, to every logger at ``step`` (default:
    :func:`logging_step`), whatever ``log_every_n_steps`` says."""
    for key, value in metrics.items() if callback_metrics else ():
        trainer.callback_metrics[key] = torch.tensor(float(value))
    if trainer.global_rank != 0 or not metrics:
        return
    step = logging_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
