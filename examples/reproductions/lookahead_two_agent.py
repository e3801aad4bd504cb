"""Lookahead-convergence paper Fig. 1 / Thm 2: Lookahead as a two-agent method on a noisy quadratic.

Source (lookahead-convergence.txt):

* Fig. 1 / §2: "Using low values for the slow learning rate α can speed-up the optimization initially, but do not
  achieve as good final training loss as higher α values" (ResNet-34/50, SGD momentum, stepwise lr decay, τ = 5).
* Thm 2 (fixed learning rate, under condition (13) αγL + (1 − α)²γ²L²τ(τ − 1) ≤ 1), eq. (14):
  (1/K) Σ_k E‖∇f(y_k)‖² ≤ 2[f(y₀) − f_inf]/(αγK) + αγLσ² + (1 − α)²γ²L²σ²(τ − 1), with y_k = αx_k + (1 − α)z_k
  (x fast, z slow). §3.1: "comparing to the asymptotic error floor of mini-batch SGD (γLσ²), one can observe that only
  when (1 − α)γL(τ − 1) ≤ 1, Lookahead can achieve a better bound. This puts a constraint on the minimal value of α
  and is corroborated well by experiments in Figure 1."

Problem: the noisy quadratic f(x) = ½ Σ_i h_i x_i², d = 10, h_i log-spaced in [0.1, 1] (L = 1), stochastic gradient
h·x + ξ with ξ_i ~ N(0, h_i) (noise ∝ curvature, as in Zhang et al.'s noisy quadratic model; σ² = Σ h_i), x₀ = 2·1,
64 independent replicas per run (one (64, 10) parameter; the loss is a sum so each row sees its own gradient), noise
drawn from a seeded generator, the same for every run. Every run is a real Lightning ``Trainer.fit`` with plain SGD:
SGD is ``strategy="auto"``, Lookahead is ``LookaheadStrategy(period=τ, alpha=α, mode="sync")`` with ``devices=1``
(classic Lookahead, per its docstring); each Lookahead trajectory is also compared with the paper's recursion
(Alg. 1, eq. (4)-(5)) run in plain torch on the same noise.

* Part 1 (Fig. 1): τ = 5, α ∈ {0.2, 0.5, 0.8} and SGD, lr γ = 0.5 (γL = 0.5) divided by 10 at half the steps.
  Loss of the slow weights (what Lightning evaluates) and of the fast weights, mean over replicas.
* Part 2 (Thm 2 / §3.1): constant γ = 0.5, α ∈ {0.2, 0.5, 0.8} × τ ∈ {2, 5, 10, 20} and SGD. Noise floors averaged
  over the second half of the run: Thm 2's measure ‖∇f(y_k)‖², the fast weights' loss and the slow weights' loss at
  synchronisations, as ratios to SGD's; compared with the exact stationary values of the linear recursion (per
  coordinate, a = 1 − γh, b = a^τ, SGD variance v: slow weights α(1 + b)v/(2 − α + αb)) and with the bound's floor
  ratio [αγLσ² + (1 − α)²γ²L²σ²(τ − 1)] / (γLσ²), which crosses 1 exactly at (1 − α)γL(τ − 1) = 1.

    python examples/reproductions/lookahead_two_agent.py            # full (~1 min on 2 shared CPU cores)
    python examples/reproductions/lookahead_two_agent.py --quick    # smoke test (~5 s of own work)
"""

from __future__ import annotations

import os

# One thread: the box is a shared 2-core CPU, and a DDP-family strategy would otherwise set torch to cpu_count threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from _plot import emit, plt, script_args
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.strategies import LookaheadStrategy

D, REPLICAS, X0, LR, DECAY = 10, 64, 2.0, 0.5, 0.1
H = torch.logspace(-1, 0, D, dtype=torch.float64)  # curvatures; L = 1
NOISE_VAR = H.clone()  # Var ξ_i = h_i
SIGMA2 = float(NOISE_VAR.sum())
L_SMOOTH = float(H.max())
FIG1_ALPHAS, TAU_FIG1 = (0.2, 0.5, 0.8), 5
GRID_ALPHAS, GRID_TAUS = (0.2, 0.5, 0.8), (2, 5, 10, 20)
COLORS = {"sgd": "tab:red", 0.2: "tab:orange", 0.5: "tab:blue", 0.8: "tab:green"}


