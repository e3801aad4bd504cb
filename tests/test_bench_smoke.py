"""Smoke mode of the benchmarks (the full runs are `make bench`, outside `make test`): they run and print tables."""

import sys
from pathlib import Path

import pytest
from dist import run_python

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("bench", ["bench_optim", "bench_sharpness", "bench_monitors_noise"])
def test_benchmark_smoke_mode(bench):
    proc = run_python([sys.executable, "-m", f"benchmarks.{bench}", "--smoke"], cwd=ROOT, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # a markdown table of ratios
