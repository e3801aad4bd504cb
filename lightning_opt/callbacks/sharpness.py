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

The measurement never changes the training trajectory: RNG states (torch CPU / CUDA, ``random``, numpy), every
buffer (batch-norm running statistics), ``.grad`` (never written: ``torch.autograd.grad`` with explicit
inputs), parameters (bitwise) and each submodule's training flag are restored. It runs outside autocast, on
the unwrapped LightningModule (not the DDP wrapper), in float32 or wider.

Distributed (``ddp_mode``): every rank uses its own probe batch.

* ``"global"``: each Hessian-vector product is averaged over ranks (an all-reduce of ``dim`` floats), so the
  operator is the Hessian of the global-batch loss; every rank runs the same Lanczos and gets the same
  numbers.
* ``"local"``: every rank measures the Hessian of its own loss at its own weights (what the periodic
  strategies' ranks see between synchronisations); the logged ``lambda_max`` / ``lambda_min`` are means over
  ranks, plus ``lambda_max_rank_max`` and ``lambda_min_rank_min``.
* ``"auto"`` (default): ``"global"`` when the weights are identical on every rank (DDP, or a periodic strategy
  right after a sync / during warm-up), else ``"local"`` (one all-gather of two checksums decides).

Schedule: ``every_n_steps=N`` measures after every N-th optimizer step. The default (``every_n_steps=None``) is
cost-aware: ``CALIBRATION_STEPS`` steps into a fit, one gradient and one Hessian-vector product are timed to
estimate a measurement's cost, and each measurement is then placed at the first step where it keeps the time
spent inside the monitor within ``max_overhead`` (default 1.5%) of the fit's wall time (later estimates use the
last measurement's cost). On a cheap model that is every few dozen steps; on an expensive one the first
measurement may come after thousands (an INFO message says when). The planned step is agreed by all ranks
when it is planned (one all-gather at calibration and after each measurement), never per step. ``overhead``
(seconds inside the monitor / fit seconds) and, in the cost-aware mode, ``next_step`` are logged with every
measurement.

Logged values are identical on every rank (``seconds`` and ``overhead`` are maxima over ranks); only global rank 0
writes (through ``trainer.loggers``, at every measurement regardless of ``log_every_n_steps``). The monitor
publishes its latest values for period schedules as ``trainer.lightning_opt_curvature = {"lambda_max": max over
ranks, "lambda_min": min over ranks, "step": int}`` (the conservative bounds on L⁺ and L⁻; identical on every
rank).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_opt._ownership import RankLocal
from lightning_opt._trainer_steps import logging_step
from lightning_opt._validation import check_bool, check_choice, check_float, check_int
from lightning_opt.callbacks._budget import OverheadBudget
from lightning_opt.distributed.buckets import all_reduce_flat, is_dist
from lightning_opt.distributed.scalars import all_gather_vector, rank, world_size
from lightning_opt.stats.hvp import HessianVectorProduct, flatten_tensors, trainable_named_parameters
from lightning_opt.stats.lanczos import lanczos_extreme_eigs
from lightning_opt.stats.smoothness import L0L1Fit, directional_curvature, local_smoothness

__all__ = ["CALIBRATION_STEPS", "CURVATURE_ATTR", "DEFAULT_MAX_OVERHEAD", "SharpnessMonitor"]

CURVATURE_ATTR = "lightning_opt_curvature"
#: Budget of the cost-aware schedule: seconds inside the monitor / fit seconds.
DEFAULT_MAX_OVERHEAD = 0.015
#: Optimizer steps into a fit call before the cost-aware schedule times one product; the step time is measured
#: over the second half of them (the first steps of a fit are slow: compilation, autotuning, data loader start).
CALIBRATION_STEPS = 10

try:  # numpy is optional; restore its RNG when present
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None


def _clone_batch(batch: Any, device: torch.device | None = None) -> Any:
    def f(t: Tensor) -> Tensor:
        t = t.detach()
        return t.to(device, copy=True) if device is not None else t.clone()

    return apply_to_collection(batch, Tensor, f)


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
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
            if max_overhead is not None:
                raise ValueError(f"`max_overhead` applies to the cost-aware schedule (every_n_steps=None); pass one "
                                 f"of them, got every_n_steps={every_n_steps!r}, max_overhead={max_overhead!r}")
        else:
            max_overhead = DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead
            max_overhead = check_float("max_overhead", max_overhead, 0.0, 1.0, low_open=True, high_open=True)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.probe = check_choice("probe", probe, ("fixed", "current"))
        self.max_iter = check_int("max_iter", max_iter, 2)
        self.tol = check_float("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
        self.bn_mode = check_choice("bn_mode", bn_mode, ("eval", "train"))
        self.smoothness = check_bool("smoothness", smoothness)
        self.dropout_mode = check_choice("dropout_mode", dropout_mode, ("eval", "train"))
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be None or a callable (pl_module, batch) -> loss, "
                             f"got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.hvp_method = check_choice("hvp_method", hvp_method, ("double_backward", "func"))
        if hvp_method == "func" and (bn_mode == "train" or dropout_mode == "train"):
            raise ValueError(f"`hvp_method`='func' needs bn_mode='eval' and dropout_mode='eval', got "
                             f"bn_mode={bn_mode!r}, dropout_mode={dropout_mode!r}")
        self.ddp_mode = check_choice("ddp_mode", ddp_mode, ("auto", "global", "local"))
        self.warm_start = check_bool("warm_start", warm_start)
        self.fit_on = check_choice("fit_on", fit_on, ("hessian_norm", "smoothness"))
        if fit_on == "smoothness" and not smoothness:
            raise ValueError("`fit_on`='smoothness' needs `smoothness`=True, got smoothness=False")
        self.fit_decay = check_float("fit_decay", fit_decay, 0.0, 1.0, low_open=True)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {seed!r}")
        self.seed = seed
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"`prefix` must be a non-empty str, got {prefix!r}")
        self.prefix = prefix
        self.save_probe = check_bool("save_probe", save_probe)

        self.fit = L0L1Fit(self.fit_decay)
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._ritz: Tensor | None = None
        self._probe_batch: Any = None
        self._loaded_probe: Any = None
        self._snapshot: Tensor | None = None
        self._snapshot_step: int | None = None
        self._last_step: int | None = None
        self._published: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._budget = OverheadBudget(max_overhead if max_overhead is not None else 1.0)
        self._calibrate_at: int | None = None
        self._mark_at: int | None = None
        self._measured_this_fit = 0

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe=self.probe,
                                        ddp_mode=self.ddp_mode, prefix=self.prefix)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError("SharpnessMonitor: `loss_fn` is required with manual optimisation (the default "
                             "calls "
                             "training_step, which would step the optimizer), got loss_fn=None")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._published is not None:
            setattr(trainer, CURVATURE_ATTR, dict(self._published))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step is not None and trainer.global_step < self._last_step:
            # a new run (a fresh Trainer) with this monitor: its step numbers and timings do not apply
            self._budget.reset()
            self._last_step = None
        self._budget.start(trainer.global_step)
        self._calibrate_at = trainer.global_step + CALIBRATION_STEPS
        self._mark_at = trainer.global_step + CALIBRATION_STEPS // 2
        self._measured_this_fit = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._budget.stop()
        if self.every_n_steps is None and self._measured_this_fit == 0:
            planned = self._budget.next_step
            why = (f"the next one is planned at step {planned}" if planned is not None else
                   f"the cost-aware schedule calibrates after {CALIBRATION_STEPS} steps of a fit")
            rank_zero_info(f"SharpnessMonitor: no measurement in this fit (max_overhead={self.max_overhead:g}; "
                           f"{why}); pass every_n_steps=N for a fixed schedule.")

    def _due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self._budget.next_step is not None and step >= self._budget.next_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.probe == "fixed" and self._probe_batch is None:
            self._probe_batch = self._take_loaded_probe(pl_module)
            if self._probe_batch is None:
                self._probe_batch = _clone_batch(batch)
        target = trainer.global_step + 1
        if self.smoothness and self._due(target) and self._snapshot_step != target:
            params = [p for _, p in trainable_named_parameters(pl_module)]
            self._snapshot = flatten_tensors(params, torch.promote_types(params[0].dtype, torch.float32))
            self._snapshot_step = target

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step:
            return
        if step == self._mark_at:
            self._budget.mark(step)  # the step time leaves the fit's slow first steps out
        probe_batch = self._probe_batch if self.probe == "fixed" else batch
        if self.every_n_steps is None and self._budget.next_step is None:
            if self._calibrate_at is not None and step >= self._calibrate_at:
                self._last_step = step
                self._calibrate(pl_module, probe_batch, step)
            return
        if not self._due(step):
            return
        self._last_step = step
        prev = self._snapshot if self._snapshot_step == step else None
        metrics = self.measure(pl_module, probe_batch, lr=_current_lr(trainer), prev_params=prev)
        self._snapshot, self._snapshot_step = None, None
        self._measured_this_fit += 1
        self._budget.charge(metrics[f"{self.prefix}/seconds"])
        ahead, share, seconds = self._agree(step, metrics[f"{self.prefix}/seconds"])
        metrics[f"{self.prefix}/seconds"] = seconds
        if ahead is not None:
            self._set_plan(step, ahead)
            metrics[f"{self.prefix}/next_step"] = float(self._budget.next_step)
        metrics[f"{self.prefix}/overhead"] = share
        metrics_step = {"step": float(step), **metrics}
        self.history.append(metrics_step)
        self.last = metrics_step
        pre = self.prefix
        lam_max = metrics.get(f"{pre}/lambda_max_rank_max", metrics[f"{pre}/lambda_max"])
        lam_min = metrics.get(f"{pre}/lambda_min_rank_min", metrics[f"{pre}/lambda_min"])
        if math.isfinite(lam_max) and math.isfinite(lam_min):
            self._published = {"lambda_max": lam_max, "lambda_min": lam_min, "step": int(step)}
            setattr(trainer, CURVATURE_ATTR, dict(self._published))
        cb_metrics = trainer.callback_metrics
        for k, v in metrics.items():
            cb_metrics[k] = torch.tensor(v)
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # at Lightning's step for this batch (global_step has moved on)
                logger.log_metrics(metrics, step=logging_step(trainer))

    # ------------------------------------------------------------------ measurement
    @torch.no_grad()
    def measure(self, pl_module: nn.Module, batch: Any, *, lr: float | None = None,
                prev_params: Tensor | None = None) -> dict[str, float]:
        """Measure at the module's current weights on ``batch`` and return the ``curvature/*`` dict (also
        usable outside a Trainer). ``prev_params``: flat weights before the last update, for the smoothness
        along it. Every rank must call it when a process group is initialised (it may use collectives)."""
        t0 = time.perf_counter()
        params, dtype, mode, world, reduce, loss_of = self._probe_setup(pl_module, batch)
        device = params[0].device
        stop_reducer = self._all_agree if (mode == "global" and world > 1) else None
        out: dict[str, float] = {}
        with self._preserved(pl_module, mode) as reset:
            lam_max = lam_min = grad_norm = smooth = dhd = probe_loss = math.nan
            n_matvec, converged = 0, 0.0
            try:
                reset()
                op = HessianVectorProduct(pl_module, loss_of, method=self.hvp_method, reduce=reduce,
                                          dtype=dtype)
                v0 = self._ritz if (self.warm_start and self._ritz is not None
                                    and self._ritz.shape[-1] == op.dim) else None
                if v0 is not None:
                    v0 = v0.to(device=device, dtype=dtype)
                res = lanczos_extreme_eigs(op, op.dim, max_iter=self.max_iter, tol=self.tol, v0=v0,
                                           device=device, dtype=dtype, generator=self._generator,
                                           stop_reducer=stop_reducer)
                lam_max, lam_min = res.lambda_max, res.lambda_min
                n_matvec, converged = res.n_matvec, float(res.converged)
                self._ritz = res.ritz_vectors.detach()
                grad = op.gradient()
                grad_norm = float(torch.linalg.vector_norm(grad))
                probe_loss = op.loss
                if self.smoothness and prev_params is not None and prev_params.numel() == op.dim:
                    cur = flatten_tensors(params, dtype)
                    d = cur - prev_params.to(device=device, dtype=dtype)
                    dhd = directional_curvature(op, d)
                    n_matvec += 1
                    op.release()
                    saved = [p.detach().clone() for p in params]
                    try:
                        _write_flat(prev_params.to(device=device, dtype=dtype), params)
                        reset()
                        g_prev = HessianVectorProduct(pl_module, loss_of, method="func", reduce=reduce,
                                                      dtype=dtype).gradient()
                    finally:
                        for p, s in zip(params, saved, strict=True):
                            p.copy_(s)
                    smooth = local_smoothness(grad, g_prev, d)
                op.release()
            except FloatingPointError as err:
                self._warn_once("nonfinite", f"SharpnessMonitor: non-finite Hessian-vector product ({err}); "
                                "logging NaN for this measurement")
        local = torch.tensor([lam_max, lam_min, grad_norm, smooth, dhd, probe_loss, float(n_matvec),
                              converged],
                             dtype=torch.float64)
        if world > 1:
            # local mode: every rank measured its own weights; global mode: the products were already averaged, but
            # the probe loss is each rank's own. Publish the rank mean either way, so every rank logs the same.
            gathered = all_gather_vector(local.to(device)).to("cpu", torch.float64)
            if mode == "local":
                out["curvature/lambda_max_rank_max"] = float(gathered[:, 0].max())
                out["curvature/lambda_min_rank_min"] = float(gathered[:, 1].min())
            vals = gathered.mean(0).tolist()
            vals[7] = float(gathered[:, 7].min())  # converged on every rank
        else:
            vals = local.tolist()
        lam_max, lam_min, grad_norm, smooth, dhd, probe_loss, n_matvec, converged = vals
        out["curvature/lambda_max"] = lam_max
        out["curvature/lambda_min"] = lam_min
        l_minus = max(0.0, -lam_min) if math.isfinite(lam_min) else math.nan
        out["curvature/neg_pos_ratio"] = l_minus / lam_max if lam_max > 0 else math.nan
        if lr is not None and math.isfinite(lr):
            out["curvature/eos_ratio"] = lam_max * lr / 2.0
            out["curvature/two_over_lr"] = 2.0 / lr if lr > 0 else math.inf
        out["curvature/grad_norm"] = grad_norm
        out["curvature/probe_loss"] = probe_loss
        if self.smoothness:
            out["curvature/smoothness"] = smooth
            out["curvature/smoothness_dHd"] = dhd
        target = smooth if self.fit_on == "smoothness" else max(abs(lam_max), abs(lam_min))
        self.fit.update(grad_norm, target)
        l0, l1 = self.fit.fit()
        eta_c, gamma = self.fit.advice()
        # the fit and its advice have no value until the fit is determined (e.g. L0 = 0 gives η_c = 1/0): such
        # keys are left out rather than logged as NaN
        derived = {"curvature/L0": l0, "curvature/L1": l1, "curvature/advice_clip_lr": eta_c,
                   "curvature/advice_clip_threshold": gamma}
        out.update({k: float(v) for k, v in derived.items() if math.isfinite(v)})
        out["curvature/matvecs"] = n_matvec
        out["curvature/converged"] = converged
        out["curvature/mode_global"] = float(mode == "global")
        out["curvature/seconds"] = time.perf_counter() - t0
        if self.prefix != "curvature":
            out = {self.prefix + k[len("curvature"):]: v for k, v in out.items()}
        return out

    # ------------------------------------------------------------------ cost-aware schedule
    def _calibrate(self, pl_module: nn.Module, batch: Any, step: int) -> None:
        """Time building the operator (one gradient) and one product on ``batch``, estimate a measurement's
        cost from them and plan the first measurement."""
        t0 = time.perf_counter()
        params, dtype, mode, _, reduce, loss_of = self._probe_setup(pl_module, batch)
        with self._preserved(pl_module, mode) as reset:
            reset()
            t = time.perf_counter()
            op = HessianVectorProduct(pl_module, loss_of, method=self.hvp_method, reduce=reduce, dtype=dtype)
            op.gradient()
            build = time.perf_counter() - t
            v = torch.full((op.dim,), op.dim ** -0.5, device=params[0].device, dtype=dtype)
            products = []
            for _ in range(2):  # the first product through a fresh graph is slower: time the second
                t = time.perf_counter()
                op(v)
                products.append(time.perf_counter() - t)
            product = products[-1]
            op.release()
        # an upper bound (Lanczos often converges in fewer than max_iter products), so the budget holds from the
        # first measurement on; later plans use the measured cost
        extra = 1 if self.smoothness else 0
        cost = build * (1 + extra) + product * (self.max_iter + extra)
        self._budget.charge(time.perf_counter() - t0)
        per_step = self._budget.step_time(step)
        ahead, _, cost = self._agree(step, cost)
        self._set_plan(step, ahead)
        steps = f"≈ {cost / per_step:.0f} training steps of {1000 * per_step:.3g} ms" if per_step > 0 else "?"
        rank_zero_info(
            f"SharpnessMonitor: one measurement is estimated at {cost:.3g} s ({steps}); to keep the monitor "
            f"within max_overhead={self.max_overhead:g} of fit time the first one runs at step "
            f"{self._budget.next_step} (pass every_n_steps=N for a fixed schedule).")

    def _agree(self, step: int, cost: float) -> tuple[int | None, float, float]:
        """Steps until the next measurement is affordable (cost-aware schedule; else None), the share of fit
        time spent in the monitor and ``cost``, each the max over ranks (one all-gather), so every rank plans
        the same step and logs the same values."""
        ahead = self._budget.steps_until_affordable(step, cost) if self.every_n_steps is None else 0
        mine = torch.tensor([float(ahead), self._budget.share(), cost], dtype=torch.float64)
        if is_dist():
            mine = all_gather_vector(mine.to(_collective_device())).amax(0).cpu()
        ahead_all, share, cost_all = mine.tolist()
        return (int(ahead_all) if self.every_n_steps is None else None), share, cost_all

    def _set_plan(self, step: int, ahead: int) -> None:
        self._budget.next_step = step + ahead
        self._budget.mark(step)  # the next plan's step time: the steps between now and then

    # ------------------------------------------------------------------ helpers
    def _probe_setup(self, pl_module: nn.Module, batch: Any) -> tuple[list[Tensor], torch.dtype, str, int,
                                                                       Callable[[Tensor], Tensor] | None,
                                                                       Callable[[nn.Module], Tensor]]:
        """Parameters, working dtype, resolved DDP mode, world size, product reducer and probe loss."""
        params = [p for _, p in trainable_named_parameters(pl_module)]
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        mode = self._resolve_mode(params, dtype)
        world = world_size() if is_dist() else 1
        reduce = self._mean_over_ranks if (mode == "global" and world > 1) else None
        return params, dtype, mode, world, reduce, self._make_loss(pl_module, batch)

    def _make_loss(self, pl_module: nn.Module, batch: Any) -> Callable[[nn.Module], Tensor]:
        user = self.loss_fn

        def loss_of(_module: nn.Module) -> Tensor:
            if user is not None:
                loss = user(pl_module, batch)
            else:
                loss = _silenced_training_step(pl_module, batch)
            if isinstance(loss, dict):
                loss = loss["loss"]
            if not isinstance(loss, Tensor):
                raise ValueError(f"SharpnessMonitor: the probe loss must be a scalar tensor, "
                                 f"got {type(loss)}")
            return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

        return loss_of

    def _resolve_mode(self, params: list[Tensor], dtype: torch.dtype) -> str:
        if not is_dist():
            return "global"
        if self.ddp_mode != "auto":
            return self.ddp_mode
        flat = flatten_tensors(params, torch.float64)
        sig = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()])
        gathered = all_gather_vector(sig)
        return "global" if bool((gathered == gathered[0]).all()) else "local"

    @staticmethod
    def _mean_over_ranks(v: Tensor) -> Tensor:
        (_, flat), = all_reduce_flat([v])  # one tensor: one bucket
        return flat.view_as(v) / world_size()

    @staticmethod
    def _all_agree(done: bool) -> bool:
        flags = all_gather_vector(torch.tensor([float(done)], device=_collective_device()))
        return bool(flags.min() > 0)

    @contextmanager
    def _preserved(self, pl_module: nn.Module, mode: str) -> Iterator[Callable[[], None]]:
        """Save RNG, buffers and training flags; set the probe modes; yield ``reset`` (restores RNG and
        buffers to the saved state, called before every forward so all forwards see the same randomness);
        restore all."""
        modes = {m: m.training for m in pl_module.modules()}
        buffers = [b.detach().clone() for b in pl_module.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_devices = sorted({p.device.index or 0 for p in pl_module.parameters()
                               if p.device.type == "cuda"})
        cuda_rng = [torch.cuda.get_rng_state(d) for d in cuda_devices]
        py_rng = random.getstate()
        np_rng = _np.random.get_state() if _np is not None else None
        local_sync_bn = mode == "local" and is_dist()

        def reset() -> None:
            torch.set_rng_state(cpu_rng)
            for d, s in zip(cuda_devices, cuda_rng, strict=True):
                torch.cuda.set_rng_state(s, d)
            for b, s in zip(pl_module.buffers(), buffers, strict=True):
                b.copy_(s)

        try:
            for m in pl_module.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    train = self.bn_mode == "train"
                    if train and local_sync_bn and isinstance(m, nn.SyncBatchNorm):
                        self._warn_once("syncbn", "SharpnessMonitor: SyncBatchNorm probed in eval mode in "
                                        "'local' "
                                        "DDP mode (its collectives would deadlock)")
                        train = False
                    m.training = train
                elif isinstance(m, nn.modules.dropout._DropoutNd):
                    m.training = self.dropout_mode == "train"
            yield reset
        finally:
            reset()
            random.setstate(py_rng)
            if _np is not None:
                _np.random.set_state(np_rng)
            for m, flag in modes.items():
                m.training = flag

    def _take_loaded_probe(self, pl_module: nn.Module) -> Any:
        if self._loaded_probe is None:
            return None
        probes = self._loaded_probe
        self._loaded_probe = None
        r = rank() if is_dist() else 0
        batch = probes[r] if r < len(probes) else probes[0]
        return move_data_to_device(batch, next(pl_module.parameters()).device)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(msg)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Warm-start Ritz vectors (this rank's; rank 0's end up in the checkpoint), the fixed probe batch of
        every rank (gathered: every rank must call this, as Lightning does when saving), generator, fit and
        last values."""
        probes = None
        if self.probe == "fixed" and self.save_probe and (self._probe_batch is not None
                                                          or self._loaded_probe is not None):
            mine = None
            if self._probe_batch is not None:
                mine = _clone_batch(self._probe_batch, torch.device("cpu"))
            if is_dist():
                gathered: list[Any] = [None] * world_size()
                dist.all_gather_object(gathered, mine)
                probes = gathered
            else:
                probes = [mine] if mine is not None else self._loaded_probe
        return {
            "version": 1,
            "ritz": None if self._ritz is None else self._ritz.detach().to("cpu"),
            "generator": self._generator.get_state(),
            "fit": self.fit.state_dict(),
            "probe_batches": probes,
            "last_step": self._last_step,
            "published": self._published,
            "last": self.last,
            "budget": self._budget.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ritz = state_dict.get("ritz")
        if state_dict.get("generator") is not None:
            self._generator.set_state(state_dict["generator"])
        if state_dict.get("fit") is not None:
            self.fit.load_state_dict(state_dict["fit"])
        probes = state_dict.get("probe_batches")
        if probes is not None and any(p is not None for p in probes):
            first = next(q for q in probes if q is not None)
            self._loaded_probe = [p if p is not None else first for p in probes]
            self._probe_batch = None
        self._last_step = state_dict.get("last_step")
        self._published = state_dict.get("published")
        self.last = state_dict.get("last")
        if state_dict.get("budget") is not None:
            self._budget.load_state_dict(state_dict["budget"])


def _write_flat(flat: Tensor, params: list[Tensor]) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def _current_lr(trainer: pl.Trainer) -> float:
    opts = trainer.optimizers
    if not opts:
        return math.nan
    try:
        return float(opts[0].param_groups[0]["lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _silenced_training_step(pl_module: nn.Module, batch: Any) -> Any:
    """``training_step(batch, 0)`` with ``log`` / ``log_dict`` replaced by no-ops for the duration of the
    call."""
    noop = lambda *args, **kwargs: None
    had = {k: k in pl_module.__dict__ for k in ("log", "log_dict")}
    old = {k: pl_module.__dict__.get(k) for k in had}
    pl_module.__dict__["log"] = noop
    pl_module.__dict__["log_dict"] = noop
    try:
        return pl_module.training_step(batch, 0)
    finally:
        for k, present in had.items():
            if present:
                pl_module.__dict__[k] = old[k]
            else:
                pl_module.__dict__.pop(k, None)
