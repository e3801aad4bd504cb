"""Reproduce thesis Fig. 6-5 with TimeAverageMonitor: GD on f(θ1, θ2) = 100·sin θ1·sin θ2.

f is L_f = 100 smooth, so gradient descent provably converges for η < 2/L_f = 0.02. With η = 0.01 the iterates
converge to a stationary point; with η = 0.04 they wander chaotically for ~575 steps, then settle on a cycle through
a dozen points: loss and gradient norm oscillate forever, yet their running (Cesàro) averages μ_k(φ)
(eq. (6.3)–(6.4)) converge — the gradient-norm average to a value far from 0.

A third row (not in the thesis figure) runs η = 0.04 with ``TimeAverageMonitor(plateau="decay_lr")`` and
``decay_factor=0.625``, so the decayed step 0.025 is still above 2/L_f: GD keeps oscillating after the decay, and
the descent lemma says nothing about it. Two caveats the script measures instead of assuming:

* the plateau test (gain interval contains 0, gradient norm away from 0) cannot tell the chaotic transient from the
  settled cycle — the summed gain telescopes, so on any bounded stretch without a downward trend the interval
  contains 0; replaying the test on the η = 0.04 run shows every check positive from the first one on, whatever
  the window. The monitor fires at step gain_window + patience − 1; we set gain_window = 800 (2/5 of the run) so
  that this is after the settling measured from the trajectory, not because the monitor detected it;
* Thm 6.5.1 is a one-step statement: from the invariant measure μ of F_η, a small enough step η' < cη gives
  E_μ[L(θ − η'∇L)] < E_μ[L]. The script evaluates that expectation on the settled cycle for a grid of η', and,
  separately, continues GD from the decay point with each η' to compare the *time-averaged* loss at η' with the
  undecayed run's over the same steps — which the theorem does not address.

Every run is a Lightning ``Trainer.fit`` of a 2-parameter module with full-batch SGD; the running averages in
the plot are the monitor's own ``time_avg/*`` values. Writes a PNG (columns: trajectory coloured by iteration,
loss and its running average, gradient norm and its running average) and prints the numbers.

    python examples/reproductions/time_average_sin.py            # 2,000 steps as in the thesis
    python examples/reproductions/time_average_sin.py --quick    # 500 steps (smoke test: no settled cycle yet)
    python examples/reproductions/time_average_sin.py --overhead # per-step cost of the monitor on an MLP
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks.time_average import TimeAverageMonitor
from lightning_opt.examples.sin import SinModule, sin_objective
from lightning_opt.stats.averages import batch_means_ci

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PNG = ROOT / "docs" / "img" / "fig6_5_time_average.png"
THETA0 = (1.0, -0.5)
L_F = 100.0  # smoothness of f: GD with η < 2/L_F = 0.02 converges
DECAY_FACTOR = 0.625  # 0.04 -> 0.025 > 2/L_F: the decayed run is still in the unstable (non-converging) regime
# The 0.025 dynamics settle on a 2-cycle of constant loss with ‖∇L‖ ≈ 90, which passes the plateau test too: without
# a floor the monitor decays again (to 0.0156 < 2/L_F) and GD converges to the minimum. min_lr holds it at 0.025.
MIN_LR = 0.025
GAIN_BATCHES, PATIENCE, GRAD_TOL = 10, 5, 0.1
ETA_GRID = (0.04, 0.038, 0.035, 0.032, 0.03, 0.028, 0.025, 0.022, 0.02, 0.01, 0.004)


def gain_window(steps: int) -> int:
    """2/5 of the run: 800 of 2,000 steps, so the first plateau check (step 800) comes after the η = 0.04 transient."""
    return max(50, 2 * steps // 5)


class Recorder(Callback):
    """Per step: θ_t, loss, gradient norm, lr, and the monitor's running averages (host reads; fine here)."""

    def __init__(self, monitor: TimeAverageMonitor) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, float]] = []
        self._theta: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._theta = pl_module.theta.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cm = trainer.callback_metrics
        avg = self.monitor.time_averages()
        assert self._theta is not None
        self.rows.append({
            "theta1": float(self._theta[0]), "theta2": float(self._theta[1]),
            "loss": float(cm["train/loss"]), "grad": float(cm["grad/norm"]),
            "avg_loss": avg["train/loss"], "avg_grad": avg["grad/norm"],
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        })


