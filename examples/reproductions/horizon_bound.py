"""Curvature paper Cor. 5.4 / Thm 6.7: the horizon s = γτ is bounded by the negative curvature L⁻.

Source (curvature-lookahead-localsgd.txt, §5 and §6.2):

* Thm 5.3 (Lookahead, Alg. 1): "if γ < (L⁺ + (1 − α)L⁻τ)⁻¹", the average E‖∇F(x_{t,l})‖² over the fast weights is at
  most 2(F(z₀) − min F)/(αγTτ) + (L⁺ + (1 − α)L⁻τ)γσ² (eq. (1)).
* Cor. 5.4: "for any s < 1/((1 − α)L⁻), and all small enough γ < (1 − s(1 − α)L⁻)/L⁺, the convergence result
  Eq. (1) in Theorem 5.3 holds with τ = s/γ" -- "the maximum horizon is bounded by negative curvature, and is
  irrelevant to positive curvature".
* Thm 6.7 (Local SGD, Alg. 2, identical data): "if γ < (L⁺ + L⁻τ)⁻¹" the same kind of bound holds with
  (L⁺ + L⁻τ)γσ² (eq. (10)); "this convergence condition effectively says γL⁺ = O(1) and γL⁻τ = O(1)", i.e. the
  Local SGD horizon is s < (1 − γL⁺)/L⁻ → 1/L⁻ (no (1 − α) factor: averaging N workers).
* Both proofs pay for the synchronisation with lower smoothness only: Lemma 5.1, F(z_{t+1}) − F(z_t) ≤
  α(F(x_{t,τ}) − F(z_t)) + (L⁻/2)α(1 − α)‖x_{t,τ} − z_t‖², and Lemma 6.6, F(z_{t+1}) ≤ E_i F(x_{i,t,τ}) +
  (L⁻/2)E_i‖x_{i,t,τ} − E_i x_{i,t,τ}‖². Under the condition the slow (consensus) loss decreases every round up to the
  noise term; Fig. 1 of the paper (not in the text extraction) is a counterexample where a too long horizon breaks it.

Function (our design; the paper's Fig. 1 is not in the text): the tilted Mexican hat
F(p) = ¼(‖p‖² − 1)² + c·p₁, c = 0.05, p ∈ R². Its Hessian is (‖p‖² − 1)I + 2ppᵀ, whose smallest eigenvalue
‖p‖² − 1 ≥ −1, so Assumption 4.3 holds globally with L⁻ = 1 exactly (attained at the origin, where the Lemmas are
tight); L⁺ = 3‖p‖² − 1 on the visited region (reported). A local maximum ("top", x ≈ 0.050), a saddle on the ring
(x ≈ 0.974) and the global minimum (x ≈ −1.024) lie on the x-axis: from the saddle side the gradient flow goes around
the hill along the ring, so an interpolation (Lookahead) or an average (Local SGD) of points far apart on the ring
cuts through the hill -- the mechanism Lemmas 5.1/6.6 bound. Stochastic gradient ∇F(p) + ξ, ξ ~ N(0, σ²/2 · I₂),
σ = 0.05, lr γ = 0.1, 64 replicas per run (one (64, 2) parameter: the loss is a sum, so every 2-vector gets exactly its
own gradient and noise): 32 on the ring at ±0.15..0.6 rad from the saddle ("ring"), 16 exactly at the saddle
("saddle"), 16 exactly at the hill top ("top").

Runs (real Lightning ``Trainer.fit``, plain SGD): ``LookaheadStrategy(period=τ, alpha=α, mode="sync")`` with
``devices=1`` (classic Lookahead, per its docstring) for α = 0.5 and 0.8, and ``LocalSGDStrategy(period=τ)`` on 2 gloo
CPU ranks (``start_method="fork"``; Thm 6.7 is about N ≥ 2 workers on identical data: their disagreement comes only
from noise amplified by negative curvature, so one rank would be plain SGD). τ is swept so that the horizon in units
of the bound, s(1 − α)L⁻ (Lookahead) or sL⁻ (Local SGD), covers 1/4 … 32 (64). Every run has ≥ 6 rounds and ≥ 3000
steps (--quick: fewer). Measured per run and replica group: whether the slow/consensus loss ever rose at a
synchronisation by > 1e-3 (the per-round descent the proofs guarantee), convergence (F − min F < 0.01 at the end),
steps to get there, the synchronisation penalty F(z_{t+1}) − [αF(x_{t,τ}) + (1 − α)F(z_t)] (Lookahead) or
F(z_{t+1}) − E_i F(x_{i,t,τ}) (Local SGD) and its ratio to the Lemma's bound (must be ≤ 1; = 1 means the Lemma is
tight), and, as a check of the strategies, the largest deviation of the synchronised weights from Alg. 1 / Alg. 2.

    python examples/reproductions/horizon_bound.py            # full (~3 min on 2 shared CPU cores)
    python examples/reproductions/horizon_bound.py --quick    # smoke test (~10 s)
"""

