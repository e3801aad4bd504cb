"""SharpnessMonitor: λ_max and λ_min of the loss Hessian by Lanczos on Hessian-vector products.

Seeds and what is logged (every ``every_n_steps`` optimizer steps, keys under ``curvature/``):

* ``lambda_max`` — the sharpness ‖∇²L‖_op of thesis eq. (6.2) (its largest eigenvalue), on a probe batch;
  ``lambda_min`` — the most negative eigenvalue; L⁻ = max(0, −λ_min) is the negative curvature that bounds the
  averaging horizon of Local SGD / Lookahead (curvature paper, Thm 6.7, Cor. 5.4: γτL⁻ = O(1)).
* ``eos_ratio`` = λ_max·lr/2 and ``two_over_lr`` = 2/lr: at the edge of stability the sharpness hovers at 2/η,
  i.e. ``eos_ratio`` ≈ 1 (lecture notes §25.3.5; meaningful for (momentum-free) SGD / GD, where lr = η).
* ``neg_pos_ratio`` = L⁻/λ_max (= |λ_min|/λ_max when λ_min < 0): the curvature imbalance of the curvature
  paper.
* ``smoothness`` — local smoothness along the last update d = x_{t+1} − x_t on the same probe batch,
  ‖∇f(x_{t+1}) − ∇f(x_t)‖/‖d‖ (thesis Fig. 3-1), and ``smoothness_dHd`` = dᵀ∇²f(x_{t+1})d/‖d‖².
* ``L0``, ``L1`` — running least-squares fit L̂ ≈ L0 + L1‖∇f‖ (thesis Def. 3.2.1, eq. (3.2)) over the
  measurements, and the clipped-GD parameters Thm 3.4.1 recommends, ``advice_clip_lr`` η_c = 1/(10 L0) and
  ``advice_clip_threshold`` γ = min{1/η_c, 1/(10 L1 η_c)} (advice only; nothing is changed).
* ``grad_norm``, ``probe_loss``, ``matvecs`` (Hessian-vector products used), ``converged`` (1/0), ``seconds``.

The measurement never changes the training trajectory: it runs under ``TrajectoryGuard`` (``callbacks/_probe.py``),
which restores the RNG states (torch CPU / CUDA, ``random``, numpy), every buffer (batch-norm running statistics),
each submodule's training flag and torchmetrics accumulators and mutes ``self.log``; ``.grad`` is never written
(``torch.autograd.grad`` with explicit inputs) and the parameters are restored bitwise. It runs outside autocast, on
the unwrapped LightningModule (not the DDP wrapper), in float32 or wider.

Distributed (``ddp_mode``): every rank uses its own probe batch.

* ``"global"``: each Hessian-vector product is averaged over ranks (an all-reduce of ``dim`` floats), so the
  operator is the Hessian of the global-batch loss; every rank runs the same Lanczos and gets the same
  numbers.
* ``"local"``: every rank measures the Hessian of its own loss at its own weights (what the periodic
  strategies' ranks see between synchronisations); the logged ``lambda_max`` / ``lambda_min`` are means over
  ranks, plus ``lambda_max_rank_max`` and ``lambda_min_rank_min``.
* ``"auto"`` (default): ``"global"`` when the weights are identical on every rank (DDP, or a periodic strategy
  right after a sync / during warm-up), else ``"local"`` (one all-gather of three checksums decides).

Schedule: ``every_n_steps=N`` measures after every N-th optimizer step. The default (``every_n_steps=None``) is
cost-aware, with budget b = ``max_overhead`` (default 1.5%): ``CALIBRATION_STEPS`` steps into a fit it times one
gradient and one Hessian-vector product, which bound a measurement's cost C_w (``max_iter`` products; once measured,
scaled from the measured cost and product count); S is the time spent in the monitor so far (calibration included). When
the fit's length is known (``trainer.estimated_stepping_batches`` finite: ``max_steps`` / ``max_epochs``), the
measurements it affords are spread evenly up to its last step, the first within its first 5% (or right after the
calibration, in fits under 200 steps). **Guarantee**: a measurement is planned only if S + C ≤ b·F, F the forecast fit
time (the time so far, the remaining steps at the step time measured since the last plan, and C), C = C_w or, when b
affords no full measurement, that of one capped at the products b affords (≥ 8 Lanczos products; ``converged`` says if
the cap bound); so a fit that runs to its estimated end spends at most b of its wall time in the monitor, as far as the
step time holds and no measurement costs more than C; the share so far can exceed b early in the fit, and a fit stopped
early (EarlyStopping, ``max_time``) can end above b. When b affords not even that, a warning, the progress bar and
TensorBoard text say so. Unknown length (infinite): each measurement waits until S + C ≤ b·(T + C) (T: fit time so far;
C: C_w, then the last measured cost), so right after each the share S/T is at most b (up to the step-time estimate).
Details: :mod:`~lightning_opt.callbacks._sharpness_schedule`. Plans are agreed by all ranks when made (one all-gather
at calibration and after each measurement). ``overhead`` (S / fit time so far) and, cost-aware, ``next_step`` (past
the fit's last step: none more in it) are logged with every measurement.

Logged values are identical on every rank (``seconds`` and ``overhead`` are maxima over ranks); only global rank 0
writes (through ``trainer.loggers``, at every measurement regardless of ``log_every_n_steps``). The monitor
publishes its latest values for period schedules as ``trainer.lightning_opt_curvature = {"lambda_max": max over
ranks, "lambda_min": min over ranks, "step": int}`` (the conservative bounds on L⁺ and L⁻; identical on every
rank).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from lightning_opt._ownership import RankLocal
from lightning_opt._tensors import flatten
from lightning_opt._validation import check_bool, check_choice, check_float, check_int
from lightning_opt.callbacks._budget import OverheadBudget
from lightning_opt.callbacks._common import current_lr, log_scalars, warn_once
from lightning_opt.callbacks._curvature import (
    CurvatureResult,
    FixedProbe,
    all_agree,
    mean_over_ranks,
    measure_on_rank,
    probe_batch_loss,
    resolve_mode,
    set_probe_modes,
    time_products,
)
from lightning_opt.callbacks._probe import TrajectoryGuard
from lightning_opt.callbacks._sharpness_schedule import CALIBRATION_STEPS, DEFAULT_MAX_OVERHEAD, MeasurementSchedule
from lightning_opt.distributed.buckets import is_dist
from lightning_opt.distributed.scalars import world_size
from lightning_opt.stats.hvp import trainable_named_parameters
from lightning_opt.stats.smoothness import L0L1Fit

__all__ = ["CALIBRATION_STEPS", "CURVATURE_ATTR", "DEFAULT_MAX_OVERHEAD", "SharpnessMonitor"]

CURVATURE_ATTR = "lightning_opt_curvature"
_OWN = "SharpnessMonitor"


class SharpnessMonitor(RankLocal, Callback):
    """Track λ_max, λ_min of the training-loss Hessian, the edge-of-stability ratio and local smoothness.

    Args:
        every_n_steps: measure after every ``every_n_steps``-th optimizer step (``trainer.global_step``), ≥ 1;
            ``None`` (default): the cost-aware schedule (see the module docstring).
        probe: ``"fixed"`` — the first training batch this rank sees, kept for the whole run (values are
            comparable across steps; saved in checkpoints); ``"current"`` — the batch of the measured step.
        max_iter: most Lanczos iterations (Hessian-vector products) per measurement, ≥ 2; the Krylov basis
            holds this many parameter-sized vectors.
        tol: relative accuracy of λ_max and λ_min, in (0, 1) (see
            :func:`~lightning_opt.stats.lanczos.lanczos_extreme_eigs`).
        bn_mode: ``"eval"`` — batch-norm layers use running statistics (the Hessian of the inference-mode
            network); ``"train"`` — batch statistics, as in the training step (running statistics are restored
            afterwards).
        smoothness: also measure the local smoothness along the last update (one extra gradient at the
            previous weights and one extra product; needs a copy of the weights taken before the measured
            step).
        dropout_mode: ``"eval"`` (default; the deterministic loss) or ``"train"`` (one dropout mask, fixed for
            all products of a measurement).
        loss_fn: ``(pl_module, batch) -> scalar loss``. Default: ``pl_module.training_step(batch, 0)`` with
            ``self.log`` silenced (its ``"loss"`` entry if it returns a dict). Required with manual
            optimisation.
        hvp_method: ``"double_backward"`` (default) or ``"func"`` (see :mod:`lightning_opt.stats.hvp`; needs
            ``bn_mode="eval"`` and ``dropout_mode="eval"``).
        ddp_mode: ``"auto"``, ``"global"`` or ``"local"`` (see the module docstring).
        warm_start: start Lanczos from the previous measurement's Ritz vectors.
        fit_on: what the (L0, L1) fit regresses on ‖∇f‖: ``"hessian_norm"`` = max(|λ_max|, |λ_min|) = ‖∇²f‖ as
            in Def. 3.2.1, or ``"smoothness"`` (the Fig. 3-1 estimate; needs ``smoothness=True``).
        fit_decay: forgetting factor of the running fit, in (0, 1].
        seed: seed of the monitor's own generator for Lanczos start vectors (the global RNG is not used).
        prefix: key prefix of the logged metrics (default ``"curvature"``; e.g. to run two monitors).
        max_overhead: budget of the cost-aware schedule, in (0, 1) (default ``DEFAULT_MAX_OVERHEAD`` = 0.015);
            only with ``every_n_steps=None``.
        save_probe: with ``probe="fixed"``, store every rank's probe batch — raw training data — in checkpoints
            (default True: a resumed run measures the same batch). False for checkpoints you share: they hold no
            training data, and a resumed run takes its first batch after resuming as the new probe.

    Attributes:
        history: list of the logged dicts (plus ``"step"``), one per measurement, on every rank.
        last: the latest such dict (``None`` before the first measurement).
    """

    # shape: one line per argument and per argument check
    def __init__(
        self,
        every_n_steps: int | None = None,
        probe: str = "fixed",
        max_iter: int = 40,
        tol: float = 1e-3,
        bn_mode: str = "eval",
        smoothness: bool = True,
        *,
        dropout_mode: str = "eval",
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        hvp_method: str = "double_backward",
        ddp_mode: str = "auto",
        warm_start: bool = True,
        fit_on: str = "hessian_norm",
        fit_decay: float = 1.0,
        seed: int = 0,
        prefix: str = "curvature",
        max_overhead: float | None = None,
        save_probe: bool = True,
    ) -> None:
        super().__init__()
        self._schedule = MeasurementSchedule(every_n_steps, max_overhead)
        self.every_n_steps = self._schedule.every_n_steps
        self.max_overhead = self._schedule.max_overhead
        self.probe = check_choice("probe", probe, ("fixed", "current"), owner=_OWN)
        self.max_iter = check_int("max_iter", max_iter, 2, owner=_OWN)
        self.tol = check_float("tol", tol, 0.0, 1.0, low_open=True, high_open=True, owner=_OWN)
        self.bn_mode = check_choice("bn_mode", bn_mode, ("eval", "train"), owner=_OWN)
        self.smoothness = check_bool("smoothness", smoothness, owner=_OWN)
        self.dropout_mode = check_choice("dropout_mode", dropout_mode, ("eval", "train"), owner=_OWN)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{_OWN}: invalid loss_fn={loss_fn!r}; expected None or a callable (pl_module, batch) "
                             "-> loss")
        self.loss_fn = loss_fn
        self.hvp_method = check_choice("hvp_method", hvp_method, ("double_backward", "func"), owner=_OWN)
        if hvp_method == "func" and (bn_mode == "train" or dropout_mode == "train"):
            raise ValueError(f"{_OWN}: invalid hvp_method='func' with bn_mode={bn_mode!r}, "
                             f"dropout_mode={dropout_mode!r}; expected bn_mode='eval' and dropout_mode='eval'")
        self.ddp_mode = check_choice("ddp_mode", ddp_mode, ("auto", "global", "local"), owner=_OWN)
        self.warm_start = check_bool("warm_start", warm_start, owner=_OWN)
        self.fit_on = check_choice("fit_on", fit_on, ("hessian_norm", "smoothness"), owner=_OWN)
        if fit_on == "smoothness" and not smoothness:
            raise ValueError(f"{_OWN}: invalid fit_on='smoothness' with smoothness=False; expected smoothness=True")
        self.fit_decay = check_float("fit_decay", fit_decay, 0.0, 1.0, low_open=True, owner=_OWN)
        self.seed = check_int("seed", seed, 0, owner=_OWN)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"{_OWN}: invalid prefix={prefix!r}; expected a non-empty str")
        self.prefix = prefix
        self.save_probe = check_bool("save_probe", save_probe, owner=_OWN)

        self.fit = L0L1Fit(self.fit_decay)
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._ritz: Tensor | None = None
        self._fixed = FixedProbe()
        self._snapshot: Tensor | None = None
        self._snapshot_step: int | None = None
        self._last_step: int | None = None
        self._published: dict[str, Any] | None = None
        self._warned: set[str] = set()

    @property
    def _budget(self) -> OverheadBudget:
        return self._schedule.budget

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe=self.probe,
                                        ddp_mode=self.ddp_mode, prefix=self.prefix)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(f"{_OWN}: invalid loss_fn=None with manual optimisation; expected a loss_fn (the "
                             "default calls training_step, which would step the optimizer)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._published is not None:
            setattr(trainer, CURVATURE_ATTR, dict(self._published))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a step before the last measured one: a new run (a fresh Trainer), whose steps and timings do not apply
        new_run = self._last_step is not None and trainer.global_step < self._last_step
        if new_run:
            self._last_step = None
        self._schedule.start(trainer.global_step, new_run=new_run, end=self._schedule.fit_end(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule.stop()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.probe == "fixed":
            self._fixed.take(batch, pl_module)
        target = trainer.global_step + 1
        if self.smoothness and self._schedule.due(target) and self._snapshot_step != target:
            params = [p for _, p in trainable_named_parameters(pl_module)]
            self._snapshot = flatten(params, torch.promote_types(params[0].dtype, torch.float32))
            self._snapshot_step = target

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step:
            return
        self._schedule.tick(step)
        probe_batch = self._fixed.batch if self.probe == "fixed" else batch
        if self._schedule.uncalibrated:
            if self._schedule.calibration_due(step):
                self._last_step = step
                self._calibrate(trainer, pl_module, probe_batch, step)
            return
        if not self._schedule.due(step):
            return
        self._last_step = step
        prev = self._snapshot if self._snapshot_step == step else None
        metrics = self.measure(pl_module, probe_batch, lr=current_lr(trainer), prev_params=prev)
        self._snapshot, self._snapshot_step = None, None
        done = self._schedule.measured(step, metrics[f"{self.prefix}/seconds"], metrics[f"{self.prefix}/matvecs"])
        metrics.update({f"{self.prefix}/{k}": v for k, v in done.items()})
        self._publish(trainer, step, metrics)

    def _publish(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        """Record, publish on the trainer (every rank) and log (rank 0, at Lightning's step for this batch)."""
        self.last = {"step": float(step), **metrics}
        self.history.append(self.last)
        pre = self.prefix
        lam_max = metrics.get(f"{pre}/lambda_max_rank_max", metrics[f"{pre}/lambda_max"])
        lam_min = metrics.get(f"{pre}/lambda_min_rank_min", metrics[f"{pre}/lambda_min"])
        if math.isfinite(lam_max) and math.isfinite(lam_min):
            self._published = {"lambda_max": lam_max, "lambda_min": lam_min, "step": int(step)}
            setattr(trainer, CURVATURE_ATTR, dict(self._published))
        log_scalars(trainer, metrics)

    # ------------------------------------------------------------------ measurement
    @torch.no_grad()
    def measure(self, pl_module: nn.Module, batch: Any, *, lr: float | None = None,
                prev_params: Tensor | None = None) -> dict[str, float]:
        """Measure at the module's current weights on ``batch`` and return the ``curvature/*`` dict (also
        usable outside a Trainer). ``prev_params``: flat weights before the last update, for the smoothness
        along it. Every rank must call it when a process group is initialised (it may use collectives)."""
        t0 = time.perf_counter()
        params, dtype, mode, world, reduce, loss_of = self._probe_setup(pl_module, batch)
        with TrajectoryGuard(pl_module, grads=False) as guard:  # autograd.grad with explicit inputs: no .grad
            set_probe_modes(pl_module, self.bn_mode, self.dropout_mode, local_ddp=mode == "local" and is_dist(),
                            warn=self._warn_once)
            local, ritz, err = measure_on_rank(
                pl_module, loss_of, guard.reset, method=self.hvp_method, reduce=reduce, dtype=dtype,
                max_iter=self._schedule.iterations(self.max_iter), tol=self.tol,
                v0=self._ritz if self.warm_start else None, generator=self._generator,
                stop_reducer=all_agree if (mode == "global" and world > 1) else None,
                prev_params=prev_params if self.smoothness else None)
        if ritz is not None:
            self._ritz = ritz
        if err is not None:
            self._warn_once("nonfinite", f"{_OWN}: non-finite Hessian-vector product ({err}); logging NaN for "
                            "this measurement")
        # local mode: every rank measured its own weights; global mode: the products were already averaged, but
        # the probe loss is each rank's own. Publish the rank mean either way, so every rank logs the same.
        result, extremes = local.reduced(mode, params[0].device) if world > 1 else (local.as_floats(), {})
        out = {f"curvature/{k}": v for k, v in extremes.items()}
        out.update(self._derived(result, lr))
        out["curvature/mode_global"] = float(mode == "global")
        out["curvature/seconds"] = time.perf_counter() - t0
        if self.prefix != "curvature":
            out = {self.prefix + k[len("curvature"):]: v for k, v in out.items()}
        return out

    def _derived(self, r: CurvatureResult, lr: float | None) -> dict[str, float]:
        """The logged values of one (reduced) measurement; updates the (L0, L1) fit."""
        out = {"curvature/lambda_max": r.lambda_max, "curvature/lambda_min": r.lambda_min}
        l_minus = max(0.0, -r.lambda_min) if math.isfinite(r.lambda_min) else math.nan
        out["curvature/neg_pos_ratio"] = l_minus / r.lambda_max if r.lambda_max > 0 else math.nan
        if lr is not None and math.isfinite(lr):
            out["curvature/eos_ratio"] = r.lambda_max * lr / 2.0
            out["curvature/two_over_lr"] = 2.0 / lr if lr > 0 else math.inf
        out["curvature/grad_norm"] = r.grad_norm
        out["curvature/probe_loss"] = r.probe_loss
        if self.smoothness:
            out["curvature/smoothness"] = r.smoothness
            out["curvature/smoothness_dHd"] = r.smoothness_dHd
        hessian_norm = max(abs(r.lambda_max), abs(r.lambda_min))
        self.fit.update(r.grad_norm, r.smoothness if self.fit_on == "smoothness" else hessian_norm)
        l0, l1 = self.fit.fit()
        eta_c, gamma = self.fit.advice()
        # the fit and its advice have no value until the fit is determined (e.g. L0 = 0 gives η_c = 1/0): such
        # keys are left out rather than logged as NaN
        derived = {"curvature/L0": l0, "curvature/L1": l1, "curvature/advice_clip_lr": eta_c,
                   "curvature/advice_clip_threshold": gamma}
        out.update({k: float(v) for k, v in derived.items() if math.isfinite(v)})
        out["curvature/matvecs"] = r.matvecs
        out["curvature/converged"] = r.converged
        return out

    def _calibrate(self, trainer: pl.Trainer, pl_module: nn.Module, batch: Any, step: int) -> None:
        """Time one gradient and one product on ``batch`` and plan the first measurement from them."""
        t0 = time.perf_counter()
        _, dtype, mode, _, reduce, loss_of = self._probe_setup(pl_module, batch)
        with TrajectoryGuard(pl_module, grads=False) as guard:
            set_probe_modes(pl_module, self.bn_mode, self.dropout_mode, local_ddp=mode == "local" and is_dist(),
                            warn=self._warn_once)
            build, product = time_products(pl_module, loss_of, guard.reset, method=self.hvp_method,
                                           reduce=reduce, dtype=dtype)
        extra = 1 if self.smoothness else 0  # the smoothness gradient and product
        note = self._schedule.calibrated(step, time.perf_counter() - t0, build * (1 + extra), product,
                                         self.max_iter + extra, extra)
        self._schedule.announce(trainer, note, self.prefix)

    # ------------------------------------------------------------------ helpers
    def _probe_setup(self, pl_module: nn.Module, batch: Any) -> tuple[list[Tensor], torch.dtype, str, int,
                                                                       Callable[[Tensor], Tensor] | None,
                                                                       Callable[[nn.Module], Tensor]]:
        """Parameters, working dtype, resolved DDP mode, world size, product reducer and probe loss."""
        params = [p for _, p in trainable_named_parameters(pl_module)]
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        mode = resolve_mode(self.ddp_mode, params)
        world = world_size() if is_dist() else 1
        reduce = mean_over_ranks if (mode == "global" and world > 1) else None
        return params, dtype, mode, world, reduce, probe_batch_loss(pl_module, batch, self.loss_fn)

    def _warn_once(self, key: str, message: str) -> None:
        warn_once(self._warned, key, message)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Warm-start Ritz vectors (this rank's; rank 0's end up in the checkpoint), the fixed probe batch of
        every rank (gathered: every rank must call this, as Lightning does when saving), generator, fit and
        last values."""
        probes = self._fixed.gathered() if self.probe == "fixed" and self.save_probe else None
        return {
            "version": 1,
            "ritz": None if self._ritz is None else self._ritz.detach().to("cpu"),
            "generator": self._generator.get_state(),
            "fit": self.fit.state_dict(),
            "probe_batches": probes,
            "last_step": self._last_step,
            "published": self._published,
            "last": self.last,
            "budget": self._schedule.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ritz = state_dict.get("ritz")
        if state_dict.get("generator") is not None:
            self._generator.set_state(state_dict["generator"])
        if state_dict.get("fit") is not None:
            self.fit.load_state_dict(state_dict["fit"])
        self._fixed.load(state_dict.get("probe_batches"))
        self._last_step = state_dict.get("last_step")
        self._published = state_dict.get("published")
        self.last = state_dict.get("last")
        if state_dict.get("budget") is not None:
            self._schedule.load_state_dict(state_dict["budget"])
