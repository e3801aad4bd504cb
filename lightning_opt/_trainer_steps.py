"""Lightning's own step numbering for what we publish, read from the trainer (never imports Lightning).

Lightning logs the metrics of training batch ``k`` (counting batches that stepped an optimizer, from 0) at step
``k``, on batches where ``(k + 1) % log_every_n_steps == 0``. Everything lightning-opt logs uses the same step and
cadence, so a TensorBoard chart of ``comm/bytes`` or ``curvature/lambda_max`` lines up with ``train/loss``.
"""

from __future__ import annotations

from typing import Any


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
