"""Reproduce thesis Fig. 6-5 with TimeAverageMonitor: GD on f(θ1, θ2) = 100·sin θ1·sin θ2.

f is L_f = 100 smooth, so gradient descent provably converges for η < 2/L_f = 0.02. With η = 0.01 the iterates
converge to a stationary point; with η = 0.04 they keep wandering among a few regions: loss and gradient norm
oscillate forever, yet their running (Cesàro) averages μ_k(φ) (eq. (6.3)–(6.4)) converge — the gradient-norm
average to a value far from 0. A third row (not in the thesis figure) runs η = 0.04 with
``TimeAverageMonitor(plateau="decay_lr")``: the vanishing per-step gain with a gradient norm away from 0 is
detected as a plateau and the decayed step size lowers the loss (Thm 6.5.1).

Every run is a Lightning ``Trainer.fit`` of a 2-parameter module with full-batch SGD; the running averages in
the plot are the monitor's own ``time_avg/*`` values. Writes a PNG (columns: trajectory coloured by iteration,
loss and its running average, gradient norm and its running average) and prints the numbers.

    python examples/reproductions/time_average_sin.py            # 2,000 steps as in the thesis
    python examples/reproductions/time_average_sin.py --quick    # 500 steps
    python examples/reproductions/time_average_sin.py --overhead # per-step cost of the monitor on an MLP
"""

from __future__ import annotations

import argparse
import logging
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

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PNG = ROOT / "docs" / "img" / "fig6_5_time_average.png"
THETA0 = (1.0, -0.5)


class SinGD(pl.LightningModule):
    """f(θ1, θ2) = 100 sin θ1 sin θ2 with full-batch gradient descent (the batch is a dummy)."""

    def __init__(self, lr: float, steps: int) -> None:
        super().__init__()
        self.lr, self.steps = lr, steps
        self.theta = nn.Parameter(torch.tensor(THETA0, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        loss = 100.0 * torch.sin(self.theta[0]) * torch.sin(self.theta[1])
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("grad/norm", self.theta.grad.norm(), on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(self.steps)), batch_size=1)


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
    model = SinGD(lr, steps)
    monitor = TimeAverageMonitor(gain_every=1, gain_window=50, gain_batches=10, patience=5, plateau=plateau,
                                 decay_factor=0.1)
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


def plot(results: list[tuple[str, list[dict[str, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        for ax in row[1:]:
            ax.legend(loc="upper right", fontsize=8)
        decays = [i for i in range(1, len(rows)) if rows[i]["lr"] != rows[i - 1]["lr"]]
        for i in decays:
            for ax in row[1:]:
                ax.axvline(i + 1, color="red", ls="--", lw=1)
    fig.suptitle("Thesis Fig. 6-5: GD on f = 100 sin θ1 sin θ2 (TimeAverageMonitor running averages)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
    results = []
    for name, lr, plateau in [("η = 0.01", 0.01, "off"), ("η = 0.04", 0.04, "off"),
                              ("η = 0.04, plateau='decay_lr'", 0.04, "decay_lr")]:
        rows, monitor = run(lr, steps, plateau)
        summarize(name, rows, monitor)
        results.append((name, rows))
    plot(results, args.out)


if __name__ == "__main__":
    main()
