"""AutoResume: a restarted job (torchrun ``--max-restarts``, a scheduler's requeue, a person) resumes by itself
from the newest complete checkpoint of its run directory."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import check_int, invalid
from lightning_opt.callbacks import _run_directory as files
from lightning_opt.callbacks._common import log_scalars

__all__ = ["AutoResume"]

_OWNER = "AutoResume"
# Lightning's own notes when a fault-tolerance callback picks the checkpoint (see AutoResume's docstring): they
# speak of "the previous fit call" and of ModelCheckpoint(save_last=True), which is not what happens here.
_LIGHTNING_NOTES = (re.escape("`.fit(ckpt_path=None)` was called without a model."),
                    re.escape('.fit(ckpt_path="last") is set, but there is no last checkpoint available.'))


class AutoResume(RankLocal, OnExceptionCheckpoint):
    """Checkpoint every ``every_n_syncs``-th sync (or every ``every_n_steps`` optimizer steps) into ``dirpath``,
    and, when the same script starts again (a restart after a lost worker), resume from the newest complete one
    exactly as ``trainer.fit(ckpt_path=...)`` would, every rank's local state included.

    * **Which checkpoint.** The newest by step whose file is complete. Each is written under a hidden temporary
      name and renamed when whole, so a crash while writing leaves no newest-but-corrupt file; a file that is
      incomplete anyway (a copy cut short) is passed over with a warning. The newest ``keep`` are kept.
    * **When.** Right after a sync of a periodic strategy (``every_n_syncs``), when the consensus is fresh and a
      checkpoint needs no extra collective; or every ``every_n_steps`` steps (any strategy, DDP included).
    * **How it hooks in.** ``trainer.fit(model)`` without ``ckpt_path`` resumes from the newest checkpoint of a
      fault-tolerance callback (Lightning's :class:`~pytorch_lightning.callbacks.OnExceptionCheckpoint`, which this
      subclasses); an explicit ``ckpt_path`` still wins. Unlike its parent it writes nothing on an exception (that
      would be a collective with a dead rank) and deletes nothing at teardown. Being a ``Checkpoint``, it replaces
      Lightning's default ``ModelCheckpoint`` and needs ``enable_checkpointing=True`` (the default); add your own
      ``ModelCheckpoint`` beside it for best-k checkpoints.
    * **What it logs** (rank 0, on the loggers): ``fault/restarts`` (starts of this run directory before this one)
      and ``fault/lost_steps`` (steps the previous attempt had finished beyond the checkpoint resumed from, i.e.
      redone now) once at the start; ``fault/checkpoint_seconds`` and ``fault/checkpoint_bytes`` per checkpoint.
      How far an attempt got is kept in ``dirpath/autoresume-progress``, rewritten in place after every step.

    A restart with another world size resumes from the consensus with the strategy's warning. Exact resume needs
    what ``ckpt_path=`` needs: the same world size, and a checkpoint at an epoch end or a resumable data loader
    (Lightning warns otherwise).

    Args:
        dirpath: the run directory (shared by every rank and every restart of the job).
        every_n_syncs: checkpoint after every n-th sync of a periodic strategy (``int >= 1``).
        every_n_steps: checkpoint every n optimizer steps instead (``int >= 1``; required for strategies that do
            not sync periodically, e.g. DDP).
        keep: how many of the newest checkpoints to keep (``int >= 1``).
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_syncs: int = 1, every_n_steps: int | None = None,
                 keep: int = 2) -> None:
        if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
            raise invalid("dirpath", dirpath, "a non-empty path", owner=_OWNER)
        self.every_n_syncs = check_int("every_n_syncs", every_n_syncs, 1, owner=_OWNER)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, owner=_OWNER, optional=True)
        self.keep = check_int("keep", keep, 1, owner=_OWNER)
        super().__init__(dirpath=str(dirpath), filename="autoresume")
        self.best_model_path = ""  # read by `ckpt_path="best"` from the first Checkpoint callback: there is none
        self._progress = files.Progress(dirpath)
        self._previous: tuple[int, int] | None = None
        self._attempt = 1
        self._resumed_from: int | None = None
        self._syncs_seen = 0
        for note in _LIGHTNING_NOTES:
            warnings.filterwarnings("ignore", message=note)

    # ------------------------------------------------------------------ which checkpoint a (re)start resumes from
    @property
    def ckpt_path(self) -> str:
        """The newest complete checkpoint of ``dirpath`` (``""`` when there is none); Lightning reads this when
        ``fit`` is called without ``ckpt_path``."""
        newest, skipped = files.newest_complete(self.dirpath)
        for path in skipped:
            rank_zero_warn(f"AutoResume: {path} is incomplete (not a whole torch.save archive); passing over it")
        return str(newest) if newest is not None else ""

    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Nothing: a checkpoint now would be a collective with a rank that may be gone."""

    def teardown(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._progress.close()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.every_n_steps is None and not hasattr(getattr(trainer.strategy, "meter", None), "syncs"):
            raise invalid("every_n_steps", None, f"an int >= 1 with {type(trainer.strategy).__name__}, which has no "
                          "periodic syncs to checkpoint after (every_n_syncs counts the syncs of lightning_opt's "
                          "strategies)", owner=_OWNER)
        if trainer.global_rank == 0:
            self._previous = self._progress.previous()
            self._attempt = self._previous[0] + 1 if self._previous else 1
            _warn_if_restarts_cannot_connect()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._resumed_from = int(checkpoint.get("global_step", 0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._syncs_seen = self._syncs(trainer)
        if trainer.global_rank != 0:
            return
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        self._progress.start(self._attempt, trainer.global_step)
        if self._previous is None:
            return
        lost = max(self._previous[1] - (self._resumed_from or 0), 0)
        source = f"step {self._resumed_from}" if self._resumed_from is not None else "the start (no checkpoint)"
        rank_zero_info(f"AutoResume: start {self._attempt} of {self.dirpath}; resumed from {source}, "
                       f"redoing {lost} steps")
        log_scalars(trainer, {"fault/restarts": self._attempt - 1, "fault/lost_steps": lost},
                    step=trainer.global_step, callback_metrics=False)

    # ------------------------------------------------------------------ writing checkpoints
    @staticmethod
    def _syncs(trainer: pl.Trainer) -> int:
        return int(getattr(getattr(trainer.strategy, "meter", None), "syncs", 0))

    def _due(self, trainer: pl.Trainer) -> bool:
        """The same answer on every rank (step and sync counters are), as the checkpoint is a collective."""
        if self.every_n_steps is not None:
            return trainer.global_step % self.every_n_steps == 0
        syncs = self._syncs(trainer)  # may move by more than one in a step (several optimizers)
        due = syncs // self.every_n_syncs > self._syncs_seen // self.every_n_syncs
        self._syncs_seen = syncs
        return due

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_rank == 0:
            self._progress.record(self._attempt, trainer.global_step)
        if self._due(trainer):
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Write a checkpoint now (every rank calls this); returns its path."""
        path = files.checkpoint_path(self.dirpath, trainer.global_step)
        start = time.perf_counter()
        trainer.save_checkpoint(files.temporary(path))  # collective; rank 0 writes, then all ranks meet
        if trainer.global_rank == 0:
            os.replace(files.temporary(path), path)
            files.prune(self.dirpath, self.keep)
            log_scalars(trainer, {"fault/checkpoint_seconds": time.perf_counter() - start,
                                  "fault/checkpoint_bytes": float(path.stat().st_size)}, callback_metrics=False)
        return path

    def __repr__(self) -> str:
        return (f"AutoResume(dirpath={self.dirpath!r}, every_n_syncs={self.every_n_syncs}, "
                f"every_n_steps={self.every_n_steps}, keep={self.keep})")


def _warn_if_restarts_cannot_connect() -> None:
    """torchrun (c10d rendezvous) shares its store with the workers' process group by default; a restarted worker
    group then reads the previous attempt's addresses from it and fails to connect, which burns the restarts
    (PyTorch issue #135712; 4 of 4 restarts failed so in tests/test_elastic.py's setting)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restarts > 0 and shared and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        rank_zero_warn("AutoResume: torchrun shares its rendezvous store with the process group, so a restarted "
                       "job may fail to connect (PyTorch issue #135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                       "torchrun's environment")
