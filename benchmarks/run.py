"""Runs every benchmark and collects their tables (``make bench`` / ``make bench-smoke``).

    python -m benchmarks.run --out benchmarks/RESULTS_latest.md   # full suite (tens of minutes on 2 CPU cores)
    python -m benchmarks.run --smoke                              # seconds-to-minutes smoke mode

Each benchmark prints ratios measured side by side in one run; this script only concatenates their output with a
machine description and the command line. ``benchmarks/RESULTS.md`` holds the curated figures.
``benchmarks.bench_cuda`` is not in the list: it needs a GPU (``python -m benchmarks.bench_cuda`` on such a machine;
``--device cpu --quick`` checks the script without one).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import torch

BENCHES = ["bench_optim", "bench_sharpness", "bench_monitors_noise", "bench_monitors_examples", "bench_strategies",
           "bench_grad_buckets", "bench_fault", "bench_throttled"]
# Full runs of these write their own curated results file by default; `make bench` must not overwrite it.
EXTRA_ARGS = {"bench_throttled": ["--out", "benchmarks/results_throttled_latest.md"]}


def machine() -> str:
    cuda = f"yes: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, CUDA {cuda}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    parts = [f"# Benchmark run {time.strftime('%Y-%m-%d %H:%M')}\n", f"Machine: {machine()}\n"]
    failed = 0
    for name in args.only or BENCHES:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--smoke"] if args.smoke else EXTRA_ARGS.get(name, []))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        failed += proc.returncode != 0
        parts.append(f"\n## {name}\n\n`{' '.join(cmd[1:])}` ({time.perf_counter() - start:.0f} s, "
                     f"exit {proc.returncode})\n\n{proc.stdout.strip()}\n")
        if proc.returncode:
            parts.append(f"\n```\n{proc.stderr[-3000:]}\n```\n")
        print(parts[-1], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("".join(parts))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
