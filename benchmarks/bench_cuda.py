"""The CUDA paths in one run, for a machine with one GPU: what works there, and the figures to record.

Run: ``python -m benchmarks.bench_cuda --out results_cuda.md [--quick] [--device cuda]`` (``--device cpu --quick``
checks the script itself on a machine without a GPU). Every section is independent: one that fails is reported
with its error and the others still run.

1. **Strategies on one GPU** (``accelerator="gpu", devices=1``): each strategy fits timm's ``resnet18`` on
   synthetic CIFAR-sized batches held on the GPU; steps/s against Lightning's ``DDPStrategy`` on the same device
   (interleaved repetitions, medians) and, for Local SGD at τ = 1, the largest weight difference to DDP's run.
2. **Two ranks on one GPU over gloo** (``num_nodes=2, devices=1``, launched as two processes with ``NODE_RANK``):
   CUDA tensors through the strategies' collectives; the ranks' weights must agree after the last sync.
   (NCCL refuses two ranks on one GPU, so this is the multi-rank CUDA path one GPU can check.)
3. **Optimizers**: ``benchmarks.bench_optim --device cuda`` (step time vs ``Adam(foreach=True)``).
4. **Lanczos on CUDA**: accuracy against ``eigvalsh`` of the exact float64 Hessian of a small MLP, and the cost of
   ``lanczos_extreme_eigs`` / ``power_iteration`` on ``resnet18`` against one training step.
5. **Monitors in a GPU fit** (2000 steps): fit time with ``SharpnessMonitor()`` at its defaults and with all four
   monitors (SharpnessMonitor every 500 steps, so full Lanczos runs inside the fit) against a plain fit, the share
   of time inside the monitors' hooks and the steps SharpnessMonitor measured at (or its progress-bar note).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from benchmarks.bench_monitors_examples import _timed
from lightning_opt.callbacks import GradientNoiseMonitor, GradNormMonitor, SharpnessMonitor, TimeAverageMonitor
from lightning_opt.examples import ImageClassifier
from lightning_opt.stats.hvp import HessianVectorProduct
from lightning_opt.stats.lanczos import lanczos_extreme_eigs, power_iteration
from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy, LSGDStrategy
from lightning_opt.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128


class StepTimer(Callback):
    """Wall time from the start of batch ``skip`` to the end of training (device synchronised at both ends)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.seconds, self.steps = skip, 0.0, 0.0, 0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip and not self.start:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.skip


