"""GradientNoiseMonitor: noise norm, histogram of noise norms, B_simple and heavy-tail indices with intervals.

At a probe step, with θ fixed, the monitor computes M minibatch gradients g_1..g_M and the noise vectors
ξ_i = g_i − ḡ, ḡ = (1/M) Σ g_i — the measurement of thesis ch. 4 §4.2 / Fig. 4-1 (distribution of the noise
norm ‖g − ∇f(x)‖ at a fixed model) and the "Noise σ(θ)" statistic of thesis eq. (6.2). It logs

* ``noise/norm`` σ = sqrt(Σ_i ‖ξ_i‖² / (M − 1)) (pooled over ranks, see :mod:`lightning_opt.stats.noise`);
* histogram ``noise/norms`` of the ‖ξ_i‖ (all ranks) — thesis Fig. 4-1(b),(f);
* ``noise/b_simple`` = b·tr(Σ_b)/|G|² with the bias-corrected |G|² (McCandlish et al. 2018, App. A.1), and
  ``noise/b_simple_ema``, the ratio of exponential moving averages of numerator and denominator that
  McCandlish et al. recommend for a stable reading;
* ``noise/grad_sq`` the unbiased |G|² estimate;
* tail indices (:mod:`lightning_opt.stats.tail_index`), each with ``_lo``/``_hi`` bootstrap bounds:
  ``noise/tail_alpha_coord`` — Mohammadi et al. across coordinates of ξ (Şimşekli et al. 2019's reading);
  ``noise/tail_alpha_sample`` — Mohammadi et al. across the sample axis, per coordinate over probes and ranks,
  robust to per-coordinate rescaling; ``noise/tail_alpha_hill`` — Hill on the noise norms.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_opt._ownership import RankLocal
from lightning_opt.callbacks._common import (
    TrajectoryGuard,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    log_histogram,
    log_scalars,
)
from lightning_opt.distributed import all_gather_vector
from lightning_opt.distributed import rank as dist_rank
from lightning_opt.stats.noise import b_simple as b_simple_fn
from lightning_opt.stats.noise import noise_moments, pool_noise
from lightning_opt.stats.tail_index import (
    DEFAULT_MAX_ALPHA_STABLE,
    TailIndexEstimate,
    tail_index_hill,
    tail_index_hill_ci,
    tail_index_mohammadi,
    tail_index_mohammadi_ci,
)

__all__ = ["GradientNoiseMonitor"]

_NAN = float("nan")


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log`` / ``self.log_dict`` into no-ops so probe losses never reach the training metrics."""
    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    object.__setattr__(module, "log", _noop)
    object.__setattr__(module, "log_dict", _noop)
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                object.__setattr__(module, k, saved[k])
            else:
                object.__delattr__(module, k)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        b = _batch_size(item)
        if b is not None:
            return b
    return None


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of every tensor in a (nested) batch; other leaves are passed through."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice_batch(v, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_batch(v, start, stop) for v in batch)
    return batch


