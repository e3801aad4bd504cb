"""Issue 12 #4 -- thesis Fig. 3-1 / 3-2: gradient norm vs local smoothness along training, with and without clipping.

Thesis ch. 3 (Def. 3.2.1, eq. (3.2)): a function is (L0, L1)-smooth if ‖∇²f(x)‖ ≤ L0 + L1‖∇f(x)‖. The motivating
observation (Fig. 3-1, Fig. 3-2, AWD-LSTM on PTB) is that along the training trajectory the local smoothness
L̂_t = ‖∇f(x_{t+1}) − ∇f(x_t)‖ / ‖x_{t+1} − x_t‖ is strongly positively correlated with ‖∇f(x_t)‖ (log-log scatter),
and that the correlation shows up when training with clipped GD and a *large* step size (Fig. 3-2a, lr 30 with
clipping) and is much weaker without clipping at a small, stable step size (Fig. 3-2b) or with clipping at that small
step size (Fig. 3-2c): "clipping enables the training trajectory to stably traverse non-smooth regions".

Here: ``CharTransformerLM`` (2 layers, d_model 64, context 64) on the offline ``CharDataModule`` corpus, one CPU
process, a plain manual loop, no momentum (the thesis' clipped GD, eq. (3.5)). Three settings, as Fig. 3-2:

* ``clip_large``: ``ClippedSGD(scope="global")`` with a large lr (plain SGD diverges at that lr; checked and reported);
* ``sgd_small``:  ``torch.optim.SGD`` at the lr of a small grid with the lowest train loss after a short run;
* ``clip_small``: ``ClippedSGD(scope="global")`` at that same small lr.

At every step both quantities are measured on a *fixed probe batch* (the "full" objective of the figure, at toy
scale): g_t = ∇f_probe(x_t), then one training step on a random mini-batch, then g_{t+1} = ∇f_probe(x_{t+1}) and
``local_smoothness(g_{t+1}, g_t, x_{t+1} − x_t)`` (lightning_opt.stats.smoothness). The pairs (‖g_t‖, L̂_t) are fed to
``L0L1Fit`` (non-negative least squares of L̂ ≈ L0 + L1‖g‖); we report Pearson correlation of the logs, Spearman rank
correlation, and the fitted (L0, L1), per setting, plus the log-log scatter coloured by iteration (Fig. 3-2 style).

    python examples/reproductions/smoothness_clipping.py           # full (~6 min on 2 shared CPU cores)
    python examples/reproductions/smoothness_clipping.py --quick   # smoke test (<60 s)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import math
import time
from pathlib import Path

import torch
from _plot import emit, plt, save_figure, script_args, smooth

from lightning_opt.examples import CharDataModule, CharTransformerLM
from lightning_opt.optim import ClippedSGD
from lightning_opt.stats.smoothness import L0L1Fit, local_smoothness

MODEL_KW = dict(d_model=64, n_layers=2, n_heads=4, block_size=64, dropout=0.0)
SGD_GRID = (0.1, 0.3, 1.0)
CLIP_NORM = 0.25
LARGE_LR = 3.0
SETTINGS = ("clip_large", "sgd_small", "clip_small")
TITLES = {"clip_large": "GClip, lr {lr:g} (large)", "sgd_small": "SGD, lr {lr:g}, no clipping",
          "clip_small": "GClip, lr {lr:g} (small)"}


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()]).double()


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def probe_grad(model: CharTransformerLM, probe: list) -> tuple[torch.Tensor, float]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in probe:
        loss = model._loss(b) / len(probe)
        loss.backward()
        total += float(loss.detach())
    g = _flat_grad(model)
    model.zero_grad(set_to_none=True)
    return g, total


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    return pearson(ranks(xs), ranks(ys))


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def train(setting: str, lr: float, steps: int, seed: int, probe_batches: int, measure: bool = True) -> dict:
    dm = CharDataModule(block_size=MODEL_KW["block_size"], batch_size=32, seed=seed, max_chars=200_000)
    torch.manual_seed(seed)
    model = CharTransformerLM(vocab_size=dm.vocab_size, **MODEL_KW)
    model.train()
    if setting == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = ClippedSGD(model.parameters(), lr=lr, max_norm=CLIP_NORM, scope="global")
    loader = dm.train_dataloader()
    it = iter(loader)
    probe = [next(it) for _ in range(probe_batches)]  # fixed probe batch: the objective whose smoothness we track
    gnorm, smooth, probe_loss, train_loss = [], [], [], []
    g_old, f_old = probe_grad(model, probe) if measure else (None, float("nan"))
    diverged = False
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x_old = _flat_params(model) if measure else None
        loss = model._loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        train_loss.append(lv)
        if not math.isfinite(lv) or lv > 20:
            diverged = True
            break
        if measure:
            g_new, f_new = probe_grad(model, probe)
            step = _flat_params(model) - x_old
            gnorm.append(float(torch.linalg.vector_norm(g_old)))
            smooth.append(local_smoothness(g_new, g_old, step))
            probe_loss.append(f_old)
            g_old, f_old = g_new, f_new
    tail = train_loss[-25:]
    return {"gnorm": gnorm, "smooth": smooth, "probe_loss": probe_loss, "train_loss": train_loss,
            "final_train": sum(tail) / len(tail) if not diverged else float("inf"), "diverged": diverged}


def analyse(run: dict, skip: int) -> dict:
    pts = [(g, s) for g, s in zip(run["gnorm"][skip:], run["smooth"][skip:], strict=True)
           if math.isfinite(g) and math.isfinite(s) and g > 0 and s > 0]
    fit = L0L1Fit()
    for g, s in pts:
        fit.update(g, s)
    l0, l1 = fit.fit()
    gs, ss = [p[0] for p in pts], [p[1] for p in pts]
    lg, ls = [math.log(g) for g in gs], [math.log(s) for s in ss]
    return {
        "n_points": len(pts),
        "pearson_log": pearson(lg, ls),
        "spearman": spearman(gs, ss),
        "pearson_linear": pearson(gs, ss),
        "L0": l0,
        "L1": l1,
        "gnorm_range": [min(gs), max(gs)] if gs else None,
        "smooth_range": [min(ss), max(ss)] if ss else None,
        "smooth_span_decades": math.log10(max(ss) / min(ss)) if ss else None,
        "gnorm_span_decades": math.log10(max(gs) / min(gs)) if gs else None,
        "final_train_loss": run["final_train"],
        "diverged": run["diverged"],
    }


def pick_small_lr(grid: tuple[float, ...], sweep_steps: int, seed: int, probe_batches: int,
                  t0: float) -> tuple[dict[str, float], float]:
    """The lr of the unclipped baseline: the best stable lr of a small grid (thesis: "without clipping, the
    optimizer has to adopt a small learning rate ... otherwise the sequence diverges")."""
    sweep = {}
    for lr in grid:
        r = train("sgd", lr, sweep_steps, seed, probe_batches, measure=False)
        sweep[f"{lr:g}"] = r["final_train"]
        print(f"[sweep] sgd lr={lr:g}: final train {r['final_train']:.3f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    stable = [lr for lr in grid if math.isfinite(sweep[f"{lr:g}"])]
    return sweep, min(stable, key=lambda lr: sweep[f"{lr:g}"]) if stable else SGD_GRID[0]


def run_settings(lrs: dict[str, float], steps: int, seed: int, probe_batches: int, skip: int,
                 t0: float) -> tuple[dict[str, dict], dict[str, dict]]:
    """The three Fig. 3-2 settings at their lrs: each one's measured trajectory and its correlations and fit."""
    runs, results = {}, {}
    for name in SETTINGS:
        kind = "sgd" if name == "sgd_small" else "clip"
        runs[name] = train(kind, lrs[name], steps, seed, probe_batches)
        results[name] = {"lr": lrs[name], **analyse(runs[name], skip)}
        r = results[name]
        print(f"[{name}] lr={lrs[name]:g} corr(log)={r['pearson_log']:.3f} spearman={r['spearman']:.3f} "
              f"L0={r['L0']:.3g} L1={r['L1']:.3g} final={r['final_train_loss']:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return runs, results


def plot(runs: dict[str, dict], results: dict[str, dict], lrs: dict[str, float], skip: int, png: Path) -> Path:
    """Fig. 3-2 style: one log-log scatter (coloured by iteration) with the (L0, L1) fit per setting, then the
    smoothed training losses."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    for ax, name in zip(axes[:3], SETTINGS, strict=True):
        run, res = runs[name], results[name]
        n = len(run["smooth"])
        sc = ax.scatter(run["gnorm"][skip:], run["smooth"][skip:], c=list(range(skip, n)), cmap="viridis", s=8)
        if res["gnorm_range"] and math.isfinite(res["L0"]):
            lo, hi = res["gnorm_range"]
            xs = [lo * (hi / lo) ** (k / 50) for k in range(51)]
            ax.plot(xs, [res["L0"] + res["L1"] * x for x in xs], "r--", lw=1.2,
                    label=f"L0={res['L0']:.3g}, L1={res['L1']:.3g}")
            ax.legend(fontsize=8, loc="upper left")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient norm ‖∇f(x_t)‖ (probe batch)")
        ax.set_ylabel("local smoothness L̂_t")
        ax.set_title(TITLES[name].format(lr=lrs[name]) + f"\nlog-corr {res['pearson_log']:.2f}, "
                     f"Spearman {res['spearman']:.2f}", fontsize=9)
        fig.colorbar(sc, ax=ax, label="iteration")
    ax = axes[3]
    for name, c in zip(SETTINGS, ("tab:blue", "tab:red", "tab:orange"), strict=True):
        ax.plot(smooth(runs[name]["train_loss"]), color=c, label=TITLES[name].format(lr=lrs[name]))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (EMA 0.9)")
    ax.legend(fontsize=8)
    ax.set_title("training loss", fontsize=9)
    return save_figure(fig, png, suptitle="Thesis Fig. 3-2 at toy scale: char-level Transformer LM, gradient norm "
                                          "vs local smoothness")


def main() -> None:
    args = script_args(__doc__, "tiny run for the smoke test",
                       {"steps": ("training steps per setting", 40, 400)})
    t0 = time.perf_counter()
    quick = args.quick
    steps = args.steps
    sweep_steps = 30 if quick else 100
    probe_batches = 2
    skip = 0 if quick else 5  # the first few steps from the random init are not part of the trajectory picture
    seed = 0

    grid = SGD_GRID[:2] if quick else SGD_GRID
    sweep, small_lr = pick_small_lr(grid, sweep_steps, seed, probe_batches, t0)
    plain_at_large = train("sgd", LARGE_LR, sweep_steps, seed, probe_batches, measure=False)
    print(f"[sweep] sgd at the large lr {LARGE_LR:g}: diverged={plain_at_large['diverged']} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    lrs = {"clip_large": LARGE_LR, "sgd_small": small_lr, "clip_small": small_lr}
    runs, results = run_settings(lrs, steps, seed, probe_batches, skip, t0)
    png = plot(runs, results, lrs, skip,
               args.out / ("repro_smoothness_quick.png" if quick else "repro_smoothness_clipping.png"))
    emit({
        "claim": "thesis Fig. 3-1/3-2: local smoothness correlates with gradient norm along training, most visibly "
                 "with clipping at a large step size",
        "config": {"quick": quick, "steps": steps, "sweep_steps": sweep_steps, "probe_batches": probe_batches,
                   "clip_norm": CLIP_NORM, "large_lr": LARGE_LR, "sgd_grid": list(grid), "model": MODEL_KW,
                   "skip": skip, "seed": seed},
        "sgd_sweep_final_train": sweep,
        "sgd_at_large_lr_diverged": plain_at_large["diverged"],
        "settings": results,
    }, png=png, t0=t0)


if __name__ == "__main__":
    main()
