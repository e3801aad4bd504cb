"""Issue 12 #12 -- thesis ch. 3, Thm 3.4.1 / 3.4.2 / 3.4.3: under (L0, L1)-smoothness clipped GD with constants that
depend on (L0, L1) only converges from any start, while fixed-step GD needs a step that shrinks with the start.

Source: thesis (``/work/shared/seeds/thesis-clipping-noise-invariant-measure.txt``) ch. 3, Def. 3.2.1 (eq. (3.2):
‖∇²f(x)‖ ≤ L0 + L1‖∇f(x)‖), Lemma 3.2.1 (a univariate polynomial of degree ≥ 3 is (L0, L1)-smooth but not
L-smooth), clipped GD eq. (3.5) x_{k+1} = x_k − h_c ∇f(x_k), h_c = min{η_c, γη_c/‖∇f(x_k)‖}, normalised GD eq. (3.6)
h_n = η_n/(‖∇f‖ + β), complexity T_ε = inf{t : ‖∇f(x_t)‖ ≤ ε} (eq. (3.7)).

* Thm 3.4.1: "With η_c = 1/(10 L0), γ = min{1/η_c, 1/(10 L1 η_c)}, ... the iteration complexity of clipped GD
  (Equation 3.5) is upper bounded by 20 L0 (f(x0) − f*)/ε² + 20 max{1, L1²}(f(x0) − f*)/L0."
* Thm 3.4.3: "If we pick parameters such that h = 1/(2(M L1 + L0)), then the iteration complexity of GD with a fixed
  step size ... is upper bounded by 4(M L1 + L0)(f(x0) − f*) ε^{-2}", M = sup{‖∇f(x)‖ : f(x) ≤ f(x0)} (Assumption
  3.4.1).
* Thm 3.4.2 (lower bound over the class, L0, L1 ≥ 1, M > 1): fixed-step GD needs at least
  L1 M (f(x0) − f* − 5ε/8) / (8ε²(log M + 1)) iterations; Remark 3.4.1: "clipped GD can be arbitrarily faster than GD
  when L1 M is large, or in other words, when the problem has a poor initialization."
* §3.3.1: NGD with γη_c = η_n, η_c = η_n/β takes ½h_c ≤ h_n ≤ 2h_c, so the clipped-GD rates "also apply to NGD".

Two (L0, L1)-smooth functions that are not L-smooth, ε = 1e-3:

* ``poly``: f(x) = x²/2 + x⁴/4 (a Lemma 3.2.1 polynomial; f'' = 1 + 3x² ≤ L0 + L1|f'| with (L0, L1) = (1, 3/2),
  tight at |x| = 1), starts |x0| from 1 to 100 (M = |x0| + |x0|³ up to 10⁶);
* ``cosh``: f(x) = cosh x − 1 (f'' = cosh x ≤ 1 + |sinh x| = L0 + L1|f'|, (L0, L1) = (1, 1); the smooth analogue of
  the e^{L1|x|} function in the proof of Thm 3.4.2, where f'' ≈ L1|f'| far out), starts |x0| from 1 to 12 (M = sinh|x0|
  up to 8·10⁴).

Runs, each counting T_ε from every start:

* ``clipped``: ``lightning_opt.optim.ClippedSGD(scope="global", lr=η_c, max_norm=γ)`` with Thm 3.4.1's η_c, γ
  (the same for every start), gradients by autograd;
* ``ngd``: ``lightning_opt.optim.NormalizedSGD(lr=η_n, beta=β)`` with §3.3.1's η_n = γη_c, β = γ;
* ``gd_thm``: fixed-step GD with Thm 3.4.3's h = 1/(2(M L1 + L0)), M = f'(|x0|);
* ``gd_1_over_L``: fixed-step GD with the classical h = 1/L_S, L_S = sup f'' over the set S of eq. (3.3)
  (= f''(|x0| + 1));
* ``gd_best``: fixed-step GD with the best step for that start on a grid h = 2^{-j/4} (plus 1/L_S);
* ``gd_h_x0_1``: fixed-step GD with Thm 3.4.3's step for |x0| = 1 used from every start.

The GD runs are a float64 scalar loop x ← x − h f'(x) (up to 2·10⁷ steps; a torch loop would take many minutes);
every GD run of at most ``--torch-cap`` steps is repeated with ``torch.optim.SGD`` + autograd and the counts compared.
A GD run is declared diverged once |x_k| > |x0| (here f'(x)/x grows with |x|, so |x| then grows for ever). For the
library runs the script checks every step against eq. (3.5)/(3.6) and the descent inequality of the proof of Thm
3.4.1, f(x_{k+1}) ≤ f(x_k) − h_k f'(x_k)²/2. Reported: T_ε per method and start, log-log slopes of T_ε against |x0|
and against M over the largest starts, the theorems' bounds, and a step-size model T ≈ τ/h (τ = gradient-flow time from
x0 to the ε-point; clipped GD: distance / γη_c while clipped, then τ/η_c).

    python examples/reproductions/l0l1_clipped_gd.py           # full (20-25 s CPU; 30-50 s on the loaded 2-core box)
    python examples/reproductions/l0l1_clipped_gd.py --quick   # smoke test (4 starts per function; ~4 s CPU of work)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _plot import emit, loglog_slope, plt, script_args

from lightning_opt.optim import ClippedSGD, NormalizedSGD

EPS = 1e-3
GD_METHODS = ("gd_thm", "gd_1_over_L", "gd_best", "gd_h_x0_1")
LIB_METHODS = ("clipped", "ngd")
METHODS = (*LIB_METHODS, *GD_METHODS)
BOUNDS = ("thm341_clipped_upper", "thm343_gd_upper", "thm342_class_lower")
LABELS = {
    "clipped": "clipped GD (ClippedSGD), Thm 3.4.1 η_c, γ",
    "ngd": "NGD (NormalizedSGD), η_n = γη_c, β = γ",
    "gd_thm": "GD, h = 1/(2(M L1 + L0)) (Thm 3.4.3)",
    "gd_1_over_L": "GD, h = 1/L_S (L_S = sup f'' on S)",
    "gd_best": "GD, best fixed h for this start (grid)",
    "gd_h_x0_1": "GD, Thm 3.4.3's h for |x0| = 1, all starts",
}
SHORT = {"clipped": "clipped GD", "ngd": "NGD", "gd_thm": "GD, Thm 3.4.3 h", "gd_1_over_L": "GD, h = 1/L_S",
         "gd_best": "GD, best fixed h", "gd_h_x0_1": "GD, h of |x0| = 1"}
COLORS = {"clipped": "tab:blue", "ngd": "tab:cyan", "gd_thm": "tab:red", "gd_1_over_L": "tab:orange",
          "gd_best": "tab:purple", "gd_h_x0_1": "tab:gray"}


@dataclass(frozen=True)
class Problem:
    """A 1-D (L0, L1)-smooth function, even, convex, minimum f* = 0 at 0, f'(x)/x increasing in |x|."""

    name: str
    title: str
    f: Callable[[float], float]
    fprime: Callable[[float], float]
    fsecond: Callable[[float], float]
    objective: Callable[[torch.Tensor], torch.Tensor]
    flow_antiderivative: Callable[[float], float]  # F with F'(x) = 1/f'(x) for x > 0
    L0: float
    L1: float
    full_starts: tuple[float, ...]
    quick_starts: tuple[float, ...]
    trace_start: float | None
    k_min: tuple[float, float]  # slope fits over starts >= k_min (full, quick)
    slope_axis: str  # the plots' slopes: of log T against log |x0| ("x0") or against log M ("M", |x0| axis linear)

    @property
    def eta_c(self) -> float:  # Thm 3.4.1
        return 1.0 / (10.0 * self.L0)

    @property
    def gamma(self) -> float:  # Thm 3.4.1
        return min(1.0 / self.eta_c, 1.0 / (10.0 * self.L1 * self.eta_c))

    def sup_grad(self, x0: float) -> float:
        """M of Assumption 3.4.1: sup |f'| over the sublevel set {f <= f(x0)} = [-|x0|, |x0|]."""
        return self.fprime(abs(x0))

    def sup_hessian(self, x0: float) -> float:
        """L_S: sup f'' over the set S of eq. (3.3) (points within 1 of the sublevel set)."""
        return self.fsecond(abs(x0) + 1.0)


