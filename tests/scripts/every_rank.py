"""Rank script (issue 24): what our pieces publish is the same on every rank, with the Lightning features users add.

argv: out_dir. Three scenarios in one launch, each rank saving ``rank{r}.pt`` after each:

* ``publish``: every monitor under Local SGD (with warm-up), ModelCheckpoint / EarlyStopping monitoring a metric of
  each, a progress bar showing them; every rank's published values at every batch end, and where comm/* landed.
* ``two_opt``: a two-optimizer module (manual optimisation, both optimizers step every batch) under each strategy;
  the flat weights at every batch end and at every sync.
* ``late``: arguments that depend on the world size fail at setup, before any training step.
"""

import sys
from pathlib import Path

import torch
from _common import CaptureLogger, TinyModel, first_layer_and_rest, flat_params, pl, rank, recording, trainer

from lightning_opt.callbacks import (
    GradientNoiseMonitor,
    GradNormMonitor,
    ProgressBarMetrics,
    SharpnessMonitor,
    TimeAverageMonitor,
)
from lightning_opt.callbacks.sharpness import CURVATURE_ATTR
from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy, LSGDStrategy

out = Path(sys.argv[1])
results: dict = {}
PREFIXES = ("grad/", "noise/", "curvature/", "time_avg/", "window_avg/", "plateau/")
MONITORED = {"noise": ("noise/norm", "min"), "curvature": ("curvature/lambda_max", "max"),
             "grad": ("grad/norm", "min"), "time_avg": ("time_avg/train/loss", "min")}
BAR = {"noise/norm": "noise", "curvature/lambda_max": "lmax", "grad/norm": "gnorm", "time_avg/train/loss": "avg"}


def save():
    torch.save(results, out / f"rank{rank()}.pt")


class Snapshot(pl.Callback):
    """Everything our callbacks published, as this rank sees it after each batch (callbacks run in list order)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(PREFIXES)}
        bar = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if k in BAR.values()}
        curv = getattr(trainer, CURVATURE_ATTR, None)
        self.rows.append({"step": trainer.global_step, "metrics": metrics, "bar": bar,
                          "curvature_attr": None if curv is None else dict(curv)})


# ------------------------------------------------------------------------------------------------- publish
snap, cap = Snapshot(), CaptureLogger()
checkpoints = {name: pl.callbacks.ModelCheckpoint(dirpath=out / f"ck_{name}", monitor=key, mode=mode,
                                                  every_n_train_steps=4, save_top_k=1, filename=f"{name}-{{step}}")
               for name, (key, mode) in MONITORED.items()}
stoppers = {name: pl.callbacks.EarlyStopping(monitor=key, mode=mode, patience=1000, check_on_train_epoch_end=True)
            for name, (key, mode) in MONITORED.items()}
callbacks = [GradNormMonitor(every_n_steps=1),
             GradientNoiseMonitor(every_n_steps=4, num_batches=4, bootstrap=20, histogram=False),
             SharpnessMonitor(every_n_steps=4, max_iter=8), TimeAverageMonitor(window=4),
             ProgressBarMetrics(keys=BAR), snap, *checkpoints.values(), *stoppers.values()]
t = trainer(LocalSGDStrategy(period=4, warmup_steps=6, timeout=60), max_steps=12, callbacks=callbacks, logger=cap,
            log_every_n_steps=5, enable_checkpointing=True)
t.fit(TinyModel())
results["publish"] = {
    "rows": snap.rows,
    "best": {name: (None if c.best_model_score is None else float(c.best_model_score), Path(c.best_model_path).name)
             for name, c in checkpoints.items()},
    "stoppers": {name: (float(s.best_score), s.wait_count) for name, s in stoppers.items()},
    "logged": {key: cap.steps_with(key) for key in ("comm/bytes", "comm/syncs", "train/loss", "curvature/lambda_max")},
}
save()


# ------------------------------------------------------------------------------------------------- two optimizers
class TwoOptimizers(TinyModel):
    """Manual optimisation: optimizer A (first layer) and B (the rest) both step every batch on different losses,
    like a GAN's generator and discriminator."""

    def __init__(self):
        super().__init__(bn=False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        for opt, scale in ((opt_a, 1.0), (opt_b, 0.5)):
            loss = scale * torch.nn.functional.mse_loss(self(x), y) + 0.1 * self.global_rank
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.log("train/loss", loss)

    def configure_optimizers(self):
        first, rest = first_layer_and_rest(self)
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)


class Weights(pl.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(flat_params(pl_module))


STRATEGIES = {
    "local_sgd": lambda: recording(LocalSGDStrategy)(period=2, timeout=60),
    "lsgd": lambda: recording(LSGDStrategy)(period=2, pull=1.0, leader_window=1, timeout=60),
    "lookahead_local": lambda: recording(LookaheadStrategy)(period=2, alpha=0.3, mode="local", timeout=60),
    "easgd": lambda: recording(EASGDStrategy)(period=2, beta=0.6, timeout=60),
}
results["two_opt"] = {}
for name, make in STRATEGIES.items():
    strategy, weights, model = make(), Weights(), TwoOptimizers()
    trainer(strategy, max_steps=-1, max_epochs=1, callbacks=[weights]).fit(model)
    results["two_opt"][name] = {
        "params": torch.stack(weights.params), "pre": torch.stack(strategy.pre), "post": torch.stack(strategy.post),
        "sync_ids": strategy.sync_ids, "syncs": strategy.meter.syncs, "steps": dict(strategy.clock.steps),
        "n_first": sum(p.numel() for p in model.net[0].parameters()),
        "leaders": [h["leader"] for h in getattr(strategy, "history", [])],
    }
save()

# ------------------------------------------------------------------------------------------------- late validation
model = TinyModel()
try:
    trainer(LSGDStrategy(period=2, group_size=3, timeout=60), max_steps=4).fit(model)
    results["late"] = {"error": None}
except ValueError as err:
    results["late"] = {"error": str(err)}
results["late"]["steps_run"] = len(model.losses)
save()
