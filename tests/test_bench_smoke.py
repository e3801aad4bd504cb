"""Smoke mode of the benchmarks (the full runs are `make bench`, outside `make test`): they run and print tables."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("bench", ["bench_optim", "bench_sharpness", "bench_monitors_noise"])
def test_benchmark_smoke_mode(bench):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{bench}", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # a markdown table of ratios
