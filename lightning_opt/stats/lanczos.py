"""Extreme eigenvalues of a symmetric operator given only as a matrix-vector product (pure torch).

Used for the sharpness ‖∇²L‖_op of thesis eq. (6.2) and the negative curvature L⁻ = max(0, −λ_min) that bounds
the averaging horizon of Local SGD / Lookahead (curvature paper, Thm 6.7, Cor. 5.4: γτL⁻ = O(1)).

:func:`lanczos_extreme_eigs` is the symmetric Lanczos process with *full* reorthogonalisation (classical
Gram–Schmidt applied twice against the whole Krylov basis, so the basis stays orthonormal to working precision
and no spurious "ghost" copies of converged eigenvalues appear). It runs entirely in torch on the device of
the vectors the matvec consumes (the model's device), keeps only the small tridiagonal matrix on the host in
float64, and supports warm starts from the Ritz vectors of a previous call (the Hessian changes slowly along a
trajectory, so the previous extreme Ritz vectors are an excellent start).

Memory: the basis holds ``min(max_iter, dim)`` vectors of length ``dim``.

:func:`power_iteration` is the textbook baseline with the stopping rule PyHessian uses (relative change of the
Rayleigh quotient below ``tol``); it finds only the eigenvalue of largest magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_opt._validation import check_choice, check_float, check_int, invalid

__all__ = ["LanczosResult", "lanczos_extreme_eigs", "power_iteration"]

_WHICH = ("both", "max", "min")


@dataclass
class LanczosResult:
    """What :func:`lanczos_extreme_eigs` found.

    ``err_max`` / ``err_min`` are a-posteriori error estimates of the Ritz values, ``min(r, r²/gap)`` with
    ``r`` the Ritz residual ‖A y − θ y‖ (for symmetric A some eigenvalue lies within r of θ) and ``gap`` the
    distance to the neighbouring Ritz value minus that value's residual (Kato–Temple bound with Parlett's
    conservative gap; when the gap is not yet resolved the estimate falls back to r). They are estimates, not
    bounds (the gap is a Ritz gap, not the true one). ``converged_max`` / ``converged_min`` say whether that end
    passed the stopping test (see :func:`lanczos_extreme_eigs`); ``converged`` refers to the extremes that were
    requested (``which``).
    """

    lambda_max: float
    lambda_min: float
    vec_max: Tensor
    vec_min: Tensor
    n_matvec: int
    n_iter: int
    converged: bool
    converged_max: bool
    converged_min: bool
    residual_max: float
    residual_min: float
    err_max: float
    err_min: float
    ritz_values: Tensor = field(repr=False)
    breakdowns: int = 0

    @property
    def ritz_vectors(self) -> Tensor:
        """``[2, dim]``: the Ritz vectors of λ_max and λ_min (what to pass as ``v0`` for a warm start)."""
        return torch.stack([self.vec_max, self.vec_min])


def _normalise(v: Tensor) -> Tensor | None:
    n = torch.linalg.vector_norm(v)
    if not torch.isfinite(n) or n.item() == 0.0:
        return None
    return v / n


def _random(dim: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(dim, generator=generator, device=gen_device, dtype=dtype).to(device)


def _start_vector(dim: int, v0: Tensor | None, warm_noise: float, generator: torch.Generator | None,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    noise = _random(dim, generator, device, dtype)
    if v0 is None:
        return _normalise(noise)
    rows = v0.detach().to(device=device, dtype=dtype).reshape(-1, dim)
    q = torch.zeros(dim, device=device, dtype=dtype)
    for row in rows:
        r = _normalise(row)
        if r is not None:
            q = q + r
    q = _normalise(q)
    if q is None:  # unusable warm start: fall back to a random vector
        return _normalise(noise)
    if warm_noise > 0:  # the noise can cancel the warm start (dimension 1): keep the unperturbed start then
        perturbed = _normalise(q + warm_noise * _normalise(noise))
        q = q if perturbed is None else perturbed
    return q


def _device_dtype(v0: Tensor | None, device: torch.device | str | None,
                  dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The basis' device and dtype: the given ones, else those of ``v0``, else CPU / the default dtype."""
    if v0 is not None:
        device = v0.device if device is None else device
        dtype = v0.dtype if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    return device, torch.get_default_dtype() if dtype is None else dtype