class _IndependentBatches:
    """Batch sampler of ``num_batches`` independent batches: each is ``batch_size`` distinct indices drawn
    uniformly (``randperm(n)[:batch_size]``) from the probe generator. Batches are independent of each other,
    so the probe gradients are i.i.d. given θ; consecutive batches of one shuffled pass would instead be
    negatively correlated when M·b is a sizeable fraction of the dataset (finite-population effect), which
    biases σ downwards and the across-sample tail index upwards."""

    def __init__(self, n: int, batch_size: int, num_batches: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.num_batches, self.generator = n, batch_size, num_batches, generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield torch.randperm(self.n, generator=self.generator)[: self.batch_size].tolist()


class GradientNoiseMonitor(RankLocal, Callback):
    """Gradient-noise statistics at a fixed θ every ``every_n_steps`` optimizer steps (see the module
    docstring).

    **Where the M gradients come from** (``source``):

    * ``"probe"`` — M extra batches of the training batch size from a *probe loader*: a separate
      ``DataLoader`` over the training dataloader's (map-style) dataset, with the same batch size and
      ``collate_fn``, ``num_workers=0`` and its own ``torch.Generator``, whose batch sampler draws M
      *independent* batches (each b distinct indices, uniformly; see ``_IndependentBatches``). The generator
      is re-seeded at every probe from ``(seed, global rank, global_step)``, so probe batches differ across
      ranks and probes, are reproducible, resume exactly from a checkpoint, and never consume the training
      loader or the global RNG. Batches go through ``trainer.strategy.batch_to_device`` (the module's
      transfer hooks).
    * ``"micro"`` — the current training batch split into M micro-batches of ⌊b/M⌋ rows (the remainder is
      dropped; every tensor of the batch is sliced along dim 0). Costs about one extra training step per
      probe, but the gradients share one batch, so they measure the noise of size-⌊b/M⌋ batches.

    **How**: each g_i is ``torch.autograd.grad`` of the loss that ``pl_module.training_step(batch,
    batch_idx)`` returns (a tensor, or a dict with key ``"loss"``), under the precision plugin's
    ``train_step_context``, on the unwrapped module (no DDP gradient hooks fire, nothing is accumulated into
    ``.grad``). Requires automatic optimisation. The probe never changes the training trajectory:
    ``self.log`` is muted during it and :class:`~lightning_opt.callbacks._common.TrajectoryGuard` restores
    the torch/CUDA/Python/NumPy RNG states, all buffers (BatchNorm statistics), ``.grad``, training modes
    and torchmetrics accumulators. The probe runs in ``on_train_batch_start`` of the first batch whose
    ``global_step`` is a multiple of ``every_n_steps`` (so step 0, at initialisation, is probed — the
    setting of thesis Fig. 4-1).

    **Memory**: the M flattened gradients are held at once (M × D float32 on the model's device).

    **DDP**: every rank computes its own M gradients and centres them at its own mean. One all-gather per
    probe moves, per rank, a validity flag, Σ‖ξ_i‖², ‖ḡ‖², the M noise norms and ξ restricted to
    ``max_coords`` coordinates (the same random subset on every rank, redrawn at every probe). Rank 0
    computes the estimators and writes; other ranks return immediately. Under the periodic-synchronisation
    strategies ranks sit at different θ and the pooled statistics average over them.

    **Tail indices** (each with a percentile bootstrap interval over ``bootstrap`` resamples at ``level``):
    ``tail_alpha_coord`` uses the gathered ξ coordinates flattened (sample by sample, coordinates in index
    order) with block ``block``; ``tail_alpha_sample`` uses, per coordinate, the differences of consecutive
    pairs of gradients g_{2j} − g_{2j+1} (= ξ_{2j} − ξ_{2j+1}) over probes and ranks: symmetric, mean-free and
    independent, whereas the centred ξ_i sum to zero and would bias the block sums (and α̂ upwards); Hill uses
    the M·world noise norms with ``hill_k`` upper order statistics. Out-of-range estimates are NaN.

    Args:
        every_n_steps: probe period in optimizer steps (≥ 1).
        num_batches: M, gradients per probe and rank (≥ 2; ≥ 8 for usable across-sample/Hill estimates).
        source: ``"probe"`` or ``"micro"``.
        histogram: write the ``noise/norms`` histogram to TensorBoard loggers.
        max_coords: coordinates of ξ gathered for the Mohammadi estimators (≥ 16).
        bootstrap: bootstrap resamples for the intervals (0 disables the ``_lo``/``_hi`` metrics).
        level: confidence level of the intervals, in (0, 1).
        block: Mohammadi block size across coordinates (None: ⌊√n⌋).
        sample_block: Mohammadi block size across samples (None: ⌊√(number of pairs)⌋).
        hill_k: Hill's k (None: ⌊√n⌋).
        batch_size: probe batch size (None: the training loader's ``batch_size``).
        ema_decay: decay of the moving averages behind ``noise/b_simple_ema``, in [0, 1).
        max_alpha: upper bound of a valid Mohammadi estimate (see :mod:`lightning_opt.stats.tail_index`).
        seed: seed of the probe loader, coordinate subsets and bootstrap.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_batches: int = 16,
        source: str = "probe",
        histogram: bool = True,
        max_coords: int = 4096,
        bootstrap: int = 200,
        level: float = 0.9,
        block: int | None = None,
        sample_block: int | None = None,
        hill_k: int | None = None,
        batch_size: int | None = None,
        ema_decay: float = 0.9,
        max_alpha: float = DEFAULT_MAX_ALPHA_STABLE,
        seed: int = 0,
    ) -> None:
        super().__init__()
        own = "GradientNoiseMonitor"
        self.every_n_steps = check_int(own, "every_n_steps", every_n_steps, minimum=1)
        self.num_batches = check_int(own, "num_batches", num_batches, minimum=2)
        self.source = check_choice(own, "source", source, ("probe", "micro"))
        self.histogram = check_bool(own, "histogram", histogram)
        self.max_coords = check_int(own, "max_coords", max_coords, minimum=16)
        self.bootstrap = check_int(own, "bootstrap", bootstrap, minimum=0)
        self.level = check_float(own, "level", level, low=0.0, high=1.0, low_open=True, high_open=True)
        self.block = check_optional_int(own, "block", block, minimum=2)
        self.sample_block = check_optional_int(own, "sample_block", sample_block, minimum=2)
        self.hill_k = check_optional_int(own, "hill_k", hill_k, minimum=1)
        self.batch_size = check_optional_int(own, "batch_size", batch_size, minimum=1)
        self.ema_decay = check_float(own, "ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
        self.max_alpha = check_float(own, "max_alpha", max_alpha, low=0.0, high=float("inf"), low_open=True)
        self.seed = check_int(own, "seed", seed, minimum=0)
        self._last_probe_step = -1
        self._ema_trace = 0.0
        self._ema_grad_sq = 0.0
        self._ema_weight = 0.0
        self._probe_loader: DataLoader | None = None
        self._probe_gen = torch.Generator()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_probe_step": self._last_probe_step,
            "ema_trace": self._ema_trace,
            "ema_grad_sq": self._ema_grad_sq,
            "ema_weight": self._ema_weight,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_probe_step = int(state_dict.get("last_probe_step", -1))
        self._ema_trace = float(state_dict.get("ema_trace", 0.0))
        self._ema_grad_sq = float(state_dict.get("ema_grad_sq", 0.0))
        self._ema_weight = float(state_dict.get("ema_weight", 0.0))

    # ------------------------------------------------------------------------------------------ helpers
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"GradientNoiseMonitor: {msg}", stacklevel=3)

    def _seed_for(self, step: int, salt: int, with_rank: bool) -> int:
        r = dist_rank() if with_rank else 0
        return ((self.seed * 1_000_003 + salt * 10_007 + r) * 2_147_483_647 + step) % (2**63)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "GradientNoiseMonitor needs automatic optimisation (training_step returns the loss)"
            )
        if self.source == "probe":
            self._probe_loader = self._build_probe_loader(trainer)

    def _build_probe_loader(self, trainer: pl.Trainer) -> DataLoader:
        own = "GradientNoiseMonitor(source='probe')"
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                f"{own} needs a single torch DataLoader as training loader, got {type(loader).__name__}; "
                "use source='micro'"
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            raise RuntimeError(f"{own} needs a map-style training dataset; use source='micro'")
        bs = self.batch_size or loader.batch_size
        if bs is None:
            raise RuntimeError(f"{own}: the training loader has no batch_size (batch_sampler?); pass one")
        n = len(dataset)  # type: ignore[arg-type]
        if n < bs:
            raise RuntimeError(f"{own}: the dataset of {n} samples is smaller than the batch size {bs}")
        sampler = _IndependentBatches(n, bs, self.num_batches, self._probe_gen)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=loader.collate_fn)

    def _batches(self, trainer: pl.Trainer, batch: Any, step: int) -> tuple[list[Any], int] | None:
        m = self.num_batches
        if self.source == "micro":
            b = _batch_size(batch)
            if b is None or b // m < 1:
                msg = f"batch of size {b} cannot be split into num_batches={m}; probe skipped"
                self._warn_once("micro", msg)
                return None
            c = b // m
            return [_slice_batch(batch, i * c, (i + 1) * c) for i in range(m)], c
        if self._probe_loader is None:
            self._probe_loader = self._build_probe_loader(trainer)
        self._probe_gen.manual_seed(self._seed_for(step, 1, with_rank=True))
        out: list[Any] = []
        for b in self._probe_loader:
            b = trainer.precision_plugin.convert_input(b)
            out.append(trainer.strategy.batch_to_device(b))
        return out, self._probe_loader.batch_sampler.batch_size  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------ the probe
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._last_probe_step:
            return
        self._last_probe_step = step
        self.probe(trainer, pl_module, batch, batch_idx)

    def _gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], batch_idx: int
    ) -> Tensor | None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            return None
        device = params[0].device
        total = sum(p.numel() for p in params)
        buf = torch.empty(len(batches), total, dtype=torch.float32, device=device)
        with _muted_logging(pl_module), torch.enable_grad():
            for i, b in enumerate(batches):
                with trainer.precision_plugin.train_step_context():
                    out = pl_module.training_step(b, batch_idx)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                if not isinstance(loss, Tensor):
                    self._warn_once("loss", "training_step returned no loss tensor; probe skipped")
                    return None
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                row = buf[i]
                offset = 0
                for p, g in zip(params, grads, strict=True):
                    n = p.numel()
                    if g is None:
                        row[offset : offset + n].zero_()
                    else:
                        row[offset : offset + n].copy_(g.reshape(-1))
                    offset += n
        return buf

    @torch.no_grad()
    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Run one probe now and log its statistics (called by ``on_train_batch_start``; public for tools)."""
        step = trainer.global_step
        m = self.num_batches
        with TrajectoryGuard(pl_module):  # also covers data loading (transforms may draw random numbers)
            got = self._batches(trainer, batch, step)
            grads = None if got is None else self._gradients(trainer, pl_module, got[0], batch_idx)
        bsz = 0 if got is None else got[1]
        dev = next(pl_module.parameters()).device
        # fixed-length vector per rank, so every rank joins the same all-gather even if its probe failed
        d_total = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        k = min(self.max_coords, d_total)
        gen = torch.Generator().manual_seed(self._seed_for(step, 2, with_rank=False))
        if d_total <= 4 * k:
            idx = torch.randperm(d_total, generator=gen)[:k].sort().values
        else:
            idx = torch.randint(d_total, (k,), generator=gen).sort().values
        packed = torch.full((4 + m + m * k,), _NAN, dtype=torch.float64, device=dev)
        packed[0] = 0.0
        if grads is not None:
            mom = noise_moments(grads)  # centres grads in place: rows are ξ_i
            packed[0] = 1.0
            packed[1] = mom.sum_sq
            packed[2] = mom.mean_sq
            packed[3] = float(bsz)
            packed[4 : 4 + m] = mom.norms
            packed[4 + m :] = grads[:, idx.to(dev)].reshape(-1).double()
            del grads
        gathered = all_gather_vector(packed)
        # every rank reports from the same gathered rows (seeded without the rank), so ``noise/*`` exists with the
        # same value everywhere: ModelCheckpoint/EarlyStopping monitoring it agree across ranks
        self._report(trainer, gathered.cpu(), m, k, step)

    def _report(self, trainer: pl.Trainer, gathered: Tensor, m: int, k: int, step: int) -> None:
        rows = gathered[gathered[:, 0] == 1.0]
        if rows.shape[0] == 0:
            return
        bsz = int(rows[0, 3].item())
        norms = rows[:, 4 : 4 + m].reshape(-1)
        xi = rows[:, 4 + m :].reshape(rows.shape[0], m, k)
        summary = pool_noise(rows[:, 1], rows[:, 2], m, bsz)
        d = self.ema_decay
        self._ema_trace = d * self._ema_trace + (1 - d) * float(summary.trace)
        self._ema_grad_sq = d * self._ema_grad_sq + (1 - d) * float(summary.grad_sq)
        self._ema_weight = d * self._ema_weight + (1 - d)
        ema_b = b_simple_fn(
            torch.tensor(self._ema_trace / self._ema_weight, dtype=torch.float64),
            torch.tensor(self._ema_grad_sq / self._ema_weight, dtype=torch.float64),
            bsz,
        )
        metrics: dict[str, float] = {
            "noise/norm": float(summary.sigma),
            "noise/grad_sq": float(summary.grad_sq),
            "noise/b_simple": float(summary.b_simple),
            "noise/b_simple_ema": float(ema_b),
        }
        gen = torch.Generator().manual_seed(self._seed_for(step, 3, with_rank=False))
        pairs = (xi[:, 0 : 2 * (m // 2) : 2] - xi[:, 1 : 2 * (m // 2) : 2]).reshape(-1, k)
        estimates = {
            "tail_alpha_coord": self._estimate(
                lambda: tail_index_mohammadi(xi, self.block, max_alpha=self.max_alpha),
                lambda: tail_index_mohammadi_ci(
                    xi, self.block, num_resamples=self.bootstrap, level=self.level, generator=gen,
                    max_alpha=self.max_alpha,
                ),
            ),
            "tail_alpha_sample": self._estimate(
                lambda: tail_index_mohammadi(pairs, self.sample_block, dim=0, max_alpha=self.max_alpha),
                lambda: tail_index_mohammadi_ci(
                    pairs, self.sample_block, dim=0, num_resamples=self.bootstrap, level=self.level,
                    generator=gen, max_alpha=self.max_alpha,
                ),
            ),
            "tail_alpha_hill": self._estimate(
                lambda: tail_index_hill(norms, self.hill_k),
                lambda: tail_index_hill_ci(
                    norms, self.hill_k, num_resamples=self.bootstrap, level=self.level, generator=gen
                ),
            ),
        }
        for name, est in estimates.items():
            metrics[f"noise/{name}"] = float(est.alpha)
            if self.bootstrap > 0:
                metrics[f"noise/{name}_lo"] = float(est.lo)
                metrics[f"noise/{name}_hi"] = float(est.hi)
        log_scalars(trainer, metrics, step)
        if self.histogram:
            log_histogram(trainer, "noise/norms", norms, step)

    def _estimate(self, point: Any, with_ci: Any) -> TailIndexEstimate:
        """Point estimate (and interval if ``bootstrap > 0``); too few samples for the estimator → NaN."""
        nan = torch.tensor(_NAN, dtype=torch.float64)
        try:
            if self.bootstrap > 0:
                return with_ci()
            return TailIndexEstimate(point(), nan, nan)
        except ValueError:  # e.g. fewer samples than one block, or k >= n
            return TailIndexEstimate(nan, nan, nan)
