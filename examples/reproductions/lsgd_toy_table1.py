"""LSGD paper (Teng et al. 2019), Supplement §6 "LGD versus EAGD: Illustrative Example", Table 1.

Source: /work/shared/seeds/lsgd-leader-sgd.txt (Supplement §6, Fig. 7, Table 1). Problem:
min_{x,y} L(x, y) = sin(π r) / (π r), r = sqrt(x² + y²) — concentric rings of local minima whose depth grows toward
the origin (global minimum −0.21723 on the ring r ≈ 1.430; the next rings: −0.09133 at r ≈ 3.471, −0.05797 at
r ≈ 5.482, ...). "Both methods use 4 workers with initial points (−6, −4), (−15, −18), (20, 11) and (17, 8). The
communication period is set to 1. The learning rate for both EAGD and LGD equals 0.1. Furthermore, EAGD uses
β = 0.43 and LGD uses λ = 0.1." Claim (Table 1, "Optimum L(x*, y*) recovered by EAGD and LGD"): EAGD −0.0912,
LGD −0.2172 — "EAGD suffers from the averaging policy, whereas LGD is able to recover a solution close to the
global optimum".

What is run: both methods through the package's strategies on 4 real gloo CPU ranks (Lightning's fork launcher,
``start_method="fork"``: the ranks are forks of this already-imported process, so a run costs no extra imports).
A LightningModule whose only parameter is the float64 2-vector (x, y); plain full-batch GD
(``torch.optim.SGD(lr=0.1)``, the loss *is* L); each rank sets its own start point in ``on_fit_start`` (after the
strategy's initial broadcast). Mapping of the paper's constants (see docs/REPRODUCTIONS_part_d.md §8):

* EAGD β = 0.43 → ``EASGDStrategy(period=1, beta=0.43)``: ``beta`` *is* the EASGD paper's moving rate β = pα, so
  the elastic coefficient is α = β/4 = 0.1075 per step; the centre starts at the workers' mean. (Suppl. §8's form
  X₊ = (1 − ηλ)X + ηλX̃ − η∇F, X̃₊ = (1 − pηλ)X̃ + pηλ·mean gives the same thing with β = pηλ.)
* LGD λ = 0.1 → ``LSGDStrategy(period=1, pull=0.1, leader_window=1)``: the paper's Alg. 1 pull
  x ← x − λ(x − x̃) after each gradient step, the leader chosen from the current (exact, full-batch) loss. The
  other reading — Suppl. §8 and §3 write batch LGD as x₊ = x − η(∇f + λ(x − z)), a per-step pull ηλ = 0.01 — is
  run too in the full mode (``lsgd_eta_lambda``).

Reported: per worker, L at every step; the consensus Lightning hands back — EASGD's centre x̃, LSGD's leader
(``eval_weights="leader"``) — read every step through ``strategy.lightning_module_state_dict()``; the best worker;
and the largest distance between our trajectories and a float64 numpy re-implementation of the updates the
strategies document (``reference``: it agrees to rounding error, ≈ 1e-15).
The number compared with Table 1 is the final L of that consensus (EASGD: centre, LSGD: leader); the paper gives no
step count, so we run until the trajectories have converged (the Table 1 runs by ≈ 115 steps, the ηλ run by ≈ 540)
and show the whole curve.

    python examples/reproductions/lsgd_toy_table1.py            # 1000 steps, 3 runs (~1-2 min here)
    python examples/reproductions/lsgd_toy_table1.py --quick    # 120 steps, the 2 Table 1 runs (smoke test)

Writes <out>/repro_lsgd_toy_table1.png (default docs/img) and prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import os

# One thread: the box is a shared 2-core CPU, and a DDP-family strategy would otherwise set torch to cpu_count threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from _plot import emit, plt, script_args
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.strategies import EASGDStrategy, LSGDStrategy

STARTS = ((-6.0, -4.0), (-15.0, -18.0), (20.0, 11.0), (17.0, 8.0))
WORKERS, LR, BETA, LAMBDA = len(STARTS), 0.1, 0.43, 0.1
PAPER = {"easgd": -0.0912, "lsgd": -0.2172}
PNG_NAME = "repro_lsgd_toy_table1.png"
RUNS: dict[str, dict[str, Any]] = {
    "easgd": {"cls": "easgd", "kwargs": {"period": 1, "beta": BETA},
              "label": f"EAGD (EASGDStrategy, β = {BETA}: α = β/4 = {BETA / WORKERS:.4g})"},
    "lsgd": {"cls": "lsgd", "kwargs": {"period": 1, "pull": LAMBDA, "leader_window": 1, "eval_weights": "leader"},
             "label": f"LGD (LSGDStrategy, pull λ = {LAMBDA}, Alg. 1)"},
    "lsgd_eta_lambda": {"cls": "lsgd", "kwargs": {"period": 1, "pull": LR * LAMBDA, "leader_window": 1,
                                                  "eval_weights": "leader"},
                        "label": f"LGD, pull ηλ = {LR * LAMBDA:.3g} (Suppl. §8 form)"},
}
STRATEGIES = {"easgd": EASGDStrategy, "lsgd": LSGDStrategy}


def sinc_loss(xy: torch.Tensor) -> torch.Tensor:
    """L(x, y) = sin(π r) / (π r), r = ‖(x, y)‖."""
    pr = math.pi * torch.linalg.vector_norm(xy)
    return torch.sin(pr) / pr


def ring_minima(count: int = 4) -> list[tuple[float, float]]:
    """(r, L) of the first ``count`` rings of local minima (tan(πr) = πr, refined by Newton on dL/dr)."""
    out = []
    for k in range(1, count + 1):
        r = 2 * k - 0.55  # minima near 1.43, 3.47, 5.48, ... (the maxima lie in between)
        for _ in range(50):
            pr = math.pi * r
            d1 = (pr * math.cos(pr) - math.sin(pr)) / (pr * r)  # dL/dr
            d2 = -math.pi ** 2 * math.sin(pr) / pr - 2 * d1 / r  # d²L/dr²
            r -= d1 / d2
        out.append((r, math.sin(math.pi * r) / (math.pi * r)))
    return out


def initial_consensus(cls: str) -> list[float]:
    """EASGD's centre starts at the workers' mean; LSGD's leader is the best starting point."""
    starts = np.asarray(STARTS)
    return (starts.mean(axis=0) if cls == "easgd" else starts[np.argmin(loss_np(starts))]).tolist()