def run(lr: float, steps: int, plateau: str) -> tuple[list[dict[str, float]], TimeAverageMonitor]:
    model = SinModule(lr, THETA0, steps)  # the batch is a dummy c = 0: the loss is f
    # the gain (one extra forward per step) only for the plateau test; the analysis replays it from the losses
    monitor = TimeAverageMonitor(gain_every=0 if plateau == "off" else 1, gain_window=gain_window(steps),
                                 gain_batches=GAIN_BATCHES, patience=PATIENCE, grad_tol=GRAD_TOL, plateau=plateau,
                                 decay_factor=DECAY_FACTOR, min_lr=MIN_LR)
    recorder = Recorder(monitor)  # after the monitor: it reads the averages that include step t
    trainer = pl.Trainer(max_steps=steps, callbacks=[monitor, recorder], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model)
    return recorder.rows, monitor


def summarize(name: str, rows: list[dict[str, float]], monitor: TimeAverageMonitor) -> dict[str, float]:
    n = len(rows)
    k = n - n // 4  # compare the running averages at 3/4 of the run and at the end ("last 500 of 2,000")
    tail = rows[k:]
    grads = torch.tensor([r["grad"] for r in tail])
    losses = torch.tensor([r["loss"] for r in tail])
    out = {
        "final_loss": rows[-1]["loss"], "final_grad": rows[-1]["grad"],
        "avg_loss": rows[-1]["avg_loss"], "avg_grad": rows[-1]["avg_grad"],
        "avg_loss_rel_change": abs(rows[-1]["avg_loss"] - rows[k - 1]["avg_loss"]) / max(abs(rows[-1]["avg_loss"]),
                                                                                           1e-12),
        "avg_grad_rel_change": abs(rows[-1]["avg_grad"] - rows[k - 1]["avg_grad"]) / max(rows[-1]["avg_grad"],
                                                                                           1e-12),
        "tail_grad_std": float(grads.std()), "tail_loss_range": float(losses.max() - losses.min()),
        "final_lr": rows[-1]["lr"], "plateaus": len(monitor.events),
    }
    print(f"\n[{name}] {n} steps, θ0 = {THETA0}")
    print(f"  final θ = ({rows[-1]['theta1']:.4f}, {rows[-1]['theta2']:.4f}), loss {out['final_loss']:.4f}, "
          f"grad norm {out['final_grad']:.4g}")
    print(f"  last {n - k} steps: grad-norm std {out['tail_grad_std']:.3f}, loss range {out['tail_loss_range']:.3f}")
    print(f"  running averages at step {k} → {n}: loss {rows[k - 1]['avg_loss']:.4f} → {out['avg_loss']:.4f} "
          f"({100 * out['avg_loss_rel_change']:.3f} %), grad norm {rows[k - 1]['avg_grad']:.4f} → "
          f"{out['avg_grad']:.4f} ({100 * out['avg_grad_rel_change']:.3f} %)")
    for ev in monitor.events:
        print(f"  plateau at step {ev['step']}: gain CI [{ev['gain_lo']:.3f}, {ev['gain_hi']:.3f}], windowed grad "
              f"norm {ev['grad_norm_window']:.2f}; lr {ev['lr_before']:g} → {ev['lr_after']:g}")
    return out


