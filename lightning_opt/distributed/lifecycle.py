"""Process lifetime: release gloo groups before the interpreter finalises; end ranks whose launcher ended; undo
what a one-process fit left in the process (:class:`LaunchRecord`).

A process that exits with its gloo process group still alive can abort with SIGABRT ("terminate called without
an active exception"): gloo's worker threads still hold work objects whose tensors reference Python objects, and
destroying them during interpreter finalisation needs a GIL that no longer exists (pytorch/pytorch#190489). We
saw it in CI and in 2 of 4 pytest runs of a two-``fit`` resume test (never in 15 direct runs). Destroying the
groups from an ``atexit`` handler, while the interpreter is still whole, avoids it. NCCL groups are left to the
user: their shutdown may wait on a peer.
Never imports Lightning.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys

import torch.distributed as dist

_registered = False


def _destroy_gloo_groups() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def release_at_exit() -> None:
    """Register (once per process) the ``atexit`` handler that destroys a live gloo process group."""
    global _registered
    if not _registered:
        atexit.register(_destroy_gloo_groups)
        _registered = True


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> bool:
    """Linux: have the kernel SIGKILL this process when the process that started it ends.

    For ranks that Lightning's own launchers started (popen re-runs the script, spawn / fork start processes):
    when rank 0 fails, e.g. on a collective timeout caused by a rank stuck in ``training_step``, the stuck rank
    would otherwise live on as an orphan holding its port and memory. Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher ended before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


#: What Lightning's launcher writes into the main process's environment.
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


class LaunchRecord:
    """What one fit changed in this process that a later fit in the same script must not inherit.

    A one-process fit leaves its process group and the launcher's ``LOCAL_RANK`` / ``NODE_RANK`` / ``MASTER_*`` /
    ``OMP_NUM_THREADS`` behind. A later two-process fit would then take the process for an externally launched
    rank and start no other rank, or fork ranks that hang in OpenMP: :meth:`undo` removes both at teardown.
    """

    def __init__(self) -> None:
        self.env_before: dict[str, str | None] = {}  # the launch variables before the launcher ran
        self.owns_group = False

    def before_launch(self) -> None:
        self.env_before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}

    def after_group_setup(self, created_group: bool, world_size: int, started_by_launcher: bool) -> None:
        """``created_group``: this setup created the default process group; ``started_by_launcher``: the process
        is a rank that the launching process started (so it ends with it)."""
        self.owns_group = created_group and world_size == 1 and dist.is_initialized()
        release_at_exit()  # gloo groups alive at interpreter exit can abort the process (module docstring)
        if started_by_launcher:
            die_with_parent()  # end with the process that launched this rank: never an orphan

    def undo(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
            for key, value in self.env_before.items():
                if value is None:
                    os.environ.pop(key, None)
