"""Headline numbers in the progress bar: steps to the next synchronisation and the monitors' latest values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import check_bool, invalid

DEFAULT_KEYS: dict[str, str] = {
    "grad/norm": "gnorm",
    "noise/norm": "noise",
    "curvature/lambda_max": "λmax",
    "curvature/eos_ratio": "eos",
    "time_avg/train/loss": "avg_loss",
}


class ProgressBarMetrics(RankLocal, Callback):
    """Copies selected metrics into the progress bar after every training batch.

    ``keys`` maps a metric name (as the monitors publish it in ``trainer.callback_metrics``) to its short label in
    the bar. With a periodic-sync strategy the bar also shows ``sync_in``: optimizer steps until the next
    synchronisation (``warmup`` while gradients are still averaged every step). Values are read from what the
    monitors already computed: no extra computation or host syncs beyond formatting the floats.
    """

    def __init__(self, keys: Mapping[str, str] | None = None, show_sync: bool = True) -> None:
        if keys is not None and (not isinstance(keys, Mapping)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items())):
            raise invalid("keys", keys, "None or a mapping of metric names to labels (str -> str)",
                          owner="ProgressBarMetrics")
        self.keys = dict(DEFAULT_KEYS if keys is None else keys)
        self.show_sync = check_bool("show_sync", show_sync, owner="ProgressBarMetrics")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = trainer.progress_bar_metrics
        metrics = trainer.callback_metrics
        for key, label in self.keys.items():
            if key in metrics:
                bar[label] = float(metrics[key])
        remaining = getattr(trainer.strategy, "steps_to_next_sync", None)
        if self.show_sync and remaining is not None:
            bar["sync_in"] = remaining
