"""Strategies over a bandwidth-capped link: steps/s and time to a target loss, DDP vs Local SGD / LSGD / Lookahead.

    sudo python -m benchmarks.bench_throttled                  # full run (about 10 min on 2 CPU cores)
    sudo python -m benchmarks.bench_throttled --smoke          # a few steps per strategy (< 2 min)
    sudo python -m benchmarks.bench_throttled --rate 50mbit    # another cap

Issue 11, item 4. Two gloo ranks, each its own "node" (``num_nodes=2, devices=1``), train the same wide MLP
(``benchmarks/scripts/throttled_rank.py``) with DDP, ``LocalSGDStrategy``, ``LSGDStrategy`` and
``LookaheadStrategy(mode="local")`` (τ = ``--period``), over two links measured in the same run:

* **throttled**: the script creates two network namespaces of its own (``lopt_bench_<pid>_a`` / ``_b``), joins them
  with a veth pair created directly inside them (nothing is added to the host's namespace), gives the ends
  ``10.231.0.1/24`` and ``10.231.0.2/24`` (addresses that exist only inside those namespaces), and caps the egress
  of *both* ends with ``tc qdisc ... tbf rate <rate>``. Rank 0 runs in namespace a, rank 1 in b
  (``ip netns exec``), ``GLOO_SOCKET_IFNAME`` = each side's veth. The link's throughput is measured with a plain
  TCP transfer before training. The namespaces (and with them the veth pair) are always deleted afterwards, also on
  Ctrl-C / SIGTERM; stale ``lopt_bench_*`` namespaces whose creating process is gone are removed at start.
* **loopback**: the same two ranks on 127.0.0.1 in the host's namespace, for comparison.

Each link runs one process pair that performs every fit in turn (a short untimed warm-up fit first, then
``--reps`` repetitions with the strategy order rotated each repetition); medians over repetitions are reported,
with ratios to DDP on the same link. *Time to target* is the wall time on rank 0 from ``on_train_start`` to the
first optimizer step at which the trailing mean (window = τ steps) of the two ranks' mean minibatch loss is
``<= --target``; "not reached" when that does not happen within the step budget. Needs root (``ip netns``);
without it, or where namespaces cannot be created, the throttled part is skipped with a message and the loopback
part still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = Path(__file__).parent / "scripts" / "throttled_rank.py"
DEFAULT_OUT = Path(__file__).parent / "results_throttled.md"
NS_PREFIX = "lopt_bench_"
ADDR_A, ADDR_B, PREFIX_LEN = "10.231.0.1", "10.231.0.2", 24
STRATEGIES = ["ddp", "local_sgd", "lsgd", "lookahead_local"]
LABELS = {"ddp": "DDP", "local_sgd": "LocalSGDStrategy", "lsgd": "LSGDStrategy (pull 0.5)",
          "lookahead_local": 'LookaheadStrategy(mode="local", α 0.5)'}


CAVEATS = """Reading the figures:
- Time to target uses *training* loss: the mean over the two ranks of each rank's minibatch loss on its own local
  weights (no consensus-model evaluation, which would add communication), smoothed over τ steps. The trajectories are
  deterministic, so the step at which the target is reached is the same on both links and in every repetition; only
  the wall time varies.
- Steps/s is rank 0's, from the end of its 4th optimizer step to the end of its last (every fit ends on a
  synchronisation when the step budget is a multiple of τ). The throttled figures are bounded by the link: one DDP
  step moves the whole gradient through the capped link (gloo's ring all-reduce sends about one model's worth of
  bytes in each direction); one Local SGD / Lookahead sync moves one model's worth of parameters the same way, every
  τ steps.
- LSGD's bytes/step is half of Local SGD's because the leader's weights are *broadcast* (one direction) rather than
  all-reduced; a broadcast of the model over the capped link takes about as long as an all-reduce at the receiver,
  but the sender is released earlier (socket buffering) and computes meanwhile, so LSGD can beat Local SGD's
  steps/s here. Its loss per step lags Local SGD's in this set-up (a partial pull, 0.5, instead of averaging).
