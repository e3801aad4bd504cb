"""Tail-index estimators of gradient noise: Mohammadi et al. (block sums) and Hill, with bootstrap intervals.

Sources
-------
* M. Mohammadi, A. Mohammadpour, H. Ogata, "On estimating the tail index and the spectral measure of
  multivariate α-stable distributions", Metrika 78 (2015), Corollary 2.4: for i.i.d. symmetric α-stable
  X_1..X_K with K = K1·K2 and block sums Y_j = Σ_{i=1}^{K1} X_{(j-1)K1+i} (j = 1..K2), Y_j has the law of
  K1^{1/α} X_1, hence

      1/α̂ = ( (1/K2) Σ_j log|Y_j| − (1/K) Σ_i log|X_i| ) / log K1.

  Şimşekli, Sagun, Gürbüzbalaban, "A tail-index analysis of stochastic gradient noise in deep neural
  networks", ICML 2019, §4, apply it to the flattened gradient-noise vector ("across coordinates"), with K1
  ≈ √K.
* B. M. Hill, "A simple general approach to inference about the tail of a distribution", Ann. Statist. 3
  (1975): with order statistics X_(1) ≥ X_(2) ≥ … of |X|, 1/α̂ = (1/k) Σ_{i≤k} log X_(i) − log X_(k+1).
* Thesis ch. 4 (Fig. 4-1) argues for looking at the noise as a vector, i.e. at the noise *norm*; the
  gradient-noise monitor feeds those norms to the Hill estimator.

Conventions (shared by every function here)
-------------------------------------------
* **Exact zeros are masked** (dropped from every log-average; a block sum that is exactly zero is dropped
  too): dead units and unused parameters produce exact zeros whose log is −∞ and which would otherwise drag
  mean log|X| down and inflate the heavy-tail reading.
* **Out-of-range estimates are NaN, never clamped.** An estimate is valid when 1/α̂ is finite and positive and
  α̂ ≤ ``max_alpha``. Stable laws have α ∈ (0, 2], but a finite sample of Gaussian noise scatters α̂ on both
  sides of 2, so the Mohammadi functions keep estimates up to ``max_alpha=2.5`` by default (reported as
  computed, not moved to 2); pass ``max_alpha=2.0`` for the strict range. The Hill estimator measures the
  tail index of any law (a noise-norm distribution may well have α > 2), so its default has no upper bound.
* The statistics are computed as masked sums, so nothing here forces a host sync; results are 0-d float64
  tensors.
* Non-finite inputs propagate: the estimate becomes NaN.

Two flavours of the Mohammadi estimator (``dim`` argument)
----------------------------------------------------------
* ``dim=None`` — **across coordinates** (Şimşekli et al.): ``x`` is flattened and treated as one i.i.d.
  series. This is *not* invariant to per-coordinate rescaling: coordinates with different scales form a
  scale mixture, whose block sums are dominated by the largest scales, so a Gaussian vector with unequal
  variances reads as heavy-tailed (α̂ < 2). ``tests/test_tail_index.py`` demonstrates both behaviours.
* ``dim=d`` — **across the sample axis**: axis ``d`` indexes samples (e.g. noise draws over probes and
  ranks) and every other position is its own series. The per-series log differences are pooled (averaged)
  before inverting. Multiplying a series by a constant c shifts both of its log-means by log c, so this
  flavour is exactly invariant to per-coordinate rescaling.

Bootstrap intervals (``*_ci``) resample the estimator's i.i.d. units — blocks for Mohammadi (the statistic
is a ratio of sums over blocks), observations for Hill — and use percentile intervals of 1/α̂ mapped through
α = 1/(·), see :mod:`lightning_opt.stats.bootstrap`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_opt._validation import invalid
from lightning_opt.stats.bootstrap import percentile_interval, resample_weights

__all__ = [
    "TailIndexEstimate",
    "default_block",
    "tail_index_hill",
    "tail_index_hill_ci",
    "tail_index_mohammadi",
    "tail_index_mohammadi_ci",
]

DEFAULT_MAX_ALPHA_STABLE = 2.5


class TailIndexEstimate(NamedTuple):
    """Point estimate and bootstrap percentile interval (0-d float64 tensors; NaN where out of range)."""

    alpha: Tensor
    lo: Tensor
    hi: Tensor


def default_block(n: int) -> int:
    """K1 = ⌊√n⌋ (at least 2), the block size Şimşekli et al. 2019 use for the Mohammadi estimator."""
    return max(2, math.isqrt(max(n, 0)))


def _check_max_alpha(fn: str, max_alpha: float | None) -> None:
    if max_alpha is not None and not (float(max_alpha) > 0.0):
        raise invalid("max_alpha", max_alpha, "None or a number > 0", owner=fn)


def _alpha_from_inverse(inv: Tensor, max_alpha: float | None) -> Tensor:
    """α = 1/inv where inv is finite and positive and α ≤ max_alpha; NaN elsewhere (no clamping)."""
    inv = inv.to(torch.float64)
    alpha = 1.0 / inv
    ok = torch.isfinite(inv) & (inv > 0)
    if max_alpha is not None:
        ok = ok & (alpha <= max_alpha)
    return torch.where(ok, alpha, torch.full_like(alpha, float("nan")))


def _estimate(alpha: Tensor, inv_lo: Tensor, inv_hi: Tensor, max_alpha: float | None) -> TailIndexEstimate:
    """Bounds of 1/α̂ → bounds of α̂ (a percentile interval maps through the decreasing α = 1/inv)."""
    lo = _alpha_from_inverse(inv_hi, max_alpha)
    hi = _alpha_from_inverse(inv_lo, max_alpha)
    return TailIndexEstimate(alpha, lo, hi)


def _masked_log_abs(x: Tensor) -> tuple[Tensor, Tensor]:
    """(log|x| with zeros replaced by 0, indicator of non-zeros) — the zero mask of the module docstring."""
    nz = x != 0
    safe = torch.where(nz, x.abs(), torch.ones_like(x))
    return torch.log(safe), nz.to(x.dtype)


class _BlockSums(NamedTuple):
    """Per-block sums of the Mohammadi estimator: shapes [K2] (flattened) or [K2, C] (per-series)."""

    log_y: Tensor  # log|Y_j| (0 where Y_j == 0)
    valid_y: Tensor  # 1 where Y_j != 0
    log_x: Tensor  # Σ_{i in block j} log|X_i| over non-zeros
    count_x: Tensor  # number of non-zero X_i in block j
    log_k1: float


def _mohammadi_blocks(fn: str, x: Tensor, block: int | None, dim: int | None) -> _BlockSums:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    x = x.detach()
    x = x.to(torch.float64) if x.dtype != torch.float64 else x
    if dim is None:
        series = x.reshape(-1, 1)
    else:
        if x.dim() == 0 or not (-x.dim() <= dim < x.dim()):
            raise ValueError(f"{fn}: dim={dim!r} is out of range for a tensor of shape {tuple(x.shape)}")
        series = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    n = series.shape[0]
    k1 = default_block(n) if block is None else block
    if not isinstance(k1, int) or isinstance(k1, bool) or k1 < 2:
        raise invalid("block", block, "None or an int with block >= 2", owner=fn)
    if n < k1:
        raise ValueError(f"{fn}: {n} samples are fewer than block={k1}; expected at least one full block")
    k2 = n // k1
    xs = series[: k1 * k2].reshape(k2, k1, -1)  # a trailing partial block is dropped
    log_x, nz = _masked_log_abs(xs)
    log_y, valid_y = _masked_log_abs(xs.sum(1))
    return _BlockSums(log_y, valid_y, log_x.sum(1), nz.sum(1), math.log(k1))


def _mohammadi_inverse(b: _BlockSums, w: Tensor | None, flat: bool) -> Tensor:
    """1/α̂ from block sums; ``w`` ([R, K2] resample weights) gives R replicates, None the point estimate."""

    def wsum(t: Tensor) -> Tensor:  # Σ_j over blocks, optionally weighted
        return t.sum(0) if w is None else w @ t

    mean_log_y = wsum(b.log_y * b.valid_y) / wsum(b.valid_y)
    mean_log_x = wsum(b.log_x) / wsum(b.count_x)
    diff = mean_log_y - mean_log_x  # [C] or [R, C]
    if flat:
        return diff[..., 0] / b.log_k1
    ok = torch.isfinite(diff)  # series without any non-zero value (or non-zero block sum) are left out
    pooled = torch.where(ok, diff, torch.zeros_like(diff)).sum(-1) / ok.sum(-1)
    return pooled / b.log_k1


def tail_index_mohammadi(
    x: Tensor,
    block: int | None = None,
    dim: int | None = None,
    *,
    max_alpha: float | None = DEFAULT_MAX_ALPHA_STABLE,
) -> Tensor:
    """Mohammadi et al. (2015, Cor. 2.4) tail index α̂ of symmetric α-stable data (Şimşekli et al. 2019).

    Args:
        x: samples. With ``dim=None`` (across coordinates) all entries form one series; with ``dim=d`` (across
            the sample axis) axis ``d`` indexes samples and every other position is a separate series whose
            log-differences are pooled — invariant to per-series rescaling (see the module docstring).
        block: block size K1 ≥ 2 (default ⌊√n⌋ with n the series length); a trailing partial block is dropped.
            For exactly stable data any K1 is unbiased and K1 ≈ e² has the smallest variance; larger blocks
            are more robust when the data are only in the domain of attraction of a stable law.
        dim: see ``x``.
        max_alpha: estimates above it (or with 1/α̂ ≤ 0, or non-finite) are NaN; None removes the upper bound.

    Returns:
        0-d float64 tensor (NaN when out of range). Exact zeros are masked.
    """
    _check_max_alpha("tail_index_mohammadi", max_alpha)
    b = _mohammadi_blocks("tail_index_mohammadi", x, block, dim)
    return _alpha_from_inverse(_mohammadi_inverse(b, None, dim is None), max_alpha)


def tail_index_mohammadi_ci(
    x: Tensor,
    block: int | None = None,
    dim: int | None = None,
    *,
    num_resamples: int = 200,
    level: float = 0.9,
    generator: torch.Generator | None = None,
    max_alpha: float | None = DEFAULT_MAX_ALPHA_STABLE,
) -> TailIndexEstimate:
    """:func:`tail_index_mohammadi` with a percentile bootstrap interval over blocks (the estimator's i.i.d.
    units: in the per-series flavour a block of samples is shared by all series, so series stay paired)."""
    _check_max_alpha("tail_index_mohammadi_ci", max_alpha)
    b = _mohammadi_blocks("tail_index_mohammadi_ci", x, block, dim)
    flat = dim is None
    alpha = _alpha_from_inverse(_mohammadi_inverse(b, None, flat), max_alpha)
    dev = b.log_y.device
    w = resample_weights(b.log_y.shape[0], num_resamples, generator=generator, device=dev)
    inv_lo, inv_hi = percentile_interval(_mohammadi_inverse(b, w, flat), level)
    return _estimate(alpha, inv_lo, inv_hi, max_alpha)


def _hill_prepare(fn: str, x: Tensor, k: int | None) -> tuple[Tensor, int]:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    s = x.detach().reshape(-1).to(torch.float64).abs()
    n = s.numel()
    kk = max(1, math.isqrt(n)) if k is None else k
    if not isinstance(kk, int) or isinstance(kk, bool) or not (1 <= kk < n):
        raise invalid("k", k, f"None or an int with 1 <= k < n = {n} samples", owner=fn)
    return torch.sort(s, descending=True).values, kk


def tail_index_hill(x: Tensor, k: int | None = None, *, max_alpha: float | None = None) -> Tensor:
    """Hill (1975) estimator of the tail index of |x| from its k largest values.

    1/α̂ = (1/k) Σ_{i=1}^{k} log X_(i) − log X_(k+1), X_(1) ≥ X_(2) ≥ … the order statistics of |x|.
    Zeros sit at the bottom of the order and never enter unless fewer than k+1 values are non-zero (then NaN).

    Args:
        x: samples (flattened), e.g. gradient-noise norms ‖ξ_i‖ (thesis ch. 4, Fig. 4-1).
        k: number of upper order statistics, 1 ≤ k < n (default ⌊√n⌋). Hill is biased for stable laws with
            α close to 2 unless k/n is small (their second-order tail term decays only like x^{-α}).
        max_alpha: optional upper bound of the valid range (default none: any α̂ > 0 is a valid tail index).
    """
    _check_max_alpha("tail_index_hill", max_alpha)
    s, k = _hill_prepare("tail_index_hill", x, k)
    top = s[:k]
    inv = torch.log(torch.where(top > 0, top, torch.ones_like(top))).mean() - torch.log(s[k])
    inv = torch.where(s[k] > 0, inv, torch.full_like(inv, float("inf")))
    return _alpha_from_inverse(inv, max_alpha)


def _hill_inverse_weighted(s: Tensor, k: int, w: Tensor) -> Tensor:
    """1/α̂ of Hill on resamples given by multinomial weights ``w`` [R, n] over the sorted (desc.) ``s``."""
    c = w.cumsum(1)
    before = c - w
    take = torch.minimum(w, (k - before).clamp_min(0))  # copies of s_i among the k largest of the resample
    log_s = torch.log(torch.where(s > 0, s, torch.ones_like(s)))
    top = (take * log_s).sum(1) / k
    pos = torch.searchsorted(c, torch.full((w.shape[0], 1), k + 1.0, dtype=c.dtype, device=c.device))
    thr = s[pos.squeeze(1).clamp_max(s.numel() - 1)]
    inv = top - torch.log(torch.where(thr > 0, thr, torch.ones_like(thr)))
    return torch.where(thr > 0, inv, torch.full_like(inv, float("inf")))


def tail_index_hill_ci(
    x: Tensor,
    k: int | None = None,
    *,
    num_resamples: int = 200,
    level: float = 0.9,
    generator: torch.Generator | None = None,
    max_alpha: float | None = None,
) -> TailIndexEstimate:
    """:func:`tail_index_hill` with a percentile bootstrap interval (observations resampled with replacement;
    bootstrap intervals of extreme-value statistics are only approximate for small n)."""
    _check_max_alpha("tail_index_hill_ci", max_alpha)
    s, k = _hill_prepare("tail_index_hill_ci", x, k)  # first: a refusal names the function the user called
    alpha = tail_index_hill(x, k, max_alpha=max_alpha)
    n = s.numel()
    chunk = max(1, min(num_resamples, 4_000_000 // n))  # bound the [R, n] weight matrix
    reps = []
    for start in range(0, num_resamples, chunk):
        r = min(chunk, num_resamples - start)
        w = resample_weights(n, r, generator=generator, device=s.device)
        reps.append(_hill_inverse_weighted(s, k, w))
    inv_lo, inv_hi = percentile_interval(torch.cat(reps), level)
    return _estimate(alpha, inv_lo, inv_hi, max_alpha)
