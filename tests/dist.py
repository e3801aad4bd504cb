"""Test-side recipe for real multi-process runs: see :mod:`lightning_opt.testing` for how it works.

Scripts live in ``tests/scripts/``; the tests directory is put on the children's ``PYTHONPATH`` so scripts can
import ``_common``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_opt import testing
from lightning_opt.testing import free_port

SCRIPTS = Path(__file__).parent / "scripts"
__all__ = ["dist_env", "free_port", "run_command", "run_ranks", "run_script"]


def dist_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = testing.dist_env(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def run_command(cmd, *, timeout: float = 180, env: dict | None = None, cwd=None):
    return testing.run_command(cmd, timeout=timeout, env=env or dist_env(), cwd=cwd)


def run_script(script: str, *args, timeout: float = 180, env: dict | None = None):
    return testing.run_script(SCRIPTS / script, *args, timeout=timeout, env=env or dist_env())


def run_ranks(script: str, *args, world_size: int = 2, timeout: float = 180, extra_env: dict | None = None,
              nodes: int = 1) -> list[str]:
    extra = dict(extra_env or {})
    extra["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return testing.run_ranks(SCRIPTS / script, *args, world_size=world_size, timeout=timeout, extra_env=extra,
                             nodes=nodes)
