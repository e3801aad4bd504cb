"""Issue 12 #7 -- curvature paper Fig. H.1 / App. I / Alg. 3: SGD vs Lookahead vs Lookahead with constant horizon.

Paper (ResNet-18, CIFAR-10, 200 epochs): SGD with lr 0.1; Lookahead with period τ = 5 and the same lr; Lookahead with
constant horizon s = γτ (same initial γ and τ), where every lr drop by 5× (epochs 60, 120, 160) multiplies τ by 5, so
τ = 5 → 25 → 125 → 625. Claim (Thm 5.6 / Cor. 5.7, "empirically verified in Fig. H.1"): keeping the horizon constant
while the lr decays still converges, like SGD and plain Lookahead.

Here, at toy scale and on one CPU process: ``ImageClassifier`` (timm ``test_efficientnet``, stride-1 stem) on
``DigitsDataModule`` (sklearn digits, 8x8 images, batch 32, 45 steps per epoch), SGD momentum 0.9, weight decay 5e-4,
lr 0.1 divided by 5 at 30%, 60%, 80% of the epochs (the paper's 60/120/160 of 200). Runs:

* ``sgd``:     ``Trainer(strategy="auto")``;
* ``la``:      ``Trainer(devices=1, strategy=LookaheadStrategy(period=5, alpha=0.5))``;
* ``la_ch``:   ``Trainer(devices=1, strategy=LookaheadStrategy(period=ConstantHorizon(0.5), alpha=0.5))``
  (τ = round(0.5 / lr) re-evaluated at every synchronisation, Alg. 3).

α = 0.5 (the paper does not print α; 0.5 is the Lookahead default). Measured per epoch: validation accuracy and loss
(Lookahead: of the slow weights, which is what Lightning evaluates under the strategy, with the BatchNorm statistics
of the fast weights), mean training loss of the fast weights, the current τ and the number of synchronisations; per
synchronisation: its step and the τ of the period it ended. τ is re-evaluated only at a synchronisation, so a τ is
*tested* only once a period of that length completes: with the default 50 epochs (2,250 steps) the last τ = 625 period
starts at step 1,855 and never completes, so the slow weights (and the reported validation numbers of ``la_ch``) stay
those of step 1,855 for the last 395 steps. ``completed_periods_by_tau`` and ``slow_weights_age_at_end`` in the
``RESULT`` line say so for any run length.

    python examples/reproductions/lookahead_horizon.py           # full (~7 min on 2 shared CPU cores)
    python examples/reproductions/lookahead_horizon.py --quick   # smoke test (<45 s)
"""

from __future__ import annotations

import os

# One thread: the box is a shared 2-core CPU, and a DDP-family strategy would otherwise set torch to cpu_count threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics
import time
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
from _plot import emit, plt, save_figure, script_args
from pytorch_lightning.callbacks import Callback

from lightning_opt.examples import DigitsDataModule, ImageClassifier
from lightning_opt.strategies import LookaheadStrategy
from lightning_opt.strategies.schedules import ConstantHorizon

METHODS = ("sgd", "la", "la_ch")
COLORS = {"sgd": "tab:red", "la": "tab:blue", "la_ch": "tab:green"}
LR0, TAU0, ALPHA, DROP = 0.1, 5, 0.5, 0.2


