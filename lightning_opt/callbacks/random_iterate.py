"""RandomIterate: return a uniformly drawn, lagged iterate at the end of fit (Stochastic INGD's output rule)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import check_int
from lightning_opt.callbacks._common import log_scalars
from lightning_opt.optim.ingd import StochasticINGD

__all__ = ["RandomIterate"]

_OWNER = "RandomIterate"


class RandomIterate(RankLocal, Callback):
    r"""Stochastic INGD's output, thesis ch. 5 Alg. 3 lines 8–10: draw :math:`i` uniformly from
    :math:`\{1, \dots, T\}`, set :math:`i \leftarrow \max\{i - K, 1\}` and return :math:`x_i`, where
    :math:`x_1` is the initial iterate, :math:`x_{t+1}` the iterate after optimizer step :math:`t` and :math:`T`
    the number of optimizer steps of the fit. The thesis returns :math:`x_{i-K}` rather than the last iterate
    because a small momentum at step :math:`t` certifies the point :math:`K` steps back (§5.5).

    At the end of ``fit`` (``on_train_end``) the chosen iterate's values are copied into the module's
    parameters, so what ``trainer.test``/``validate``, ``trainer.save_checkpoint`` and the returned module see
    afterwards is the algorithm's output; validation *during* training uses the current weights, as without
    the callback. Buffers (BatchNorm statistics) stay those of the last step. With :class:`StochasticINGD` the
    iterate is the optimizer's :math:`x` (the parameters hold the oracle point :math:`y`); with any other
    optimizer it is the parameters.

    **How the draw is made without knowing T.** :math:`j = \max\{i - K, 1\}` takes the value 1 with probability
    :math:`(K + 1)/T` and each :math:`m \in \{2, \dots, T - K\}` with probability :math:`1/T`. A weighted
    reservoir of one over the candidates :math:`m = 1, 2, \dots` (weights :math:`K + 1, 1, 1, \dots`) has exactly
    this law once it has seen the candidates up to :math:`T - K`. The callback runs the reservoir as the
    iterates arrive and keeps each replacement of the last :math:`K` steps, so at the end it can roll back to
    the reservoir as it stood at candidate :math:`T - K`: an early stop or ``max_time`` still gets the exact law.
    It holds one copy of the parameters plus, on average, :math:`\ln(T/(T-K))` more (about 0.7 copies for
    :math:`K = T/2`); every copy lives on the parameters' device.

    The draws come from a CPU generator seeded with ``seed`` (default ``torch.initial_seed()``), so every rank
    picks the same iterate; weights must be identical on every rank (single device or DDP). The periodic
    strategies keep rank-local weights and are refused. ``state_dict`` holds the reservoir, the counters and
    the generator, so a resumed fit ends with the iterate the uninterrupted one would. Logs
    ``random_iterate/step`` (the chosen :math:`j - 1`, i.e. the optimizer steps taken before it) at the end.

    Args:
        lag: :math:`K \ge 0` (Thm 5.7.3 sets :math:`K = p\delta`); 0 draws uniformly among all iterates.
        seed: seed of the draws (``int >= 0`` or ``None``).
    """

    def __init__(self, lag: int = 0, seed: int | None = None) -> None:
        super().__init__()
        self.lag = check_int("lag", lag, 0, owner=_OWNER)
        seed = check_int("seed", seed, 0, owner=_OWNER, optional=True)
        self._gen = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        self._weight = 0  # total weight of the candidates seen
        self._seen = 0  # candidates seen: x_1 .. x_seen
        self._history: list[tuple[int, list[Tensor]]] = []  # (candidate index, its parameter values)
        self.chosen: int | None = None  # j of the output, after fit

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The periodic strategies (recognised by the attribute ProgressBarMetrics reads too) keep local weights.
        if stage == "fit" and hasattr(trainer.strategy, "steps_to_next_sync"):
            raise ValueError(f"{_OWNER}: {type(trainer.strategy).__name__} keeps rank-local weights, so there is no "
                             "single iterate sequence to draw from (accepted: single-device or DDP training)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seen == 0:  # a resumed fit already has x_1 .. x_seen
            self._offer(self._iterate(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        while self._seen < trainer.global_step + 1:  # one candidate per optimizer step taken
            self._offer(self._iterate(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._history:
            return
        self.chosen, values = self._rolled_back(self._seen - 1)
        with torch.no_grad():
            for p, v in zip(pl_module.parameters(), values, strict=True):
                p.copy_(v)  # v may be on the CPU after a resume
        log_scalars(trainer, {"random_iterate/step": float(self.chosen - 1)}, trainer.global_step)

    # ------------------------------------------------------------------ the reservoir
    def _offer(self, values: list[Tensor]) -> None:
        """Candidate m = seen + 1 with weight K + 1 (m = 1) or 1; replace with probability weight / total."""
        self._seen += 1
        weight = self.lag + 1 if self._seen == 1 else 1
        self._weight += weight
        if self._seen == 1 or torch.rand((), generator=self._gen).item() * self._weight < weight:
            self._history.append((self._seen, [v.detach().clone() for v in values]))
        self._prune(self._seen - 1)

    def _rolled_back(self, steps: int) -> tuple[int, list[Tensor]]:
        """The reservoir as it stood after candidate max(T − K, 1), T = ``steps``."""
        cutoff = max(steps - self.lag, 1)
        return [entry for entry in self._history if entry[0] <= cutoff][-1]

    def _prune(self, steps: int) -> None:
        """Keep the entries a final T ≥ ``steps`` can roll back to: the last one at or before max(T − K, 1),
        and all after it."""
        keep_from = self._history.index(self._rolled_back(steps))
        del self._history[:keep_from]

    @staticmethod
    def _iterate(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Tensor]:
        params = list(pl_module.parameters())
        opt = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        if isinstance(opt, StochasticINGD):
            return [opt.state.get(p, {}).get("x", p) for p in params]
        return params

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"weight": self._weight, "seen": self._seen, "generator": self._gen.get_state(),
                "history": [(m, [v.cpu() for v in values]) for m, values in self._history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._weight, self._seen = int(state_dict["weight"]), int(state_dict["seen"])
        self._gen.set_state(state_dict["generator"])
        self._history = [(int(m), list(values)) for m, values in state_dict["history"]]
