"""Smoke test of the issue-12 reproduction #12 (thesis ch. 3, Thm 3.4.1 / 3.4.3: clipped GD vs fixed-step GD under
(L0, L1)-smoothness, ``examples/reproductions/l0l1_clipped_gd.py``): the script's ``--quick`` mode in a subprocess
(starts |x0| = 1, 3, 10, 30 on f = x²/2 + x⁴/4 and 1, 3, 6, 9 on f = cosh x − 1), its JSON summary and PNG, and the
claims that are exact or robust at that size. Quick-mode iteration counts when written: poly clipped GD 66 / 96 /
201 / 501, GD with Thm 3.4.3's step 49 / 626 / 20923 / 560111, best fixed step 1 / 31 / 367 / 3005; cosh clipped GD
65 / 85 / 115 / 145, Thm 3.4.3's step 26 / 161 / 3074 / 61597, best fixed step 2 / 7 / 138 / 1939."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dist import run_python

pytestmark = pytest.mark.timeout(120)
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproductions" / "l0l1_clipped_gd.py"
PROBLEMS = ("poly", "cosh")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("repro_l0l1")
    proc = run_python([sys.executable, SCRIPT, "--quick", "--out", out], timeout=110)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    r = json.loads(lines[0][len("RESULT "):])
    assert r["quick"] is True and set(r["problems"]) == set(PROBLEMS)
    png = Path(r["png"])
    assert png.parent == out and png.name == "repro_l0l1_clipped_gd.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    return r


@pytest.mark.parametrize("name", PROBLEMS)
def test_constants_are_the_theorems(result, name):
    p = result["problems"][name]
    approx = lambda v: pytest.approx(v, rel=1e-4, abs=1e-6)  # the summary is rounded to 6 decimals
    # Thm 3.4.1: η_c = 1/(10 L0), γ = min{1/η_c, 1/(10 L1 η_c)}; §3.3.1: η_n = γη_c, β = γ
    assert p["eta_c"] == approx(1 / (10 * p["L0"]))
    assert p["gamma"] == approx(min(1 / p["eta_c"], 1 / (10 * p["L1"] * p["eta_c"])))
    assert p["eta_n"] == approx(p["gamma"] * p["eta_c"]) and p["beta"] == approx(p["gamma"])
    assert p["smoothness_ratio_max"] == pytest.approx(1.0, abs=1e-6)  # (L0, L1) valid (and tight) on a grid
    # Thm 3.4.3's step h = 1/(2(M L1 + L0)), M = f'(|x0|), shrinks with the start
    for m, inv_h in zip(p["M"], p["gd_inv_h"]["gd_thm"], strict=True):
        assert inv_h == approx(2 * (m * p["L1"] + p["L0"]))


@pytest.mark.parametrize("name", PROBLEMS)
def test_library_optimizers_follow_eq_3_5_and_the_descent_inequality(result, name):
    p = result["problems"][name]
    for method in ("clipped", "ngd"):
        chk = p["checks"][method]
        assert chk["step_rel_err_in_eps"] < 1e4, method  # every ClippedSGD / NormalizedSGD step is eq. (3.5) / (3.6)
        assert chk["descent_ratio_min"] >= 1.0, method  # f(x_k+1) <= f(x_k) - h_k f'(x_k)²/2 (proof of Thm 3.4.1)
        assert all(isinstance(t, int) for t in p["iterations"][method]), method  # converged from every start


@pytest.mark.parametrize("name", PROBLEMS)
def test_clipped_gd_moves_gamma_eta_per_step(result, name):
    # While clipped, a step has length γη_c = 1/(10 L1): T grows by 1/(γη_c) per unit of |x0| (poly 15, cosh 10).
    p = result["problems"][name]
    assert p["predicted_steps_per_unit_x0"] == pytest.approx(10 * p["L1"])
    assert p["clipped_steps_per_unit_x0"] == pytest.approx(p["predicted_steps_per_unit_x0"], rel=0.02)
    for t, model in zip(p["iterations"]["clipped"], p["model_iterations"]["clipped"], strict=True):
        assert abs(t - model) <= 0.1 * model


@pytest.mark.parametrize("name", PROBLEMS)
def test_fixed_step_gd_needs_a_shrinking_step_and_falls_far_behind(result, name):
    p = result["problems"][name]
    s, it = p["slopes_vs_M"], p["iterations"]
    assert 0.9 < s["gd_thm"] < 1.1  # T ∝ 1/h ∝ M L1 + L0 (measured 1.00 / 0.99)
    assert s["gd_best"] > s["clipped"] + 0.3  # even the best fixed step for each start grows faster (0.43 / 0.85)
    ratios = p["ratio_to_clipped"]["gd_thm"]
    assert ratios[-1] > 300 and all(b > 3 * a for a, b in zip(ratios[1:], ratios[2:]))  # the gap keeps growing
    assert it["gd_best"][-1] > 4 * it["clipped"][-1]
    # one fixed step for every start (Thm 3.4.3's h for |x0| = 1) diverges from the larger starts (Thm 3.4.2, part 1)
    assert p["gd_status"]["gd_h_x0_1"] == ["converged", "converged", "diverged", "diverged"]
    assert p["bounds_hold"] == {"clipped": True, "ngd": True, "gd_thm": True}  # Thm 3.4.1 / 3.4.3 upper bounds
    assert p["torch_crosscheck"] and p["torch_crosscheck_max_diff"] == 0  # scalar GD == torch.optim.SGD


def test_polynomial_vs_exponential_scaling(result):
    poly, cosh = result["problems"]["poly"], result["problems"]["cosh"]
    # poly: clipped T ∝ |x0| (slope < 1 at these sizes), best fixed step ∝ |x0|² (sup f'' on S ∝ |x0|²)
    assert poly["slopes_vs_x0"]["clipped"] < 1.0 and 1.7 < poly["slopes_vs_x0"]["gd_best"] < 2.3
    assert 2.7 < poly["slopes_vs_x0"]["gd_thm"] < 3.2
    # cosh: clipped T ∝ |x0| ≈ log M, best fixed step ∝ M (f'' ≈ L1 |f'|: Remark 3.4.1's gap)
    assert cosh["slopes_vs_M"]["clipped"] < 0.2 and cosh["slopes_vs_M"]["gd_best"] > 0.8