POLY = Problem(
    name="poly", title="f(x) = x²/2 + x⁴/4",
    f=lambda x: 0.5 * x * x + 0.25 * x**4, fprime=lambda x: x + x * x * x, fsecond=lambda x: 1.0 + 3.0 * x * x,
    objective=lambda x: (0.5 * x.pow(2) + 0.25 * x.pow(4)).sum(),
    flow_antiderivative=lambda x: math.log(x / math.sqrt(1.0 + x * x)),
    L0=1.0, L1=1.5, full_starts=(1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0),
    quick_starts=(1.0, 3.0, 10.0, 30.0), trace_start=30.0, k_min=(10.0, 3.0), slope_axis="x0",
)
COSH = Problem(
    name="cosh", title="f(x) = cosh x − 1",
    f=lambda x: math.cosh(x) - 1.0, fprime=math.sinh, fsecond=math.cosh,
    objective=lambda x: (torch.cosh(x) - 1.0).sum(),
    flow_antiderivative=lambda x: math.log(math.tanh(0.5 * x)),
    L0=1.0, L1=1.0, full_starts=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0),
    quick_starts=(1.0, 3.0, 6.0, 9.0), trace_start=None, k_min=(6.0, 3.0), slope_axis="M",
)
PROBLEMS = (POLY, COSH)