def f(x: Tensor) -> Tensor:
    return 0.5 * (H * x * x).sum(-1)


def grad_sq(x: Tensor) -> Tensor:
    return (H * x).pow(2).sum(-1)


def noise(steps: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((steps, REPLICAS, D), generator=g, dtype=torch.float64) * NOISE_VAR.sqrt()


class NoisyQuadratic(pl.LightningModule):
    """64 replicas of the noisy quadratic; records the weights after every optimizer step (after any sync)."""

    def __init__(self, steps: int, decay_at: int | None) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.full((REPLICAS, D), X0, dtype=torch.float64))
        self.steps, self.decay_at = steps, decay_at
        self.xi = noise(steps)
        self.post: list[Tensor] = []

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return f(self.x).sum() + (self.xi[batch_idx] * self.x).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.post.append(self.x.detach().clone())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        at = self.decay_at if self.decay_at is not None else self.steps + 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < at else DECAY)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.steps)), batch_size=1)


def fit(alpha: float | None, tau: int, steps: int, decay_at: int | None) -> Tensor:
    """Weights before every step k = 0..steps (row 0 = x₀), shape (steps + 1, 64, 10)."""
    strategy = "auto" if alpha is None else LookaheadStrategy(period=tau, alpha=alpha, mode="sync", timeout=120)
    model = NoisyQuadratic(steps, decay_at)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return torch.cat([torch.full((1, REPLICAS, D), X0, dtype=torch.float64), torch.stack(model.post)])


def reference(alpha: float | None, tau: int, steps: int, decay_at: int | None) -> Tensor:
    """The paper's recursion (Alg. 1; SGD when alpha is None) on the same noise, same layout as :func:`fit`."""
    xi = noise(steps)
    x = torch.full((REPLICAS, D), X0, dtype=torch.float64)
    z, out = x.clone(), [x.clone()]
    for k in range(steps):
        lr = LR if decay_at is None or k < decay_at else LR * DECAY
        x = x - lr * (H * x + xi[k])
        if alpha is not None and (k + 1) % tau == 0:
            z = z + alpha * (x - z)
            x = z.clone()
        out.append(x.clone())
    return torch.stack(out)


