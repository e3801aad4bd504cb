"""Gradient-noise statistics from M minibatch gradients at a fixed θ: noise norms, σ, |G|², B_simple.

Notation (thesis eq. (6.2), ch. 4 Fig. 4-1): g_1..g_M are minibatch gradients of batch size b at the same θ,
ḡ = (1/M) Σ g_i, and the noise vectors are ξ_i = g_i − ḡ. Then

* noise norms ‖ξ_i‖ (the quantity whose histogram is thesis Fig. 4-1(b),(f));
* tr(Σ_b) ≈ Σ_i ‖ξ_i‖² / (M − 1), unbiased for the trace of the covariance of a size-b minibatch gradient, and
  the noise norm σ = sqrt(tr(Σ_b)) (the minibatch version of "Noise: σ(θ)" in eq. (6.2));
* |G|² ≈ ‖ḡ‖² − tr(Σ_b)/M, unbiased for the squared norm of the true gradient. This is McCandlish et al. 2018,
  "An Empirical Model of Large-Batch Training", App. A.1, eq. (A.2) with B_small = b and B_big = M·b:
  (B_big‖G_big‖² − B_small‖G_small‖²)/(B_big − B_small) with ‖G_small‖² = (1/M) Σ ‖g_i‖² — the same number;
* the simple noise scale B_simple = tr(Σ)/|G|² with the per-example covariance Σ = b·Σ_b (McCandlish eq.
  (2.8)), i.e. B_simple = b · tr(Σ_b)/|G|². It is NaN when the |G|² estimate is not positive (never clamped).

With several groups of samples (ranks: each rank centres its own M gradients at its own ḡ_r), the trace is
pooled, Σ_r Σ_i ‖ξ_ri‖² / Σ_r (M_r − 1), and |G|² is the average of the per-group unbiased estimates — both
stay unbiased and only scalars cross ranks. Everything is pure torch and sync-free.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_opt._validation import invalid

__all__ = ["NoiseMoments", "NoiseSummary", "b_simple", "noise_moments", "pool_noise", "summarize"]


class NoiseMoments(NamedTuple):
    """Per-group moments of M gradients: ``norms`` ‖ξ_i‖ [M], ``sum_sq`` Σ‖ξ_i‖², ``mean_sq`` ‖ḡ‖²,
    ``count`` M."""

    norms: Tensor
    sum_sq: Tensor
    mean_sq: Tensor
    count: int


class NoiseSummary(NamedTuple):
    """Pooled statistics (0-d float64): ``trace`` tr(Σ_b), ``sigma`` sqrt(trace), ``grad_sq`` unbiased |G|²,
    ``b_simple`` b·tr(Σ_b)/|G|² (NaN if |G|² ≤ 0)."""

    trace: Tensor
    sigma: Tensor
    grad_sq: Tensor
    b_simple: Tensor


def noise_moments(grads: Tensor, *, center: bool = True) -> NoiseMoments:
    """Moments of the rows of ``grads`` [M, D] (M ≥ 2 minibatch gradients, flattened).

    With ``center=True`` the rows are centred **in place** (``grads`` then holds ξ_i = g_i − ḡ), which
    avoids a second M×D buffer; pass a copy if the raw gradients are still needed."""
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"noise_moments: grads of shape {tuple(grads.shape)}; expected [M, D] with M >= 2")
    mean = grads.mean(0)
    mean_sq = mean.double().square().sum()
    xi = grads.sub_(mean) if center else grads - mean
    norms = torch.linalg.vector_norm(xi, dim=1).double()
    return NoiseMoments(norms, norms.square().sum(), mean_sq, grads.shape[0])


def b_simple(trace: Tensor, grad_sq: Tensor, batch_size: int) -> Tensor:
    """B_simple = b · tr(Σ_b)/|G|² (McCandlish et al. 2018, eq. (2.8)); NaN unless |G|² > 0 and finite."""
    val = batch_size * trace / grad_sq
    ok = (grad_sq > 0) & torch.isfinite(val)
    return torch.where(ok, val, torch.full_like(val, float("nan")))


def pool_noise(sum_sq: Tensor, mean_sq: Tensor, count: int, batch_size: int) -> NoiseSummary:
    """Pool per-group moments. ``sum_sq`` and ``mean_sq`` are [R] (one entry per group/rank, or 0-d for one
    group), each group holding ``count`` gradients of batch size ``batch_size``."""
    if count < 2:
        raise invalid("count", count, "count >= 2 gradients per group", owner="pool_noise")
    if batch_size < 1:
        raise invalid("batch_size", batch_size, "batch_size >= 1", owner="pool_noise")
    s = sum_sq.double().reshape(-1)
    m = mean_sq.double().reshape(-1)
    trace = s.sum() / (s.numel() * (count - 1))
    grad_sq = (m - s / (count * (count - 1))).mean()
    return NoiseSummary(trace, trace.sqrt(), grad_sq, b_simple(trace, grad_sq, batch_size))


def summarize(grads: Tensor, batch_size: int) -> NoiseSummary:
    """One-group convenience: :func:`noise_moments` (on a copy) followed by :func:`pool_noise`."""
    mom = noise_moments(grads.detach().clone())
    return pool_noise(mom.sum_sq, mom.mean_sq, mom.count, batch_size)