# --------------------------------------------------------------------------------------- theorems and step sizes
def smoothness_ratio(p: Problem) -> float:
    """max over a grid of f''(x) / (L0 + L1 |f'(x)|): <= 1 iff (L0, L1) are valid constants on the grid."""
    xs = [0.0, 1.0] + [10 ** (-4 + 6 * i / 4000) for i in range(4001)]
    return max(p.fsecond(x) / (p.L0 + p.L1 * abs(p.fprime(x))) for x in xs)


def theorem_bounds(p: Problem, x0: float) -> dict[str, float]:
    delta, m = p.f(x0), p.sup_grad(x0)
    return {
        "thm341_clipped_upper": 20 * p.L0 * delta / EPS**2 + 20 * max(1.0, p.L1**2) * delta / p.L0,
        "thm343_gd_upper": 4 * (m * p.L1 + p.L0) * delta / EPS**2,
        "thm342_class_lower": p.L1 * m * (delta - 5 * EPS / 8) / (8 * EPS**2 * (math.log(m) + 1)),
    }


def gd_steps(p: Problem, x0: float) -> dict[str, float]:
    thm = lambda s: 1.0 / (2.0 * (p.sup_grad(s) * p.L1 + p.L0))
    return {"gd_thm": thm(x0), "gd_1_over_L": 1.0 / p.sup_hessian(x0), "gd_h_x0_1": thm(1.0)}


def solve_grad(p: Problem, value: float) -> float:
    """The x > 0 with f'(x) = value (bisection; f' is increasing on x > 0)."""
    lo, hi = 0.0, 1.0
    while p.fprime(hi) < value:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p.fprime(mid) < value else (lo, mid)
    return 0.5 * (lo + hi)


def flow_time(p: Problem, a: float, b: float) -> float:
    """Gradient-flow time from x = a down to x = b (0 < b): ∫_b^a dx / f'(x) (0 if a <= b)."""
    return max(0.0, p.flow_antiderivative(a) - p.flow_antiderivative(b))


def model_iterations(p: Problem, method: str, x0: float, h: float | None) -> float:
    """Step-size model: fixed-step GD needs ≈ τ(x0 → x_ε)/h steps; clipped GD moves γη_c per step until |f'| = γ,
    then ≈ τ(x_γ → x_ε)/η_c."""
    x_eps = solve_grad(p, EPS)
    if method == "clipped":
        x_gamma = solve_grad(p, p.gamma)
        travel = max(0.0, x0 - x_gamma) / (p.gamma * p.eta_c)
        return travel + flow_time(p, min(x0, x_gamma), x_eps) / p.eta_c
    return flow_time(p, x0, x_eps) / h if h else math.nan


# ------------------------------------------------------------------------------------------------- GD (scalar loop)
def gd_scalar(p: Problem, x0: float, h: float, cap: int,
              trace: list[tuple[int, float]] | None = None) -> tuple[int | None, str]:
    """Fixed-step GD x <- x - h f'(x) in float64 until |f'(x)| <= EPS. Returns (T_ε or None, status)."""
    fp, bound = p.fprime, abs(x0)
    x, k, g, nxt = x0, 0, fp(x0), 1
    while abs(g) > EPS:
        x -= h * g
        k += 1
        if not abs(x) <= bound:
            return None, "diverged"
        g = fp(x)
        if trace is not None and k >= nxt:
            trace.append((k, abs(g)))
            nxt = math.ceil(nxt * 1.05)
        if k >= cap:
            return None, "cap"
    if trace is not None:
        trace.append((k, abs(g)))
    return k, "converged"