def slow_weights(traj: Tensor, tau: int) -> Tensor:
    """z_k for k = 0..steps − 1: the weights at the start of the current round (Lookahead resets x to z there)."""
    k = torch.arange(traj.shape[0] - 1)
    return traj[(k // tau) * tau]


def run(alpha: float | None, tau: int, steps: int, decay_at: int | None) -> dict:
    t0 = time.perf_counter()
    traj = fit(alpha, tau, steps, decay_at)
    ref = reference(alpha, tau, steps, decay_at)
    pre = traj[:-1]
    z = slow_weights(traj, tau) if alpha is not None else pre
    y = pre if alpha is None else alpha * pre + (1 - alpha) * z
    return {"fast": f(pre).mean(-1), "slow": f(z).mean(-1), "grad_y": grad_sq(y).mean(-1),
            "ref_deviation": float((traj - ref).abs().max()), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ exact stationary values
def exact_floors(alpha: float | None, tau: int, lr: float = LR) -> dict[str, float]:
    """Stationary E f(fast, time average), E f(slow), E‖∇f(y)‖² (time average) of the linear recursion."""
    a = 1 - lr * H
    v = lr**2 * NOISE_VAR / (1 - a**2)
    if alpha is None:
        return {"fast": float((H * v).sum() / 2), "slow": float((H * v).sum() / 2), "grad_y": float((H**2 * v).sum())}
    b = a**tau
    ez = alpha * (1 + b) * v / (2 - alpha + alpha * b)
    fast, grad_y = 0.0, 0.0
    for step in range(tau):
        ex = a ** (2 * step) * ez + (1 - a ** (2 * step)) * v
        ey = alpha**2 * ex + (1 - alpha) ** 2 * ez + 2 * alpha * (1 - alpha) * a**step * ez
        fast += float((H * ex).sum() / 2) / tau
        grad_y += float((H**2 * ey).sum()) / tau
    return {"fast": fast, "slow": float((H * ez).sum() / 2), "grad_y": grad_y}


def bound_floor_ratio(alpha: float, tau: int, lr: float = LR) -> float:
    """Thm 2's asymptotic floor over SGD's, [αγLσ² + (1−α)²γ²L²σ²(τ−1)] / (γLσ²) = α + (1−α)²γL(τ−1)."""
    return alpha + (1 - alpha) ** 2 * lr * L_SMOOTH * (tau - 1)


def condition_13(alpha: float, tau: int, lr: float = LR) -> float:
    return alpha * lr * L_SMOOTH + (1 - alpha) ** 2 * (lr * L_SMOOTH) ** 2 * tau * (tau - 1)


# ------------------------------------------------------------------------------------------------------ experiments
def part1(steps: int, alphas: tuple[float, ...]) -> dict:
    decay_at = steps // 2
    out = {}
    for alpha in (None, *alphas):
        r = run(alpha, TAU_FIG1, steps, decay_at)
        out["sgd" if alpha is None else alpha] = r
        print(f"[fig1 {alpha}] slow loss at 50/{decay_at}/{steps}: {float(r['slow'][50]):.4f} "
              f"{float(r['slow'][decay_at - 1]):.4f} {float(r['slow'][-1]):.4f} ({r['seconds']:.1f}s)", flush=True)
    return out


def window_mean(series: Tensor, lo: int, hi: int) -> float:
    return float(series[lo:hi].mean())


def fig1_summary(res: dict, steps: int) -> dict:
    decay_at = steps // 2
    marks = {"early_50": (40, 61), "early_100": (90, 111), "end_phase1": (decay_at - 100, decay_at),
             "final": (steps - 100, steps)}
    table = {str(k): {m: window_mean(r["slow"], lo, hi) for m, (lo, hi) in marks.items()} for k, r in res.items()}
    la = [k for k in res if k != "sgd"]
    ranking = {m: [str(a) for a in sorted(la, key=lambda a, m=m: table[str(a)][m])] for m in marks}
    return {"slow_loss": table, "alpha_ranking_low_to_high_loss": ranking,
            "ref_deviation": max(r["ref_deviation"] for r in res.values())}


def part2(steps: int, cells: list[tuple[float, int]]) -> dict:
    half = steps // 2
    sgd = run(None, 1, steps, None)
    base = {m: window_mean(sgd[m], half, steps) for m in ("fast", "slow", "grad_y")}
    rows = {"sgd": {"measured": base, "exact": exact_floors(None, 1), "ref_deviation": sgd["ref_deviation"]}}
    for alpha, tau in cells:
        r = run(alpha, tau, steps, None)
        meas = {m: window_mean(r[m], half, steps) for m in ("fast", "slow", "grad_y")}
        exact = exact_floors(alpha, tau)
        rows[f"{alpha}_{tau}"] = {
            "alpha": alpha, "tau": tau, "measured": meas, "exact": exact,
            "ratio_to_sgd": {m: meas[m] / base[m] for m in meas},
            "exact_ratio_to_sgd": {m: exact[m] / rows["sgd"]["exact"][m] for m in exact},
            "bound_ratio_to_sgd": bound_floor_ratio(alpha, tau),
            "condition_lhs": (1 - alpha) * LR * L_SMOOTH * (tau - 1),  # ≤ 1: the bound beats SGD's
            "condition_13": condition_13(alpha, tau),  # ≤ 1: Thm 2 applies
            "ref_deviation": r["ref_deviation"],
        }
        ratios = rows[f"{alpha}_{tau}"]
        print(f"[thm2 α={alpha} τ={tau}] floor ratio to SGD: grad_y {ratios['ratio_to_sgd']['grad_y']:.3f} (exact "
              f"{ratios['exact_ratio_to_sgd']['grad_y']:.3f}, bound {ratios['bound_ratio_to_sgd']:.2f}), slow "
              f"{ratios['ratio_to_sgd']['slow']:.3f} ({r['seconds']:.1f}s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ plotting
def plot_fig1(ax, res: dict, steps: int) -> None:
    k = torch.arange(1, steps + 1)
    for key, r in res.items():
        lab = "SGD" if key == "sgd" else f"Lookahead α={key}, τ={TAU_FIG1}"
        ax.semilogy(k, r["slow"], color=COLORS[key], lw=1.2, label=lab + (" (slow weights)" if key != "sgd" else ""))
        if key != "sgd":
            ax.semilogy(k, r["fast"], color=COLORS[key], lw=0.4, alpha=0.25)
    ax.set_xscale("log")
    ax.axvline(steps // 2, color="k", ls=":", lw=1)
    ax.set_xlabel("step + 1 (lr 0.5 → 0.05 at the dotted line)")
    ax.set_ylabel("f, mean over 64 replicas (thin: fast weights)")
    ax.set_title("Fig. 1 analogue: step-decay lr, τ = 5", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def plot_ratios(ax, rows: dict, metric: str, title: str) -> None:
    for alpha in GRID_ALPHAS:
        cells = [r for key, r in rows.items() if key != "sgd" and r["alpha"] == alpha]
        if not cells:
            continue
        taus = [r["tau"] for r in cells]
        ax.plot(taus, [r["ratio_to_sgd"][metric] for r in cells], "o", color=COLORS[alpha], label=f"α={alpha} measured")
        ax.plot(taus, [r["exact_ratio_to_sgd"][metric] for r in cells], "-", color=COLORS[alpha], lw=1,
                label=f"α={alpha} exact stationary value")
        if metric == "grad_y":
            ax.plot(taus, [r["bound_ratio_to_sgd"] for r in cells], "--", color=COLORS[alpha], lw=1,
                    label=f"α={alpha} Thm 2 bound / SGD bound")
            ax.axvline(1 + 1 / ((1 - alpha) * LR * L_SMOOTH), color=COLORS[alpha], ls=":", lw=1)
    ax.axhline(1.0, color="tab:red", lw=1.2, label="SGD (= 1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("τ  (dotted: (1−α)γL(τ−1) = 1)" if metric == "grad_y" else "τ")
    ax.set_ylabel("noise floor / SGD's")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, which="both")


def plot(fig1: dict, rows: dict, steps1: int, png: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    plot_fig1(axes[0], fig1, steps1)
    plot_ratios(axes[1], rows, "grad_y", "Thm 2's measure: time average of ‖∇f(y_k)‖², constant γ = 0.5")
    plot_ratios(axes[2], rows, "slow", "loss of the slow weights at syncs, constant γ = 0.5")
    fig.suptitle(f"Lookahead-convergence paper Fig. 1 / Thm 2 on a noisy quadratic (d={D}, h∈[0.1,1], ξ_i~N(0,h_i), "
                 "64 replicas; LookaheadStrategy devices=1 vs SGD)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    args = script_args(__doc__, "fewer runs and steps (smoke test)")
    t0 = time.perf_counter()
    steps1, steps2 = (400, 400) if args.quick else (2000, 2000)
    alphas = (0.2, 0.8) if args.quick else FIG1_ALPHAS
    cells = [(0.2, 2), (0.2, 20)] if args.quick else [(a, t) for a in GRID_ALPHAS for t in GRID_TAUS]
    fig1 = part1(steps1, alphas)
    rows = part2(steps2, cells)
    png = args.out / "repro_lookahead_two_agent.png"
    plot(fig1, rows, steps1, png)
    emit({"claim": "Lookahead-convergence paper Fig. 1 / Thm 2", "quick": args.quick, "lr": LR, "decay": DECAY,
          "sigma2": SIGMA2, "L": L_SMOOTH, "tau_fig1": TAU_FIG1, "steps": [steps1, steps2],
          "fig1": fig1_summary(fig1, steps1), "thm2": rows, "png": str(png), "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
