"""Lanczos, power iteration and Hessian-vector products pinned by value.

The Lanczos reference is the algorithm of ``lanczos_extreme_eigs``' docstring written again in numpy float64:
full reorthogonalisation (Gram–Schmidt twice), the tridiagonal's eigenpairs, residuals β|s_k|, the estimate
min(r, r²/gap) with Parlett's gap, the per-end test (estimate ≤ t/4, residual ≤ 3t, movement ≤ t, t =
tol·max(|θ|, floor·max|θ|)), claims that hold until θ moves by more than t, and the restart after a breakdown
from a random vector orthogonal to the basis. Its random draws come from a generator seeded like the one handed
to the function (start noise first, then one draw per restart). Every field of the result is compared, at every
``max_iter`` of a run, so each branch of the stopping logic changes some number. The HVP reference is the analytic
Hessian of a small polynomial loss."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from lightning_opt.stats.hvp import HessianVectorProduct, flat_to_tensors, trainable_named_parameters
from lightning_opt.stats.lanczos import _keep_claims, _Ritz, lanczos_extreme_eigs, power_iteration

MARGIN, RESIDUAL = 4.0, 3.0  # the docstring's t/4 and 3t


def _noise(gen: torch.Generator, dim: int) -> np.ndarray:
    return torch.randn(dim, generator=gen, dtype=torch.float64).numpy()


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return None if not math.isfinite(n) or n == 0 else v / n


def ref_start(dim, v0, warm_noise, gen):
    noise = _noise(gen, dim)
    if v0 is None:
        return _unit(noise)
    q = np.zeros(dim)
    for row in np.asarray(v0, dtype=np.float64).reshape(-1, dim):
        r = _unit(row)
        if r is not None:
            q = q + r
    q = _unit(q)
    if q is None:
        return _unit(noise)
    return _unit(q + warm_noise * _unit(noise)) if warm_noise > 0 else q


def ref_lanczos(a, *, max_iter, tol, which="both", v0=None, warm_noise=0.1, min_iter=2, floor=1e-4, seed=0,
                reducer=None):
    dim = a.shape[0]
    gen = torch.Generator().manual_seed(seed)
    q = ref_start(dim, v0, warm_noise, gen)
    m = min(max_iter, dim)
    basis, alphas, betas = [], [], []
    claims, prev, breakdowns = {}, (math.nan, math.nan), 0
    for _ in range(m):
        basis.append(q)
        v = np.array(basis)
        w = a @ q
        alpha = float(q @ w)
        for _ in range(2):
            w = w - v.T @ (v @ w)
        beta = float(np.linalg.norm(w))
        alphas.append(alpha)
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, s = np.linalg.eigh(t)
        res = [beta * abs(x) for x in s[-1, :]]
        k = len(alphas)
        scale = float(np.abs(theta).max())
        out = {}
        for name, i, nb, p in (("max", k - 1, k - 2, prev[0]), ("min", 0, 1, prev[1])):
            gap = abs(theta[i] - theta[nb]) - res[nb] if k > 1 else math.inf
            r = res[i]
            err = min(r, r * r / gap) if gap > 0 else r
            target = tol * max(abs(theta[i]), floor * scale)
            moved = abs(theta[i] - p)
            passed = k >= min_iter and MARGIN * err <= target and r <= RESIDUAL * target and moved <= target
            if name in claims and abs(theta[i] - claims[name]) > target:
                del claims[name]
            if passed and name not in claims:
                claims[name] = float(theta[i])
            out[name] = (err, name in claims)
        prev = (float(theta[-1]), float(theta[0]))
        conv = {name: out[name][1] for name in out}
        done = (conv["max"] and conv["min"] if which == "both" else conv[which]) or k == dim
        if reducer is not None:
            done = reducer(done)
        if done or k == m:
            break
        if beta <= 1e-10 * max(scale, 1e-30):
            breakdowns += 1
            for _ in range(3):
                fresh = np.array(basis)
                z = _noise(gen, dim)
                for _ in range(2):
                    z = z - fresh.T @ (fresh @ z)
                q = _unit(z)
                if q is not None:
                    break
            betas.append(0.0)
        else:
            betas.append(beta)
            q = w / beta
    if k == dim and breakdowns == 0:
        conv = {"max": True, "min": True}
    v = np.array(basis)
    return {
        "lambda_max": float(theta[-1]), "lambda_min": float(theta[0]), "n_iter": k, "n_matvec": k,
        "converged": conv["max"] and conv["min"] if which == "both" else conv[which],
        "converged_max": conv["max"], "converged_min": conv["min"], "residual_max": res[-1], "residual_min": res[0],
        "err_max": out["max"][0], "err_min": out["min"][0], "ritz_values": theta, "breakdowns": breakdowns,
        "vec_max": _unit(v.T @ s[:, -1]), "vec_min": _unit(v.T @ s[:, 0]),
    }


def _check(got, want, a, what):
    scale = float(np.abs(np.linalg.eigvalsh(a)).max())
    for key in ("n_iter", "n_matvec", "converged", "converged_max", "converged_min", "breakdowns"):
        assert getattr(got, key) == want[key], (what, key, getattr(got, key), want[key])
    for key in ("lambda_max", "lambda_min"):
        assert math.isclose(getattr(got, key), want[key], rel_tol=1e-9, abs_tol=1e-11 * scale), (what, key)
    for key in ("residual_max", "residual_min", "err_max", "err_min"):
        assert math.isclose(getattr(got, key), want[key], rel_tol=1e-5, abs_tol=1e-9 * scale), (
            what, key, getattr(got, key), want[key])
    theta = want["ritz_values"]
    np.testing.assert_allclose(got.ritz_values.numpy(), theta, rtol=1e-9, atol=1e-11 * scale)
    for key, i, nb in (("vec_max", -1, -2), ("vec_min", 0, 1)):
        v = getattr(got, key).double().numpy()
        assert abs(np.linalg.norm(v) - 1) < 1e-12, (what, key)
        if len(theta) == 1 or abs(theta[i] - theta[nb]) > 1e-6 * scale:  # a simple Ritz value: one vector
            assert abs(abs(float(v @ want[key])) - 1) < 1e-8, (what, key)


def _sym(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return (q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T).numpy()


SPECTRUM = [7.3, 7.0, 4.1, 2.2, 0.9, 0.35, 0.0, -0.6, -1.2, -3.1]


@pytest.mark.parametrize("which, tol, floor, min_iter", [("both", 1e-2, 1e-4, 2), ("max", 3e-3, 1e-4, 3),
                                                         ("min", 1e-2, 0.3, 2), ("both", 1e-9, 1e-4, 1)])
def test_lanczos_matches_reference_at_every_max_iter(which, tol, floor, min_iter):
    a = _sym(SPECTRUM, seed=3)
    at = torch.from_numpy(a)
    for max_iter in range(1, len(SPECTRUM) + 2):
        kwargs = dict(max_iter=max_iter, tol=tol, which=which, min_iter=min_iter, floor=floor)
        got = lanczos_extreme_eigs(lambda v: at @ v, a.shape[0], **kwargs, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(5))
        _check(got, ref_lanczos(a, **kwargs, seed=5), a, (which, max_iter))


def test_lanczos_warm_start_rows_noise_and_dtypes():
    a = _sym(SPECTRUM, seed=4)
    at = torch.from_numpy(a)
    g = torch.Generator().manual_seed(8)
    v0 = torch.randn(2, 10, generator=g, dtype=torch.float64) * torch.tensor([[3.0], [0.2]], dtype=torch.float64)
    for warm in (0.3, 0.0, 1.0):
        kwargs = dict(max_iter=6, tol=1e-3, warm_noise=warm)
        got = lanczos_extreme_eigs(lambda v: at @ v, 10, v0=v0, **kwargs, generator=torch.Generator().manual_seed(2))
        assert got.vec_max.dtype == torch.float64  # the dtype of v0
        _check(got, ref_lanczos(a, v0=v0.numpy(), **kwargs, seed=2), a, warm)
    # an unusable warm start (zeros) falls back to the random start
    got = lanczos_extreme_eigs(lambda v: at @ v, 10, v0=torch.zeros(10, dtype=torch.float64), max_iter=5,
                               generator=torch.Generator().manual_seed(2))
    _check(got, ref_lanczos(a, v0=np.zeros(10), max_iter=5, tol=1e-3, seed=2), a, "zero v0")
    # a float32 warm start with dtype=float64: the basis is float64; a float32 matvec result is cast
    v32 = v0[0].float()
    got = lanczos_extreme_eigs(lambda v: (at @ v).float(), 10, v0=v32, dtype=torch.float64, max_iter=10,
                               warm_noise=0.0)
    assert got.vec_min.dtype == torch.float64 and got.converged
    assert math.isclose(got.lambda_max, 7.3, rel_tol=1e-6) and math.isclose(got.lambda_min, -3.1, rel_tol=1e-6)
    got = lanczos_extreme_eigs(lambda v: at.float() @ v, 10, v0=v32, max_iter=3)
    assert got.vec_max.dtype == torch.float32
    got = lanczos_extreme_eigs(lambda v: at @ v, 10, max_iter=3, dtype=torch.float64)
    assert got.vec_max.dtype == torch.float64 and got.vec_max.device.type == "cpu"


def test_lanczos_breakdowns_restart_from_the_generator():
    # two distinct eigenvalues: every Krylov space closes after two steps
    a = _sym([3.0, 3.0, 3.0, -1.5, -1.5, -1.5], seed=1)
    at = torch.from_numpy(a)
    kwargs = dict(max_iter=6, tol=1e-9)  # converged after 3 steps: the reducer says go on
    got = lanczos_extreme_eigs(lambda v: at @ v, 6, **kwargs, generator=torch.Generator().manual_seed(4),
                               dtype=torch.float64, stop_reducer=lambda done: False)
    want = ref_lanczos(a, **kwargs, seed=4, reducer=lambda done: False)
    assert want["breakdowns"] == 2 and want["n_iter"] == 6
    _check(got, want, a, "two eigenvalues")
    # an exact eigenvector (up to rounding) as the start: β ≈ 0 at once, the restart finds the rest
    b = _sym(SPECTRUM[:6], seed=2)
    vec = np.linalg.eigh(b)[1][:, -1]
    bt = torch.from_numpy(b)
    for which, mi in (("max", 2), ("both", 4), ("max", 6)):
        kwargs = dict(max_iter=mi, tol=1e-6, which=which, warm_noise=0.0, v0=vec)
        got = lanczos_extreme_eigs(lambda v: bt @ v, 6, **{**kwargs, "v0": torch.from_numpy(vec)},
                                   generator=torch.Generator().manual_seed(7))
        want = ref_lanczos(b, **kwargs, seed=7)
        assert want["breakdowns"] == 1
        _check(got, want, b, which)
    # a start a little off the eigenvector: β ≈ 1e-11·scale is a breakdown, not a direction
    big = _sym([s * 100 for s in SPECTRUM[:6]], seed=2)
    vec = np.linalg.eigh(big)[1][:, -1] + 1e-13 * _noise(torch.Generator().manual_seed(1), 6)
    for scale in (1.0, 1e-6):
        kwargs = dict(max_iter=4, tol=1e-6, which="both", warm_noise=0.0, v0=vec)
        bs = torch.from_numpy(big * scale)
        got = lanczos_extreme_eigs(lambda v, bs=bs: bs @ v, 6, **{**kwargs, "v0": torch.from_numpy(vec)},
                                   generator=torch.Generator().manual_seed(7))
        want = ref_lanczos(big * scale, **kwargs, seed=7)
        _check(got, want, big * scale, scale)


def test_lanczos_breakdown_threshold_for_a_tiny_operator():
    a = _sym(SPECTRUM[:6], seed=2) * 1e-9  # max|θ| ≈ 7e-9: the threshold is 1e-10·max|θ|, not 1e-10
    vec = np.linalg.eigh(a)[1][:, -1] + 1e-5 * _noise(torch.Generator().manual_seed(3), 6)
    at = torch.from_numpy(a)
    kwargs = dict(max_iter=5, tol=1e-6, warm_noise=0.0, v0=vec)
    got = lanczos_extreme_eigs(lambda v: at @ v, 6, **{**kwargs, "v0": torch.from_numpy(vec)},
                               generator=torch.Generator().manual_seed(7))
    want = ref_lanczos(a, **kwargs, seed=7)
    assert want["breakdowns"] == 0
    _check(got, want, a, "tiny")


def test_lanczos_stops_at_the_default_caps_and_on_the_reducer():
    eigs = [3 + math.cos(math.pi * i / 119) for i in range(120)]  # clustered ends: > 100 steps at tol 1e-9
    a = np.diag(eigs)
    at = torch.from_numpy(a)
    got = lanczos_extreme_eigs(lambda v: at @ v, 120, tol=1e-9, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    assert got.n_iter == 100 and not got.converged
    b = _sym(SPECTRUM, seed=3)
    bt = torch.from_numpy(b)
    seen = []

    def reducer(done):
        seen.append(done)
        return True

    got = lanczos_extreme_eigs(lambda v: bt @ v, 10, max_iter=8, stop_reducer=reducer,
                               generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert got.n_iter == 1 and seen == [False]
    _check(got, ref_lanczos(b, max_iter=8, tol=1e-3, seed=5, reducer=lambda d: True), b, "reducer")
    got = lanczos_extreme_eigs(lambda v: bt @ v, 10, max_iter=8, tol=0.5, stop_reducer=lambda d: False,
                               generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert got.n_iter == 8
    _check(got, ref_lanczos(b, max_iter=8, tol=0.5, seed=5, reducer=lambda d: False), b, "never")
    # the default min_iter is 2: an exact eigenvector with which="max" can stop after 2 steps
    vec = np.linalg.eigh(b)[1][:, -1]
    got = lanczos_extreme_eigs(lambda v: bt @ v, 10, which="max", v0=torch.from_numpy(vec), warm_noise=0.0,
                               generator=torch.Generator().manual_seed(5))
    want = ref_lanczos(b, max_iter=100, tol=1e-3, which="max", v0=vec, warm_noise=0.0, seed=5)
    assert want["n_iter"] == 2
    _check(got, want, b, "min_iter default")


def _msg(name, value, expected):
    return re.escape(f"invalid {name}={value!r}; expected {expected}")


def test_lanczos_and_power_iteration_argument_ranges():
    eye = lambda v: 2.0 * v  # noqa: E731
    # seed 0 draws positive noise: with negative noise, v0 + 1.0·noise cancels in dim 1 (see the note of issue 27)
    ok = lanczos_extreme_eigs(eye, 1, max_iter=1, min_iter=1, warm_noise=1.0, v0=torch.ones(1),
                              generator=torch.Generator().manual_seed(0))
    assert ok.lambda_max == pytest.approx(2.0) and ok.converged
    assert power_iteration(eye, 1, max_iter=1)[2] == 1
    cases = [({"dim": 0}, _msg("dim", 0, "an int with dim >= 1")),
             ({"max_iter": 0}, _msg("max_iter", 0, "an int with max_iter >= 1")),
             ({"tol": 1.0}, _msg("tol", 1.0, "a finite number with tol in (0, 1)")),
             ({"tol": 0.0}, _msg("tol", 0.0, "a finite number with tol in (0, 1)")),
             ({"which": "mid"}, _msg("which", "mid", "one of 'both', 'max', 'min'")),
             ({"warm_noise": 1.5}, _msg("warm_noise", 1.5, "a finite number with warm_noise in [0, 1]")),
             ({"min_iter": 0}, _msg("min_iter", 0, "an int with min_iter >= 1")),
             ({"floor": 1.0}, _msg("floor", 1.0, "a finite number with floor in [0, 1)")),
             ({"v0": torch.ones(3)}, _msg("v0", torch.Size([3]), "None or a tensor of shape [dim] or [k, dim] with "
                                                                 "dim=2")),
             ({"v0": [1.0, 2.0]}, _msg("v0", [1.0, 2.0], "None or a tensor of shape [dim] or [k, dim] with dim=2"))]
    for kwargs, match in cases:
        args = {"dim": 2} | kwargs
        with pytest.raises(ValueError, match=match):
            lanczos_extreme_eigs(eye, **args)
    for kwargs, match in cases[:4]:
        args = {"dim": 2} | kwargs
        with pytest.raises(ValueError, match=match):
            power_iteration(eye, **args)
    with pytest.raises(FloatingPointError, match=re.escape("matvec returned non-finite values at Lanczos step 0")):
        lanczos_extreme_eigs(lambda v: v * math.inf, 3)


def ref_power(a, *, max_iter=100, tol=1e-3, v0=None, seed=0):
    v = ref_start(a.shape[0], v0, 0.0, torch.Generator().manual_seed(seed))
    eig, n = None, 0
    for _ in range(max_iter):
        w = a @ v
        n += 1
        new = float(v @ w)
        nv = _unit(w)
        if nv is None:
            return new, v, n
        v = nv
        if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
            return new, v, n
        eig = new
    return eig, v, n


@pytest.mark.parametrize("case", ["default", "v0", "slow", "tiny", "zero"])
def test_power_iteration_matches_reference(case):
    a = _sym([5.0, -4.2, 1.0, 0.3, -0.1], seed=6)
    kwargs = {}
    if case == "v0":
        kwargs = dict(v0=np.array([[1.0, 0.0, 2.0, 0.0, -1.0]]), tol=1e-5)
    elif case == "slow":
        a = _sym([2.0, -1.999, 0.5, 0.2, 0.1], seed=6)
        kwargs = dict(tol=1e-12)
    elif case == "tiny":
        a = a * 1e-7
        kwargs = dict(tol=0.2)
    elif case == "zero":
        a = np.zeros((5, 5))
    at = torch.from_numpy(a)
    targs = {k: (torch.from_numpy(v) if k == "v0" else v) for k, v in kwargs.items()}
    eig, vec, n = power_iteration(lambda v: (at @ v).float(), 5, **targs, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(3))
    want_eig, want_vec, want_n = ref_power(a, **kwargs, seed=3)
    assert n == want_n, (n, want_n)
    assert math.isclose(eig, want_eig, rel_tol=1e-6, abs_tol=1e-14)
    assert abs(float(vec.double().numpy() @ want_vec) - 1) < 1e-5
    if case == "slow":
        assert n == 100
    if case == "zero":
        assert n == 1 and eig == 0.0


# --------------------------------------------------------------------------------------------- HVP


class Poly(nn.Module):
    """L = b0 Σ c_ij w_ij² + w00 w11 b2 + f Σ b_k³/3 + d·e with f frozen, ``u`` unused and ``e`` linear."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.3, -1.1], [0.7, 1.9]], dtype=dtype))
        self.f = nn.Parameter(torch.tensor(1.7, dtype=dtype), requires_grad=False)
        self.b = nn.Parameter(torch.tensor([0.4, -0.8, 1.3], dtype=torch.float64))
        self.u = nn.Parameter(torch.tensor([2.0, 3.0], dtype=dtype))
        self.e = nn.Parameter(torch.tensor([0.25, -0.5], dtype=dtype))
        self.register_buffer("c", torch.tensor([[1.5, -0.5], [2.0, 0.25]], dtype=torch.float64))
        self.register_buffer("d", torch.tensor([0.6, 1.4], dtype=torch.float64))