class ToyProblem(pl.LightningModule):
    """The 2-vector (x, y) of one worker; each step records the local point and the strategy's consensus."""

    def __init__(self, steps: int, out_dir: str, run: str) -> None:
        super().__init__()
        self.steps, self.out_dir, self.run = steps, out_dir, run
        self.xy = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.local: list[list[float]] = []
        self.consensus: list[list[float]] = []

    def on_fit_start(self) -> None:
        with torch.no_grad():
            self.xy.copy_(torch.tensor(STARTS[self.global_rank], dtype=torch.float64))
        self.local = [self.xy.detach().tolist()]
        self.consensus = [initial_consensus(RUNS[self.run]["cls"])]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return sinc_loss(self.xy)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.local.append(self.xy.detach().tolist())  # after the step and the sync
        state = self.trainer.strategy.lightning_module_state_dict()  # a collective: the consensus it would save
        self.consensus.append(state["xy"].detach().tolist())

    def on_train_end(self) -> None:
        path = Path(self.out_dir) / f"{self.run}_rank{self.global_rank}.json"
        path.write_text(json.dumps({"local": self.local, "consensus": self.consensus}))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.steps)), batch_size=1)


def fit(run: str, steps: int, out_dir: Path) -> None:
    spec = RUNS[run]
    strategy = STRATEGIES[spec["cls"]](**spec["kwargs"], start_method="fork", timeout=120)
    trainer = pl.Trainer(accelerator="cpu", devices=WORKERS, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(ToyProblem(steps, str(out_dir), run))


def loss_np(points: np.ndarray) -> np.ndarray:
    r = np.linalg.norm(points, axis=-1)
    return np.sin(np.pi * r) / (np.pi * r)


def grad_np(points: np.ndarray) -> np.ndarray:
    r = np.linalg.norm(points, axis=-1, keepdims=True)
    pr = np.pi * r
    return np.pi * (pr * np.cos(pr) - np.sin(pr)) / pr ** 2 * points / r


def reference(run: str, steps: int) -> np.ndarray:
    """The strategies' update, re-implemented in numpy (float64) as their docstrings state it: a GD step, then the
    sync — EASGD: x_i ← x_i − α(x_i − x̃), x̃ ← x̃ + αΣ(x_i − x̃) (pre-sync values, α = β/N); LSGD: x ← x + λ(x̃ − x)
    with x̃ the worker of lowest pre-step loss, rounded to float32 as LSGD's score window is (ties → lowest rank).
    Returns (worker, step + 1, 2)."""
    kw = RUNS[run]["kwargs"]
    x = np.asarray(STARTS, dtype=np.float64)
    centre, out = x.mean(axis=0), [x]
    for _ in range(steps):
        leader = int(np.argmin(loss_np(x).astype(np.float32)))  # LSGD keeps its scores in float32
        x = x - LR * grad_np(x)
        if RUNS[run]["cls"] == "easgd":
            alpha, diff = kw["beta"] / WORKERS, x - centre
            x, centre = x - alpha * diff, centre + alpha * diff.sum(axis=0)
        else:
            x = x + kw["pull"] * (x[leader] - x)
        out.append(x)
    return np.stack(out, axis=1)


def read_run(run: str, out_dir: Path) -> dict[str, np.ndarray]:
    logs = [json.loads((out_dir / f"{run}_rank{r}.json").read_text()) for r in range(WORKERS)]
    local = np.stack([np.asarray(log["local"]) for log in logs])  # (worker, step + 1, 2)
    consensus = np.asarray(logs[0]["consensus"])
    if not all(np.array_equal(consensus, np.asarray(log["consensus"])) for log in logs):
        raise RuntimeError(f"{run}: the ranks disagree on the consensus")
    return {"local": local, "consensus": consensus, "L": loss_np(local), "L_consensus": loss_np(consensus)}


def converged_at(curve: np.ndarray, tol: float = 1e-5) -> int:
    """First step from which the curve stays within ``tol`` of its final value."""
    off = np.abs(curve - curve[-1]) > tol
    return int(np.nonzero(off)[0][-1] + 1) if off.any() else 0


def summarise_run(run: str, data: dict[str, np.ndarray]) -> dict[str, Any]:
    best = data["L"].min(axis=0)
    row: dict[str, Any] = {
        "kwargs": RUNS[run]["kwargs"],
        "consensus": "centre" if run == "easgd" else "leader",
        "final_L_consensus": float(data["L_consensus"][-1]),
        "final_L_best_worker": float(best[-1]),
        "final_L_per_worker": [float(v) for v in data["L"][:, -1]],
        "final_r_per_worker": [float(v) for v in np.linalg.norm(data["local"][:, -1], axis=-1)],
        "final_xy_consensus": [float(v) for v in data["consensus"][-1]],
        "L_of_worker_mean": float(loss_np(data["local"][:, -1].mean(axis=0))),
        "steps_to_converge_consensus": converged_at(data["L_consensus"]),
        # a string: emit() rounds floats to 6 decimals, and this is ulp-sized
        "max_abs_dev_from_numpy_reference": f"{np.abs(data['local'] - reference(run, len(best) - 1)).max():.1e}",
        "L_consensus_at_step": {str(s): float(data["L_consensus"][s]) for s in (50, 100, 150, 200)
                                if s < len(best)},
    }
    if run in PAPER:
        row["paper"] = PAPER[run]
        row["abs_diff_to_paper"] = abs(row["final_L_consensus"] - PAPER[run])
    return row


def plot(data: dict[str, dict[str, np.ndarray]], png: Path) -> None:
    fig, axes = plt.subplots(len(data), 2, figsize=(11.5, 4.6 * len(data)), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    rings = ring_minima(8)
    grid = np.linspace(-24, 24, 400)
    gx, gy = np.meshgrid(grid, grid)
    field = loss_np(np.stack([gx, gy], axis=-1) + 1e-12)
    for (run, d), (ax_xy, ax_l) in zip(data.items(), axes):
        ax_xy.contourf(gx, gy, field, levels=30, cmap="Greys", alpha=0.5)
        for r, _ in rings:
            ax_xy.add_patch(plt.Circle((0, 0), r, fill=False, ls="--", lw=0.6, color="k", alpha=0.5))
        for w in range(WORKERS):
            ax_xy.plot(d["local"][w, :, 0], d["local"][w, :, 1], color=colors[w], lw=1.2, label=f"worker {w}")
            ax_xy.plot(*d["local"][w, 0], "o", color="red", ms=5)
            ax_xy.plot(*d["local"][w, -1], "o", color="blue", ms=5)
        ax_xy.plot(d["consensus"][:, 0], d["consensus"][:, 1], color="k", lw=1.0, ls=":",
                   label="centre x̃" if run == "easgd" else "leader")
        ax_xy.set_aspect("equal")
        ax_xy.set_title(f"{RUNS[run]['label']}\ntrajectories (red: start, blue: end; dashed: rings of minima)",
                        fontsize=8)
        ax_xy.legend(fontsize=7, loc="upper left")
        steps = np.arange(d["L"].shape[1])
        for w in range(WORKERS):
            ax_l.plot(steps, d["L"][w], color=colors[w], lw=1.2, label=f"worker {w}")
        ax_l.plot(steps, d["L_consensus"], color="k", lw=1.0, ls=":",
                  label=f"{'centre' if run == 'easgd' else 'leader'}: {d['L_consensus'][-1]:.5f}")
        if run in PAPER:
            ax_l.axhline(PAPER[run], color="red", lw=0.8, ls="--", label=f"paper Table 1: {PAPER[run]}")
        ax_l.set_xscale("symlog", linthresh=10)
        ax_l.set_xlim(0, steps[-1])
        ax_l.set_xlabel("optimizer step")
        ax_l.set_ylabel("L(x, y) = sin(πr)/(πr)")
        ax_l.set_ylim(-0.24, 0.24)
        ax_l.grid(alpha=0.3)
        ax_l.legend(fontsize=7)
        ax_l.set_title("L per worker (4 gloo ranks, τ = 1, η = 0.1)", fontsize=8)
    fig.suptitle("LSGD paper Suppl. §6, Fig. 7 / Table 1: EAGD vs LGD on sin(πr)/(πr)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = script_args(__doc__, "120 steps, only the two Table 1 runs (smoke test)",
                       {"steps": ("optimizer steps", 120, 1000)}, argv)
    steps = args.steps
    runs = ["easgd", "lsgd"] if args.quick else list(RUNS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            fit(run, steps, Path(tmp))
        data = {run: read_run(run, Path(tmp)) for run in runs}
    fit_seconds = time.perf_counter() - start
    png = args.out / PNG_NAME
    plot(data, png)
    summary = {"config": {"workers": WORKERS, "starts": STARTS, "lr": LR, "period": 1, "steps": steps,
                          "quick": args.quick, "dtype": "float64"},
               "ring_minima": [{"r": r, "L": v} for r, v in ring_minima(4)],
               "runs": {run: summarise_run(run, d) for run, d in data.items()},
               "fit_seconds": round(fit_seconds, 1), "wall_seconds": round(time.perf_counter() - start, 1),
               "png": str(png)}
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
