"""Small helpers shared by the reproduction scripts: Agg matplotlib, log-log slope fits, JSON summary line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "img"

__all__ = ["DEFAULT_OUT", "ROOT", "emit", "loglog_slope", "plt", "script_args"]


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


def emit(summary: dict[str, Any]) -> None:
    """Print ``summary`` as one JSON line prefixed by ``RESULT `` (non-finite floats become ``null``)."""
    text = json.dumps(_clean(summary), sort_keys=True)
    print("RESULT " + text, flush=True)


def script_args(doc: str | None, quick_help: str) -> argparse.Namespace:
    """The reproduction scripts' command line (``--quick``, ``--out`` directory, created) and quiet start: one torch
    thread, Lightning's info logging and warnings off."""
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    return args