class StepScheduleClassifier(ImageClassifier):
    """``ImageClassifier`` with a step lr schedule (× ``gamma`` at the milestone epochs)."""

    def __init__(self, milestones: list[int], gamma: float = DROP, **kwargs) -> None:
        super().__init__(**kwargs)
        self.milestones, self.gamma = list(milestones), gamma

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class Recorder(Callback):
    """Per epoch: val loss / acc, mean train loss, lr, the strategy's current period and its sync count."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.sync_log: list[tuple[int, int | None]] = []  # (optimizer step of the sync, τ of the period it ended)
        self.total_steps = 0
        self._train: list[float] = []
        self._lr = float("nan")
        self._syncs_seen = 0
        self._tau: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # the lr this epoch trains with (an epoch-interval scheduler has already stepped by validation time)
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train.append(float(outputs["loss"].detach()))
        strat = trainer.strategy
        meter = getattr(strat, "meter", None)
        if meter is not None:  # the period in progress was scheduled at the previous sync (read at the last batch)
            if meter.syncs > self._syncs_seen:
                self.sync_log.append((trainer.global_step, self._tau))
                self._syncs_seen = meter.syncs
            self._tau = getattr(getattr(strat, "clock", None), "period", {}).get(0)

    def on_train_end(self, trainer, pl_module) -> None:
        self.total_steps = trainer.global_step

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        cm = trainer.callback_metrics
        strat = trainer.strategy
        period = getattr(getattr(strat, "clock", None), "period", {}).get(0)
        meter = getattr(strat, "meter", None)
        self.rows.append(
            {
                "epoch": trainer.current_epoch + 1,
                "val_loss": float(cm["val/loss"]),
                "val_acc": float(cm["val/acc"]),
                "train_loss": statistics.fmean(self._train) if self._train else float("nan"),
                "lr": self._lr,
                "period": period,
                "syncs": getattr(meter, "syncs", None),
            }
        )
        self._train = []


def run(method: str, seed: int, epochs: int, image_size: int) -> Recorder:
    pl.seed_everything(seed, workers=True, verbose=False)
    milestones = [round(0.3 * epochs), round(0.6 * epochs), round(0.8 * epochs)]
    model = StepScheduleClassifier(milestones, lr=LR0, momentum=0.9, weight_decay=5e-4)
    dm = DigitsDataModule(batch_size=32, image_size=image_size, seed=seed)
    if method == "sgd":
        strategy: object = "auto"
    elif method == "la":
        strategy = LookaheadStrategy(period=TAU0, alpha=ALPHA)
    else:
        strategy = LookaheadStrategy(period=ConstantHorizon(LR0 * TAU0), alpha=ALPHA)
    rec = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[rec],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return rec


def summarise(m: str, runs: list[list[dict]], rec: Recorder) -> dict:
    """Method ``m``'s numbers over its seeds (``runs``: per-epoch rows per seed); schedules and syncs from seed 0."""
    last = [r[-1] for r in runs]
    best = [max(row["val_acc"] for row in r) for r in runs]
    out = {
        "final_val_acc": [row["val_acc"] for row in last],
        "final_val_loss": [row["val_loss"] for row in last],
        "final_train_loss": [row["train_loss"] for row in last],
        "final_val_acc_mean": statistics.fmean(row["val_acc"] for row in last),
        "final_val_loss_mean": statistics.fmean(row["val_loss"] for row in last),
        "final_train_loss_mean": statistics.fmean(row["train_loss"] for row in last),
        "best_val_acc_mean": statistics.fmean(best),
        "periods": sorted({row["period"] for row in runs[0] if row["period"] is not None}),
        "syncs": runs[0][-1]["syncs"],
    }
    # synchronisations per lr phase (from the per-epoch sync counter)
    phases: dict[str, int] = {}
    prev = 0
    for lr in sorted({row["lr"] for row in runs[0]}, reverse=True):
        rows = [row for row in runs[0] if row["lr"] == lr]
        if rows and rows[-1]["syncs"] is not None:
            phases[f"{lr:.4g}"] = rows[-1]["syncs"] - prev
            prev = rows[-1]["syncs"]
    out["syncs_per_lr_phase"] = phases
    # which horizons were actually exercised: a τ counts once a period of that length has ended in a sync
    if m != "sgd":
        last_sync = rec.sync_log[-1][0] if rec.sync_log else 0
        completed = Counter(tau for _, tau in rec.sync_log)
        out["completed_periods_by_tau"] = {str(k): v for k, v in sorted(completed.items())}
        out["last_sync_step"] = last_sync
        out["slow_weights_age_at_end"] = rec.total_steps - last_sync
    out["total_steps"] = rec.total_steps
    last_lr = min(row["lr"] for row in runs[0])
    out["last_phase_val_loss"] = [[row["val_loss"] for row in r if row["lr"] == last_lr] for r in runs]
    out["last_phase_val_acc"] = [[row["val_acc"] for row in r if row["lr"] == last_lr] for r in runs]
    return out


def plot(runs: dict[str, list[list[dict]]], recs: dict[str, list[Recorder]], n_seeds: int, png: Path) -> Path:
    """Validation accuracy and loss, training loss, and the scheduled vs completed periods τ, per epoch."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for m in METHODS:
        for i, r in enumerate(runs[m]):
            ep = [row["epoch"] for row in r]
            lab = m if i == 0 else None
            ls = "--" if m == "la_ch" else "-"  # la and la_ch coincide until the first lr drop
            axes[0].plot(ep, [row["val_acc"] for row in r], color=COLORS[m], lw=1, ls=ls, label=lab)
            axes[1].semilogy(ep, [row["val_loss"] for row in r], color=COLORS[m], lw=1, ls=ls, label=lab)
            axes[2].semilogy(ep, [row["train_loss"] for row in r], color=COLORS[m], lw=1, ls=ls, label=lab)
            if m != "sgd" and i == 0:
                spe = recs[m][0].total_steps / max(len(r), 1)  # steps per epoch
                log = recs[m][0].sync_log
                axes[3].semilogy([st / spe for st, _ in log], [tau or 1 for _, tau in log], color=COLORS[m],
                                 marker="o" if m == "la_ch" else ".", ms=3, ls="none", label=f"{m}: completed τ")
                axes[3].semilogy(ep, [row["period"] or 1 for row in r], color=COLORS[m], ls=ls, lw=0.8, alpha=0.6,
                                 label=f"{m}: τ scheduled")
    axes[0].set_ylim(0.9, 1.0)
    axes[0].set_title("val accuracy (Lookahead: slow weights)")
    axes[1].set_title("val loss (Lookahead: slow weights)")
    axes[2].set_title("training loss (fast weights, epoch mean)")
    axes[3].set_title("τ: scheduled (line) vs completed periods (markers at their sync)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return save_figure(fig, png, suptitle=f"digits 8x8, test_efficientnet, {n_seeds} seed(s), lr0={LR0}, "
                                          f"τ0={TAU0}, α={ALPHA}")


def main() -> None:
    args = script_args(__doc__, "tiny run for the smoke test",
                       {"seeds": ("number of seeds", 1, 2), "epochs": ("epochs", 5, 50)})
    t0 = time.perf_counter()
    quick = args.quick
    seeds = list(range(args.seeds))
    epochs = args.epochs
    image_size = 8

    runs: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    recs: dict[str, list[Recorder]] = {m: [] for m in METHODS}
    for m in METHODS:
        for s in seeds:
            recs[m].append(run(m, s, epochs, image_size))
            runs[m].append(recs[m][-1].rows)
            print(f"[{m} seed {s}] final {runs[m][-1][-1]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    results = {m: summarise(m, runs[m], recs[m][0]) for m in METHODS}

    png = plot(runs, recs, len(seeds), args.out / "repro_lookahead_horizon.png")
    emit({"claim": "curvature paper Fig. H.1 / Alg. 3", "quick": quick, "epochs": epochs, "seeds": len(seeds),
          "results": results}, png=png, t0=t0)


if __name__ == "__main__":
    main()
