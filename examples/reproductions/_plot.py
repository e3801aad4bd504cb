"""Small helpers shared by the reproduction scripts: the command line and quiet start, Agg matplotlib, an EMA for
noisy curves, log-log slope fits, saving the figure, the JSON summary line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "img"

__all__ = ["DEFAULT_OUT", "ROOT", "emit", "loglog_slope", "plt", "save_figure", "script_args", "smooth"]


def loglog_slope(steps: Sequence[float], values: Sequence[float], k_min: float, k_max: float | None = None) -> float:
    """Least-squares slope of log(value) against log(step) over steps in [k_min, k_max] (NaN if < 3 points or a
    value is not positive and finite)."""
    pts = [
        (math.log(k), math.log(v))
        for k, v in zip(steps, values, strict=True)
        if k >= k_min and (k_max is None or k <= k_max) and v > 0 and math.isfinite(v)
    ]
    if len(pts) < 3:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def smooth(xs: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average of ``xs`` (weight ``beta`` on the past), for plotting noisy loss curves."""
    out: list[float] = []
    for x in xs:
        out.append(x if not out else beta * out[-1] + (1 - beta) * x)
    return out


def save_figure(fig: Any, path: Path, *, dpi: int = 110, suptitle: str | None = None) -> Path:
    """Lay out ``fig`` (under ``suptitle``), write it to ``path`` and close it; returns ``path``."""
    if suptitle is not None:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def emit(summary: dict[str, Any], *, png: Path | None = None, t0: float | None = None) -> None:
    """Print ``summary`` as one JSON line prefixed by ``RESULT `` (non-finite floats become ``null``), with
    ``"png"`` (the figure's path) and ``"seconds"`` (since ``t0``, a ``time.perf_counter()``) when given."""
    summary = dict(summary)
    if png is not None:
        summary["png"] = str(png)
    if t0 is not None:
        summary["seconds"] = time.perf_counter() - t0
    text = json.dumps(_clean(summary), sort_keys=True)
    print("RESULT " + text, flush=True)


def script_args(doc: str | None, quick_help: str, ints: dict[str, tuple[str, int, int]] | None = None,
                argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The reproduction scripts' command line and quiet start.

    Options: ``--quick``, ``--out`` (the PNG's directory, created) and one ``--<name> N`` per entry of ``ints``,
    name → (help, quick value, full value): the parsed value is N, or the quick / full value when N is not given
    (or 0). Quiet start: one torch thread, Lightning's info logging and warnings off.
    """
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG")
    for name, (help_text, quick, full) in (ints or {}).items():
        ap.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (default {full} full / {quick} quick)")
    args = ap.parse_args(argv)
    for name, (_, quick, full) in (ints or {}).items():
        dest = name.replace("-", "_")
        setattr(args, dest, getattr(args, dest) or (quick if args.quick else full))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    return args
