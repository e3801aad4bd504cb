"""Overhead of each monitor, and of all four together, at their defaults on the two example models.

    python -m benchmarks.bench_monitors_examples            # 4000 optimizer steps per fit
    python -m benchmarks.bench_monitors_examples --smoke    # 60 steps per fit, checks that it runs
    python -m benchmarks.bench_monitors_examples --configs baseline "all four" --models image

SharpnessMonitor's default schedule is cost-aware: with ``max_steps`` known it spreads the measurements 1.5% of the
forecast fit time affords over the fit, the first within its first 5% (a measurement's cost bounded from above by a
timed gradient and ``max_iter`` products; when the budget is short of that, one capped at the products it affords),
so a short fit of these CPU models may afford only a capped one, or none;
``SharpnessMonitor(max_overhead=0.1)`` shows the schedule at work (its share should end below 10%). The last column
lists the steps SharpnessMonitor measured at, or why it measured nothing (its progress-bar note).

Single process, CPU, one torch thread. Two figures per configuration, both measured in the same run:
* in-callback share: wall time spent inside the monitors' hooks / wall time of the fit (robust to machine noise);
* fit ratio: fit wall time / the baseline fit's wall time (configurations interleaved; noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

from lightning_opt.callbacks import (  # noqa: E402
    GradientNoiseMonitor,
    GradNormMonitor,
    SharpnessMonitor,
    TimeAverageMonitor,
)
from lightning_opt.examples import CharDataModule, CharTransformerLM, DigitsDataModule, ImageClassifier  # noqa: E402

CONFIGS = {
    "baseline": lambda: [],
    "GradNormMonitor": lambda: [GradNormMonitor()],
    "GradientNoiseMonitor": lambda: [GradientNoiseMonitor()],
    "SharpnessMonitor": lambda: [SharpnessMonitor()],
    "SharpnessMonitor(max_overhead=0.1)": lambda: [SharpnessMonitor(max_overhead=0.1)],
    "TimeAverageMonitor": lambda: [TimeAverageMonitor()],
    "all four": lambda: [GradNormMonitor(), GradientNoiseMonitor(), SharpnessMonitor(), TimeAverageMonitor()],
}


def _timed(callbacks: list[Callback]) -> list[float]:
    """Wrap every hook the monitors override so the time spent inside them is accumulated in ``spent[0]``."""
    spent = [0.0]
    for cb in callbacks:
        for name in dir(type(cb)):
            if not name.startswith("on_") or getattr(type(cb), name) is getattr(Callback, name, None):
                continue
            original = getattr(cb, name)

            @functools.wraps(original)
            def wrapper(*args, __f=original, **kwargs):
                start = time.perf_counter()
                try:
                    return __f(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - start

            setattr(cb, name, wrapper)
    return spent


def _model_and_data(which: str):
    if which == "image":
        return ImageClassifier(model_name="test_efficientnet"), DigitsDataModule(batch_size=32)
    dm = CharDataModule(block_size=64, batch_size=32, max_chars=100_000)
    return CharTransformerLM(vocab_size=dm.vocab_size, d_model=64, n_layers=2, n_heads=4, block_size=64), dm


def fit_once(which: str, config: str, steps: int) -> tuple[float, float, str]:
    torch.manual_seed(0)
    model, dm = _model_and_data(which)
    callbacks = CONFIGS[config]()
    spent = _timed(callbacks)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start
    measured = [int(h["step"]) for cb in callbacks if isinstance(cb, SharpnessMonitor) for h in cb.history]
    note = trainer.progress_bar_metrics.get("sharpness")
    return wall, spent[0], ", ".join(map(str, measured)) or (f"— ({note})" if note else "—")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--models", nargs="*", default=["image", "charlm"])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    steps = 60 if args.smoke else args.steps
    print(f"{steps} optimizer steps per fit, 1 thread, single process, configurations interleaved")
    for which in args.models:
        fit_once(which, "baseline", min(steps, 20))  # warm-up: imports, data loading, allocator
        names = ["baseline", *(c for c in args.configs if c != "baseline")]
        rows = {name: fit_once(which, name, steps) for name in names}
        base = rows["baseline"][0]
        print(f"\n{which}: baseline {1000 * base / steps:.1f} ms/step\n")
        print("| configuration | in-callback share of fit time | fit ratio vs baseline | sharpness measured at |")
        print("|---|---|---|---|")
        for name, (wall, inside, measured) in rows.items():
            print(f"| {name} | {100 * inside / wall:.2f}% | {wall / base:.3f} | {measured} |")


if __name__ == "__main__":
    main()
