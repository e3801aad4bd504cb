"""The files of an auto-resuming run: atomically written checkpoints, the newest complete one, retention, and a
progress file that says how far the previous attempt got (pure Python and ``zipfile``; no Lightning).

Why atomic: a restart picks the newest checkpoint by its step number, so a file cut short by a crash while it was
written must never carry a checkpoint's name. A checkpoint is written under a hidden temporary name and renamed
when complete (``os.replace`` is atomic on a POSIX filesystem); a file that is nonetheless incomplete (copied in
by hand, a disk error) is recognised because ``torch.save`` writes a zip archive whose directory is at its end.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

PREFIX, SUFFIX = "autoresume-step=", ".ckpt"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)" + re.escape(SUFFIX) + "$")
PROGRESS = "autoresume-progress"
_RECORD = "{attempt:>10} {step:>20}\n"  # fixed width, so each update overwrites the last in place


def checkpoint_path(dirpath: str | os.PathLike, step: int) -> Path:
    return Path(dirpath) / f"{PREFIX}{step:09d}{SUFFIX}"


def temporary(path: Path) -> Path:
    """Where ``path`` is written before it is complete (hidden, and not matching a checkpoint's name)."""
    return path.with_name(f".{path.name}.tmp")


def complete(path: Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (its zip directory, written last, is readable)."""
    return zipfile.is_zipfile(path)


def checkpoints(dirpath: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's checkpoints as ``(step, path)``, oldest first (complete or not)."""
    found = []
    for path in Path(dirpath).glob(f"{PREFIX}*{SUFFIX}"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_complete(dirpath: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint (``None`` if there is none) and the newer incomplete files passed over."""
    skipped = []
    for _, path in reversed(checkpoints(dirpath)):
        if complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def prune(dirpath: str | os.PathLike, keep: int) -> list[Path]:
    """Delete every checkpoint older than the newest ``keep`` complete ones; returns what was deleted."""
    found = checkpoints(dirpath)
    kept = [step for step, path in found if complete(path)][-keep:]
    if not kept:
        return []
    older = [path for step, path in found if step < kept[0]]
    for path in older:
        path.unlink(missing_ok=True)
    return older


class Progress:
    """``attempt`` (1 for the first start of the run) and the last optimizer step it finished, in one small file
    that the training process updates in place after every step (one ``pwrite``; the page cache keeps it across a
    killed process)."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.path = Path(dirpath) / PROGRESS
        self._fd: int | None = None

    def previous(self) -> tuple[int, int] | None:
        """``(attempt, step)`` of the attempt that last wrote the file, or ``None`` for a new run."""
        try:
            attempt, step = self.path.read_text().split()
            return int(attempt), int(step)
        except (FileNotFoundError, ValueError):
            return None

    def start(self, attempt: int, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.record(attempt, step)

    def record(self, attempt: int, step: int) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, _RECORD.format(attempt=attempt, step=step).encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
