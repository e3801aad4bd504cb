"""Smoke test of the Fig. 6-5 reproduction script (`--quick`): it runs, writes its plot, prints its numbers."""

import sys
from pathlib import Path

import pytest
from dist import run_python

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def test_time_average_sin_quick(tmp_path):
    png = tmp_path / "fig.png"
    proc = run_python([sys.executable, ROOT / "examples" / "reproductions" / "time_average_sin.py", "--quick", "--out",
                       png], timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.stat().st_size > 10_000
    assert "0.04" in proc.stdout and "0.01" in proc.stdout
    # the analysis of the decay_lr run: replayed plateau test and Thm 6.5.1's one-step quantity
    assert "[plateau test on η = 0.04]" in proc.stdout and "[Thm 6.5.1, one step" in proc.stdout
