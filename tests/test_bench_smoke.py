"""Smoke mode of the benchmarks (the full runs are `make bench`, outside `make test`): each runs and prints the
table it exists for, with every row it promises and values that make sense (no timing thresholds: the machine is
noisy)."""

import math
import sys
from pathlib import Path

import pytest
from dist import run_python

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _rows(stdout: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell (header and separator rows left out)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set("-:") and cells[0] not in rows:
            rows[cells[0]] = cells[1:]
    return rows


def _positive(cell: str) -> float:
    value = float(cell.rstrip("%"))
    assert value > 0 and math.isfinite(value), cell
    return value


def _bench(name: str) -> dict[str, list[str]]:
    proc = run_python([sys.executable, "-m", f"benchmarks.{name}", "--smoke"], cwd=ROOT, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _rows(proc.stdout)


def test_bench_optim_times_every_optimizer_against_adam():
    rows = _bench("bench_optim")
    names = ["SGD(m=0.9) + clip_grad_norm_", "ClippedSGD global (GClip), m=0", "ClippedSGD coordinate (CClip), m=0.9",
             "NormalizedSGD, m=0.9", "ACClip (defaults)", "StochasticINGD (defaults)"]
    assert set(names) <= set(rows), sorted(rows)
    assert float(rows["Adam(foreach=True)"][1]) == 1.0  # the baseline's own ratio
    for name in names:
        for cell in rows[name][:3]:  # step time, wall ratio, CPU ratio
            _positive(cell)


def test_bench_sharpness_lanczos_meets_its_tolerance():
    rows = _bench("bench_sharpness")
    (cells,) = [v for k, v in rows.items() if k.isdigit()]  # one problem in smoke mode, keyed by its size
    assert float(cells[1]) > float(cells[2])  # λ_max > λ_min
    power_rel, lanczos_rel, both_max, both_min = (float(cells[i]) for i in (4, 7, 10, 11))
    assert lanczos_rel <= 1e-3 and both_max <= 1e-3 and both_min <= 1e-3 and power_rel < 1e-2
    assert 0 < int(cells[6]) <= int(cells[9])  # λ_max alone never costs more HVPs than both ends


def test_bench_grad_buckets_times_each_configuration_per_model():
    proc = run_python([sys.executable, "-m", "benchmarks.bench_grad_buckets", "--smoke"], cwd=ROOT, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| MLP") or ln.startswith("| deep")]
    cells = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln.strip("|").split("|")[2:] for ln in lines}
    for model in ("MLP (8 tensors)", "deep (324 tensors)"):
        for config in ("backward", "hooks that do nothing", "hooks, copy per tensor", "OverlappedGradSum, armed",
                       "DDP (its C++ reducer)"):
            _positive(cells[(model, config)][0])
        assert float(cells[(model, "backward")][1]) == 1.0  # the floor's own ratio
    for piece in ("non-finite check, a norm per tensor", "non-finite check, a norm per flat bucket",
                  "write-back, views built every step", "write-back, views kept"):
        _positive(cells[("deep (324 tensors)", piece)][0])


def test_bench_monitors_noise_reports_each_monitor_per_model():
    rows = _bench("bench_monitors_noise")
    for name in ["GradNormMonitor()", "GradNormMonitor(per_layer=True)", "GradientNoiseMonitor()",
                 "GradientNoiseMonitor(source='micro')"]:
        ratio, share, events, per_event = rows[name]
        assert _positive(ratio) >= 0.5 and 0 <= float(share.rstrip("%")) < 100 and int(events) >= 1, rows[name]
        _positive(per_event)
