"""GradientNoiseMonitor's estimators on the gathered noise: the moving average behind ``noise/b_simple_ema`` and the
three tail indices with their bootstrap intervals (sources in :mod:`lightning_opt.callbacks.gradient_noise`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_opt.stats.noise import b_simple
from lightning_opt.stats.tail_index import (
    TailIndexEstimate,
    tail_index_hill,
    tail_index_hill_ci,
    tail_index_mohammadi,
    tail_index_mohammadi_ci,
)

__all__ = ["BSimpleEma", "tail_metrics"]


@dataclass
class BSimpleEma:
    """Exponential moving averages of tr(Σ_b) and |G|² with decay ``decay``; B_simple of their ratio (the
    bias-correcting weight cancels) is the stable reading McCandlish et al. 2018 recommend."""

    decay: float
    trace: float = 0.0
    grad_sq: float = 0.0
    weight: float = 0.0

    def update(self, trace: float, grad_sq: float, batch_size: int) -> float:
        """Add one probe's estimates; the averaged B_simple."""
        d = self.decay
        self.trace = d * self.trace + (1 - d) * trace
        self.grad_sq = d * self.grad_sq + (1 - d) * grad_sq
        self.weight = d * self.weight + (1 - d)
        return float(b_simple(torch.tensor(self.trace / self.weight, dtype=torch.float64),
                              torch.tensor(self.grad_sq / self.weight, dtype=torch.float64), batch_size))

    def state_dict(self) -> dict[str, float]:
        return {"ema_trace": self.trace, "ema_grad_sq": self.grad_sq, "ema_weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trace = float(state.get("ema_trace", 0.0))
        self.grad_sq = float(state.get("ema_grad_sq", 0.0))
        self.weight = float(state.get("ema_weight", 0.0))


def _estimate(point: Callable[[], Tensor], with_ci: Callable[[], TailIndexEstimate],
              bootstrap: int) -> TailIndexEstimate:
    """Point estimate (and interval if ``bootstrap > 0``); too few samples for the estimator → NaN."""
    nan = torch.tensor(math.nan, dtype=torch.float64)
    try:
        if bootstrap > 0:
            return with_ci()
        return TailIndexEstimate(point(), nan, nan)
    except ValueError:  # e.g. fewer samples than one block, or k >= n
        return TailIndexEstimate(nan, nan, nan)


def tail_metrics(xi: Tensor, norms: Tensor, generator: torch.Generator, *, block: int | None,
                 sample_block: int | None, hill_k: int | None, bootstrap: int, level: float,
                 max_alpha: float) -> dict[str, float]:
    """``noise/tail_alpha_{coord,sample,hill}`` (and ``_lo``/``_hi`` when ``bootstrap > 0``) of the noise ``xi``
    ``[ranks, M, k]`` and the noise norms; the intervals draw from ``generator`` in that order."""
    m, k = xi.shape[1], xi.shape[2]
    # g_{2j} − g_{2j+1} = ξ_{2j} − ξ_{2j+1}: symmetric, mean-free and independent across pairs (the centred ξ_i
    # sum to zero, which would bias the block sums across samples)
    pairs = (xi[:, 0 : 2 * (m // 2) : 2] - xi[:, 1 : 2 * (m // 2) : 2]).reshape(-1, k)
    ci = {"num_resamples": bootstrap, "level": level, "generator": generator}
    estimates = {
        "tail_alpha_coord": _estimate(
            lambda: tail_index_mohammadi(xi, block, max_alpha=max_alpha),
            lambda: tail_index_mohammadi_ci(xi, block, max_alpha=max_alpha, **ci), bootstrap),
        "tail_alpha_sample": _estimate(
            lambda: tail_index_mohammadi(pairs, sample_block, dim=0, max_alpha=max_alpha),
            lambda: tail_index_mohammadi_ci(pairs, sample_block, dim=0, max_alpha=max_alpha, **ci), bootstrap),
        "tail_alpha_hill": _estimate(
            lambda: tail_index_hill(norms, hill_k),
            lambda: tail_index_hill_ci(norms, hill_k, **ci), bootstrap),
    }
    metrics: dict[str, float] = {}
    for name, est in estimates.items():
        metrics[f"noise/{name}"] = float(est.alpha)
        if bootstrap > 0:
            metrics[f"noise/{name}_lo"] = float(est.lo)
            metrics[f"noise/{name}_hi"] = float(est.hi)
    return metrics
