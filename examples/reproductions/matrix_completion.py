"""Reproduce LSGD paper Fig. 1 (Teng et al. 2019): low-rank matrix completion, LSGD vs EASGD vs Local SGD.

Problem (paper eq. in §2 and Suppl. §8): min_X F(X) = ¼‖M − XXᵀ‖²_F over X ∈ R^{d×r}, M = UUᵀ, U ~ N(0, 1). All
local minimisers are global, but they form a continuum (X·Q for any orthogonal Q), so workers that start from
different points X_0^i ~ N(0, 1) head for *different* minimisers. The paper's claim: elastic averaging pulls every
worker toward the centre (≈ the workers' mean, which is not a minimiser), so EASGD "slows down significantly as it
approaches a minimizer", while the leader's pull does not hold the best worker back. Metric: the best worker's
objective at each step (paper Fig. 1), here relative to F(0) = ¼‖M‖²_F.

Scale-down (CPU, 4 real gloo processes via :func:`lightning_opt.testing.run_ranks`, one per worker): d = 40,
r = 3 instead of d = 1000, r ∈ {1, 10, 50, 100} and 8 workers; the paper's η = 5e-4 at d = 1000 (η‖M‖ ≈ 0.5)
becomes η = 0.008 here (η‖M‖ ≈ 0.5). Unlike the paper's deterministic EAGD/LGD, every worker uses its own stochastic
gradient from a fresh random 30 % of the entries each step (unbiased for ∇F). Communication period τ = 1 (the
paper's). Two couplings:

* ``beta043`` — EASGD β = 0.43 (the EASGD paper's moving rate, used for the LSGD paper's EASGD baselines), elastic
  coefficient α = β/N; LSGD with the same per-worker pull λ = α.
* ``paper_fig1`` — the paper's Fig. 1 coupling (Suppl. §8): per-step pull ηλ with λ = 1/5, i.e. α = 0.2η for both
  (EASGD β = Nα). Local SGD (averaging every step) has no coupling parameter and is run once.

Same lr, step budget, problem instances, starting points and sampled entries for every strategy.

    python examples/reproductions/matrix_completion.py            # 3 instances × 400 steps, both couplings
    python examples/reproductions/matrix_completion.py --quick    # 1 instance × 60 steps (smoke test)

Writes docs/img/repro_matrix_completion.png (``--png``) and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _load_testing():
    """``lightning_opt.testing`` (stdlib only) loaded from its file: importing the package would register the
    strategies, i.e. import Lightning, in this driver process that only launches the ranks and plots."""
    spec = importlib.util.spec_from_file_location("_lightning_opt_testing", ROOT / "lightning_opt" / "testing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_ranks = _load_testing().run_ranks

DEFAULT_PNG = ROOT / "docs" / "img" / "repro_matrix_completion.png"
RANK_SCRIPT = HERE / "_matrix_completion_rank.py"
WORKERS, D, R, LR, Q, TAU = 4, 40, 3, 0.008, 0.3, 1
CHECKPOINTS = (25, 50, 100, 200)
COLORS = {"lsgd": "tab:blue", "easgd": "tab:red", "local_sgd": "tab:green"}
LABELS = {"lsgd": "LSGD", "easgd": "EASGD", "local_sgd": "Local SGD (average every step)"}


def settings() -> dict[str, dict[str, dict]]:
    beta_alpha = 0.43 / WORKERS
    paper_alpha = 0.2 * LR
    out = {
        "beta043": {
            "lsgd": {"period": TAU, "pull": beta_alpha, "leader_window": 1},
            "easgd": {"period": TAU, "beta": 0.43},
            "local_sgd": {"period": TAU},
        },
        "paper_fig1": {
            "lsgd": {"period": TAU, "pull": paper_alpha, "leader_window": 1},
            "easgd": {"period": TAU, "beta": WORKERS * paper_alpha},
            "local_sgd": {"period": TAU},
        },
    }
    return out


def make_plan(steps: int, seeds: list[int]) -> list[dict]:
    plan, done_local = [], set()
    for setting, strategies in settings().items():
        for name, kwargs in strategies.items():
            for seed in seeds:
                if name == "local_sgd" and seed in done_local:
                    continue  # no coupling parameter: one run serves both settings
                if name == "local_sgd":
                    done_local.add(seed)
                plan.append({"id": f"{setting}-{name}-{seed}", "setting": setting, "strategy": name,
                             "kwargs": kwargs, "d": D, "r": R, "seed": seed, "lr": LR, "q": Q, "steps": steps})
    return plan


def read_logs(workdir: Path, plan: list[dict]) -> tuple[dict, dict, dict]:
    """Run id → best (and worst) worker's F(X)/F(0) per step (index 0 = the starting points), and run id →
    the worst worker's final F(X)/F(0) and how far apart the workers end: mean pairwise ‖X_i − X_j‖/‖X_j‖, raw and
    after the best rotation Q (orthogonal Procrustes). F is invariant under X → XQ, so a small aligned spread with a
    large raw one means the workers sit near *different* points of the same orbit of minimisers — the situation the
    paper blames for EASGD's slowdown."""
    import numpy as np

    curves, worst, spreads = {}, {}, {}
    for run in plan:
        logs = [json.loads((workdir / f"{run['id']}_rank{r}.json").read_text()) for r in range(WORKERS)]
        f0 = logs[0]["f_zero"]
        curves[run["id"]] = [min(vals) / f0 for vals in zip(*(log["objective"] for log in logs))]
        worst[run["id"]] = [max(vals) / f0 for vals in zip(*(log["objective"] for log in logs))]
        xs = [np.asarray(log["final_x"]) for log in logs]
        raw, aligned = [], []
        for i in range(WORKERS):
            for j in range(i + 1, WORKERS):
                u, _, vt = np.linalg.svd(xs[j].T @ xs[i])
                norm = np.linalg.norm(xs[j])
                raw.append(np.linalg.norm(xs[i] - xs[j]) / norm)
                aligned.append(np.linalg.norm(xs[i] - xs[j] @ (u @ vt)) / norm)
        spreads[run["id"]] = {"raw": float(np.mean(raw)), "aligned": float(np.mean(aligned)),
                              "worst_worker": worst[run["id"]][-1]}
    return curves, worst, spreads


