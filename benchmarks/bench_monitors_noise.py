"""Overhead of GradNormMonitor and GradientNoiseMonitor at their defaults; cost of "probe" vs "micro" probes.

Run from the repository root::

    python -m benchmarks.bench_monitors_noise            # 1000 optimizer steps per fit, 3 interleaved rounds
    python -m benchmarks.bench_monitors_noise --smoke    # a few seconds, checks that everything runs

For each model, every configuration is fitted once per round and the rounds are interleaved (baseline,
monitor A, monitor B, …, baseline, …), so slow drifts of a shared machine hit all configurations alike. Two
figures per configuration, both measured in the same run:

* ``fit ratio`` — median wall time of the fit / median wall time of the baseline fit (end to end, noisy on a
  busy machine);
* ``in-callback`` — time spent inside the monitor's hooks / wall time of that fit (precise: it isolates the
  monitor's own cost from machine noise), and ``per event`` — that time divided by the number of logging steps
  or probes.

At the defaults a 1000-step fit contains 20 GradNormMonitor logging steps and exactly one GradientNoiseMonitor
probe (step 0), i.e. the default rates.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks.grad_norm import GradNormMonitor
from lightning_opt.callbacks.gradient_noise import GradientNoiseMonitor

warnings.filterwarnings("ignore")


class _Model(pl.LightningModule):
    def __init__(self, net: nn.Module, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.net = net
        self.data = data
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True)


def mlp() -> tuple[nn.Module, TensorDataset, int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 128, generator=g)
    y = (x[:, :10] + 0.3 * torch.randn(8192, 10, generator=g)).argmax(1)
    net = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return net, TensorDataset(x, y), 128


def cnn() -> tuple[nn.Module, TensorDataset, int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    net = nn.Sequential(block(3, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, 10))
    return net, TensorDataset(x, y), 64


MODELS: dict[str, Callable[[], tuple[nn.Module, TensorDataset, int]]] = {"mlp": mlp, "cnn": cnn}


class _Timed(Callback):
    """Wraps a callback and accumulates the wall time spent in its hooks (and how many hook calls did
    work)."""

    HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_before_optimizer_step",
             "on_train_batch_end")

    def __init__(self, inner: Callback) -> None:
        self.inner = inner
        self.seconds = 0.0
        for name in self.HOOKS:
            setattr(self, name, self._wrap(getattr(inner, name)))

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        return timed

    @property
    def state_key(self) -> str:
        return self.inner.state_key


def configs() -> dict[str, Callable[[], Callback | None]]:
    return {
        "baseline": lambda: None,
        "GradNormMonitor()": lambda: GradNormMonitor(),
        "GradNormMonitor(per_layer=True)": lambda: GradNormMonitor(per_layer=True),
        "GradientNoiseMonitor()": lambda: GradientNoiseMonitor(),
        "GradientNoiseMonitor(source='micro')": lambda: GradientNoiseMonitor(source="micro"),
    }


def events(name: str, steps: int) -> int:
    if name.startswith("GradNormMonitor"):
        return len(range(0, steps, 50))
    if name.startswith("GradientNoiseMonitor"):
        return len(range(0, steps, 1000))
    return 0


def run_fit(model_name: str, cb: Callback | None, steps: int) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    net, data, bs = MODELS[model_name]()
    model = _Model(net, data, bs)
    timed = _Timed(cb) if cb is not None else None
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                         callbacks=[timed] if timed else [], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(model)
    wall = time.perf_counter() - start
    return wall, (timed.seconds if timed else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run: 60 steps, 1 round")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args()
    steps = args.steps or (60 if args.smoke else 1000)
    rounds = args.rounds or (1 if args.smoke else 3)
    torch.set_num_threads(1)
    print(f"# bench_monitors_noise: {steps} steps per fit, {rounds} interleaved rounds, torch "
          f"{torch.__version__}, threads={torch.get_num_threads()}, CPU\n")
    for model_name in args.models.split(","):
        walls: dict[str, list[float]] = defaultdict(list)
        inside: dict[str, list[float]] = defaultdict(list)
        run_fit(model_name, None, min(steps, 20))  # warm-up (imports, allocator)
        for _ in range(rounds):
            for name, make in configs().items():
                wall, cb_s = run_fit(model_name, make(), steps)
                walls[name].append(wall)
                inside[name].append(cb_s)
        base = statistics.median(walls["baseline"])
        print(f"## {model_name}: baseline {base:.2f} s per fit ({1000 * base / steps:.2f} ms/step)\n")
        print("| configuration | fit ratio (median) | in-callback share | events/fit | per event (ms) |")
        print("|---|---|---|---|---|")
        for name in configs():
            if name == "baseline":
                continue
            w = statistics.median(walls[name])
            share = statistics.median([c / t for c, t in zip(inside[name], walls[name], strict=True)])
            n_ev = events(name, steps)
            per = 1000 * statistics.median(inside[name]) / max(n_ev, 1)
            print(f"| {name} | {w / base:.3f} | {100 * share:.2f}% | {n_ev} | {per:.1f} |")
        print()


if __name__ == "__main__":
    main()