def gd_best(p: Problem, x0: float, cap: int) -> tuple[int, float]:
    """Smallest T_ε over fixed steps h = 2^{-j/4} >= 1/L_S and h = 1/L_S (runs stop once they exceed the best)."""
    h_ref = 1.0 / p.sup_hessian(x0)
    t_ref = gd_scalar(p, x0, h_ref, cap)[0]
    best, best_h = (t_ref if t_ref is not None else cap), h_ref
    j = 0
    while 2 ** (-j / 4) >= h_ref:
        h = 2 ** (-j / 4)
        t, _ = gd_scalar(p, x0, h, best)
        if t is not None and t < best:
            best, best_h = t, h
        j += 1
    return best, best_h


# --------------------------------------------------------------------------------------- torch runs (library)
def run_torch(p: Problem, make_opt: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer], x0: float,
              cap: int) -> dict:
    """Run an optimizer on f from x0 with autograd gradients until |f'| <= EPS; record x_k, f(x_k), f'(x_k)."""
    x = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
    opt = make_opt([x])
    xs: list[float] = []
    fs: list[float] = []
    gs: list[float] = []
    status = "cap"
    for _ in range(cap + 1):
        opt.zero_grad(set_to_none=True)
        loss = p.objective(x)
        loss.backward()
        xs.append(float(x.detach()))
        fs.append(float(loss.detach()))
        gs.append(float(x.grad))
        if abs(gs[-1]) <= EPS:
            status = "converged"
            break
        if not abs(xs[-1]) <= abs(x0):
            status = "diverged"
            break
        opt.step()
    return {"iterations": len(xs) - 1 if status == "converged" else None, "status": status,
            "x": xs, "f": fs, "g": gs}


def library_step(p: Problem, method: str, g: float) -> float:
    """The step size h_k of eq. (3.5) (clipped GD) or eq. (3.6) (NGD, η_n = γη_c, β = γ) at gradient g."""
    if method == "clipped":
        return min(p.eta_c, p.gamma * p.eta_c / abs(g))
    return p.gamma * p.eta_c / (abs(g) + p.gamma)


def make_library(p: Problem, method: str) -> Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]:
    if method == "clipped":
        return lambda params: ClippedSGD(params, lr=p.eta_c, max_norm=p.gamma, scope="global")
    return lambda params: NormalizedSGD(params, lr=p.gamma * p.eta_c, beta=p.gamma)


def step_checks(p: Problem, method: str, run: dict) -> dict[str, float]:
    """Max relative error of each library step vs the formula (in units of float64's machine epsilon), and min of
    the descent ratio (f_k - f_{k+1}) / (h_k g_k² / 2) of the proof of Thm 3.4.1 (>= 1 where its inequality holds)."""
    xs, fs, gs = run["x"], run["f"], run["g"]
    err, ratio = 0.0, math.inf
    for k in range(len(xs) - 1):
        h = library_step(p, method, gs[k])
        err = max(err, abs(xs[k + 1] - (xs[k] - h * gs[k])) / abs(h * gs[k]))
        ratio = min(ratio, (fs[k] - fs[k + 1]) / (0.5 * h * gs[k] ** 2))
    return {"step_rel_err_in_eps": err / 2.0**-52, "descent_ratio_min": ratio}


# ----------------------------------------------------------------------------------------------------- experiment
def library_runs(p: Problem, starts: tuple[float, ...]) -> tuple[dict, dict]:
    results = {m: {"iterations": [], "step_rel_err_in_eps": 0.0, "descent_ratio_min": math.inf} for m in LIB_METHODS}
    traces: dict[str, list[tuple[int, float]]] = {}
    for method in LIB_METHODS:
        r = results[method]
        for x0 in starts:
            run = run_torch(p, make_library(p, method), x0, cap=100_000)
            r["iterations"].append(run["iterations"])
            chk = step_checks(p, method, run)
            r["step_rel_err_in_eps"] = max(r["step_rel_err_in_eps"], chk["step_rel_err_in_eps"])
            r["descent_ratio_min"] = min(r["descent_ratio_min"], chk["descent_ratio_min"])
            if x0 == p.trace_start:
                traces[method] = [(k, abs(g)) for k, g in enumerate(run["g"])]
    return results, traces


