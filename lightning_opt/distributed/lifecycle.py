"""Process lifetime: release gloo groups before the interpreter finalises; end ranks whose launcher ended.

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
