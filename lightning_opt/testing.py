"""Run real multi-process Lightning jobs (CPU, gloo) from tests and benchmarks, with hard timeouts.

How it works: a test runs a *script* (a Python file, e.g. under ``tests/scripts/``, or any command such as
the ``lightning-opt`` CLI) in a fresh subprocess. The script builds
``Trainer(accelerator="cpu", devices=N, strategy=...)``; Lightning's own launcher (``start_method="popen"``)
re-executes it for ranks 1..N-1, or the ``*_spawn`` strategies spawn them; :func:`run_ranks` instead starts all N
ranks itself (``LOCAL_RANK``/``NODE_RANK`` set), which allows several ``fit`` calls per script and simulated
nodes. Every rank writes its results under an output directory the test passed in; the test reads those files.
The whole process tree runs in its own session and is killed with SIGKILL when ``timeout`` expires, so a hung
collective fails the test instead of hanging CI. Scripts should also give the strategy a short collective
timeout (``timeout=60``).

Example::

    def test_something(tmp_path):
        run_script("train_local_sgd.py", "--out", tmp_path, timeout=120)
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port on loopback that is free right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a distributed child: loopback rendezvous on a fresh port, quiet, single-threaded BLAS."""
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK"):
        env.pop(key, None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra or {})
    return env


def run_command(cmd: Sequence[str | os.PathLike], *, timeout: float = 180, env: dict | None = None,
                cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (and every process it starts) with a hard timeout; raise with its output on failure."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or dist_env(), cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n{out[-6000:]}") from None
    finally:
        try:  # reap stray ranks whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {cmd}\n{out[-8000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def run_script(script: str | os.PathLike, *args: str | os.PathLike, timeout: float = 180,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the Python file ``script`` with the current interpreter (see the module docstring)."""
    return run_command([sys.executable, script, *args], timeout=timeout, env=env)


def run_ranks(script: str | os.PathLike, *args: str | os.PathLike, world_size: int = 2, timeout: float = 180,
              extra_env: dict[str, str] | None = None, nodes: int = 1) -> list[str]:
    """Launch ``world_size`` copies of the Python file ``script`` ourselves (``LOCAL_RANK``/``NODE_RANK`` set,
    so Lightning treats them as externally created ranks). Use this when one script runs several ``fit`` calls
    (the process group is reused) or to simulate ``nodes`` nodes on loopback. Returns each rank's output."""
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
             for env in rank_envs(world_size, extra_env, nodes)]
    outs: list[str] = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        codes = [p.poll() for p in procs]  # None: still running when the timeout struck
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while len(outs) < len(procs):
            outs.append(procs[len(outs)].communicate()[0])
    return check_ranks(script, list(zip(codes, outs)))


def rank_envs(world_size: int, extra_env: dict[str, str] | None = None, nodes: int = 1) -> list[dict[str, str]]:
    """One :func:`dist_env` per rank with ``LOCAL_RANK``/``NODE_RANK``/``WORLD_SIZE``/``RANK`` set."""
    env0 = dist_env(extra_env)
    per_node = world_size // nodes
    return [dict(env0, LOCAL_RANK=str(r % per_node), NODE_RANK=str(r // per_node), WORLD_SIZE=str(world_size),
                 RANK=str(r)) for r in range(world_size)]


def check_ranks(script: str | os.PathLike, results: Sequence[tuple[int | None, str]]) -> list[str]:
    """Each rank's output; raise with every rank's output tail if one failed (code != 0) or timed out (None)."""
    failed = [r for r, (code, _) in enumerate(results) if code != 0]
    if failed:
        detail = "\n".join(f"--- rank {r} (rc={code})\n{out[-5000:]}" for r, (code, out) in enumerate(results))
        raise AssertionError(f"ranks failed or timed out ({failed}) in {script}\n{detail}")
    return [out for _, out in results]