def gd_runs(p: Problem, starts: tuple[float, ...], cap: int) -> tuple[dict, dict]:
    results = {m: {"iterations": [], "h": [], "status": []} for m in GD_METHODS}
    traces: dict[str, list[tuple[int, float]]] = {}
    for x0 in starts:
        steps = gd_steps(p, x0)
        best_t, steps["gd_best"] = gd_best(p, x0, cap)
        for method in GD_METHODS:
            trace = [(0, abs(p.fprime(x0)))] if x0 == p.trace_start else None
            t, status = gd_scalar(p, x0, steps[method], cap, trace)
            assert method != "gd_best" or t == best_t, (x0, t, best_t)
            for key, value in (("iterations", t), ("h", steps[method]), ("status", status)):
                results[method][key].append(value)
            if trace is not None and t is not None:
                traces[method] = trace
    return results, traces


def torch_crosscheck(p: Problem, starts: tuple[float, ...], gd: dict, cap: int) -> list[dict]:
    """Repeat every GD run of at most ``cap`` steps with torch.optim.SGD (autograd) and compare T_ε."""
    rows = []
    for method in GD_METHODS:
        for i, x0 in enumerate(starts):
            t, h = gd[method]["iterations"][i], gd[method]["h"][i]
            if t is None or t > cap:
                continue
            run = run_torch(p, lambda params, h=h: torch.optim.SGD(params, lr=h), x0, cap=cap + 10)
            rows.append({"method": method, "x0": x0, "scalar": t, "torch_sgd": run["iterations"]})
    return rows


def fit_slopes(xs: list[float], series: dict[str, list], k_min: float) -> dict[str, float]:
    out = {}
    for name, values in series.items():
        pts = [(s, float(v)) for s, v in zip(xs, values, strict=True) if v is not None]
        out[name] = loglog_slope([q[0] for q in pts], [q[1] for q in pts], k_min) if pts else math.nan
    return out


def linear_increment(starts: tuple[float, ...], values: list, k_min: float) -> float:
    """Least-squares slope of T against |x0| (linear axes) over starts >= k_min: clipped GD's steps per unit
    distance, predicted 1/(γη_c) = 10 L1 by the clipped step length."""
    pts = [(s, float(v)) for s, v in zip(starts, values, strict=True) if s >= k_min and v is not None]
    if len(pts) < 2:
        return math.nan
    mx = sum(q[0] for q in pts) / len(pts)
    my = sum(q[1] for q in pts) / len(pts)
    return sum((q[0] - mx) * (q[1] - my) for q in pts) / sum((q[0] - mx) ** 2 for q in pts)


def bounds_hold(iters: dict, bounds: dict) -> dict[str, bool]:
    ok = lambda ts, bs: all(t is not None and t <= b for t, b in zip(ts, bs, strict=True))
    return {"clipped": ok(iters["clipped"], bounds["thm341_clipped_upper"]),
            "ngd": ok(iters["ngd"], bounds["thm341_clipped_upper"]),
            "gd_thm": ok(iters["gd_thm"], bounds["thm343_gd_upper"])}


