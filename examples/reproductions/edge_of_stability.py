"""Edge of stability (lecture notes §25.3.4–§25.3.5, after Cohen et al. 2022): full-batch GD's sharpness rises to 2/η
and hovers there while the loss keeps decreasing, non-monotonically.

Source: lecture notes ``/work/shared/seeds/lecture-parallel-sgd-edge-of-stability.txt``. §25.3.4 ("Does Deep Learning
Work Because We Picked Safe Learning Rates? No."): "We can measure the local smoothness of the function by the largest
eigenvalue of the Hessian of the training loss, termed the *sharpness* of the function. When the sharpness is more
than 2/η, training for a locally quadratic function will become unstable. [...] Further even though we would expect
the sharpness to continue to rise much higher than 2/η gradient descent somehow prevents it from doing so." and "[...]
retaining the same high learning rate, gradient descent continues to (overall) improve the objective". §25.3.5 ("The
Edge of Stability"): "gradient descent [...] succeed[s] in this regime where the learning rate is high, and the
sharpness hovers just above the 2/η threshold."

What is run: for each step size η, one Lightning ``Trainer.fit`` of full-batch gradient descent
(``torch.optim.SGD``, no momentum, no weight decay) on a tanh MLP 64 → 200 → 200 → 200 → 10 (PyTorch's default
init, seed 0) trained on a fixed subset of 500 of sklearn's digits (offline; flattened 8x8 pixels in [0, 1]) with the
square loss ½‖f(x) − onehot(y)‖² averaged over the samples. Square loss rather than cross-entropy: its second
derivative in the outputs is constant, whereas with cross-entropy the Gauss-Newton part of the Hessian shrinks as the
softmax saturates (the sharpness falls as the loss goes to 0 for reasons that have nothing to do with the edge; see
curvature_balance.py), which would blur the plateau; the seed text does not say which loss Cohen et al. used. Every
batch is the whole training subset (a loader that yields the same full batch ``steps`` times), so the monitor's fixed
probe batch is the whole training set and λ_max is the sharpness of the training loss itself. λ_max is measured by
our ``SharpnessMonitor`` (Lanczos on Hessian-vector products, warm-started from the previous Ritz vectors) on a fixed
schedule: every 9 / 19 / 39 steps for 2/η = 20 / 40 / 80 (odd, so that the measurements alternate between the two
phases of GD's period-2 oscillation at the edge), at most ``max_iter`` = 10 products (λ_max converges in a few
warm-started products; the monitor also waits for λ_min, which needs 40-110 here). Its logged values are read back
from an in-memory Lightning logger together with the per-step training loss. Smaller η need longer runs (progressive
sharpening follows the gradient-flow time η·t). A full run ends with an accuracy check: the last logged λ_max
against a cold 150-product Lanczos run of a fresh monitor at the final weights.

Reported per η: the first step at which λ_max ≥ 0.9·2/η, the mean / min / max of λ_max·η/2 after it, the training
loss at that step and at the end, the number of steps after it where the loss went up, and whether the loss kept
decreasing overall (the mean over the last tenth of the run below its value at the crossing).

    python examples/reproductions/edge_of_stability.py            # 2/η ∈ {20, 40, 80} (~3 min of CPU, 2 cores)
    python examples/reproductions/edge_of_stability.py --quick    # 2/η = 20 only, 650 steps (~8 s)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _plot import emit, plt, script_args
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_opt.callbacks import SharpnessMonitor
from lightning_opt.examples.data import load_digits_tensors

PNG = "repro_edge_of_stability.png"
REACH = 0.9  # "reached the edge": λ_max ≥ REACH · 2/η
#: run entries copied into the summary as they are
COPIED = ("two_over_eta", "eta", "steps", "every_n_steps", "seconds", "cpu_seconds", "monitor_seconds", "matvecs_mean",
          "converged_fraction", "check")
CHECK_ITER = 150  # Lanczos products of the accuracy check at the end of a full run


@dataclass(frozen=True)
class Config:
    """One experiment: the data subset, the network, and per 2/η the number of full-batch steps."""

    n_samples: int
    width: int
    depth: int
    two_over_eta: tuple[float, ...]
    steps: tuple[int, ...]
    every_n_steps: tuple[int, ...]
    max_iter: int
    check: bool


FULL = Config(n_samples=500, width=200, depth=3, two_over_eta=(20.0, 40.0, 80.0), steps=(1206, 3496, 8502),
              every_n_steps=(9, 19, 39), max_iter=10, check=True)
QUICK = Config(n_samples=500, width=200, depth=3, two_over_eta=(20.0,), steps=(650,), every_n_steps=(25,),
               max_iter=8, check=False)


class FullBatches(Dataset):
    """The same full batch ``(x, y)``, ``steps`` times: one epoch of full-batch gradient descent."""

    def __init__(self, x: Tensor, y: Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


class TanhMLP(pl.LightningModule):
    """Tanh MLP with the square loss ½‖f(x) − y‖² (summed over outputs, mean over samples) and plain SGD."""

    def __init__(self, width: int, depth: int, lr: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d_in = 64
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.Tanh()]
            d_in = width
        layers.append(nn.Linear(d_in, 10))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = 0.5 * (self.net(x) - y).pow(2).sum(1).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in memory: ``series[key] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.series.setdefault(key, []).append((int(step or 0), float(value)))


def digits_subset(n: int) -> tuple[Tensor, Tensor]:
    """``n`` digits (a fixed random subset), flattened pixels in [0, 1], one-hot targets."""
    images, labels = load_digits_tensors()
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    x = images[idx].reshape(n, -1)
    return x, nn.functional.one_hot(labels[idx], 10).float()


def run_one(cfg: Config, i: int, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Full-batch GD at η = 2 / cfg.two_over_eta[i] for cfg.steps[i] steps; the logged loss and sharpness series."""
    two_over_eta, steps, every = cfg.two_over_eta[i], cfg.steps[i], cfg.every_n_steps[i]
    eta = 2.0 / two_over_eta
    torch.manual_seed(0)
    model = TanhMLP(cfg.width, cfg.depth, eta)
    logger = MemoryLogger()
    monitor = SharpnessMonitor(every_n_steps=every, max_iter=cfg.max_iter, smoothness=False)
    trainer = pl.Trainer(max_steps=steps, logger=logger, log_every_n_steps=1, callbacks=[monitor],
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.fit(model, DataLoader(FullBatches(x, y, steps), batch_size=None))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    out = {"eta": eta, "two_over_eta": two_over_eta, "steps": steps, "every_n_steps": every, "seconds": seconds,
           "cpu_seconds": cpu_seconds, **collect(logger)}
    if cfg.check and out["lam_steps"][-1] == steps:
        out["check"] = accuracy_check(model, x, y, out["lambda_max"][-1])
    return out


def collect(logger: MemoryLogger) -> dict[str, Any]:
    """The loss and sharpness series and the monitor's cost from the logger. The loss logged at Lightning step k
    is at the weights after k updates; the monitor's values logged at step k are measured right after that
    batch's update, i.e. after k + 1 updates (the monitor's own ``step``)."""
    series = logger.series
    lam = [(k + 1, v) for k, v in series["curvature/lambda_max"]]
    return {"loss_steps": [k for k, _ in series["train/loss"]], "loss": [v for _, v in series["train/loss"]],
            "lam_steps": [k for k, _ in lam], "lambda_max": [v for _, v in lam],
            "matvecs_mean": statistics.fmean(v for _, v in series["curvature/matvecs"]),
            "converged_fraction": statistics.fmean(v for _, v in series["curvature/converged"]),
            "monitor_seconds": sum(v for _, v in series["curvature/seconds"])}


def accuracy_check(model: TanhMLP, x: Tensor, y: Tensor, logged: float) -> dict[str, float]:
    """The last logged λ_max (``max_iter`` products, warm-started) against a cold, long Lanczos run of a fresh
    monitor at the same (final) weights."""
    ref = SharpnessMonitor(every_n_steps=1, max_iter=CHECK_ITER, tol=1e-5, smoothness=False, warm_start=False)
    value = ref.measure(model, (x, y))["curvature/lambda_max"]
    return {"logged": logged, "reference": value, "rel_diff": logged / value - 1.0}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Crossing step of REACH·2/η, λ_max·η/2 after it, and whether the loss kept decreasing after it."""
    eta, lam, loss = run["eta"], run["lambda_max"], run["loss"]
    ratio = [v * eta / 2 for v in lam]
    cross = next((i for i, r in enumerate(ratio) if r >= REACH), None)
    out: dict[str, Any] = {k: run.get(k) for k in COPIED}
    out.update({"ratio_start": ratio[0], "ratio_max": max(ratio), "lambda_max_start": lam[0], "loss_start": loss[0],
                "loss_end": loss[-1], "reached_step": None})
    if cross is None:
        return out
    step = run["lam_steps"][cross]
    after = ratio[cross:]
    tail = loss[step:]
    last = loss[-max(1, len(loss) // 10):]
    out.update({
        "reached_step": step, "n_after": len(after), "ratio_mean_after": statistics.fmean(after),
        "ratio_min_after": min(after), "ratio_max_after": max(after),
        "ratio_sd_after": statistics.pstdev(after), "frac_after_above_1_5": sum(r > 1.5 for r in after) / len(after),
        "loss_at_reach": loss[step], "loss_tail_mean": statistics.fmean(last),
        "loss_increases_after": sum(b > a for a, b in zip(tail, tail[1:], strict=False)),
        "loss_max_after": max(tail),
        "loss_kept_decreasing": statistics.fmean(last) < loss[step],
    })
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    fig, (ax_a, ax_r, ax_l) = plt.subplots(1, 3, figsize=(18, 4.8))
    for run, color in zip(runs, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        label = f"η = {run['eta']:.4g} (2/η = {run['two_over_eta']:g})"
        ax_a.plot(run["lam_steps"], run["lambda_max"], color=color, lw=1.2, label=label)
        ax_a.axhline(run["two_over_eta"], color=color, ls="--", lw=1)
        ratio = [v * run["eta"] / 2 for v in run["lambda_max"]]
        ax_r.plot(run["lam_steps"], ratio, color=color, lw=1.2, label=label)
        ax_l.plot(run["loss_steps"], run["loss"], color=color, lw=0.8, label=label)
    ax_a.set(xlabel="GD step", ylabel="λ_max (sharpness)", title="λ_max of the training loss; dashed: 2/η")
    ax_r.axhline(1.0, color="k", ls="--", lw=1, label="λ_max = 2/η")
    ax_r.axhline(REACH, color="grey", ls=":", lw=1, label=f"{REACH:g} · 2/η")
    ax_r.set(xlabel="GD step", ylabel="λ_max · η / 2", title="sharpness relative to 2/η")
    ax_l.set(xlabel="GD step", ylabel="training loss (square loss)", yscale="log", title="full-batch training loss")
    for ax in (ax_a, ax_r, ax_l):
        ax.legend(fontsize=8)
    fig.suptitle("Edge of stability: full-batch GD on a tanh MLP (digits, 500 samples), λ_max by SharpnessMonitor "
                 "(lecture notes §25.3.4–25.3.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(s: dict[str, Any]) -> None:
    head = f"2/η = {s['two_over_eta']:g} (η = {s['eta']:.4g}), {s['steps']} steps, {s['seconds']:.0f}s:"
    if s["reached_step"] is None:
        print(f"{head} λ_max·η/2 {s['ratio_start']:.3f} → max {s['ratio_max']:.3f}: never reached {REACH}",
              flush=True)
        return
    print(f"{head} λ_max·η/2 {s['ratio_start']:.3f} at start, ≥ {REACH} at step {s['reached_step']}, after: mean "
          f"{s['ratio_mean_after']:.3f} range [{s['ratio_min_after']:.3f}, {s['ratio_max_after']:.3f}]; loss "
          f"{s['loss_at_reach']:.4f} → {s['loss_end']:.4f} ({s['loss_increases_after']} increases)", flush=True)


def main() -> None:
    args = script_args(__doc__, "2/η = 20 only, 650 steps (smoke test)")
    cfg = QUICK if args.quick else FULL
    t0, cpu0 = time.perf_counter(), time.process_time()
    x, y = digits_subset(cfg.n_samples)
    runs = [run_one(cfg, i, x, y) for i in range(len(cfg.two_over_eta))]
    summaries = [summarize(run) for run in runs]
    for s in summaries:
        report(s)
    png = args.out / PNG
    plot(runs, png)
    emit({"claim": "lecture notes §25.3.4-25.3.5: under full-batch GD the sharpness rises to 2/η and hovers there "
                   "while the loss keeps decreasing non-monotonically",
          "config": {"quick": args.quick, **asdict(cfg)}, "runs": summaries,
          "series": [{"two_over_eta": r["two_over_eta"], "steps": r["lam_steps"], "lambda_max": r["lambda_max"]}
                     for r in runs],
          "png": str(png), "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0})


if __name__ == "__main__":
    main()