def poly_loss(m):
    w, b = m.w.double(), m.b
    return (b[0] * (m.c * w * w).sum() + w[0, 0] * w[1, 1] * b[2] + m.f.double() * (b ** 3).sum() / 3
            + (m.d * m.e.double()).sum())


def ref_poly(m):
    """(loss, gradient, Hessian) of ``poly_loss`` by hand, over (w00, w01, w10, w11, b0, b1, b2, u0, u1, e0, e1)."""
    w = m.w.detach().double().reshape(-1).tolist()
    b = m.b.detach().tolist()
    c = m.c.reshape(-1).tolist()
    f = float(m.f)
    d = m.d.tolist()
    e = m.e.detach().double().tolist()
    loss = b[0] * sum(ci * wi * wi for ci, wi in zip(c, w)) + w[0] * w[3] * b[2] + f * sum(x ** 3 for x in b) / 3 \
        + d[0] * e[0] + d[1] * e[1]
    grad = [2 * c[i] * w[i] * b[0] for i in range(4)]
    grad[0] += w[3] * b[2]
    grad[3] += w[0] * b[2]
    grad += [sum(ci * wi * wi for ci, wi in zip(c, w)) + f * b[0] ** 2, f * b[1] ** 2, w[0] * w[3] + f * b[2] ** 2]
    grad += [0.0, 0.0, d[0], d[1]]
    h = np.zeros((11, 11))
    for i in range(4):
        h[i, i] = 2 * c[i] * b[0]
        h[i, 4] = h[4, i] = 2 * c[i] * w[i]
    h[0, 3] = h[3, 0] = b[2]
    h[0, 6] = h[6, 0] = w[3]
    h[3, 6] = h[6, 3] = w[0]
    for k in range(3):
        h[4 + k, 4 + k] = 2 * f * b[k]
    return loss, np.array(grad), h


