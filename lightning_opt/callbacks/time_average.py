"""TimeAverageMonitor: invariant-measure time averages, the vanishing per-step gain, plateau test, LR decay.

Thesis ch. 6. Along a training run the iterates θ_t need not converge (gradient descent with η > 2/L cycles,
SGD keeps moving), yet the loss does — in the time-average sense of the empirical measure μ_k = (1/k) Σ_t
δ_{θ_t} (eq. (6.3)), μ_k(φ) = (1/k) Σ_t φ(θ_t) (eq. (6.4)). The per-step gain E_{μ_n}[L(θ) − L(F(θ))]
vanishes like O(1/√n) (Thm 6.4.1, Thm 6.4.6 for networks with weight decay), and once it has vanished while
μ is *not* supported on stationary points (E_μ‖∇L‖² > 0), a smaller step size lowers the loss (Thm 6.5.1).
Fig. 6-5 shows all of it on f(θ1, θ2) = 100 sin θ1 sin θ2: η = 0.01 converges, η = 0.04 cycles while the
averages of loss and gradient norm converge (``examples/reproductions/time_average_sin.py`` reproduces it
with this callback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from lightning_opt._ownership import RankLocal
from lightning_opt._trainer_steps import logs_this_step
from lightning_opt._validation import check_bool, check_choice, check_float, check_int
from lightning_opt.callbacks._common import current_lr, log_scalars, warn_once
from lightning_opt.callbacks._gain import GainStatistics, grad_norm, measure_gain
from lightning_opt.callbacks._plateau import PlateauTest
from lightning_opt.callbacks._probe import RngState
from lightning_opt.callbacks._time_averages import MetricAverages, returned_loss

__all__ = ["DEFAULT_METRICS", "GAIN_EVERY_DIAGNOSTIC", "GAIN_EVERY_PLATEAU", "PLATEAU_MODES", "TimeAverageMonitor"]

#: Metrics tracked by default besides the training loss (``loss_key``), when the monitors publishing them run:
#: gradient norm (GradNormMonitor), gradient-noise norm (GradientNoiseMonitor), λ_max (SharpnessMonitor).
DEFAULT_METRICS: tuple[str, ...] = ("grad/norm", "noise/norm", "curvature/lambda_max")
PLATEAU_MODES: tuple[str, ...] = ("off", "log", "decay_lr")
#: Default ``gain_every`` with a plateau test (it needs gain samples) and without one (the gain is a diagnostic).
GAIN_EVERY_PLATEAU = 10
GAIN_EVERY_DIAGNOSTIC = 100
_OWN = "TimeAverageMonitor"

LossFn = Callable[["pl.LightningModule", Any], Tensor]


def _metric_names(metrics: Sequence[str] | None, loss_key: Any) -> tuple[str, ...]:
    if not isinstance(loss_key, str) or not loss_key:
        raise ValueError(f"{_OWN}: invalid loss_key={loss_key!r}; expected a non-empty string")
    if metrics is None:
        return (loss_key, *DEFAULT_METRICS)
    names = list(metrics) if isinstance(metrics, Sequence) and not isinstance(metrics, str) else None
    if names is None or any(not isinstance(m, str) or not m for m in names) or len(set(names)) != len(names):
        raise ValueError(f"{_OWN}: invalid metrics={metrics!r}; expected None or a sequence of distinct non-empty "
                         "strings")
    return tuple(names)


class TimeAverageMonitor(RankLocal, Callback):
    r"""Time averages over the empirical measure of the iterates, per-step gain, plateau test (thesis ch. 6).

    **Time averages.** After every optimizer step, each tracked metric φ contributes its latest value to

    - ``time_avg/<metric>``: the Cesàro average μ_k(φ) = (1/k) Σ_{t≤k} φ(θ_t) of eq. (6.3)–(6.4) since the
      start of the current constant-lr phase (``reset_on_lr_change=True``: it restarts whenever
      ``trainer.optimizers[0].param_groups[0]["lr"]`` changes, so it estimates the invariant measure of one
      map F_η) or since the start of training (``False``);
    - ``window_avg/<metric>``: the average over the last ``window`` optimizer steps (Lemma 6.4.2's M_t); with
      ``reset_on_lr_change=True`` it restarts at an lr change too, so it never mixes two maps.

    The restart is *our* default, not the thesis': eq. (6.3) is the plain Cesàro mean over the whole iterate
    sequence of one map F_η (ch. 6 keeps η fixed), and the thesis does not say what to average once η changes.
    A mean over a mix of maps estimates neither invariant measure, so we restart; ``reset_on_lr_change=False``
    gives the thesis' plain mean over the whole run.

    Metrics are read by name from ``trainer.callback_metrics`` (also ``<name>_step``); absent ones are
    skipped.
    Defaults: the training loss (``loss_key``; if the module does not log it, the loss returned by
    ``training_step`` is used), ``grad/norm``, ``noise/norm`` and ``curvature/lambda_max`` when the monitors
    publishing them run. A metric logged only every N steps is sampled-and-held (every step counts its latest
    value), which equals the average of its samples up to boundary terms; a value another callback publishes
    later in the same hook is picked up one step later. Updates stay on the device; the host reads them only
    on logging steps (``Trainer(log_every_n_steps=...)``).

    **Per-step gain** (Thm 6.4.1, 6.4.6). Every ``gain_every`` optimizer steps the loss on the *same* batch
    is re-evaluated after the step: gain_t = L_B(θ_t) − L_B(θ_{t+1}), where L_B(θ_t) is the loss
    ``training_step`` returned. The re-evaluation runs ``training_step`` (or ``loss_fn(pl_module, batch)``)
    under ``torch.no_grad`` inside the precision plugin's train-step context, with the RNG states (torch CPU/CUDA,
    python, numpy) set to what they were at the start of the batch — so dropout draws the same mask as in the
    step — inside a :class:`~lightning_opt.callbacks._probe.TrajectoryGuard`, which mutes logging and restores
    the RNG states, every buffer (BatchNorm running statistics), training modes and torchmetrics accumulators
    afterwards: the training trajectory is unchanged. One extra forward per gain step; nothing else. Steps are optimizer
    steps (``trainer.global_step``); with gradient accumulation the gain is measured on the last micro-batch
    of the step. It logs

    - ``time_avg/gain``: the Cesàro mean of the gains of the current phase, E_{μ_n}[L(θ) − L(F(θ))] of (6.6);
    - ``window_avg/gain``, ``time_avg/gain_lo``, ``time_avg/gain_hi``: a batch-means confidence interval
      (``confidence``; ``gain_batches`` batches) for the stationary mean of the gain from its last
      ``gain_window`` samples. The transient of the phase is left out on purpose: on a deterministic cycle
      the summed gain telescopes to L(θ_1) − L(θ_{n+1}), so a Cesàro mean that keeps the initial descent
      decays only like (loss drop)/n and its interval would not contain 0 for a long time, although the map
      is at its invariant measure.

    With minibatch SGD the same-batch gain has a positive bias of about η·E‖g_B − ∇L_S‖² (the step fits its
    own batch), so the interval may stay above 0 on a plateau; ``gain_tol`` widens "contains 0" to "meets
    [−gain_tol, gain_tol]". With full-batch GD the gain is exact.

    **Plateau** (``plateau="log"`` or ``"decay_lr"``). A *check* happens at every gain step once the gain
    window is full (``gain_window`` samples since the phase start or the last decay). A check is positive
    when

    1. the gain interval meets [−gain_tol, gain_tol] (by default: contains 0) — the per-step gain has
       vanished, as at an invariant measure (Thm 6.4.1). The gain telescopes to the loss change over the window,
       so any stretch of iterates that is not trending down passes too, a chaotic transient included: the test
       cannot tell a transient from the invariant regime (docs/REPRODUCTIONS.md §1; a longer ``gain_window``
       only helps if it is longer than the transient); and
    2. the gradient norm stays away from 0 (Thm 6.5.1 needs E_μ‖∇L‖² > 0): with ḡ_win its mean over the gain
       window, ḡ_last its mean over the window's last batch and ḡ_run its Cesàro mean over the whole run
       (never reset), ḡ_win > 0, ḡ_last ≥ ``grad_tol``·ḡ_win (it is not collapsing inside the window) and
       ḡ_win ≥ ``grad_tol``·ḡ_run (it is not negligible on the run's scale). Gradient descent converging to
       a stationary point also has gains whose interval contains 0 (a geometrically decaying positive
       sequence has widely spread batch means), but its gradient norm decays towards 0 and fails these
       tests. The gradient norm is measured by this callback on gain steps, right before the optimizer step
       (after AMP unscaling, before clipping), so the test does not depend on other monitors.

    ``patience`` consecutive positive checks make a plateau: it is logged once (``plateau/detected`` = 1 on
    the next logging step, a text event in TensorBoard and the python log, an entry in ``events``) and
    re-armed after a negative check. With ``"decay_lr"`` every param group of every optimizer gets ``lr ←
    max(lr · decay_factor, min_lr)`` (Thm 6.5.1: a small enough step lowers the loss), the gain window and
    the counters restart, and the next ``cooldown`` checks are skipped.

    *LR schedulers.* A scheduler and ``decay_lr`` both write ``param_group["lr"]``. The decay also multiplies
    each scheduler's ``base_lrs``, so chainable schedulers (StepLR, MultiStepLR, ExponentialLR,
    ReduceLROnPlateau), which update the current lr multiplicatively, and closed-form ones computed from
    ``base_lrs`` (LambdaLR, CosineAnnealingLR) keep the decay; schedulers that keep their own lr bounds
    (OneCycleLR, CyclicLR) overwrite it. A warning is issued when ``decay_lr`` runs with a scheduler. Also
    note: a scheduler that changes the lr every step restarts the averages every step when
    ``reset_on_lr_change=True``.

    **DDP.** The loss re-evaluation is per rank (each rank's own batch); the gain and the gradient norm are
    averaged over ranks with one all-gather per gain step (``lightning_opt.distributed``), so every rank
    sees the same statistics and takes the same lr decision. A non-finite gain on any rank is dropped from
    the statistics on every rank. On logging steps the time and window averages are averaged over ranks
    (NaN-aware) with one all-gather. Manual optimisation: the gain needs ``loss_fn`` and ``training_step``
    returning the loss, otherwise it is skipped.

    **Checkpoints.** ``state_dict`` holds every accumulator, the gain window, counters and events, so a
    resumed run logs what the uninterrupted one would.

    Args:
        metrics: names of logged metrics to average; ``None`` = ``(loss_key, *DEFAULT_METRICS)``.
        loss_key: name under which the module logs its training loss.
        window: steps in the sliding-window average (≥ 1).
        reset_on_lr_change: restart the Cesàro and window averages (and gain statistics) at every lr change
            (our default; ``False`` is the thesis' plain Cesàro mean, see above).
        gain_every: optimizer steps between gain evaluations (≥ 0; 0 disables the gain and the plateau test).
            ``None`` (default): ``GAIN_EVERY_PLATEAU`` = 10 with a plateau test (it needs ``gain_window`` samples
            per check), ``GAIN_EVERY_DIAGNOSTIC`` = 100 without one — the extra forward then costs about 1/300
            of the training time.
        gain_window: gain samples in the interval window (≥ gain_batches).
        gain_batches: batches of the batch-means interval (≥ 2).
        plateau: ``"off"``, ``"log"`` or ``"decay_lr"``.
        decay_factor: lr multiplier at a plateau, in (0, 1).
        confidence: confidence level of the gain interval, in (0, 1).
        patience: consecutive positive checks that make a plateau (≥ 1).
        cooldown: checks skipped after an lr decay (≥ 0).
        gain_tol: half-width of the band the interval must meet (≥ 0).
        grad_tol: minimum ratios ḡ_last/ḡ_win and ḡ_win/ḡ_run of the plateau test, in [0, 1].
        min_lr: floor for the decayed lr (≥ 0).
        loss_fn: optional ``(pl_module, batch) -> loss`` used to re-evaluate the loss instead of
            ``training_step``.
    """

    # shape: one line per argument and per argument check
    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        *,
        loss_key: str = "train/loss",
        window: int = 100,
        reset_on_lr_change: bool = True,
        gain_every: int | None = None,
        gain_window: int = 50,
        gain_batches: int = 10,
        plateau: str = "off",
        decay_factor: float = 0.1,
        confidence: float = 0.95,
        patience: int = 5,
        cooldown: int = 0,
        gain_tol: float = 0.0,
        grad_tol: float = 0.1,
        min_lr: float = 0.0,
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        self.metrics = _metric_names(metrics, loss_key)
        self.loss_key = loss_key
        self.window = check_int("window", window, 1, owner=_OWN)
        self.reset_on_lr_change = check_bool("reset_on_lr_change", reset_on_lr_change, owner=_OWN)
        self.plateau = check_choice("plateau", plateau, PLATEAU_MODES, owner=_OWN)
        if gain_every is None:
            gain_every = GAIN_EVERY_DIAGNOSTIC if plateau == "off" else GAIN_EVERY_PLATEAU
        self.gain_every = check_int("gain_every", gain_every, 0, owner=_OWN)
        if plateau != "off" and self.gain_every == 0:
            raise ValueError(f"{_OWN}: invalid gain_every=0 with plateau={plateau!r}; expected an int with "
                             "gain_every >= 1 (the plateau test needs gain samples)")
        self.gain_batches = check_int("gain_batches", gain_batches, 2, owner=_OWN)
        self.gain_window = check_int("gain_window", gain_window, self.gain_batches, owner=_OWN)
        self.decay_factor = check_float("decay_factor", decay_factor, 0.0, 1.0, low_open=True, high_open=True,
                                        owner=_OWN)
        self.confidence = check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True, owner=_OWN)
        self.patience = check_int("patience", patience, 1, owner=_OWN)
        self.cooldown = check_int("cooldown", cooldown, 0, owner=_OWN)
        self.gain_tol = check_float("gain_tol", gain_tol, 0.0, owner=_OWN)
        self.grad_tol = check_float("grad_tol", grad_tol, 0.0, 1.0, owner=_OWN)
        self.min_lr = check_float("min_lr", min_lr, 0.0, owner=_OWN)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"{_OWN}: invalid loss_fn={loss_fn!r}; expected None or a callable (pl_module, batch) "
                             "-> loss tensor")
        self.loss_fn = loss_fn

        self._averages = MetricAverages(self.metrics, loss_key, self.window)
        self._gain = GainStatistics(self.gain_window, self.gain_batches)
        self._plateau = PlateauTest(self.plateau, patience=self.patience, cooldown=self.cooldown,
                                    gain_tol=self.gain_tol, grad_tol=self.grad_tol, decay_factor=self.decay_factor,
                                    min_lr=self.min_lr)
        self._phase_lr: float | None = None
        # transient per-step state (not checkpointed: it never outlives a batch)
        self._step_at_start = -1
        self._rng_at_start: RngState | None = None
        self._pending_gn: Tensor | None = None
        self._warned: set[str] = set()
        self._state_key = self._generate_state_key(metrics=self.metrics, window=self.window,
                                                   gain_every=self.gain_every)

    # ------------------------------------------------------------------ public read-outs

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def events(self) -> list[dict[str, Any]]:
        """The plateaus found: step, gain interval, gradient-norm levels, lr before and after."""
        return self._plateau.events

    def time_averages(self) -> dict[str, float]:
        """Local Cesàro averages μ_k(φ) of the tracked metrics seen so far in this phase (host sync)."""
        return self._averages.local("cesaro")

    def window_averages(self) -> dict[str, float]:
        """Local averages over the last ``window`` steps (host sync)."""
        return self._averages.local("window")

    def gain_statistics(self) -> dict[str, float]:
        """Rank-averaged gain statistics: Cesàro ``mean`` of the phase, ``window_mean`` with its interval
        ``lo``/``hi``, sample counts, and the windowed / phase-average gradient norm used by the plateau
        test."""
        return self._gain.statistics()

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._averages.to(pl_module.device)
        if trainer.lr_scheduler_configs:
            if self.plateau == "decay_lr":
                warn_once(self._warned, "sched",
                          "TimeAverageMonitor(plateau='decay_lr') runs alongside an LR scheduler: at a plateau it "
                          "multiplies every param group's lr and each scheduler's base_lrs by decay_factor; "
                          "chainable (StepLR, ExponentialLR, ReduceLROnPlateau) and base_lrs-based (LambdaLR, "
                          "CosineAnnealingLR) schedulers keep the decay, OneCycleLR/CyclicLR overwrite it.")
            if self.reset_on_lr_change and any(c.interval == "step" for c in trainer.lr_scheduler_configs):
                warn_once(self._warned, "step_sched",
                          "TimeAverageMonitor(reset_on_lr_change=True) with a per-step LR scheduler restarts the "
                          "time averages at every lr change; consider reset_on_lr_change=False.")
        if self.gain_every and not pl_module.automatic_optimization and self.loss_fn is None:
            warn_once(self._warned, "manual", "TimeAverageMonitor: manual optimisation without loss_fn, the "
                      "per-step gain (and the plateau test) is skipped.")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._averages.to(pl_module.device)
        lr = current_lr(trainer)
        if self._phase_lr is None:
            self._phase_lr = lr
        elif lr != self._phase_lr:
            self._phase_lr = lr
            if self.reset_on_lr_change:
                self._reset_phase()
        self._step_at_start = trainer.global_step
        self._pending_gn = None
        # the re-evaluation after the step replays the step's randomness (dropout masks, input noise)
        self._rng_at_start = RngState.capture() if self._gain_due(trainer.global_step + 1) else None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._gain_due(trainer.global_step + 1):
            return
        self._pending_gn = grad_norm(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._step_at_start:  # accumulation micro-batch or skipped step
            return
        self._averages.update(trainer, outputs)
        if self._gain_due(trainer.global_step):
            self._gain_step(trainer, pl_module, outputs, batch, batch_idx)
        if logs_this_step(trainer):  # Lightning's cadence (not should_stop, which may differ by rank)
            self._log(trainer)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "metrics": list(self.metrics), **self._averages.state_dict(), "phase_lr": self._phase_lr,
                **self._gain.state_dict(), **self._plateau.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["metrics"]) != list(self.metrics):
            raise ValueError(f"TimeAverageMonitor checkpoint tracks metrics {state_dict['metrics']}, this "
                             f"monitor tracks {list(self.metrics)}")
        self._averages.load_state_dict(state_dict)
        lr = state_dict["phase_lr"]
        self._phase_lr = None if lr is None else float(lr)
        self._gain.load_state_dict(state_dict)
        self._plateau.load_state_dict(state_dict)

    # ------------------------------------------------------------------ internals

    def _gain_due(self, step: int) -> bool:
        return self.gain_every > 0 and step > 0 and step % self.gain_every == 0

    def _reset_phase(self) -> None:
        self._averages.reset()
        self._gain.reset_phase()
        self._plateau.rearm()

    def _gain_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int) -> None:
        can_eval = pl_module.automatic_optimization or self.loss_fn is not None
        before = returned_loss(trainer, outputs) if can_eval else None
        g, n = measure_gain(trainer, pl_module, batch, batch_idx, before=before, rng=self._rng_at_start,
                            step_grad_norm=self._pending_gn, loss_fn=self.loss_fn)
        self._pending_gn = None
        if self._gain.add(g, n, self.confidence) and self.plateau != "off":
            self._plateau.check(trainer, self._gain)

    def _log(self, trainer: pl.Trainer) -> None:
        """The rank-averaged (NaN-aware) time and window averages, the gain statistics and the plateau flag."""
        out = self._averages.metrics()
        if self.gain_every:
            out |= self._gain.metrics()
        if self.plateau != "off":
            out["plateau/detected"] = self._plateau.take_detected()
        log_scalars(trainer, out)
