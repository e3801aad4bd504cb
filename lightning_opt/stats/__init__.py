"""Pure-torch statistics: tail-index estimators, Lanczos / HVPs, running and windowed averages.

Never imports Lightning. Names are resolved lazily so that importing one estimator does not pull in the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # averages (thesis ch. 6)
    "CesaroAverage": "averages", "WindowedAverage": "averages", "BatchMeansWindow": "averages",
    "batch_means_ci": "averages", "t_critical": "averages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_opt.stats.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_opt.stats' has no attribute {name!r}")