@pytest.mark.parametrize("method", ["double_backward", "func"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hvp_matches_the_analytic_hessian(method, dtype):
    m = Poly(dtype)
    calls = []

    def loss_fn(mod):
        calls.append(1)
        return poly_loss(mod)

    op = HessianVectorProduct(m, loss_fn, method=method, reduce=lambda v: 0.7 * v)
    loss, grad, h = ref_poly(m)
    assert op.dim == 11 and op.names == ["w", "b", "u", "e"]
    assert op.dtype == torch.promote_types(dtype, torch.float32) and op.device == m.w.device
    assert len(calls) == (1 if method == "double_backward" else 0)
    assert (op.loss == pytest.approx(loss, rel=1e-6)) if method == "double_backward" else math.isnan(op.loss)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.gradient().double(), torch.from_numpy(0.7 * grad), **tol)
    assert op.loss == pytest.approx(loss, rel=1e-6)
    assert len(calls) == 1  # built once and cached
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        v = torch.randn(11, generator=g, dtype=torch.float64)
        hv = op(v)
        assert hv.dtype == op.dtype and hv.shape == (11,)
        torch.testing.assert_close(hv.double(), torch.from_numpy(0.7 * h @ v.numpy()), **tol)
    assert op.n_matvec == 2
    assert len(calls) == (1 if method == "double_backward" else 3)
    assert all(p.grad is None for p in m.parameters())
    with pytest.raises(ValueError, match=re.escape("vector has 10 entries, expected dim=11")):
        op(torch.zeros(10))
    op.release()
    if method == "double_backward":
        with pytest.raises(RuntimeError, match="^HessianVectorProduct was released$"):
            op(torch.zeros(11))
    else:
        op(torch.zeros(11))  # nothing retained: still usable


@pytest.mark.parametrize("method", ["double_backward", "func"])
def test_hvp_of_a_loss_linear_in_every_parameter_is_zero(method):
    """A linear model's loss (here the ``e`` term of ``poly_loss`` alone): no gradient depends on a parameter,
    so the Hessian is zero, not an error."""
    m = Poly()
    op = HessianVectorProduct(m, lambda mod: (mod.d * mod.e).sum(), method=method)
    assert op.dim == 11
    torch.testing.assert_close(op.gradient(), torch.tensor([0.0] * 9 + [0.6, 1.4], dtype=torch.float64))
    assert torch.equal(op(torch.linspace(-1, 1, 11, dtype=torch.float64)), torch.zeros(11, dtype=torch.float64))


def test_hvp_dtype_argument_and_no_reduce():
    m = Poly(torch.float32)
    op = HessianVectorProduct(m, poly_loss, dtype=torch.float64)
    loss, grad, h = ref_poly(m)
    assert op.dtype == torch.float64 and op.gradient().dtype == torch.float64
    v = torch.linspace(-1, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(op(v), torch.from_numpy(h @ v.numpy()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(op.gradient(), torch.from_numpy(grad), rtol=1e-6, atol=1e-6)
    assert [n for n, _ in trainable_named_parameters(m)] == ["w", "b", "u", "e"]


def test_hvp_errors_name_what_is_wrong():
    m = Poly()
    with pytest.raises(ValueError, match=_msg("module", "int", "an nn.Module")):
        HessianVectorProduct(3, poly_loss)
    with pytest.raises(ValueError, match=_msg("loss_fn", 5, "a callable (module -> scalar loss)")):
        HessianVectorProduct(m, 5)
    with pytest.raises(ValueError, match=_msg("method", "jvp", "one of 'double_backward', 'func'")):
        HessianVectorProduct(m, poly_loss, method="jvp")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    no_params = "^" + re.escape("`module` has no trainable parameters (requires_grad=True)") + "$"
    with pytest.raises(ValueError, match=no_params):
        HessianVectorProduct(frozen, poly_loss)
    with pytest.raises(ValueError, match=re.escape("`loss_fn` must return a scalar tensor, got Tensor(2,)")):
        HessianVectorProduct(m, lambda mod: mod.u * 2)
    with pytest.raises(ValueError, match=re.escape("`loss_fn` must return a scalar tensor, got float()")):
        HessianVectorProduct(m, lambda mod: 3.0)
    with pytest.raises(ValueError, match=re.escape("`loss_fn` returned a loss that does not require grad "
                                                   "(is it computed under no_grad?)")):
        HessianVectorProduct(m, lambda mod: mod.c.sum())
    with pytest.raises(ValueError, match=re.escape("flat vector has 5 entries, the tensors hold 4")):
        flat_to_tensors(torch.zeros(5), [torch.zeros(2), torch.zeros(2, 1)])
    parts = flat_to_tensors(torch.arange(5, dtype=torch.float64), [torch.zeros(2, dtype=torch.float16),
                                                                   torch.zeros(3, 1)])
    assert parts[0].dtype == torch.float16 and parts[1].shape == (3, 1) and parts[1].dtype == torch.float32
    assert parts[1].reshape(-1).tolist() == [2.0, 3.0, 4.0]


def _ritz_at(theta_min: float, theta_max: float, conv: dict[str, bool]) -> _Ritz:
    return _Ritz(theta=torch.tensor([theta_min, theta_max], dtype=torch.float64), s=torch.eye(2, dtype=torch.float64),
                 res=[0.0, 0.0], scale=abs(theta_max), errs={"max": 0.0, "min": 0.0},
                 targets={"max": 0.5, "min": 0.25}, conv=dict(conv))


def test_a_claim_holds_until_its_value_moves_by_more_than_its_target():
    """Once an end passes, it stays converged while its Ritz value moves by at most its target (exactly the
    target included) even when this step's test fails; a larger move withdraws the claim."""
    claims: dict[str, float] = {}
    r = _ritz_at(-1.0, 4.0, {"max": True, "min": False})
    _keep_claims(r, claims)
    assert claims == {"max": 4.0} and r.conv == {"max": True, "min": False}
    r = _ritz_at(-1.25, 4.5, {"max": False, "min": True})  # max moved by exactly its target 0.5
    _keep_claims(r, claims)
    assert claims == {"max": 4.0, "min": -1.25} and r.conv == {"max": True, "min": True}
    r = _ritz_at(-1.5, 4.5, {"max": False, "min": False})  # min moved by its target 0.25: kept
    _keep_claims(r, claims)
    assert claims == {"max": 4.0, "min": -1.25} and r.conv == {"max": True, "min": True}
    r = _ritz_at(-1.75, 4.75, {"max": False, "min": False})  # both moved past their targets: withdrawn
    _keep_claims(r, claims)
    assert claims == {} and r.conv == {"max": False, "min": False}
    r = _ritz_at(-1.75, 5.0, {"max": True, "min": False})  # a new pass is claimed at its current value
    _keep_claims(r, claims)
    assert claims == {"max": 5.0}