- Lookahead (mode "local", α 0.5) moves the slow weights only half-way to the average every τ steps, so it
  progresses more slowly per step on this short budget; "not reached" means just that, within the step budget.
- `tbf` caps each veth end's egress, so the link is full-duplex at the given rate; no latency is added
  (`netem` is not available on these kernels).
"""


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


# ------------------------------------------------------------------------------------------------------- ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without rank variables, one BLAS thread, quiet warnings, plus ``extra``.
    (Built here rather than with ``lightning_opt.testing.dist_env`` so the launcher never imports torch.)"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "GLOO_SOCKET_IFNAME")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_pair(steps: int, specs: list[str], timeout: float, link: ThrottledLink | None, width: int) -> list[list[dict]]:
    """Start rank 0 and rank 1 (in the link's namespaces, or on loopback); returns each rank's RESULT dicts."""
    base = rank_env({"BENCH_WIDTH": str(width), "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    if link is not None:
        base["MASTER_ADDR"] = link.addr[0]  # the port is free: the namespace is brand new
    else:
        base["GLOO_SOCKET_IFNAME"] = "lo"
    procs, logs = [], []
    try:
        for rank in range(2):
            env = dict(base, RANK=str(rank), LOCAL_RANK="0", NODE_RANK=str(rank), WORLD_SIZE="2")
            cmd = [sys.executable, str(RANK_SCRIPT), str(steps), *specs]
            if link is not None:
                env["GLOO_SOCKET_IFNAME"] = link.dev[rank]
                cmd = ["ip", "netns", "exec", link.ns[rank], *cmd]
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                          cwd=ROOT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one rank died: the other would only wait for its collective timeout
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        timed_out = any(p.poll() is None for p in procs)
    finally:
        for p in procs:
            kill_group(p)
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    if timed_out or any(p.returncode != 0 for p in procs):
        detail = "\n".join(f"--- rank {r} (rc={p.returncode})\n{o[-4000:]}" for r, (p, o) in
                           enumerate(zip(procs, outs)))
        why = f"timed out after {timeout:.0f} s" if timed_out else "a rank failed"
        raise RuntimeError(f"{why} ({'throttled' if link else 'loopback'})\n{detail}")
    return [[json.loads(ln[len("RESULT "):]) for ln in o.splitlines() if ln.startswith("RESULT ")] for o in outs]


# ---------------------------------------------------------------------------------------------------- analysis
def summarise_fit(r0: dict, r1: dict, window: int, target: float) -> dict:
    """Per-fit figures: rank 0's steps/s and times; loss = mean over both ranks, trailing mean over ``window``."""
    loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    smooth = [statistics.fmean(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    hit = next((i for i in range(window - 1, len(smooth)) if smooth[i] <= target), None)
    return {"sps": r0["steps_per_s"], "bytes": r0["bytes_per_step"], "final": smooth[-1],
            "ttt": None if hit is None else r0["times"][hit], "ttt_step": None if hit is None else hit + 1,
            "wall": r0["times"][-1], "params": r0["params"]}


def aggregate(fits: list[dict]) -> dict:
    reached = [f["ttt"] for f in fits if f["ttt"] is not None]
    steps = [f["ttt_step"] for f in fits if f["ttt_step"] is not None]
    return {"sps": statistics.median(f["sps"] for f in fits), "bytes": fits[0]["bytes"],
            "final": statistics.median(f["final"] for f in fits), "n": len(fits), "n_reached": len(reached),
            "ttt": statistics.median(reached) if reached else None,
            "ttt_step": statistics.median(steps) if steps else None, "sps_all": [f["sps"] for f in fits]}


def table(link: str, agg: dict[str, dict], target: float) -> str:
    ddp = agg["ddp"]
    lines = [f"| link | strategy | bytes/step | steps/s (median) | steps/s vs DDP | time to loss ≤ {target:g} "
             "(median) | step reached | time-to-target speed-up vs DDP | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in STRATEGIES:
        a = agg[name]
        if a["ttt"] is None:
            ttt, speed, step = "not reached", "—", "—"
        else:
            part = "" if a["n_reached"] == a["n"] else f" ({a['n_reached']}/{a['n']} reps)"
            ttt = f"{a['ttt']:.1f} s{part}"
            step = f"{a['ttt_step']:.0f}"
            speed = f"{ddp['ttt'] / a['ttt']:.2f}×" if ddp["ttt"] is not None else "DDP did not reach it"
        lines.append(f"| {link} | {LABELS[name]} | {a['bytes'] / 1e6:.2f} MB | {a['sps']:.2f} | "
                     f"{a['sps'] / ddp['sps']:.2f}× | {ttt} | {step} | {speed} | {a['final']:.3f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for dist in ("torch", "pytorch-lightning"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            + ", ".join(versions))


# -------------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few steps per strategy, 1 repetition (< 2 min)")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of each veth end (default 100mbit)")
    ap.add_argument("--period", type=int, default=8, help="τ of the periodic strategies (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 96; smoke 16)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; smoke 1)")
    ap.add_argument("--target", type=float, default=None,
                    help="target training loss (default 1.3, which DDP reaches in ~70 of 96 steps; smoke 2.26)")
    ap.add_argument("--width", type=int, default=1024, help="MLP width (1024: ~2.2M parameters)")
    ap.add_argument("--no-loopback", action="store_true", help="skip the loopback comparison")
    ap.add_argument("--out", default=None, help=f"markdown output (default {DEFAULT_OUT.name}; none with --smoke)")
    args = ap.parse_args()
    steps = args.steps or (16 if args.smoke else 96)
    reps = args.reps or (1 if args.smoke else 3)
    target = args.target if args.target is not None else (2.26 if args.smoke else 1.3)
    out_path = Path(args.out) if args.out else (None if args.smoke else DEFAULT_OUT)
    if args.period < 1 or steps <= 4 or reps < 1:
        raise SystemExit("`--period` must be >= 1, `--steps` > 4 and `--reps` >= 1")
    rate_bytes = parse_rate(args.rate)

    # one process pair per link: an untimed warm-up fit, then `reps` rounds in rotated order
    specs = [f"local_sgd:{args.period}"]
    order: list[str] = []
    for rep in range(reps):
        rot = STRATEGIES[rep % len(STRATEGIES):] + STRATEGIES[:rep % len(STRATEGIES)]
        order += rot
        specs += [f"{n}:{1 if n == 'ddp' else args.period}" for n in rot]
    nparams = args.width * (64 + 1) + 2 * args.width * (args.width + 1) + (args.width + 1) * 10
    link_s = nparams * 4 / rate_bytes  # one full-model transfer over the capped link

    def timeout_for(throttled: bool) -> float:
        per_step = (2.5 * link_s if throttled else 0.0) + 0.5
        return 180 + len(specs) * (30 + steps * per_step)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Ctrl-C, kill and a closed terminal all unwind through the `finally` that deletes the namespaces (installed
    # explicitly: a shell's background job inherits an ignored SIGINT).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    notes: list[str] = []
    link_line = ""

    def collect(link_name: str, outs: list[list[dict]]) -> None:
        fits: dict[str, list[dict]] = {}
        window = args.period
        for name, r0, r1 in zip(order, outs[0][1:], outs[1][1:]):
            fits.setdefault(name, []).append(summarise_fit(r0, r1, window, target))
        results[link_name] = {name: aggregate(f) for name, f in fits.items()}

    # ---- throttled link
    skip = None
    if os.geteuid() != 0:
        skip = "not running as root (network namespaces need CAP_SYS_ADMIN)"
    elif not (shutil.which("ip") and shutil.which("tc")):
        skip = "`ip` or `tc` (iproute2) not found"
    if skip is None:
        stale = remove_stale_namespaces()
        if stale:
            notes.append(f"removed stale namespaces from earlier runs: {', '.join(stale)}")
        link = ThrottledLink(args.rate)
        try:
            with link:
                got = link.measure(2_000_000 if args.smoke else 8_000_000)
                link_line = (f"throttled link: veth pair between namespaces {link.ns[0]} ({ADDR_A}) and {link.ns[1]} "
                             f"({ADDR_B}); `{link.qdisc()}` on both ends; measured TCP throughput "
                             f"{got * 8 / 1e6:.1f} Mbit/s (one {nparams * 4 / 1e6:.1f} MB model transfer ≈ "
                             f"{nparams * 4 / got:.2f} s)")
                print(link_line, file=sys.stderr, flush=True)
                print(f"running {len(specs)} fits over the throttled link ...", file=sys.stderr, flush=True)
                outs = run_pair(steps, specs, timeout_for(True), link, args.width)
            collect("throttled", outs)
        except (subprocess.CalledProcessError, OSError) as err:
            msg = getattr(err, "stderr", "") or str(err)
            skip = f"could not create the network namespaces / veth / tbf qdisc: {msg.strip()}"
        finally:
            link.close()
            left = [ns for ns in list_namespaces() if ns in link.ns]
            if left:
                print(f"WARNING: namespaces still present after cleanup: {left}", file=sys.stderr)
    if skip is not None:
        print(f"SKIPPED the throttled link: {skip}", flush=True)
        notes.append(f"throttled link skipped: {skip}")

    # ---- loopback
    if not args.no_loopback:
        print(f"running {len(specs)} fits over loopback ...", file=sys.stderr, flush=True)
        collect("loopback", run_pair(steps, specs, timeout_for(False), None, args.width))

    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()
    header = [
        f"model: MLP 64→{args.width}→{args.width}→{args.width}→10 ({nparams:,} parameters, "
        f"{nparams * 4 / 1e6:.1f} MB of fp32 gradient), SGD lr 0.05 momentum 0.9, batch 32 per rank; "
        f"{steps} optimizer steps per fit; τ = {args.period}; {reps} repetition(s) per link, strategy order rotated, "
        "medians reported; 2 gloo ranks, one per \"node\", one thread each",
        f"time to target: rank-0 wall time from `on_train_start` until the trailing {args.period}-step mean of the "
        f"two ranks' mean minibatch loss is ≤ {target:g}",
    ]
    if link_line:
        header.append(link_line)
    header += [f"machine: {machine()}",
               f"load average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f}"
               + (" — a loaded machine (other jobs were running), expect noise" if max(load0[0], load1[0]) >
                  (os.cpu_count() or 1) else ""),
               f"total wall time {elapsed:.0f} s", *notes]
    body = "\n\n".join(table(link_name, agg, target) for link_name, agg in results.items())
    spread = "\n".join(f"- {link_name} {LABELS[name]}: steps/s per repetition "
                       + ", ".join(f"{v:.2f}" for v in a["sps_all"])
                       for link_name, agg in results.items() for name, a in agg.items())
    goal = ""
    if "throttled" in results:
        ratio = results["throttled"]["local_sgd"]["sps"] / results["throttled"]["ddp"]["sps"]
        goal = (f"Issue 11 goal, Local SGD (τ = {args.period}) ≥ 3× DDP's steps/s on the {args.rate} link: "
                f"{'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}×).\n\n")
    report = ("\n".join(f"- {h}" for h in header) + "\n\n" + body + "\n\n" + goal + spread + "\n\n" + CAVEATS)
    print(report, flush=True)
    if out_path is not None and results:
        cmd = "python -m benchmarks.bench_throttled " + " ".join(sys.argv[1:])
        out_path.write_text(
            "# Strategies over a throttled link (issue 11, item 4)\n\n"
            f"Run {started}; command (as root, from the repository root): `{cmd.strip()}`\n\n"
            "Generated by `benchmarks/bench_throttled.py`; see its docstring for the set-up.\n\n" + report)
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
