"""Process-group lifetime: release gloo groups before the interpreter finalises.

A process that exits with its gloo process group still alive can abort with SIGABRT ("terminate called without
an active exception"): gloo's worker threads still hold work objects whose tensors reference Python objects, and
destroying them during interpreter finalisation needs a GIL that no longer exists (pytorch/pytorch#190489). We
saw it here about once in twenty two-``fit`` runs. Destroying the groups from an ``atexit`` handler, while the
interpreter is still whole, avoids it. NCCL groups are left to the user: their shutdown may wait on a peer.
Never imports Lightning.
"""

from __future__ import annotations

import atexit

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