def run_problem(p: Problem, quick: bool, torch_cap: int, t0: float) -> tuple[dict, dict]:
    starts = p.quick_starts if quick else p.full_starts
    k_min = p.k_min[1] if quick else p.k_min[0]
    lib, lib_traces = library_runs(p, starts)
    gd, gd_traces = gd_runs(p, starts, cap=10**8)
    cross = torch_crosscheck(p, starts, gd, torch_cap)
    print(f"[{p.name}] runs and {len(cross)} torch.optim.SGD cross-checks done ({time.perf_counter() - t0:.1f}s)",
          flush=True)
    iters = {m: lib[m]["iterations"] for m in LIB_METHODS} | {m: gd[m]["iterations"] for m in GD_METHODS}
    bounds = {key: [theorem_bounds(p, s)[key] for s in starts] for key in BOUNDS}
    m_values = [p.sup_grad(s) for s in starts]
    k_min_m = p.sup_grad(k_min)
    for i, s in enumerate(starts):
        print(f"[{p.name} x0={s:g}] " + " ".join(f"{m}={iters[m][i]}" for m in METHODS), flush=True)
    res = {
        "function": p.title, "slope_axis": p.slope_axis, "L0": p.L0, "L1": p.L1, "eta_c": p.eta_c, "gamma": p.gamma,
        "eta_n": p.gamma * p.eta_c, "beta": p.gamma, "starts": list(starts), "M": m_values, "slope_k_min": k_min,
        "smoothness_ratio_max": smoothness_ratio(p),
        "iterations": iters,
        "gd_h": {m: gd[m]["h"] for m in GD_METHODS},
        "gd_inv_h": {m: [1.0 / h for h in gd[m]["h"]] for m in GD_METHODS},  # 1/h survives emit's 6-decimal rounding
        "gd_status": {m: gd[m]["status"] for m in GD_METHODS},
        "model_iterations": {m: [model_iterations(p, m, s, gd[m]["h"][i] if m in GD_METHODS else None)
                                 for i, s in enumerate(starts)] for m in ("clipped", "gd_thm", "gd_1_over_L")},
        "bounds": bounds,
        "slopes_vs_x0": fit_slopes(list(starts), {**iters, **bounds}, k_min),
        "slopes_vs_M": fit_slopes(m_values, {**iters, **bounds}, k_min_m),
        "clipped_steps_per_unit_x0": linear_increment(starts, iters["clipped"], k_min),
        "predicted_steps_per_unit_x0": 1.0 / (p.gamma * p.eta_c),
        "ratio_to_clipped": {m: [None if t is None else t / c for t, c in zip(iters[m], iters["clipped"], strict=True)]
                             for m in ("gd_thm", "gd_1_over_L", "gd_best")},
        "checks": {m: {k: lib[m][k] for k in ("step_rel_err_in_eps", "descent_ratio_min")} for m in LIB_METHODS},
        "bounds_hold": bounds_hold(iters, bounds),
        "torch_crosscheck": cross,
        "torch_crosscheck_max_diff": max((abs(r["scalar"] - r["torch_sgd"]) if r["torch_sgd"] is not None else 10**9
                                          for r in cross), default=None),
    }
    return res, gd_traces | lib_traces


# ---------------------------------------------------------------------------------------------------------- plot
def _series(xs: list[float], values: list) -> tuple[list[float], list[float]]:
    pts = [(s, float(v)) for s, v in zip(xs, values, strict=True) if v is not None]
    return [q[0] for q in pts], [q[1] for q in pts]


def _loglog(ax: Any, xlabel: str, ylabel: str, title: str, xlog: bool = True) -> None:
    ax.set_xscale("log" if xlog else "linear")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def _what(res: dict) -> str:
    return "slope" if res["slope_axis"] == "x0" else "slope vs M"


def plot_iterations(ax: Any, res: dict) -> None:
    starts, iters, slopes, what = res["starts"], res["iterations"], res[f"slopes_vs_{res['slope_axis']}"], _what(res)
    for method in METHODS:
        xs, ys = _series(starts, iters[method])
        slope = slopes.get(method)
        label = LABELS[method] + (f" — {what} {slope:.2f}" if slope is not None and math.isfinite(slope) else "")
        ax.plot(xs, ys, marker="s" if method == "ngd" else "o", ms=4, color=COLORS[method], label=label,
                ls="--" if method == "ngd" else "-")
        if method in res["model_iterations"]:
            ax.plot(starts, res["model_iterations"][method], ":", color="k", lw=0.9)
    div = [s for s, v in zip(starts, iters["gd_h_x0_1"], strict=True) if v is None]
    if div:
        ax.scatter(div, [1.5] * len(div), marker="x", color=COLORS["gd_h_x0_1"], s=50,
                   label=f"h = {res['gd_h']['gd_h_x0_1'][0]:.3g} (|x0| = 1's) diverges")
    _loglog(ax, "|x0|", "iterations T_ε",
            f"{res['function']}, (L0, L1) = ({res['L0']:g}, {res['L1']:g}): measured; dotted black: model τ/h",
            res["slope_axis"] == "x0")
    ax.legend(fontsize=6.5, loc="upper left")