def runs_of(plan: list[dict], setting: str, name: str) -> list[str]:
    """Run ids of strategy ``name`` in ``setting`` (Local SGD has no coupling: its runs serve every setting)."""
    return [p["id"] for p in plan if p["strategy"] == name and (p["setting"] == setting or name == "local_sgd")]


def summarise(plan: list[dict], curves: dict[str, list[float]], spreads: dict[str, dict[str, float]], steps: int,
              quick: bool) -> dict:
    out: dict = {"config": {"workers": WORKERS, "d": D, "r": R, "lr": LR, "sampled_fraction": Q, "period": TAU,
                            "steps": steps, "instances": sorted({p["seed"] for p in plan}), "quick": quick,
                            "metric": "best worker's F(X)/F(0), median over instances"},
                 "settings": {}}
    for setting, strategies in settings().items():
        block = {}
        for name, kwargs in strategies.items():
            ids = runs_of(plan, setting, name)
            runs = [curves[i] for i in ids]
            at = {str(s): statistics.median(c[s] for c in runs) for s in CHECKPOINTS if s <= steps}
            at[str(steps)] = statistics.median(c[steps] for c in runs)
            block[name] = {"kwargs": kwargs, "best_rel_objective_at_step": at,
                           "final_per_instance": [c[steps] for c in runs],
                           "steps_to_1e-8_per_instance": [next((t for t, v in enumerate(c) if v < 1e-8), None)
                                                          for c in runs],
                           "final_worst_worker_rel_objective": statistics.median(spreads[i]["worst_worker"]
                                                                                 for i in ids),
                           "final_worker_spread": {k: statistics.median(spreads[i][k] for i in ids)
                                                   for k in ("raw", "aligned")}}
        out["settings"][setting] = block
    return out


def plot(plan: list[dict], curves: dict[str, list[float]], worst: dict[str, list[float]], summary: dict,
         png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.0 * len(names), 4.2), squeeze=False)
    titles = {"beta043": f"EASGD β = 0.43 (α = β/N), LSGD pull λ = α = {0.43 / WORKERS:.4g}",
              "paper_fig1": f"paper Fig. 1 coupling (Suppl. §8): α = λ = η/5 = {0.2 * LR:.4g} per step"}
    for ax, setting in zip(axes[0], names):
        for name in summary["settings"][setting]:
            for i, run_id in enumerate(runs_of(plan, setting, name)):
                c = curves[run_id]
                ax.semilogy([max(v, 1e-32) for v in c], color=COLORS[name], lw=1.3, alpha=0.85,
                            label=f"{LABELS[name]}: best worker" if i == 0 else None)
            if name != "local_sgd":  # Local SGD's workers are identical after every sync
                med = [statistics.median(vals) for vals in zip(*(worst[i] for i in runs_of(plan, setting, name)))]
                ax.semilogy([max(v, 1e-32) for v in med], color=COLORS[name], lw=1.0, ls=":",
                            label=f"{LABELS[name]}: worst worker (median)")
        ax.set_title(f"{titles[setting]}\n(d={D}, r={R}, {WORKERS} workers, τ={TAU}, η={LR}, {int(Q * 100)}% entries)",
                     fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("F(X) / F(0)   (fp64 floor ≈ 1e-32)")
        ax.set_ylim(1e-32, 10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("LSGD paper Fig. 1 (scaled down): low-rank matrix completion, ¼‖M − XXᵀ‖²", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 instance, 60 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--instances", type=int, default=None)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    ap.add_argument("--workdir", type=Path, default=None, help="where the ranks write their logs (default: temp)")
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.quick else 400)
    seeds = list(range(args.instances or (1 if args.quick else 3)))
    plan = make_plan(steps, seeds)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "plan.json").write_text(json.dumps(plan))
        run_ranks(RANK_SCRIPT, workdir, world_size=WORKERS, timeout=590,
                  extra_env={"PYTHONPATH": str(ROOT)})
        curves, worst, spreads = read_logs(workdir, plan)
    summary = summarise(plan, curves, spreads, steps, args.quick)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    plot(plan, curves, worst, summary, args.png)
    summary["png"] = str(args.png)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