def synthetic_loader(device: str, n_batches: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """CIFAR-sized random images and labels, already on ``device`` (so host-to-device copies are not timed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n_batches * BATCH,), generator=g).to(device)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def trainer(device: str, steps: int, strategy, callbacks=(), **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, strategy=strategy,
                      max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=list(callbacks), **kw)


def flat_weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in module.parameters()])


# ----------------------------------------------------------------------------- 1. strategies on one GPU


def _arch(quick: bool, big: str = "resnet18") -> str:
    """The model: ``big`` on the GPU, timm's 0.1M-parameter test model for ``--quick`` (a CPU check of the script)."""
    return "test_efficientnet" if quick else big

STRATEGIES: dict[str, Callable[[], object]] = {
    "DDPStrategy (Lightning)": lambda: "ddp",
    "single device (Lightning)": lambda: "auto",
    "LocalSGD τ=1": lambda: LocalSGDStrategy(period=1),
    "LocalSGD τ=8, DiLoCo outer (0.7, Nesterov 0.9)":
        lambda: LocalSGDStrategy(period=8, outer_lr=0.7, outer_momentum=0.9, outer_nesterov=True),
    "LSGD τ=4": lambda: LSGDStrategy(period=4),
    "Lookahead sync (τ=5, α=0.5)": lambda: LookaheadStrategy(period=5, mode="sync"),
    "Lookahead local (τ=5, α=0.5)": lambda: LookaheadStrategy(period=5, mode="local"),
    "EASGD τ=4": lambda: EASGDStrategy(period=4),
}


def fit_strategy(name: str, device: str, steps: int, skip: int, arch: str) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    model = ImageClassifier(model_name=arch, lr=0.05)
    timer = StepTimer(skip)
    trainer(device, steps, STRATEGIES[name](), [timer]).fit(model, synthetic_loader(device, 40))
    return timer.steps / timer.seconds, flat_weights(model)


def section_strategies(device: str, quick: bool) -> list[str]:
    steps, skip, reps = (12, 4, 1) if quick else (200, 20, 3)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True  # so τ = 1 can be compared with DDP weight for weight
    rates: dict[str, list[float]] = {n: [] for n in STRATEGIES}
    weights: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for _ in range(reps):  # interleaved repetitions
        for name in STRATEGIES:
            if name in errors:
                continue
            try:
                rate, weights[name] = fit_strategy(name, device, steps, skip, _arch(quick))
                rates[name].append(rate)
            except Exception as exc:  # noqa: BLE001 - reported in the table, the other rows still run
                errors[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                traceback.print_exc()
    base = statistics.median(rates["DDPStrategy (Lightning)"] or [float("nan")])
    lines = [f"timm `{_arch(quick)}`, batch {BATCH}, synthetic data on the device, {steps} steps, timed from step "
             f"{skip}, {reps} interleaved repetitions (medians)", "",
             "| strategy | steps/s | vs DDP | max abs weight diff vs DDP |", "|---|---|---|---|"]
    ref = weights.get("DDPStrategy (Lightning)")
    for name in STRATEGIES:
        if name in errors:
            lines.append(f"| {name} | failed: {errors[name]} | | |")
            continue
        rate = statistics.median(rates[name])
        diff = "—"  # only τ = 1 does DDP's arithmetic; the others differ by design
        if name == "LocalSGD τ=1" and ref is not None:
            diff = f"{float((weights[name] - ref).abs().max()):.2e}"
        lines.append(f"| {name} | {rate:.1f} | {rate / base:.3f} | {diff} |")
    return lines


# --------------------------------------------------------------------- 2. two ranks on one GPU over gloo

def worker(out: Path, device: str, quick: bool) -> None:
    """One rank of section 2 (run as ``--worker OUT``): Local SGD with outer momentum, then Lookahead sync."""
    result = {}
    for name, make in (("LocalSGD τ=4, outer momentum", lambda: LocalSGDStrategy(
            period=4, outer_lr=0.7, outer_momentum=0.9, process_group_backend="gloo", timeout=120)),
            ("Lookahead sync τ=4, α=0.3", lambda: LookaheadStrategy(
                period=4, alpha=0.3, mode="sync", process_group_backend="gloo", timeout=120))):
        torch.manual_seed(0)
        model = ImageClassifier(model_name=_arch(quick, "resnet10t"), lr=0.05)
        t = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, num_nodes=2, strategy=make(),
                       max_steps=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                       use_distributed_sampler=False)
        t.fit(model, synthetic_loader(device, 16, seed=int(os.environ["NODE_RANK"])))
        result[name] = (flat_weights(model), str(t.strategy.root_device),
                        float(t.callback_metrics.get("train/loss", torch.tensor(float("nan")))))
    torch.save(result, out / f"rank{os.environ['NODE_RANK']}.pt")


def section_gloo_two_ranks(device: str, quick: bool, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LOCAL_RANK="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.bench_cuda", "--worker", str(out), "--device", device]
    procs = [subprocess.Popen(cmd + (["--quick"] if quick else []), cwd=ROOT, env=dict(env, NODE_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        tails = " / ".join(f"rank {r} rc={p.returncode}: {logs[r][-800:]}" for r, p in enumerate(procs))
        return [f"failed: {tails}".replace("\n", " ")]
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in range(2))
    lines = [f"timm `{_arch(quick, 'resnet10t')}`, 2 processes on one device, gloo, different data per rank, "
             "16 steps (ends on a sync)", "",
             "| strategy | training device | max abs diff between ranks | loss rank 0 / 1 |", "|---|---|---|---|"]
    for name in r0:
        diff = float((r0[name][0] - r1[name][0]).abs().max())
        lines.append(f"| {name} | {r0[name][1]} | {diff:.2e} | {r0[name][2]:.4f} / {r1[name][2]:.4f} |")
    return lines


# ------------------------------------------------------------------------------------- 3. optimizers

def section_optim(device: str, quick: bool) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.bench_optim", "--device", device, "--threads", "0"]
    cmd += ["--smoke"] if quick else ["--reps", "7"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    if proc.returncode:
        return [f"failed (rc {proc.returncode}): {proc.stderr[-1500:]}"]
    return [f"`{' '.join(cmd[1:])}`", "", *proc.stdout.strip().splitlines()]


# --------------------------------------------------------------------------------- 4. Lanczos on CUDA

def _mlp_problem(device: str, dtype: torch.dtype, width: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    net = net.to(device=device, dtype=dtype)
    x = torch.randn(256, 32, dtype=torch.float64).to(device=device, dtype=dtype)  # same data in every dtype
    y = torch.randint(0, 10, (256,)).to(device)
    return net, lambda m: nn.functional.cross_entropy(m(x), y)


def _exact_extremes(hvp: HessianVectorProduct) -> tuple[float, float]:
    eye = torch.eye(hvp.dim, device=hvp.device, dtype=torch.float64)
    h = torch.stack([hvp(eye[i]) for i in range(hvp.dim)])
    eig = torch.linalg.eigvalsh((h + h.T) / 2)
    return float(eig[-1]), float(eig[0])


def _rel(a: float, b: float) -> str:
    return f"{abs(a - b) / max(abs(b), 1e-12):.1e}"


def section_lanczos_accuracy(device: str, quick: bool) -> list[str]:
    width = 16 if quick else 48
    net64, loss64 = _mlp_problem(device, torch.float64, width)
    lmax, lmin = _exact_extremes(HessianVectorProduct(net64, loss64))
    lines = [f"tanh MLP 32-{width}-{width}-10, cross-entropy, batch 256 on {device}; exact: eigvalsh of the float64 "
             f"Hessian (λ_max {lmax:.5g}, λ_min {lmin:.5g})", "",
             "| method | products | rel. err λ_max | rel. err λ_min | claims converged |", "|---|---|---|---|---|"]
    for dtype in (torch.float64, torch.float32):
        net, loss = _mlp_problem(device, dtype, width)
        hvp = HessianVectorProduct(net, loss)
        gen = torch.Generator(device=device).manual_seed(0)
        res = lanczos_extreme_eigs(hvp, hvp.dim, tol=1e-3, device=device, dtype=dtype, generator=gen)
        lines.append(f"| lanczos_extreme_eigs(tol=1e-3), {dtype} | {res.n_matvec} | {_rel(res.lambda_max, lmax)} | "
                     f"{_rel(res.lambda_min, lmin)} | {res.converged} |")
        eig, _, n = power_iteration(hvp, hvp.dim, tol=1e-3, device=device, dtype=dtype, generator=gen)
        lines.append(f"| power_iteration(tol=1e-3), {dtype} | {n} | {_rel(eig, lmax)} | — | — |")
    return lines


def _median_seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def section_lanczos_cost(device: str, quick: bool) -> list[str]:
    torch.manual_seed(0)
    model = ImageClassifier(model_name=_arch(quick)).model.to(device).eval()
    x, y = torch.randn(BATCH, 3, 32, 32, device=device), torch.randint(0, 10, (BATCH,), device=device)
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()

    step_s = _median_seconds(train_step, device, 3 if quick else 20)
    gib = (lambda: torch.cuda.memory_allocated() / 2**30) if device == "cuda" else (lambda: float("nan"))
    hvp = HessianVectorProduct(model, loss_fn)  # after the steps: its graph holds the current weights
    v = torch.randn(hvp.dim, device=device)
    hvp_s = _median_seconds(lambda: hvp(v), device, 3 if quick else 20)
    held = gib()  # the model, the double-backward graph of the gradient, one product's buffers
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    res = lanczos_extreme_eigs(hvp, hvp.dim, tol=1e-3, max_iter=100, device=device, generator=gen)
    lanczos_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    t0 = time.perf_counter()
    eig, _, n_pow = power_iteration(hvp, hvp.dim, tol=1e-3, device=device, generator=gen)
    power_s = time.perf_counter() - t0
    return [f"timm `{_arch(quick)}` ({hvp.dim / 1e6:.2f}M parameters), batch {BATCH}, "
            f"eval mode, float32 on {device}", "",
            "| quantity | value |", "|---|---|",
            f"| training step (fwd + bwd + SGD) | {1e3 * step_s:.2f} ms |",
            f"| one Hessian-vector product | {1e3 * hvp_s:.2f} ms ({hvp_s / step_s:.2f} training steps) |",
            f"| lanczos_extreme_eigs(tol=1e-3), both ends | {res.n_matvec} products, {lanczos_s:.2f} s, "
            f"λ_max {res.lambda_max:.5g}, λ_min {res.lambda_min:.5g}, converged {res.converged}, "
            f"peak GPU memory {peak:.2f} GiB ({held:.2f} GiB held by the product's graph before it) |",
            f"| power_iteration(tol=1e-3), λ_max only | {n_pow} products, {power_s:.2f} s, λ {eig:.5g} |"]


# ----------------------------------------------------------------------------- 5. monitors in a GPU fit

MONITOR_CONFIGS: dict[str, Callable[[], list[Callback]]] = {
    "baseline": lambda: [],
    "SharpnessMonitor()": lambda: [SharpnessMonitor()],
    "all four (SharpnessMonitor every 500 steps)": lambda: [
        GradNormMonitor(), GradientNoiseMonitor(), SharpnessMonitor(every_n_steps=500), TimeAverageMonitor()],
}


def section_monitors(device: str, quick: bool) -> list[str]:
    steps = 20 if quick else 2000
    rows = {}
    for name, make in MONITOR_CONFIGS.items():
        torch.manual_seed(0)
        model = ImageClassifier(model_name=_arch(quick), lr=0.05)
        callbacks = make()
        spent = _timed(callbacks)
        start = time.perf_counter()
        trainer(device, steps, "auto", callbacks).fit(model, synthetic_loader(device, 50))
        wall = time.perf_counter() - start
        sharp = [cb for cb in callbacks if isinstance(cb, SharpnessMonitor)]
        hist = sharp[0].history if sharp else []
        note = sharp[0]._schedule.notice if sharp else None
        steps_at = [f"{int(h['step'])} ({int(h['curvature/matvecs'])} products)" for h in hist]
        measured = ", ".join(steps_at) or f"— ({note})"
        rows[name] = (wall, spent[0], measured)
    base = rows["baseline"][0]
    lines = [f"timm `{_arch(quick)}`, batch {BATCH}, {steps} steps, one device, default monitor arguments unless "
             "named", "",
             "| configuration | fit time vs baseline | in-callback share | sharpness measured at step |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {w / base:.3f} | {100 * s / w:.2f}% | {m} |" for n, (w, s, m) in rows.items()]
    return lines


# ------------------------------------------------------------------------------------------------ main

def _environment(device: str) -> list[str]:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU run)"
    return [f"- device: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); pytorch-lightning "
            f"{pl.__version__}; Python {sys.version.split()[0]}; {os.cpu_count()} CPU cores"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--out", type=Path, default=Path("results_cuda.md"))
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sections", nargs="*", default=None, help="run only these (1-5)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.worker is not None:
        return worker(args.worker, args.device, args.quick)
    sections = [("1. Strategies on one device", lambda: section_strategies(args.device, args.quick)),
                ("2. Two ranks on one device over gloo",
                 lambda: section_gloo_two_ranks(args.device, args.quick, args.out.parent / "bench_cuda_ranks")),
                ("3. Optimizers", lambda: section_optim(args.device, args.quick)),
                ("4a. Lanczos accuracy", lambda: section_lanczos_accuracy(args.device, args.quick)),
                ("4b. Lanczos cost", lambda: section_lanczos_cost(args.device, args.quick)),
                ("5. Monitors in a fit", lambda: section_monitors(args.device, args.quick))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = ["# CUDA checks (`python -m benchmarks.bench_cuda`)", "", *_environment(args.device)]
    for title, run in sections:
        if args.sections and title.split(".")[0].rstrip("ab") not in args.sections:
            continue
        start = time.perf_counter()
        try:
            body = run()
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
            traceback.print_exc()
            body = [f"failed: {type(exc).__name__}: {exc}"]
        report += ["", f"## {title} ({time.perf_counter() - start:.0f} s)", "", *body]
        args.out.write_text("\n".join(report) + "\n")
        print("\n".join(report[-len(body) - 2:]), flush=True)


if __name__ == "__main__":
    main()