from __future__ import annotations

import os

# One thread: the box is a shared 2-core CPU, and a DDP-family strategy would otherwise set torch to cpu_count threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import math
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from _plot import emit, plt, script_args
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy

TILT, L_MINUS, LR, SIGMA = 0.05, 1.0, 0.1, 0.05
CONVERGED, INCREASE = 0.01, 1e-3  # F − min F below which a run has converged; a rise of the slow loss that counts
GROUPS = {"ring": slice(0, 32), "saddle": slice(32, 48), "top": slice(48, 64)}
# (method, α): multiples of the bound swept (full, quick)
SWEEPS = {
    ("lookahead", 0.5): ((0.25, 0.5, 1, 2, 4, 8, 16, 32), (0.5, 16)),
    ("lookahead", 0.8): ((0.25, 0.5, 1, 4, 8, 16), ()),
    ("local_sgd", 0.0): ((0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), (1, 8)),
}
COLORS = {"lookahead_0.5": "tab:blue", "lookahead_0.8": "tab:purple", "local_sgd": "tab:green"}


def loss_fn(p: Tensor) -> Tensor:
    """F(p) = ¼(‖p‖² − 1)² + c·p₁, one value per row."""
    return 0.25 * (p.pow(2).sum(-1) - 1).pow(2) + TILT * p[..., 0]


