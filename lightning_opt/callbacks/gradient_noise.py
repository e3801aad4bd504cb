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

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import check_bool, check_choice, check_float, check_int
from lightning_opt.callbacks._common import log_histogram, log_scalars, warn_once
from lightning_opt.callbacks._noise_batches import batch_rows, micro_batches, probe_loader
from lightning_opt.callbacks._noise_stats import BSimpleEma, tail_metrics
from lightning_opt.callbacks._probe import TrajectoryGuard, probe_loss
from lightning_opt.distributed import all_gather_vector
from lightning_opt.distributed import rank as dist_rank
from lightning_opt.stats.noise import noise_moments, pool_noise
from lightning_opt.stats.tail_index import DEFAULT_MAX_ALPHA_STABLE

__all__ = ["GradientNoiseMonitor"]

_NAN = float("nan")
#: columns of a rank's gathered row before the M noise norms: valid flag, Σ‖ξ_i‖², ‖ḡ‖², batch size
_HEAD = 4


class GradientNoiseMonitor(RankLocal, Callback):
    """Gradient-noise statistics at a fixed θ every ``every_n_steps`` optimizer steps (see the module
    docstring).

    **Where the M gradients come from** (``source``):

    * ``"probe"`` — M extra batches of the training batch size from a *probe loader*: a separate
      ``DataLoader`` over the training dataloader's (map-style) dataset, with the same batch size and
      ``collate_fn``, ``num_workers=0`` and its own ``torch.Generator``, whose batch sampler draws M
      *independent* batches (each b distinct indices, uniformly; see ``_noise_batches.IndependentBatches``). The
      generator is re-seeded at every probe from ``(seed, global rank, global_step)``, so probe batches differ across
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
    :class:`~lightning_opt.callbacks._probe.TrajectoryGuard` mutes ``self.log`` and restores the
    torch/CUDA/Python/NumPy RNG states, all buffers (BatchNorm statistics), ``.grad``, training modes and
    torchmetrics accumulators. The probe runs in ``on_train_batch_start`` of the first batch whose
    ``global_step`` is a multiple of ``every_n_steps`` (so step 0, at initialisation, is probed — the
    setting of thesis Fig. 4-1).

    **Memory**: the M flattened gradients are held at once (M × D float32 on the model's device).

    **DDP**: every rank computes its own M gradients and centres them at its own mean. One all-gather per
    probe moves, per rank, a validity flag, Σ‖ξ_i‖², ‖ḡ‖², the M noise norms and ξ restricted to
    ``max_coords`` coordinates (the same random subset on every rank, redrawn at every probe). Every
    rank computes the estimators from the same gathered rows (so ``noise/*`` is published with the same value
    on every rank); rank 0 writes. Under the periodic-synchronisation strategies ranks sit at different θ and
    the pooled statistics average over them.

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
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, owner=own)
        self.num_batches = check_int("num_batches", num_batches, 2, owner=own)
        self.source = check_choice("source", source, ("probe", "micro"), owner=own)
        self.histogram = check_bool("histogram", histogram, owner=own)
        self.max_coords = check_int("max_coords", max_coords, 16, owner=own)
        self.bootstrap = check_int("bootstrap", bootstrap, 0, owner=own)
        self.level = check_float("level", level, 0.0, 1.0, low_open=True, high_open=True, owner=own)
        self.block = check_int("block", block, 2, owner=own, optional=True)
        self.sample_block = check_int("sample_block", sample_block, 2, owner=own, optional=True)
        self.hill_k = check_int("hill_k", hill_k, 1, owner=own, optional=True)
        self.batch_size = check_int("batch_size", batch_size, 1, owner=own, optional=True)
        self.ema_decay = check_float("ema_decay", ema_decay, 0.0, 1.0, high_open=True, owner=own)
        # an unbounded estimate is a valid setting: the interval is closed at inf
        self.max_alpha = check_float("max_alpha", max_alpha, 0.0, float("inf"), low_open=True, high_open=False,
                                     owner=own)
        self.seed = check_int("seed", seed, 0, owner=own)
        self._last_probe_step = -1
        self._ema = BSimpleEma(self.ema_decay)
        self._probe_loader: DataLoader | None = None
        self._probe_gen = torch.Generator()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"last_probe_step": self._last_probe_step, **self._ema.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_probe_step = int(state_dict.get("last_probe_step", -1))
        self._ema.load_state_dict(state_dict)

    # ------------------------------------------------------------------------------------------ helpers
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
        return probe_loader(trainer.train_dataloader, self.batch_size, self.num_batches, self._probe_gen)

    def _batches(self, trainer: pl.Trainer, batch: Any, step: int) -> tuple[list[Any], int] | None:
        m = self.num_batches
        if self.source == "micro":
            got = micro_batches(batch, m)
            if got is None:
                msg = f"batch of size {batch_rows(batch)} cannot be split into num_batches={m}; probe skipped"
                warn_once(self._warned, "micro", f"GradientNoiseMonitor: {msg}")
            return got
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
        """[M, D] float32 gradients of the probe losses (``torch.autograd.grad``: nothing reaches ``.grad``)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            return None
        buf = torch.empty(len(batches), sum(p.numel() for p in params), dtype=torch.float32,
                          device=params[0].device)
        with torch.enable_grad():
            for row, b in zip(buf, batches, strict=True):
                loss = probe_loss(trainer, pl_module, b, batch_idx)
                if loss is None:
                    warn_once(self._warned, "loss",
                              "GradientNoiseMonitor: training_step returned no loss tensor; probe skipped")
                    return None
                grads = torch.autograd.grad(loss, params, allow_unused=True)
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
        packed = torch.full((_HEAD + m + m * k,), _NAN, dtype=torch.float64, device=dev)
        packed[0] = 0.0
        if grads is not None:
            mom = noise_moments(grads)  # centres grads in place: rows are ξ_i
            packed[0] = 1.0
            packed[1] = mom.sum_sq
            packed[2] = mom.mean_sq
            packed[3] = float(bsz)
            packed[_HEAD : _HEAD + m] = mom.norms
            packed[_HEAD + m :] = grads[:, idx.to(dev)].reshape(-1).double()
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
        norms = rows[:, _HEAD : _HEAD + m].reshape(-1)
        xi = rows[:, _HEAD + m :].reshape(rows.shape[0], m, k)
        summary = pool_noise(rows[:, 1], rows[:, 2], m, bsz)
        metrics: dict[str, float] = {
            "noise/norm": float(summary.sigma),
            "noise/grad_sq": float(summary.grad_sq),
            "noise/b_simple": float(summary.b_simple),
            "noise/b_simple_ema": self._ema.update(float(summary.trace), float(summary.grad_sq), bsz),
        }
        gen = torch.Generator().manual_seed(self._seed_for(step, 3, with_rank=False))
        metrics |= tail_metrics(xi, norms, gen, block=self.block, sample_block=self.sample_block,
                                hill_k=self.hill_k, bootstrap=self.bootstrap, level=self.level,
                                max_alpha=self.max_alpha)
        log_scalars(trainer, metrics, step)
        if self.histogram:
            log_histogram(trainer, "noise/norms", norms, step)