def settled_from(rows: list[dict[str, float]]) -> tuple[int, float, float]:
    """First step from which the loss stays inside the band of the run's last quarter (widened by 1% of its width)."""
    losses = [r["loss"] for r in rows]
    tail = losses[len(losses) - len(losses) // 4:]
    lo, hi = min(tail), max(tail)
    pad = 0.01 * (hi - lo) + 1e-9
    k = len(losses)
    while k > 0 and lo - pad <= losses[k - 1] <= hi + pad:
        k -= 1
    return k + 1, lo, hi


def replay_checks(rows: list[dict[str, float]], window: int) -> dict[int, bool]:
    """The monitor's plateau check at every step, replayed offline on a run with gain_every=1.

    Full-batch GD: the monitor's gain at step t is exactly loss_t − loss_{t+1}, and its gradient norm is the one the
    module logs, so this reproduces its decisions (checked against the monitor's own event in main()).
    """
    out: dict[int, bool] = {}
    gains = [0.0] + [rows[t - 1]["loss"] - rows[t]["loss"] for t in range(1, len(rows))]  # gains[t]: step t
    grads = [0.0] + [r["grad"] for r in rows]  # grads[t]: the gradient norm of step t
    m = max(1, window // GAIN_BATCHES)
    gn_run = 0.0
    for t in range(1, len(rows)):
        gn_run += grads[t]
        if t < window:
            continue
        _, lo, hi = batch_means_ci(gains[t - window + 1:t + 1], GAIN_BATCHES)
        win, recent = sum(grads[t - window + 1:t + 1]) / window, sum(grads[t - m + 1:t + 1]) / m
        out[t] = lo <= 0.0 <= hi and win > 0 and recent >= GRAD_TOL * win and win >= GRAD_TOL * gn_run / t
    return out


def first_firing(checks: dict[int, bool]) -> int | None:
    run = 0
    for t, ok in checks.items():
        run = run + 1 if ok else 0
        if run >= PATIENCE:
            return t
    return None


def one_step_change(thetas: torch.Tensor, lr: float) -> float:
    """E_μ[L(θ − lr·∇L(θ))] − E_μ[L(θ)] over the empirical measure of ``thetas`` (Thm 6.5.1's quantity)."""
    th = thetas.clone().requires_grad_(True)
    loss = sin_objective(th)
    (grad,) = torch.autograd.grad(loss.sum(), th)
    with torch.no_grad():
        return float(sin_objective(th - lr * grad).mean() - loss.mean())


def continue_gd(theta: tuple[float, float], lrs: tuple[float, ...], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses and gradient norms, shape (steps, len(lrs)), of GD from ``theta`` with each lr (all lrs at once)."""
    th = torch.tensor([theta] * len(lrs), dtype=torch.float64)
    lr = torch.tensor(lrs, dtype=torch.float64).unsqueeze(1)
    losses, grads = [], []
    for _ in range(steps):
        th.requires_grad_(True)
        loss = sin_objective(th)
        (g,) = torch.autograd.grad(loss.sum(), th)
        losses.append(loss.detach())
        grads.append(g.norm(dim=1))
        th = (th.detach() - lr * g).detach()
    return torch.stack(losses), torch.stack(grads)


def report_replays(hot: list[dict[str, float]], settle: int, steps: int) -> dict[int, dict[int, bool]]:
    """The plateau checks replayed on the η = 0.04 run for a short and the configured gain window: how many were
    positive before and after the settling step, and when the monitor would fire."""
    replays = {w: replay_checks(hot, w) for w in sorted({50, gain_window(steps)})}
    for w, checks in replays.items():
        before = [ok for t, ok in checks.items() if t < settle]
        after = [ok for t, ok in checks.items() if t >= settle]
        fire = first_firing(checks)

        def frac(xs: list[bool]) -> str:
            return f"{sum(xs)}/{len(xs)}" if xs else "none"

        print(f"  gain_window {w}: positive checks before step {settle}: {frac(before)}, from it on: {frac(after)}; "
              f"first plateau (patience {PATIENCE}) at step {fire}")
    return replays


def analyse_decay(hot: list[dict[str, float]], dec: list[dict[str, float]], monitor: TimeAverageMonitor,
                  steps: int) -> dict[str, float]:
    """What the decayed run shows: when the monitor fired vs when the cycle settled, Thm 6.5.1's one-step
    quantity on the settled η = 0.04 cycle, and the time-averaged loss after the decay vs without it."""
    n = len(hot)
    settle, band_lo, band_hi = settled_from(hot)
    print(f"\n[plateau test on η = 0.04] the loss stays in its last-quarter band [{band_lo:.2f}, {band_hi:.2f}] from "
          f"step {settle}; before that its range is [{min(r['loss'] for r in hot[:settle]):.2f}, "
          f"{max(r['loss'] for r in hot[:settle]):.2f}] (chaotic transient)")
    out: dict[str, float] = {"settled_from": settle}
    replays = report_replays(hot, settle, steps)
    ev = monitor.events[0] if monitor.events else None
    if ev is None:
        print("  the decay_lr run declared no plateau")
        return out
    s = int(ev["step"])
    replayed = first_firing(replays[gain_window(steps)])
    print(f"  decay_lr run: plateau at step {s} (replay: {replayed}), lr {ev['lr_before']:g} → {ev['lr_after']:g}; "
          f"{'after' if s >= settle else 'BEFORE'} the settling (step {settle}), by the choice of gain_window, "
          "not by detection")
    for e in monitor.events[1:]:
        print(f"  decay_lr run: another plateau at step {e['step']} (gain CI [{e['gain_lo']:.3g}, {e['gain_hi']:.3g}], "
              f"windowed ‖∇L‖ {e['grad_norm_window']:.1f}); lr {e['lr_before']:g} → {e['lr_after']:g} (held by min_lr)")
    out.update(plateau_step=s, lr_after=ev["lr_after"])
    same = max(abs(a["loss"] - b["loss"]) for a, b in zip(hot[:s + 1], dec[:s + 1], strict=True))
    # Thm 6.5.1: one step with η' from the invariant measure of F_0.04 (its settled part; whole 2nd half if none)
    mu = torch.tensor([[r["theta1"], r["theta2"]] for r in hot[min(settle, n // 2):]], dtype=torch.float64)
    grad2 = float(torch.tensor([r["grad"] ** 2 for r in hot[min(settle, n // 2):]]).mean())
    print(f"\n[Thm 6.5.1, one step from μ = empirical measure of η = 0.04, steps {min(settle, n // 2) + 1}..{n}] "
          f"E_μ L = {float(sin_objective(mu).mean()):.3f}, E_μ‖∇L‖² = {grad2:.0f}")
    print(f"  {'η′':>6}  E_μ[L(θ − η′∇L)] − E_μ[L]   | GD continued from step {s} with η′ for {n - s} steps: "
          "mean loss (vs η = 0.04: same steps), last quarter: mean, range, mean ‖∇L‖")
    ref = sum(r["loss"] for r in hot[s:]) / (n - s)
    cont_all, grad_all = continue_gd((dec[s]["theta1"], dec[s]["theta2"]), ETA_GRID, n - s)
    for j, lr in enumerate(ETA_GRID):
        d1 = one_step_change(mu, lr)
        cont, cont_g = cont_all[:, j].tolist(), grad_all[:, j].tolist()
        q, gq = cont[len(cont) - len(cont) // 4:], cont_g[len(cont) - len(cont) // 4:]
        mean = sum(cont) / len(cont)
        if lr == ev["lr_after"]:
            out["continuation_matches_run"] = max(abs(a - r["loss"]) for a, r in zip(cont, dec[s:], strict=True))
        tag = " (≤ 2/L)" if lr <= 2 / L_F else ""
        # a chaotic orbit (η′ ≥ 0.038) re-simulated here drifts from the Lightning run by rounding: ≈ within 0.05
        verdict = "≈" if abs(mean - ref) < 0.05 else "lower than" if mean < ref else "HIGHER than"
        print(f"  {lr:6.3f}  {d1:+9.3f}                    | {mean:8.3f} ({verdict} "
              f"{ref:.3f}); {sum(q) / len(q):8.3f}, {max(q) - min(q):7.3f}, {sum(gq) / len(gq):6.2f}{tag}")
        out[f"one_step_{lr:g}"] = d1
        out[f"avg_after_{lr:g}"] = mean
    post = dec[s:]
    mon_avg = monitor.time_averages()["train/loss"]
    post_loss = sum(r["loss"] for r in post) / len(post)
    print(f"  decay_lr run after the decay (lr {ev['lr_after']:g}): mean loss {post_loss:.3f}"
          f" (monitor's time_avg, restarted at the decay: {mon_avg:.3f}), mean ‖∇L‖ "
          f"{sum(r['grad'] for r in post) / len(post):.2f}; η = 0.04 over the same steps: mean loss {ref:.3f}, "
          f"mean ‖∇L‖ {sum(r['grad'] for r in hot[s:]) / (n - s):.2f}; trajectories identical up to the decay: "
          f"{same == 0.0}; the η′ = {ev['lr_after']:g} continuation above reproduces this run to "
          f"{out.get('continuation_matches_run', math.nan):.1e}")
    out.update(avg_after_decay=mon_avg, avg_undecayed_same_steps=ref)
    return out


def plot(results: list[tuple[str, list[dict[str, float]]]], path: Path, marks: dict[str, dict]) -> None:
    from _plot import plt, save_figure  # here: the --overhead mode draws nothing

    fig, axes = plt.subplots(len(results), 3, figsize=(15, 4.2 * len(results)), squeeze=False)
    for row, (name, rows) in zip(axes, results, strict=True):
        it = list(range(1, len(rows) + 1))
        def col(key: str, rows: list[dict[str, float]] = rows) -> list[float]:
            return [r[key] for r in rows]

        sc = row[0].scatter(col("theta1"), col("theta2"), c=it, s=6, cmap="viridis")
        fig.colorbar(sc, ax=row[0], label="iteration")
        row[0].set(xlabel="θ1", ylabel="θ2", title=f"{name}: trajectory")
        row[1].plot(it, col("loss"), lw=0.6, label="training loss")
        row[1].plot(it, col("avg_loss"), lw=2.0, label="running average (time_avg)")
        row[1].set(xlabel="iteration", title=f"{name}: loss")
        row[2].plot(it, col("grad"), lw=0.6, label="gradient norm")
        row[2].plot(it, col("avg_grad"), lw=2.0, label="running average (time_avg)")
        row[2].set(xlabel="iteration", title=f"{name}: gradient norm")
        decays = [i for i in range(1, len(rows)) if rows[i]["lr"] != rows[i - 1]["lr"]]
        for i in decays:
            for ax in row[1:]:
                ax.axvline(i + 1, color="red", ls="--", lw=1, label=f"plateau: lr {rows[i - 1]['lr']:g} → "
                           f"{rows[i]['lr']:g}" if ax is row[1] else None)
        mk = marks.get(name, {})
        if "settled" in mk:
            for ax in row[1:]:
                ax.axvline(mk["settled"], color="grey", ls=":", lw=1.2,
                           label=f"loss in its final band from step {mk['settled']}" if ax is row[1] else None)
        if "ref" in mk:
            s, ref = mk["ref"]
            row[1].hlines(ref, s, len(rows), colors="black", linestyles=":", lw=1.5,
                          label=f"η = 0.04 without decay: mean loss over the same steps ({ref:.1f})")
        for ax in row[1:]:
            ax.legend(loc="upper right", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path,
                suptitle="Thesis Fig. 6-5: GD on f = 100 sin θ1 sin θ2 (TimeAverageMonitor running averages)")
    print(f"\nwrote {path}")


# ------------------------------------------------------------------------------------------------- overhead


class MLP(pl.LightningModule):
    def __init__(self, width: int, n: int, batch: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        self.batch = batch
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=batch[0].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch, shuffle=True)


class StepTimer(Callback):
    """Steady-state wall time per optimizer step: from the start of batch ``warmup`` to the end of training."""

    def __init__(self, warmup: int = 10) -> None:
        self.warmup, self.start, self.steps, self.seconds = warmup, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.steps = trainer.global_step - self.warmup
        self.seconds = time.perf_counter() - self.start


def overhead(steps: int, repeats: int, accelerator: str) -> None:
    configs = {
        "no monitor": lambda: [],
        "monitor, gain off (gain_every=0)": lambda: [TimeAverageMonitor(gain_every=0)],
        "monitor, gain_every=10": lambda: [TimeAverageMonitor(gain_every=10)],
        "monitor, defaults (gain_every=100)": lambda: [TimeAverageMonitor()],
        "monitor, gain_every=1, plateau=log": lambda: [TimeAverageMonitor(gain_every=1, plateau="log")],
    }
    best = {k: float("inf") for k in configs}
    for _ in range(repeats):  # interleaved repeats, best per configuration
        for name, make in configs.items():
            torch.manual_seed(0)
            model = MLP(width=128, n=steps * 32, batch=32)
            timer = StepTimer()
            trainer = pl.Trainer(max_steps=steps, callbacks=[*make(), timer], accelerator=accelerator, devices=1,
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, log_every_n_steps=50)
            trainer.fit(model)
            best[name] = min(best[name], timer.seconds / timer.steps)
    base = best["no monitor"]
    print(f"\nMLP 32-128-128-10, batch 32, {steps} steps, {accelerator}, torch threads "
          f"{torch.get_num_threads()}, best of {repeats}, steady-state time per optimizer step:")
    for name, t in best.items():
        print(f"  {name:36s} {1e3 * t:7.3f} ms/step   +{1e3 * (t - base):6.3f} ms   x{t / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 steps instead of 2,000")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_PNG, help="PNG path")
    parser.add_argument("--overhead", action="store_true", help="measure the monitor's per-step overhead")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    if args.overhead:
        torch.set_num_threads(1)
        overhead(steps=args.steps or (100 if args.quick else 300), repeats=3, accelerator=args.accelerator)
        return
    steps = args.steps or (500 if args.quick else 2000)
    if args.quick:
        print("quick mode: 500 steps end inside the η = 0.04 transient; the numbers are a smoke test only")
    results, monitors = [], []
    for name, lr, plateau in [("η = 0.01", 0.01, "off"), ("η = 0.04", 0.04, "off"),
                              (f"η = 0.04, plateau='decay_lr' (×{DECAY_FACTOR:g})", 0.04, "decay_lr")]:
        rows, monitor = run(lr, steps, plateau)
        summarize(name, rows, monitor)
        results.append((name, rows))
        monitors.append(monitor)
    info = analyse_decay(results[1][1], results[2][1], monitors[2], steps)
    marks = {results[1][0]: {"settled": info["settled_from"]}}
    if "plateau_step" in info:
        marks[results[2][0]] = {"ref": (info["plateau_step"], info["avg_undecayed_same_steps"])}
    plot(results, args.out, marks)


if __name__ == "__main__":
    main()
