"""Vectorised nonparametric bootstrap (Efron 1979; percentile intervals, Efron & Tibshirani 1993, ch. 13).

A resample of ``n`` i.i.d. units is represented by its multinomial count vector ``w`` (``w_i`` = how many
times unit ``i`` was drawn, ``sum(w) = n``), so every statistic that is a ratio of weighted sums over units
can be evaluated on all resamples at once with a matrix product, without a Python loop and without host
syncs. The tail-index estimators in :mod:`lightning_opt.stats.tail_index` are written that way: the
Mohammadi estimator resamples *blocks* (its i.i.d. units), the Hill estimator resamples observations.

Percentile intervals are equivariant under monotone maps, so the estimators bootstrap the linear statistic
1/α and map the bounds through α = 1/(·) afterwards; a bound that lands outside the estimator's valid range is
reported as NaN, exactly like the point estimate (never clamped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_opt._validation import check_float, check_int, invalid

__all__ = ["bootstrap_interval", "percentile_interval", "resample_weights"]


def _check(num_resamples: int, level: float) -> None:
    check_int("num_resamples", num_resamples, 1, owner="bootstrap")
    check_float("level", level, 0.0, 1.0, low_open=True, high_open=True, owner="bootstrap")


def resample_weights(
    n: int,
    num_resamples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Multinomial counts ``[num_resamples, n]`` of drawing ``n`` units with replacement, each row summing
    to ``n``."""
    if n < 1:
        raise invalid("n", n, "an int with n >= 1", owner="resample_weights")
    _check(num_resamples, 0.5)
    idx = torch.randint(n, (num_resamples, n), generator=generator, device=device)
    w = torch.zeros(num_resamples, n, dtype=dtype, device=device)
    return w.scatter_add_(1, idx, torch.ones_like(w))


def percentile_interval(samples: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """Equal-tailed percentile interval ``(q_{(1-level)/2}, q_{(1+level)/2})`` of bootstrap replicates.

    Non-finite replicates are ignored (``nanquantile``); if fewer than half the replicates are finite both
    bounds are NaN, because the interval would describe a biased subset of resamples."""
    _check(1, level)
    s = samples.detach().reshape(-1).to(torch.float64)
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=s.dtype, device=s.device)
    bounds = torch.nanquantile(s, q)
    enough = torch.isfinite(s).sum() * 2 >= s.numel()
    bounds = torch.where(enough, bounds, torch.full_like(bounds, float("nan")))
    return bounds[0], bounds[1]


def bootstrap_interval(
    weighted_statistic: Callable[[Tensor], Tensor],
    n: int,
    *,
    num_resamples: int = 200,
    level: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of a statistic of ``n`` i.i.d. units.

    ``weighted_statistic`` maps resample weights ``[R, n]`` (see :func:`resample_weights`) to ``R``
    replicates; the original sample corresponds to all-ones weights."""
    _check(num_resamples, level)
    w = resample_weights(n, num_resamples, generator=generator, device=device)
    return percentile_interval(weighted_statistic(w), level)
