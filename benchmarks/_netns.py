"""Network namespaces for ``benchmarks/bench_throttled.py``: two namespaces joined by a tbf-capped veth pair
(:class:`ThrottledLink`), stale-namespace clean-up and a TCP throughput check. Needs root and iproute2; never imports
torch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

NS_PREFIX = "lopt_bench_"
ADDR_A, ADDR_B, PREFIX_LEN = "10.231.0.1", "10.231.0.2", 24


# ---------------------------------------------------------------------------------------------- network namespaces
def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


def list_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete ``lopt_bench_<pid>_*`` namespaces left by runs whose process no longer exists."""
    removed = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)_[ab]", ns)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def parse_rate(rate: str) -> float:
    """tc rate string -> bytes per second (``100mbit``, ``1gbit``, ``500kbit``, ``10mbps``)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise ValueError(f"`--rate` must look like 100mbit / 1gbit / 500kbit / 10mbps, got {rate!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return value / 8 if m.group(3) == "bit" else value


class ThrottledLink:
    """Two namespaces joined by a tbf-capped veth pair; a context manager that always removes them."""

    def __init__(self, rate: str):
        self.rate = rate
        self.rate_bytes = parse_rate(rate)
        pid = os.getpid()
        self.ns = (f"{NS_PREFIX}{pid}_a", f"{NS_PREFIX}{pid}_b")
        self.dev = (f"lob{pid}a", f"lob{pid}b")  # interface names stay < 16 characters
        self.addr = (ADDR_A, ADDR_B)
        # tbf: bucket of ~10 ms of traffic (at least 32 KiB, so GSO-sized packets fit), 50 ms of queue.
        self.burst = max(32 * 1024, int(self.rate_bytes / 100))
        self.created: list[str] = []

    def __enter__(self) -> ThrottledLink:
        try:
            for ns in self.ns:
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
            a, b = self.ns
            sh("ip", "-n", a, "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1], "netns", b)
            for ns, dev, addr in zip(self.ns, self.dev, self.addr):
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                   "burst", str(self.burst), "latency", "50ms")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in self.created:  # deleting a namespace destroys the veth end inside it (and so the pair)
            sh("ip", "netns", "del", ns, check=False)
        self.created = []

    def qdisc(self) -> str:
        return sh("tc", "-n", self.ns[0], "qdisc", "show", "dev", self.dev[0], check=False).stdout.strip()

    def measure(self, nbytes: int, timeout: float = 60) -> float:
        """Send ``nbytes`` over TCP from namespace b to a; returns the receiver-side throughput in bytes/s
        (also proves connectivity)."""
        port = 23456
        server = ("import socket, time\n"
                  f"s = socket.create_server(('{self.addr[0]}', {port}))\n"
                  "print('READY', flush=True)\n"
                  "c, _ = s.accept(); n = 0; t0 = None\n"
                  "while True:\n"
                  "    d = c.recv(1 << 20)\n"
                  "    if t0 is None: t0 = time.perf_counter()\n"
                  "    if not d: break\n"
                  "    n += len(d)\n"
                  "print('GOT', n, time.perf_counter() - t0, flush=True)\n")
        client = ("import socket, time\n"
                  "for _ in range(100):\n"
                  "    try:\n"
                  f"        c = socket.create_connection(('{self.addr[0]}', {port}), timeout=5); break\n"
                  "    except OSError: time.sleep(0.1)\n"
                  f"c.sendall(bytes({nbytes})); c.close()\n")
        srv = subprocess.Popen(["ip", "netns", "exec", self.ns[0], sys.executable, "-c", server],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            assert srv.stdout is not None
            first = srv.stdout.readline()
            if not first.startswith("READY"):
                raise RuntimeError(f"link test server failed: {first}{srv.stdout.read()}")
            cli = sh("ip", "netns", "exec", self.ns[1], sys.executable, "-c", client, check=False, timeout=timeout)
            if cli.returncode != 0:
                raise RuntimeError(f"no connectivity from {self.ns[1]} to {self.addr[0]}: {cli.stderr[-2000:]}")
            out, _ = srv.communicate(timeout=timeout)
        finally:
            kill_group(srv)
        m = re.search(r"GOT (\d+) ([\d.e-]+)", out)
        if not m or int(m.group(1)) != nbytes:
            raise RuntimeError(f"link test received {out!r}, expected {nbytes} bytes")
        return nbytes / float(m.group(2))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