def plot_bounds(ax: Any, res: dict) -> None:
    starts, slopes, what = res["starts"], res[f"slopes_vs_{res['slope_axis']}"], _what(res)
    for method in ("clipped", "gd_thm"):
        xs, ys = _series(starts, res["iterations"][method])
        ax.plot(xs, ys, "o-", ms=4, color=COLORS[method], label=f"{SHORT[method]} (measured)")
    for key, method in (("thm341_clipped_upper", "clipped"), ("thm343_gd_upper", "gd_thm")):
        ax.plot(starts, res["bounds"][key], "--", color=COLORS[method],
                label=f"{key.replace('_', ' ')} — {what} {slopes[key]:.2f}")
    _loglog(ax, "|x0|", "iterations", f"{res['function']}: measured vs the theorems' upper bounds",
            res["slope_axis"] == "x0")
    ax.legend(fontsize=7, loc="upper left")


def plot_traces(ax: Any, res: dict, traces: dict, x0: float) -> None:
    for method in ("clipped", "ngd", "gd_thm", "gd_1_over_L", "gd_best"):
        if method in traces:
            ks, gs = zip(*[(k + 1, g) for k, g in traces[method]], strict=True)
            ax.plot(ks, gs, color=COLORS[method], label=SHORT[method], ls="--" if method == "ngd" else "-")
    ax.axhline(EPS, color="k", lw=0.8, ls=":")
    _loglog(ax, "iteration k + 1", "|f'(x_k)|", f"{res['function']}: trajectories from x0 = {x0:g}")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 0.08))


def plot_gap(ax: Any, results: dict) -> None:
    markers = {"poly": "o", "cosh": "^"}
    for name, res in results.items():
        for method in ("gd_thm", "gd_best"):
            xs, ys = _series(res["M"], res["ratio_to_clipped"][method])
            ax.plot(xs, ys, marker=markers[name], ms=4, color=COLORS[method],
                    ls="-" if name == "cosh" else "--", label=f"{name}: {SHORT[method]} / clipped GD")
    ms = [10 ** (i / 10) for i in range(0, 61)]
    ax.plot(ms, [m / (math.log(m) + 1) for m in ms], "k:", lw=1,
            label="∝ M/(log M + 1), Remark 3.4.1's gap (scale arbitrary)")
    ax.axhline(1.0, color="gray", lw=0.6)
    _loglog(ax, "M = sup |f'| on the sublevel set of x0", "T_ε(GD) / T_ε(clipped GD)",
            "how much faster clipped GD is, vs M")
    ax.legend(fontsize=7, loc="upper left")


def plot(out: Path, results: dict, traces: dict, dpi: int) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(19, 11))
    plot_iterations(axes[0][0], results["poly"])
    plot_bounds(axes[0][1], results["poly"])
    plot_traces(axes[0][2], results["poly"], traces["poly"], POLY.trace_start or 0.0)
    plot_iterations(axes[1][0], results["cosh"])
    plot_bounds(axes[1][1], results["cosh"])
    plot_gap(axes[1][2], results)
    fig.suptitle(f"Thesis ch. 3 (Thm 3.4.1–3.4.3): iterations to |f'(x)| ≤ ε = {EPS:g} from |x0|, clipped GD with "
                 "(L0, L1)-only constants vs fixed-step GD", fontsize=11)
    fig.tight_layout()
    png = out / "repro_l0l1_clipped_gd.png"
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    args = script_args(__doc__, "4 starts per function (smoke test)",
                       {"torch-cap": ("cross-check GD runs of at most this many steps with torch.optim.SGD",
                                      1_000, 10_000)})
    t0 = time.perf_counter()
    torch_cap = args.torch_cap
    results, traces = {}, {}
    for p in PROBLEMS:
        results[p.name], traces[p.name] = run_problem(p, args.quick, torch_cap, t0)
    png = plot(args.out, results, traces, dpi=60 if args.quick else 100)
    emit({
        "claim": "thesis ch. 3 Thm 3.4.1-3.4.3 / Remark 3.4.1: under (L0, L1)-smoothness clipped GD with (L0, L1)-only "
                 "constants converges from any start, fixed-step GD needs h shrinking with M; clipped GD can be "
                 "arbitrarily faster for poor initialisations",
        "quick": args.quick,
        "config": {"eps": EPS, "torch_cap": torch_cap},
        "problems": results,
    }, png=png, t0=t0)


if __name__ == "__main__":
    main()
