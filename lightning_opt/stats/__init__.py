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
    # heavy-tailed noise (thesis ch. 4; Mohammadi et al. / Simsekli et al. 2019; Hill 1975)
    "tail_index_mohammadi": "tail_index", "tail_index_mohammadi_ci": "tail_index", "tail_index_hill": "tail_index",
    "tail_index_hill_ci": "tail_index", "TailIndexEstimate": "tail_index", "symmetric_stable": "stable",
    "bootstrap_interval": "bootstrap", "percentile_interval": "bootstrap",
    "noise_moments": "noise", "b_simple": "noise", "NoiseMoments": "noise", "NoiseSummary": "noise",
    # curvature (thesis eq. (6.2), Def. 3.2.1; lecture notes §25.3.5; curvature paper)
    "lanczos_extreme_eigs": "lanczos", "LanczosResult": "lanczos", "power_iteration": "lanczos",
    "HessianVectorProduct": "hvp", "flatten_tensors": "hvp", "flat_to_tensors": "hvp",
    "trainable_named_parameters": "hvp", "L0L1Fit": "smoothness", "clipping_advice": "smoothness",
    "local_smoothness": "smoothness", "directional_curvature": "smoothness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_opt.stats.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_opt.stats' has no attribute {name!r}")