def _check_lanczos_args(dim: int, max_iter: int, tol: float, which: str, v0: Tensor | None, warm_noise: float,
                        min_iter: int, floor: float) -> None:
    check_int("dim", dim, 1)
    check_int("max_iter", max_iter, 1)
    check_float("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
    check_choice("which", which, _WHICH)
    check_float("warm_noise", warm_noise, 0.0, 1.0)
    check_int("min_iter", min_iter, 1)
    check_float("floor", floor, 0.0, 1.0, high_open=True)
    if v0 is not None and (not isinstance(v0, Tensor) or v0.numel() % dim != 0 or v0.numel() == 0):
        raise invalid("v0", getattr(v0, "shape", v0), f"None or a tensor of shape [dim] or [k, dim] with dim={dim}")


# ------------------------------------------------------------------------------------------ the iteration


def _orthogonalise(view: Tensor, w: Tensor) -> Tensor:
    """CGS2: classical Gram–Schmidt applied twice against the rows of ``view`` (full reorthogonalisation)."""
    for _ in range(2):
        w = w - view.T @ (view @ w)
    return w


def _lanczos_step(matvec: Callable[[Tensor], Tensor], basis: Tensor, j: int, q: Tensor,
                  dtype: torch.dtype) -> tuple[float, Tensor, float]:
    """Step ``j``: store ``q_j``, ``w = A q_j``, ``α_j = q_jᵀ w``, ``w`` made orthogonal to ``q_0..q_j``.
    Returns ``(α_j, w, β_j = ‖w‖)``; ``w / β_j`` is the next basis vector unless β_j breaks down."""
    basis[j] = q
    w = matvec(q).detach().reshape(-1).to(dtype)
    if not torch.isfinite(w).all():
        raise FloatingPointError(f"matvec returned non-finite values at Lanczos step {j}")
    alpha = float(torch.dot(q, w))
    w = _orthogonalise(basis[: j + 1], w)
    return alpha, w, float(torch.linalg.vector_norm(w))


def _restart_vector(view: Tensor, dim: int, generator: torch.Generator | None, device: torch.device,
                    dtype: torch.dtype) -> Tensor | None:
    """After a breakdown (β≈0: the basis spans an invariant subspace) a random unit vector orthogonal to the basis,
    so the iteration goes on in the rest of the space; None when three draws all vanish (the basis spans it all)."""
    for _ in range(3):
        fresh = _normalise(_orthogonalise(view, _random(dim, generator, device, dtype)))
        if fresh is not None:
            return fresh
    return None


# ------------------------------------------------------------------------- error estimates and stopping


# An end passes when _MARGIN × its estimate and its residual / _RESIDUAL are within the target. min(r, r²/gap) is
# exact to first order once the neighbouring eigenvalue is resolved, but before that the Ritz gap overstates the
# true gap and the estimate is optimistic; the residual cap is the one rigorous part (an eigenvalue within r).
# Chosen on 168 cold runs on network Hessians (benchmarks/results_sharpness.md): at tol 1e-3 they removed the
# bare estimate's false claims (3 → 0) for 8% more products.
_MARGIN = 4.0
_RESIDUAL = 3.0


@dataclass
class _Ritz:
    """The Ritz pairs of the tridiagonal ``T_k`` after one step, with the estimates that decide the stop."""

    theta: Tensor  # Ritz values, ascending (float64, host)
    s: Tensor  # eigenvectors of T_k (columns)
    res: list[float]  # Ritz residuals ‖A y_i − θ_i y_i‖ = β_k |s_{k,i}|
    scale: float  # max |θ|
    errs: dict[str, float]  # "max" / "min": min(r, r²/gap)
    targets: dict[str, float]  # "max" / "min": tol·max(|θ|, floor·max|θ|)
    conv: dict[str, bool]

    @property
    def k(self) -> int:
        return len(self.res)

    def value(self, name: str) -> float:
        return float(self.theta[-1 if name == "max" else 0])


def _ritz(alphas: list[float], betas: list[float], beta: float) -> tuple[Tensor, Tensor, list[float]]:
    """Eigen-decomposition of the tridiagonal ``T_k`` (diagonal ``alphas``, off-diagonal ``betas``) in float64,
    and the residual of every Ritz pair (``beta`` couples the last basis vector to the next one)."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s, (beta * s[-1, :].abs()).tolist()


def _estimate(alphas: list[float], betas: list[float], beta: float, prev: tuple[float, float], *, tol: float,
              floor: float, min_iter: int) -> _Ritz:
    """The Ritz pairs and, for each extreme, the error estimate and this step's test: ``_MARGIN`` times the
    estimate, the residual over ``_RESIDUAL`` and the movement since the previous step (``prev`` = previous
    (θ_max, θ_min)), all within ``tol·max(|θ|, floor·max|θ|)``."""
    theta, s, res = _ritz(alphas, betas, beta)
    k = len(res)
    scale_all = float(theta.abs().max())
    errs, targets, conv = {}, {}, {}
    for name, i in (("max", k - 1), ("min", 0)):
        gap = math.inf
        if k > 1:  # Parlett's conservative gap: the neighbour Ritz value is known within its residual
            nb = i - 1 if name == "max" else 1
            gap = abs(float(theta[i] - theta[nb])) - res[nb]
        r = res[i]
        err = min(r, r * r / gap) if gap > 0 else r
        target = tol * max(abs(float(theta[i])), floor * scale_all)
        moved = abs(float(theta[i]) - (prev[0] if name == "max" else prev[1]))
        errs[name], targets[name] = err, target
        conv[name] = k >= min_iter and _MARGIN * err <= target and r <= _RESIDUAL * target and moved <= target
    return _Ritz(theta, s, res, scale_all, errs, targets, conv)


def _keep_claims(ritz: _Ritz, claims: dict[str, float]) -> None:
    """Each end stops independently: once it passes the test it stays converged (its Ritz value can only move
    towards the eigenvalue) unless that value later moves by more than its target, which withdraws the claim.
    ``claims`` maps an end to its Ritz value when it passed; ``ritz.conv`` becomes the claims held now."""
    for name in ("max", "min"):
        if name in claims and abs(ritz.value(name) - claims[name]) > ritz.targets[name]:
            del claims[name]
        if ritz.conv[name] and name not in claims:
            claims[name] = ritz.value(name)
        ritz.conv[name] = name in claims


def _requested(conv: dict[str, bool], which: str) -> bool:
    return (conv["max"] and conv["min"]) if which == "both" else conv[which]


def _result(view: Tensor, ritz: _Ritz, which: str, dim: int, breakdowns: int) -> LanczosResult:
    """Both extremes with their unit Ritz vectors ``V s`` from the final basis ``view`` (``k`` vectors)."""
    s_dev = ritz.s.to(device=view.device, dtype=view.dtype)
    vmax = view.T @ s_dev[:, -1]
    vmin = view.T @ s_dev[:, 0]
    vmax = vmax / torch.linalg.vector_norm(vmax).clamp_min(1e-30)
    vmin = vmin / torch.linalg.vector_norm(vmin).clamp_min(1e-30)
    conv = ritz.conv
    if ritz.k == dim and breakdowns == 0:  # full space: the Ritz values are the eigenvalues
        conv = {"max": True, "min": True}
    theta, res, errs = ritz.theta, ritz.res, ritz.errs
    return LanczosResult(
        lambda_max=float(theta[-1]), lambda_min=float(theta[0]), vec_max=vmax, vec_min=vmin, n_matvec=ritz.k,
        n_iter=ritz.k, converged=bool(_requested(conv, which)), converged_max=bool(conv["max"]),
        converged_min=bool(conv["min"]), residual_max=float(res[-1]), residual_min=float(res[0]),
        err_max=float(errs["max"]), err_min=float(errs["min"]), ritz_values=theta, breakdowns=breakdowns,
    )


# ---------------------------------------------------------------------------------------- the public API


def lanczos_extreme_eigs(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    which: str = "both",
    v0: Tensor | None = None,
    warm_noise: float = 0.1,
    min_iter: int = 2,
    floor: float = 1e-4,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    stop_reducer: Callable[[bool], bool] | None = None,
) -> LanczosResult:
    """λ_max and λ_min of the symmetric operator ``matvec`` on ``R^dim`` by Lanczos with full
    reorthogonalisation.

    Args:
        matvec: ``v ↦ A v`` for a symmetric A (e.g. :class:`~lightning_opt.stats.hvp.HessianVectorProduct`);
            receives and must return a 1-D tensor of length ``dim``.
        dim: dimension of the space (number of trainable parameters for a Hessian).
        max_iter: most Lanczos steps (= matvecs); capped at ``dim``. Also the number of stored basis vectors.
        tol: relative accuracy of the requested extreme eigenvalues (see "Stopping" below).
        which: ``"both"`` (default), ``"max"`` or ``"min"`` — which extremes must converge before stopping
            (both are always returned).
        v0: warm start: a vector ``[dim]`` or the previous Ritz vectors ``[k, dim]`` (e.g.
            ``LanczosResult.ritz_vectors``); the start is their normalised sum plus ``warm_noise`` of a random
            unit vector (so that the Krylov space is not trapped in the old invariant subspace).
        warm_noise: weight of the random component added to a warm start, in [0, 1].
        min_iter: do not stop before this many steps.
        floor: eigenvalues below ``floor·max|θ|`` in magnitude are judged on that absolute scale (so an
            exactly zero λ_min can converge).
        device, dtype: of the Krylov basis; default: those of ``v0``, else CPU /
            ``torch.get_default_dtype()``.
        generator: RNG for the random start / noise (the global RNG is never touched when one is given).
        stop_reducer: optional reduction of the local stop decision, e.g. an all-reduce so that every rank of
            a distributed matvec stops at the same step (must return the same bool on every rank).

    Returns:
        :class:`LanczosResult` with both extremes, their Ritz vectors (unit norm), the matvec count and
        convergence information.

    Stopping: each extreme is judged on its own target ``t = tol·max(|θ|, floor·max|θ|)``. An end passes when
    its estimate ``min(r, r²/gap)`` (see :class:`LanczosResult`) is ≤ ``t/4``, its residual ``r`` ≤ ``3t`` and its
    Ritz value moved by ≤ ``t`` since the previous step; once passed it stays converged (more steps only move θ
    towards the eigenvalue) unless θ later moves by more than ``t``. The iteration stops when every requested
    end is converged, at ``max_iter`` or when the Krylov space is the whole space (then the Ritz values are the
    eigenvalues).

    What ``converged=True`` guarantees (up to rounding): each returned value is a Rayleigh quotient
    (θ_max ≤ λ_max, θ_min ≥ λ_min) and some eigenvalue of A lies within ``3t`` of it (the residual bound). What it
    does not guarantee: that this eigenvalue is the extreme one, nor a true error ≤ ``t``. The ``t/4`` test is an
    estimate: before a close neighbour is resolved the Ritz gap overstates the true gap, and an eigenvector the
    start vector barely touches can stay out of the Krylov space for many steps while θ sits converged on the
    next eigenvalue (misconvergence; no test on the Krylov space alone can see it). Measured on 168 cold runs on
    network Hessians (``benchmarks/results_sharpness.md``): no false claim at ``tol`` 1e-3 or 1e-4; at 1e-2, 7 in
    336 runs (both ends and λ_max alone), on extremes with a neighbour about ``tol`` away.

    Breakdown (β≈0, an invariant subspace was found) continues from a fresh random vector orthogonal to the
    basis, so the returned extremes are those of the whole space up to ``dim`` steps.
    """
    _check_lanczos_args(dim, max_iter, tol, which, v0, warm_noise, min_iter, floor)
    device, dtype = _device_dtype(v0, device, dtype)
    m = min(max_iter, dim)
    basis = torch.empty(m, dim, device=device, dtype=dtype)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    q = _start_vector(dim, v0, warm_noise, generator, device, dtype)
    breakdowns = 0
    prev = (math.nan, math.nan)
    claims: dict[str, float] = {}
    for j in range(m):
        alpha, w, beta = _lanczos_step(matvec, basis, j, q, dtype)
        alphas.append(alpha)
        ritz = _estimate(alphas, betas, beta, prev, tol=tol, floor=floor, min_iter=min_iter)
        _keep_claims(ritz, claims)
        prev = (ritz.value("max"), ritz.value("min"))
        done = _requested(ritz.conv, which) or ritz.k == dim
        if stop_reducer is not None:
            done = bool(stop_reducer(done))
        if done or ritz.k == m:
            break
        if beta <= 1e-10 * max(ritz.scale, 1e-30) or beta == 0.0:  # breakdown: restart orthogonally
            breakdowns += 1
            q = _restart_vector(basis[: j + 1], dim, generator, device, dtype)
            if q is None:
                break
            betas.append(0.0)
        else:
            betas.append(beta)
            q = w / beta
    return _result(basis[: ritz.k], ritz, which, dim, breakdowns)


def power_iteration(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, Tensor, int]:
    """Power iteration for the eigenvalue of largest magnitude, stopping when the Rayleigh quotient changes by
    less than ``tol`` relative (``|λ_k − λ_{k−1}| / (|λ_{k−1}| + 1e-6) < tol``, PyHessian's rule).

    Returns ``(eigenvalue, unit eigenvector estimate, number of matvecs)``. A baseline for
    :func:`lanczos_extreme_eigs`; the stopping rule measures progress, not error, so it can stop early on a
    slowly converging spectrum.
    """
    check_int("dim", dim, 1)
    check_int("max_iter", max_iter, 1)
    check_float("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
    device, dtype = _device_dtype(v0, device, dtype)
    v = _start_vector(dim, v0, 0.0, generator, device, dtype)
    eig = None
    n = 0
    for _ in range(max_iter):
        w = matvec(v).detach().reshape(-1).to(dtype)
        n += 1
        new = float(torch.dot(v, w))
        nv = _normalise(w)
        if nv is None:
            return new, v, n
        v = nv
        if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
            eig = new
            break
        eig = new
    return float(eig), v, n
