"""Test-side recipe for real multi-process runs: see :mod:`lightning_opt.testing` for how it works.

Scripts live in ``tests/scripts/``; the tests directory is put on the children's ``PYTHONPATH`` so scripts can
import ``_common``. Children are forked from the session's pre-imported zygote (``tests/zygote.py``) where that
behaves like a fresh interpreter, else started afresh; ``fresh=True`` (tests about import state) or
``LIGHTNING_OPT_TEST_FRESH=1`` (the whole run) always start a new interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import zygote

from lightning_opt import testing
from lightning_opt.testing import free_port

TESTS = Path(__file__).parent
SCRIPTS = TESTS / "scripts"
__all__ = ["dist_env", "free_port", "run_command", "run_python", "run_quick", "run_ranks", "run_script"]


def _with_tests_path(env: dict[str, str]) -> dict[str, str]:
    return dict(env, PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))


def dist_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return _with_tests_path(testing.dist_env(extra))


def _served(envs: list[dict[str, str]], fresh: bool) -> zygote.Zygote | None:
    z = None if fresh else zygote.get(testing.dist_env())
    return z if z is not None and all(z.serves(e) for e in envs) else None


def _python_target(cmd: list[str]) -> tuple[str, list[str], bool] | None:
    """(target, args, is_module) when ``cmd`` is ``python FILE ...``, ``python -m MOD ...`` or a console script of
    this interpreter; None for anything else (flags, ``-c``, other programs)."""
    if cmd[0] == sys.executable and len(cmd) > 2 and cmd[1] == "-m":
        return cmd[2], cmd[3:], True
    if cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py"):
        return cmd[1], cmd[2:], False
    path = Path(cmd[0])
    if path.parent == Path(sys.executable).parent and path.is_file():  # a console script of this environment
        with open(path, "rb") as f:
            shebang = Path(f.readline()[2:].decode(errors="replace").strip())
        if shebang.parent == path.parent and os.path.realpath(shebang) == os.path.realpath(sys.executable):
            return cmd[0], cmd[1:], False
    return None


def _serving(cmd: list[str], env: dict[str, str], fresh: bool) -> tuple[zygote.Zygote | None, tuple | None]:
    """The zygote that can run ``cmd`` with ``env`` (None: start it afresh) and ``cmd`` as (target, args,
    is_module)."""
    target = _python_target(cmd)
    return (None if target is None else _served([env], fresh)), target


def run_command(cmd, *, timeout: float = 180, env: dict | None = None, cwd=None, fresh: bool = False):
    for _ in range(2):
        try:
            return _run_command_once(cmd, timeout, env or dist_env(), cwd, fresh)
        except AssertionError as err:
            # The port dist_env found free was taken by another test (xdist runs two at once) before the child
            # bound it: run again on a new one. A caller's own environment is left alone.
            if env is not None or "EADDRINUSE" not in str(err):
                raise
    return _run_command_once(cmd, timeout, env or dist_env(), cwd, fresh)


def _run_command_once(cmd, timeout: float, env: dict, cwd, fresh: bool):
    cmd = [str(c) for c in cmd]
    z, target = _serving(cmd, env, fresh)
    if z is None:
        return testing.run_command(cmd, timeout=timeout, env=env, cwd=cwd)
    [(code, out)] = z.run(target[0], target[1], [env], module=target[2], cwd=cwd, timeout=timeout)
    if code is None:
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n{out[-6000:]}")
    if code != 0:
        raise AssertionError(f"exit code {code}: {cmd}\n{out[-8000:]}")
    return subprocess.CompletedProcess(cmd, code, out, None)


def run_python(cmd, *, timeout: float = 180, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` (stdout and stderr apart, no check; environment
    :func:`dist_env` unless given), served by the zygote where it can be; raises ``subprocess.TimeoutExpired``
    after ``timeout``."""
    cmd, env = [str(c) for c in cmd], env or dist_env()
    z, target = _serving(cmd, env, False)
    if z is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    [(code, out, err)] = z.run(target[0], target[1], [env], module=target[2], cwd=cwd, timeout=timeout, split=True)
    if code is None:
        raise subprocess.TimeoutExpired(cmd, timeout, out, err)
    return subprocess.CompletedProcess(cmd, code, out, err)


def run_script(script: str, *args, timeout: float = 180, env: dict | None = None, fresh: bool = False):
    return run_command([sys.executable, SCRIPTS / script, *args], timeout=timeout, env=env, fresh=fresh)


def run_ranks(script: str, *args, world_size: int = 2, timeout: float = 180, extra_env: dict | None = None,
              nodes: int = 1, fresh: bool = False) -> list[str]:
    extra = _with_tests_path(dict(extra_env or {}, PYTHONPATH=os.environ.get("PYTHONPATH", "")))
    envs = testing.rank_envs(world_size, extra, nodes)
    z = _served(envs, fresh)
    if z is None:
        return testing.run_ranks(SCRIPTS / script, *args, world_size=world_size, timeout=timeout, extra_env=extra,
                                 nodes=nodes)
    return testing.check_ranks(script, z.run(SCRIPTS / script, list(args), envs, timeout=timeout))


REPRODUCTIONS = TESTS.parent / "examples" / "reproductions"


def run_quick(script: str, out: Path, timeout: float = 240.0) -> dict:
    """Run ``examples/reproductions/<script> --quick --out <out>`` (one torch thread, no rank variables inherited),
    check it wrote one ``RESULT {json}`` line and its PNG under ``out``; return the summary."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = run_python([sys.executable, REPRODUCTIONS / script, "--quick", "--out", out], cwd=TESTS.parent, env=env,
                      timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["quick"] is True
    png = Path(result["png"])
    assert png.parent == out and png.name.startswith("repro_") and png.stat().st_size > 10_000
    return result