def critical_x() -> tuple[float, float, float]:
    """x-coordinates of the minimum, the hill top and the saddle: the roots of x³ − x + c = 0."""
    companion = torch.tensor([[0.0, 1.0, -TILT], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    lo, mid, hi = sorted(torch.linalg.eigvals(companion).real.tolist())
    return lo, mid, hi


def starts() -> Tensor:
    _, top, saddle = critical_x()
    ang = torch.linspace(0.15, 0.6, 16, dtype=torch.float64)
    ang = torch.cat([ang, -ang])
    ring = torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    fixed = torch.tensor([[saddle, 0.0]] * 16 + [[top, 0.0]] * 16, dtype=torch.float64)
    return torch.cat([ring, fixed])


class HatReplicas(pl.LightningModule):
    """64 independent 2-vectors on F with seeded Gaussian gradient noise; records every step's local result (before
    any synchronisation) and the weights after it, and saves them per rank at the end of the fit."""

    def __init__(self, start: Tensor, steps: int, seed: int, out: Path) -> None:
        super().__init__()
        self.p = nn.Parameter(start.clone())
        self.steps, self.seed, self.out = steps, seed, out
        self.noise = torch.zeros(0)
        self.local: list[Tensor] = []
        self.post: list[Tensor] = []

    def on_fit_start(self) -> None:
        g = torch.Generator().manual_seed(1000 * self.seed + self.global_rank)
        shape = (self.steps, *self.p.shape)
        self.noise = torch.randn(shape, generator=g, dtype=torch.float64) * (SIGMA / math.sqrt(2))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return loss_fn(self.p).sum() + (self.noise[batch_idx] * self.p).sum()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.local.append((self.p - LR * self.p.grad).detach().clone())  # plain SGD's step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.post.append(self.p.detach().clone())

    def on_train_end(self) -> None:
        torch.save({"local": torch.stack(self.local), "post": torch.stack(self.post)},
                   self.out / f"rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.steps)), batch_size=1)


def fit(method: str, alpha: float, tau: int, steps: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """One ``Trainer.fit``; returns each rank's recorded ``local`` / ``post`` tensors (steps, 64, 2)."""
    devices = 1 if method == "lookahead" else 2
    if method == "lookahead":
        strategy: pl.strategies.Strategy = LookaheadStrategy(period=tau, alpha=alpha, mode="sync", timeout=120)
    else:
        strategy = LocalSGDStrategy(period=tau, start_method="fork", timeout=120)
    with tempfile.TemporaryDirectory() as tmp:
        model = HatReplicas(starts(), steps, seed, Path(tmp))
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, max_epochs=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        )  # fmt: skip
        trainer.fit(model)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(devices)]


def sync_terms(ranks: list[dict[str, Tensor]], tau: int, alpha: float, lookahead: bool) -> dict[str, Tensor]:
    """Slow/consensus weights z_0..z_R, the synchronisation penalty, the Lemma's bound and the deviation from the
    algorithm's own update (Alg. 1: z + α(x − z); Alg. 2: the workers' mean)."""
    post = ranks[0]["post"]
    idx = torch.arange(1, post.shape[0] // tau + 1) * tau - 1
    z = torch.cat([starts()[None], post[idx]])
    x = torch.stack([r["local"][idx] for r in ranks])  # (workers, rounds, 64, 2)
    if lookahead:
        expected = z[:-1] + alpha * (x[0] - z[:-1])
        interp = alpha * loss_fn(x[0]) + (1 - alpha) * loss_fn(z[:-1])
        lemma = 0.5 * L_MINUS * alpha * (1 - alpha) * (x[0] - z[:-1]).pow(2).sum(-1)
    else:
        expected = x.mean(0)
        interp = loss_fn(x).mean(0)
        lemma = 0.5 * L_MINUS * (x - z[1:]).pow(2).sum(-1).mean(0)
    rank_dev = max(float((r["post"][idx] - post[idx]).abs().max()) for r in ranks)
    visited = torch.cat([post.reshape(-1, 2)] + [r["local"].reshape(-1, 2) for r in ranks])
    return {"z": z, "penalty": loss_fn(z[1:]) - interp, "lemma": lemma, "rank_dev": rank_dev,
            "dev": float((z[1:] - expected).abs().max()), "r_max": float(visited.norm(dim=-1).max())}


def group_stats(terms: dict[str, Tensor], sl: slice, tau: int, f_min: float) -> dict:
    fz = loss_fn(terms["z"][:, sl])
    rise = fz[1:] - fz[:-1]
    gap = fz - f_min
    reached = [int((g < CONVERGED).nonzero()[0]) * tau if bool((g < CONVERGED).any()) else None for g in gap.T]
    pen, lemma = terms["penalty"][:, sl], terms["lemma"][:, sl]
    ratio = torch.where(lemma > 1e-9, pen / lemma.clamp_min(1e-9), torch.zeros(()))
    done = [r for r in reached if r is not None]
    return {
        "converged": float((gap[-1] < CONVERGED).double().mean()),
        "slow_loss_rose": float((rise > INCREASE).any(0).double().mean()),
        "max_rise": float(rise.max()),
        "penalty_max_median": statistics.median(pen.max(0).values.tolist()),
        "lemma_ratio_max": float(ratio.max()),
        "steps_to_min_median": statistics.median(done) if len(done) * 2 > len(reached) else None,
        "final_gap_median": statistics.median(gap[-1].tolist()),
    }


def one_run(method: str, alpha: float, multiple: float, min_steps: int, min_rounds: int) -> dict:
    factor = (1 - alpha) * L_MINUS if method == "lookahead" else L_MINUS
    tau = max(1, round(multiple / factor / LR))
    steps = -(-max(min_steps, min_rounds * tau) // tau) * tau
    t0 = time.perf_counter()
    ranks = fit(method, alpha, tau, steps)
    terms = sync_terms(ranks, tau, alpha, method == "lookahead")
    f_min = float(loss_fn(torch.tensor([critical_x()[0], 0.0], dtype=torch.float64)))
    l_plus = 3 * terms["r_max"] ** 2 - 1
    return {
        "tau": tau, "horizon": LR * tau, "multiple": LR * tau * factor, "steps": steps, "rounds": steps // tau,
        "thm_condition": LR * (l_plus + factor * tau),  # γ(L⁺ + (1 − α)L⁻τ) or γ(L⁺ + L⁻τ): < 1 in the theorems
        "l_plus_visited": l_plus, "alg_deviation": terms["dev"], "rank_deviation": terms["rank_dev"],
        "groups": {name: group_stats(terms, sl, tau, f_min) for name, sl in GROUPS.items()},
        "seconds": time.perf_counter() - t0,
        "_z": terms["z"][:, 0], "_fast": ranks[0]["post"][:, 0],
    }


def sweep(quick: bool) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for (method, alpha), (full, short) in SWEEPS.items():
        key = method if method == "local_sgd" else f"{method}_{alpha}"
        min_steps, min_rounds = ((400 if method == "local_sgd" else 600), 4) if quick else (3000, 6)
        for m in short if quick else full:
            run = one_run(method, alpha, m, min_steps, min_rounds)
            out.setdefault(key, []).append(run)
            g = run["groups"]
            print(f"[{key} ×{run['multiple']:.3g} τ={run['tau']}] rose: ring {g['ring']['slow_loss_rose']:.2f} "
                  f"saddle {g['saddle']['slow_loss_rose']:.2f} top {g['top']['slow_loss_rose']:.2f}; converged "
                  f"{g['ring']['converged']:.2f}/{g['saddle']['converged']:.2f}/{g['top']['converged']:.2f} "
                  f"({run['seconds']:.1f}s)", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------ plotting
def plot_landscape(ax, runs: list[dict]) -> None:
    g = torch.linspace(-1.45, 1.45, 241, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    ff = loss_fn(torch.stack([xx, yy], -1))
    ax.contour(xx.numpy(), yy.numpy(), ff.numpy(), levels=torch.linspace(-0.045, 0.3, 16).tolist(), cmap="Greys",
               linewidths=0.6)
    for run, color in zip(runs, ("tab:blue", "tab:red")):
        fast, z = run["_fast"], run["_z"]
        ax.plot(fast[:, 0], fast[:, 1], color=color, lw=0.6, alpha=0.6)
        ax.plot(z[:, 0], z[:, 1], "o--", color=color, ms=4, lw=1.0,
                label=f"slow weights, s(1−α)L⁻ = {run['multiple']:.3g} (τ = {run['tau']})")
    lo, top, saddle = critical_x()
    ax.plot([lo, top, saddle], [0, 0, 0], "k*", ms=8)
    ax.set_title("Lookahead α = 0.5 on ¼(‖p‖²−1)² + 0.05·p₁ (one 'ring' replica)\n"
                 "thin: fast weights; ★ min / top / saddle", fontsize=9)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower left")


def plot_vs_multiple(ax, res: dict[str, list[dict]], groups: tuple[str, ...], field: str, ylabel: str) -> None:
    styles = {"ring": "-", "saddle": "--", "top": ":"}
    for key, runs in res.items():
        xs = [r["multiple"] for r in runs]
        for grp in groups:
            ys = [r["groups"][grp][field] for r in runs]
            ys = [float("nan") if y is None else y for y in ys]
            ax.plot(xs, ys, styles[grp], marker="o", ms=3, color=COLORS[key], label=f"{key} ({grp})")
    ax.axvline(1.0, color="k", lw=1.2)
    ax.text(1.05, 0.97, "bound", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("horizon / bound:  s(1−α)L⁻ (Lookahead),  sL⁻ (Local SGD)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot(res: dict[str, list[dict]], png: Path, quick: bool) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    axes = axes.ravel()
    la = res["lookahead_0.5"]
    plot_landscape(axes[0], [la[0 if quick else 1], la[-1]])
    plot_vs_multiple(axes[1], res, ("ring", "saddle"), "slow_loss_rose",
                     "fraction of replicas whose slow / consensus loss rose at a sync")
    axes[1].set_title("per-round descent (guaranteed below the bound)", fontsize=9)
    plot_vs_multiple(axes[2], res, ("top", "ring"), "penalty_max_median", "largest sync penalty (median)")
    axes[2].set_title("sync penalty F(z') − [αF(x)+(1−α)F(z)] / F(z') − E_i F(x_i)", fontsize=9)
    plot_vs_multiple(axes[3], res, ("ring", "saddle", "top"), "steps_to_min_median",
                     "steps until F(z) − min F < 0.01 (median; gap = not within budget)")
    axes[3].set_yscale("log")
    axes[3].set_title("convergence of the slow / consensus weights", fontsize=9)
    fig.suptitle(f"Curvature paper Cor. 5.4 / Thm 6.7: L⁻ = 1, γ = {LR}, σ = {SIGMA}, 64 replicas per run; "
                 "Lookahead devices=1, Local SGD 2 gloo ranks", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def public(res: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {k: [{n: v for n, v in r.items() if not n.startswith("_")} for r in runs] for k, runs in res.items()}


def main() -> None:
    args = script_args(__doc__, "two horizons per method, short budgets (smoke test)")
    t0 = time.perf_counter()
    res = sweep(args.quick)
    png = args.out / "repro_horizon_bound.png"
    plot(res, png, args.quick)
    lo, top, saddle = critical_x()
    emit({"claim": "curvature paper Cor. 5.4 / Thm 6.7", "quick": args.quick, "l_minus": L_MINUS, "lr": LR,
          "sigma": SIGMA, "tilt": TILT, "min_x": lo, "top_x": top, "saddle_x": saddle,
          "min_loss": float(loss_fn(torch.tensor([lo, 0.0], dtype=torch.float64))), "results": public(res),
          "png": str(png), "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
