"""A pre-imported Python that forks the test suite's child processes (test infrastructure only).

Why: every rank a test starts spends ~8 s of CPU importing torch and Lightning before it does anything (Lightning
imports torchmetrics, which imports torchvision, scipy and torch._dynamo). With ~150 launches in the suite that
was most of ``make test``'s wall time on two cores. The zygote imports them once; each job is a ``fork`` of it
that runs the script exactly as ``python SCRIPT ARGS`` would (``__main__``, ``sys.argv``, ``sys.path``, the job's
environment and working directory, the interpreter's exit sequence), so the children are still real, separate
processes talking over real gloo sockets.

What cannot be served (the client falls back to a fresh interpreter): a child whose environment changes
something read at import time (``PYTHON*`` other than ``PYTHONPATH``, ``LIGHTNING_OPT_*``, thread counts,
``TORCH*``; not e.g. ``PL_GLOBAL_SEED``, which Lightning reads at run time), ``python -c`` or interpreter flags,
and any test that asks for ``fresh=True`` because it is about import state.

Protocol: the client sends one length-prefixed JSON request per job over a Unix socket; the zygote forks a job
process (its own session, so the client can kill the whole job with ``killpg``) that replies with its process
group, forks one child per environment with stdout/stderr to a log file, waits for them and replies with their
exit codes.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_IMPORT_TIME_PREFIXES = ("PYTHON", "LIGHTNING_OPT_", "OMP_", "MKL_", "OPENBLAS_", "TORCH", "CUDA", "KMP_")
_TORCH_DEFAULT_SEED = 67280421310721  # torch's default CPU generator seed in a fresh interpreter


# --------------------------------------------------------------------------------------------------- wire format
def _send(conn: socket.socket, obj) -> None:
    data = json.dumps(obj).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv(conn: socket.socket):
    head = _recv_exact(conn, 4)
    return json.loads(_recv_exact(conn, struct.unpack("!I", head)[0]))


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("zygote closed the connection")
        buf += chunk
    return buf


# --------------------------------------------------------------------------------------------------- server side
def _preload() -> None:
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    import lightning_opt  # noqa: F401  (installs the import hook; the default Lightning package follows the env)
    import lightning_opt.callbacks  # noqa: F401
    import lightning_opt.strategies  # noqa: F401
    from lightning_opt import _flavour

    _flavour.lightning_module()


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _finish(code: int) -> None:
    """The interpreter's own exit sequence (join threads, atexit handlers, flush), then leave without finalising."""
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _run_child(req: dict, env: dict, logs: list[str], base_path: list[str]) -> None:
    import random

    import torch

    out = os.open(logs[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out if len(logs) == 1 else os.open(logs[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    target, args = req["target"], req["args"]
    first = "" if req["module"] else str(Path(target).resolve().parent)
    sys.path[:] = [first, *extra, *base_path]
    sys.argv[:] = [target, *args]  # run_module(alter_sys=True) replaces argv[0] with the module's file
    random.seed()
    torch.manual_seed(_TORCH_DEFAULT_SEED)
    code = 0
    try:
        if req["module"]:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish(code)


def _run_job(conn: socket.socket, req: dict, base_path: list[str]) -> None:
    _send(conn, {"pgid": os.getpid()})
    pids = []
    for env, logs in zip(req["envs"], req["logs"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_child(req, env, logs, base_path)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    _send(conn, {"codes": codes})


def serve(path: str) -> None:
    _preload()
    base_path = sys.path[1:]
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # job processes are reaped automatically
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + ".tmp")
    srv.listen(16)
    os.rename(path + ".tmp", path)  # the client waits for this name: the zygote is ready
    while os.getppid() == parent:  # the test session ended without telling us: leave
        if not select.select([srv], [], [], 1.0)[0]:
            continue
        conn, _ = srv.accept()
        req = _recv(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            srv.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setsid()
            try:
                _run_job(conn, req, base_path)
            finally:
                os._exit(0)
        conn.close()


# --------------------------------------------------------------------------------------------------- client side
def _take(path: str) -> str:
    """A child's log (empty if it never started), removed once read."""
    text = Path(path).read_text(errors="replace") if os.path.exists(path) else ""
    Path(path).unlink(missing_ok=True)
    return text


class Zygote:
    """One pre-imported server per test session, started on first use."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        self.dir = Path(tempfile.mkdtemp(prefix="zygote-"))
        self.sock = str(self.dir / "sock")
        self.proc = subprocess.Popen([sys.executable, __file__, self.sock], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "zygote.log", "w"),
                                     start_new_session=True)
        self._jobs = 0

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"zygote did not start:\n{(self.dir / 'zygote.log').read_text()[-4000:]}")
            time.sleep(0.05)

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a child with ``env`` would behave the same forked from here as started afresh."""
        keys = set(env) | set(self.env)
        return not any(env.get(k) != self.env.get(k) for k in keys if k.startswith(_IMPORT_TIME_PREFIXES)
                       and k != "PYTHONPATH")

    def run(self, target: str, args: list[str], envs: list[dict[str, str]], *, module: bool = False,
            cwd: str | None = None, timeout: float = 180, split: bool = False) -> list[tuple]:
        """Run ``python TARGET ARGS`` (or ``-m TARGET``) once per environment, concurrently; each child's
        (exit code, output), or (exit code, stdout, stderr) with ``split``. A code is None when the job timed out
        (every child was then killed)."""
        self._wait_ready()
        self._jobs += 1
        streams = ("out", "err") if split else ("log",)
        logs = [[str(self.dir / f"job{self._jobs}-{i}.{s}") for s in streams] for i in range(len(envs))]
        req = {"target": str(target), "args": [str(a) for a in args], "envs": envs, "logs": logs,
               "module": module, "cwd": str(cwd or os.getcwd())}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.sock)
            _send(conn, req)
            conn.settimeout(30)
            pgid = _recv(conn)["pgid"]
            conn.settimeout(timeout)
            try:
                codes = _recv(conn)["codes"]
            except (TimeoutError, ConnectionError):
                codes = [None] * len(envs)
            finally:
                try:
                    os.killpg(pgid, signal.SIGKILL)  # stray grandchildren (e.g. ranks a script launched)
                except ProcessLookupError:
                    pass
        return [(code, *map(_take, paths)) for code, paths in zip(codes, logs)]

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_zygote: Zygote | None = None


def get(env: dict[str, str]) -> Zygote | None:
    """The session's zygote (started with ``env``), or None where ``LIGHTNING_OPT_TEST_FRESH=1`` turns it off."""
    global _zygote
    if os.environ.get("LIGHTNING_OPT_TEST_FRESH") == "1":
        return None
    if _zygote is None:
        _zygote = Zygote(env)
        atexit.register(_zygote.close)
    return _zygote


if __name__ == "__main__":
    serve(sys.argv[1])
