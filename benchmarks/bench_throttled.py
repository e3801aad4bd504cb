"""Strategies over a bandwidth-capped link: steps/s, bytes, time to a target loss; alone, DDP, Local SGD, Streaming.

Rows: no communication at all, DDP, Local SGD and Streaming DiLoCo (fp32 / bf16 / int8), optionally LSGD and Lookahead.

    sudo python -m benchmarks.bench_throttled                  # full run, default rows (about 10 min on 2 CPU cores)
    sudo python -m benchmarks.bench_throttled --smoke          # a few steps per row (about 1 min)
    sudo python -m benchmarks.bench_throttled --rate 20mbit --ddp-steps 12   # DDP: 12 steps (about 12 min)
    sudo python -m benchmarks.bench_throttled --width 1664 --ddp-steps 24     # 5.7M parameters (about 11 min)
    sudo python -m benchmarks.bench_throttled --strategies alone,ddp,local_sgd,lsgd,lookahead_local   # issue 11's

Issue 11, item 4, and issue 19 (Streaming DiLoCo). Two gloo ranks, each its own "node" (``num_nodes=2,
devices=1``), train the same wide MLP (``benchmarks/scripts/throttled_rank.py``; ``--width``, 1024 ≈ 2.2M
parameters, 1664 ≈ 5.7M, 2048 ≈ 8.5M) with the rows chosen by ``--strategies`` (comma-separated; default
``alone,ddp,local_sgd,stream_fp32,stream_bf16,stream_int8``, also ``lsgd`` and ``lookahead_local``):

* ``alone``: each rank trains by itself, no communication at all (Lightning's default single-device strategy,
  ``devices=1, num_nodes=1``, same shard, same initial weights): the steps/s ceiling;
* ``ddp``: ``DDPStrategy``, one gradient all-reduce per step;
* ``local_sgd``: ``LocalSGDStrategy(period=τ)``, plain averaging every τ = ``--period`` steps;
* ``stream_fp32`` / ``stream_bf16`` / ``stream_int8``: Streaming DiLoCo, ``LocalSGDStrategy(period=τ,
  fragments=--fragments, overlap_steps=--overlap, merge_mix=--merge-mix, comm_dtype=...)`` (defaults 4, 2, 0.5);
* ``lsgd``: ``LSGDStrategy(pull=0.5)``; ``lookahead_local``: ``LookaheadStrategy(mode="local")``.

Two links are measured in the same run:

* **throttled**: the script creates two network namespaces of its own (``lopt_bench_<pid>_a`` / ``_b``), joins them
  with a veth pair created directly inside them (nothing is added to the host's namespace), gives the ends
  ``10.231.0.1/24`` and ``10.231.0.2/24`` (addresses that exist only inside those namespaces), and caps the egress
  of *both* ends with ``tc qdisc ... tbf rate <rate>`` (``--rate``). Rank 0 runs in namespace a, rank 1 in b
  (``ip netns exec``), ``GLOO_SOCKET_IFNAME`` = each side's veth. The link's throughput is measured with a plain
  TCP transfer before training. The namespaces (and with them the veth pair) are always deleted afterwards, also on
  Ctrl-C / SIGTERM; stale ``lopt_bench_*`` namespaces whose creating process is gone are removed at start
  (``benchmarks/_netns.py``).
* **loopback**: the same two ranks on 127.0.0.1 in the host's namespace, for comparison (``--no-loopback``: skip).

Each link runs one process pair that performs every fit in turn (a short untimed Local SGD warm-up fit first, then
``--reps`` repetitions with the row order rotated each repetition; each fit starts with an untimed barrier); medians
over repetitions are reported, with ratios to ``alone`` and to DDP on the same link. A slow link makes DDP slow (at
20 Mbit one step moves the 8.7 MB gradient, about 3.5 s): ``--ddp-steps N`` runs DDP for only N steps on the
throttled link (loopback keeps ``--steps``), and its time to target is then estimated from the loopback run's step
(the trajectory is the same), marked "est."; or leave ``ddp`` out of ``--strategies``.

*Time to target* is the wall time on rank 0 from ``on_train_start`` to the first optimizer step at which the
trailing mean (window = τ steps) of the two ranks' mean minibatch loss is ``<= --target``; "not reached" when that
does not happen within the step budget. Bytes and overlap waits are the strategies' ``CommMeter`` figures
(``benchmarks/_throttled_report.py``). Needs root (``ip netns``); without it, or where namespaces cannot be created, the
throttled part is skipped with a message and the loopback part still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._netns import (
    ADDR_A,
    ADDR_B,
    ThrottledLink,
    kill_group,
    list_namespaces,
    parse_rate,
    remove_stale_namespaces,
)
from benchmarks._throttled_report import (
    ALL_STRATEGIES,
    CAVEATS,
    DEFAULT_STRATEGIES,
    STREAMING,
    aggregate,
    estimate_capped,
    goal_lines,
    labels,
    machine,
    spread,
    summarise_fit,
    table,
)

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = Path(__file__).parent / "scripts" / "throttled_rank.py"
DEFAULT_OUT = Path(__file__).parent / "results_throttled.md"
WARMUP = 4  # the rank script's steps excluded from steps/s


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


def run_pair(specs: list[str], timeout: float, link: ThrottledLink | None, env: dict[str, str]) -> list[list[dict]]:
    """Start rank 0 and rank 1 (in the link's namespaces, or on loopback); returns each rank's RESULT dicts."""
    base = rank_env({**env, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    if link is not None:
        base["MASTER_ADDR"] = link.addr[0]  # the port is free: the namespace is brand new
    else:
        base["GLOO_SOCKET_IFNAME"] = "lo"
    procs, logs = [], []
    try:
        for rank in range(2):
            env = dict(base, RANK=str(rank), LOCAL_RANK="0", NODE_RANK=str(rank), WORLD_SIZE="2")
            cmd = [sys.executable, str(RANK_SCRIPT), *specs]
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


# -------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few steps per row, 1 repetition (about 1 min)")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of each veth end (default 100mbit)")
    ap.add_argument("--period", type=int, default=8, help="τ of the periodic strategies (default 8)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 96; smoke 16)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; smoke 1)")
    ap.add_argument("--target", type=float, default=None,
                    help="target training loss (default 1.3, which DDP reaches in ~70 of 96 steps; smoke 2.26)")
    ap.add_argument("--width", type=int, default=1024, help="MLP width (1024: ~2.2M parameters; 1664: ~5.7M)")
    ap.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                    help=f"comma-separated rows, in table order, from {','.join(ALL_STRATEGIES)} "
                         f"(default {','.join(DEFAULT_STRATEGIES)})")
    ap.add_argument("--fragments", type=int, default=4, help="streaming rows: fragments P (default 4)")
    ap.add_argument("--overlap", type=int, default=2, help="streaming rows: overlap_steps d (default 2)")
    ap.add_argument("--merge-mix", type=float, default=0.5, help="streaming rows: merge_mix m (default 0.5)")
    ap.add_argument("--ddp-steps", type=int, default=None,
                    help="DDP's optimizer steps on the throttled link only (default --steps; e.g. 12 at 20mbit)")
    ap.add_argument("--no-loopback", action="store_true", help="skip the loopback comparison")
    ap.add_argument("--out", default=None, help=f"markdown output (default {DEFAULT_OUT.name}; none with --smoke)")
    args = ap.parse_args()
    args.steps = args.steps or (16 if args.smoke else 96)
    args.reps = args.reps or (1 if args.smoke else 3)
    args.target = args.target if args.target is not None else (2.26 if args.smoke else 1.3)
    args.names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    problems = []
    if args.period < 1 or args.steps <= WARMUP or args.reps < 1:
        problems.append(f"`--period` must be >= 1, `--steps` > {WARMUP} and `--reps` >= 1")
    unknown = [n for n in args.names if n not in ALL_STRATEGIES]
    if unknown or not args.names or len(set(args.names)) != len(args.names):
        problems.append(f"`--strategies`: distinct names from {','.join(ALL_STRATEGIES)}, got {args.strategies!r}")
    if any(n in STREAMING for n in args.names) and not (
            1 <= args.fragments <= args.period and 0 <= args.overlap < args.period and 0 < args.merge_mix <= 1):
        problems.append("streaming rows need 1 <= --fragments <= --period, 0 <= --overlap < --period and "
                        "0 < --merge-mix <= 1")
    if args.ddp_steps is not None and not WARMUP < args.ddp_steps <= args.steps:
        problems.append(f"`--ddp-steps` must be in ({WARMUP}, --steps]")
    if problems:
        raise SystemExit("; ".join(problems))
    parse_rate(args.rate)  # fails early on a bad rate
    return args


def main() -> int:
    args = parse_args()
    steps, reps, target, period, names = args.steps, args.reps, args.target, args.period, args.names
    out_path = Path(args.out) if args.out else (None if args.smoke else DEFAULT_OUT)
    row_names = labels(period, args.fragments, args.overlap, args.merge_mix)
    rate_bytes = parse_rate(args.rate)
    nparams = args.width * (64 + 1) + 2 * args.width * (args.width + 1) + (args.width + 1) * 10
    link_s = nparams * 4 / rate_bytes  # one full-model transfer over the capped link
    compute_s = 0.5 * max(1.0, (args.width / 1024) ** 2)  # a generous bound on one step's compute
    print(f"model: MLP width {args.width}, {nparams:,} parameters ({nparams * 4 / 1e6:.1f} MB fp32); rows: "
          f"{','.join(names)}", file=sys.stderr, flush=True)
    env = {"BENCH_WIDTH": str(args.width), "BENCH_FRAGMENTS": str(args.fragments),
           "BENCH_OVERLAP": str(args.overlap), "BENCH_MERGE_MIX": repr(args.merge_mix)}

    # one process pair per link: a short untimed warm-up fit, then `reps` rounds in rotated order
    order = [n for rep in range(reps) for n in names[rep % len(names):] + names[:rep % len(names)]]

    def specs_for(throttled: bool) -> list[str]:
        cap = {"ddp": args.ddp_steps} if throttled and args.ddp_steps else {}
        warm = f"local_sgd:{period}:{min(steps, max(8, 2 * period))}"
        return [warm] + [f"{n}:{1 if n in ('ddp', 'alone') else period}:{cap.get(n, steps)}" for n in order]

    def timeout_for(specs: list[str], throttled: bool) -> float:
        total = 180.0
        for spec in specs:
            name, per, n = spec.split(":")
            comm = 0.0 if not throttled or name == "alone" else 2.5 * link_s / (1 if name == "ddp" else int(per))
            total += 30 + int(n) * (comm + compute_s)
        return total

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
        fits: dict[str, list[dict]] = {n: [] for n in names}  # table order = --strategies order
        for name, r0, r1 in zip(order, outs[0][1:], outs[1][1:]):
            assert r0["strategy"] == r1["strategy"] == name, (name, r0["strategy"], r1["strategy"])
            if name == "alone" and not r0["trainer_world"] == r1["trainer_world"] == 1:
                raise RuntimeError("an `alone` fit ran with more than one process")
            fits[name].append(summarise_fit(r0, r1, period, target))
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
                specs = specs_for(True)
                print(f"running {len(specs)} fits over the throttled link ...", file=sys.stderr, flush=True)
                outs = run_pair(specs, timeout_for(specs, True), link, env)
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
        specs = specs_for(False)
        print(f"running {len(specs)} fits over loopback ...", file=sys.stderr, flush=True)
        collect("loopback", run_pair(specs, timeout_for(specs, False), None, env))
    estimate_capped(results, steps)

    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()
    stream = (f"; streaming rows: fragments P = {args.fragments}, overlap_steps d = {args.overlap}, merge_mix m = "
              f"{args.merge_mix:g}" if any(n in STREAMING for n in names) else "")
    header = [
        f"model: MLP 64→{args.width}→{args.width}→{args.width}→10 ({nparams:,} parameters, "
        f"{nparams * 4 / 1e6:.1f} MB of fp32 gradient), SGD lr 0.05 momentum 0.9, batch 32 per rank; "
        f"{steps} optimizer steps per fit"
        + (f" (DDP {args.ddp_steps} on the throttled link)" if args.ddp_steps and "ddp" in names else "")
        + f"; τ = {period}{stream}; {reps} repetition(s) per link, row order rotated, medians reported; 2 gloo "
        "ranks, one per \"node\", one thread each",
        f"time to target: rank-0 wall time from `on_train_start` until the trailing {period}-step mean of the "
        f"two ranks' mean minibatch loss is ≤ {target:g}",
    ]
    if link_line:
        header.append(link_line)
    header += [f"machine: {machine()}",
               f"load average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f}"
               + (" — a loaded machine (other jobs were running), expect noise" if max(load0[0], load1[0]) >
                  (os.cpu_count() or 1) else ""),
               f"total wall time {elapsed:.0f} s", *notes]
    body = "\n\n".join(table(link_name, agg, target, row_names, steps) for link_name, agg in results.items())
    goal_links = ["throttled"] if "throttled" in results else list(results)  # the goal is about the capped link
    goals = [g for link_name in goal_links for g in goal_lines(link_name, results[link_name], period, args.rate)]
    report = ("\n".join(f"- {h}" for h in header) + "\n\n" + body + "\n\n"
              + "".join(g + "\n\n" for g in goals) + spread(results, row_names) + "\n\n" + CAVEATS)
    print(report, flush=True)
    if out_path is not None and results:
        cmd = "python -m benchmarks.bench_throttled " + " ".join(sys.argv[1:])
        out_path.write_text(
            "# Strategies over a throttled link (issue 11, item 4; issue 19)\n\n"
            f"Run {started}; command (as root, from the repository root): `{cmd.strip()}`\n\n"
            "Generated by `benchmarks/bench_throttled.py`; see its docstring for the set-up.\n\n" + report)
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
