"""What the monitoring callbacks share besides probes (``_probe.py``): publishing, one-time warnings, the lr."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_opt._trainer_steps import log_scalars

__all__ = ["collective_device", "current_lr", "log_histogram", "log_scalars", "log_text", "tensorboard_writers",
           "warn_once"]


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """SummaryWriters of the TensorBoard loggers among ``trainer.loggers`` on global rank 0 (empty
    elsewhere)."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> bool:
    """``add_histogram`` of the finite ``values`` on every TensorBoard logger (rank 0). Returns whether anything
    was written."""
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


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """``add_text`` on every TensorBoard logger (rank 0)."""
    for w in tensorboard_writers(trainer):
        w.add_text(tag, text, global_step=step)


def warn_once(seen: set[str], key: str, message: str) -> None:
    """Warn with ``message`` (on rank 0: every rank would print the same line) unless ``key`` is in ``seen``."""
    if key not in seen:
        seen.add(key)
        rank_zero_warn(message)


def current_lr(trainer: pl.Trainer) -> float:
    """The first optimizer's first param group's lr (NaN without an optimizer or a numeric lr)."""
    if not trainer.optimizers:
        return math.nan
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
