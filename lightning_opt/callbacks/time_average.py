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

import logging
import math
import random
import sys
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from lightning_opt._ownership import RankLocal
from lightning_opt._trainer_steps import logs_this_step
from lightning_opt.distributed.buckets import is_dist
from lightning_opt.distributed.scalars import all_gather_vector
from lightning_opt.stats.averages import BatchMeansWindow, CesaroAverage, WindowedAverage

__all__ = ["DEFAULT_METRICS", "GAIN_EVERY_DIAGNOSTIC", "GAIN_EVERY_PLATEAU", "PLATEAU_MODES", "TimeAverageMonitor"]

log = logging.getLogger(__name__)

#: Metrics tracked by default besides the training loss (``loss_key``), when the monitors publishing them run:
#: gradient norm (GradNormMonitor), gradient-noise norm (GradientNoiseMonitor), λ_max (SharpnessMonitor).
DEFAULT_METRICS: tuple[str, ...] = ("grad/norm", "noise/norm", "curvature/lambda_max")
PLATEAU_MODES: tuple[str, ...] = ("off", "log", "decay_lr")
#: Default ``gain_every`` with a plateau test (it needs gain samples) and without one (the gain is a diagnostic).
GAIN_EVERY_PLATEAU = 10
GAIN_EVERY_DIAGNOSTIC = 100

LossFn = Callable[["pl.LightningModule", Any], Tensor]


def _bad(name: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"TimeAverageMonitor: {name} must be {accepted}, got {value!r}")


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _bad(name, value, f"an integer in [{lo}, inf)")
    return value


def _check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    accepted = f"a float in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, value, accepted)
    v = float(value)
    if not math.isfinite(v) and not (v == hi == math.inf and not hi_open):
        raise _bad(name, value, accepted)
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        raise _bad(name, value, accepted)
    return v


def _capture_rng(device: torch.device, with_numpy: bool) -> dict[str, Any]:
    """torch CPU (+ the device's CUDA) and python RNG states; numpy's only on request (it costs ~0.1 ms)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    np = sys.modules.get("numpy") if with_numpy else None
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        device, cuda_state = state["cuda"]
        torch.cuda.set_rng_state(cuda_state, device)
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


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
    under ``torch.no_grad`` inside the precision plugin's train-step context with logging muted, the
    module's train/eval mode untouched, the torch (CPU/CUDA) and python RNG states set to what they were at
    the start of the batch — so dropout draws the same mask as in the step — and restored afterwards (numpy's
    global RNG is saved and restored as well), and every buffer (BatchNorm running statistics) restored: the
    training trajectory is unchanged. One extra forward per gain step; nothing else. Steps are optimizer
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
        if not isinstance(loss_key, str) or not loss_key:
            raise _bad("loss_key", loss_key, "a non-empty string")
        if metrics is None:
            names = [loss_key, *DEFAULT_METRICS]
        else:
            if isinstance(metrics, str) or not isinstance(metrics, Sequence):
                raise _bad("metrics", metrics, "None or a sequence of distinct non-empty strings")
            names = list(metrics)
            if any(not isinstance(m, str) or not m for m in names) or len(set(names)) != len(names):
                raise _bad("metrics", metrics, "None or a sequence of distinct non-empty strings")
        self.metrics: tuple[str, ...] = tuple(names)
        self.loss_key = loss_key
        self.window = _check_int("window", window, 1)
        if not isinstance(reset_on_lr_change, bool):
            raise _bad("reset_on_lr_change", reset_on_lr_change, "a bool (True or False)")
        self.reset_on_lr_change = reset_on_lr_change
        if plateau not in PLATEAU_MODES:
            raise _bad("plateau", plateau, f"one of {PLATEAU_MODES}")
        if gain_every is None:
            gain_every = GAIN_EVERY_DIAGNOSTIC if plateau == "off" else GAIN_EVERY_PLATEAU
        self.gain_every = _check_int("gain_every", gain_every, 0)
        self.gain_batches = _check_int("gain_batches", gain_batches, 2)
        self.gain_window = _check_int("gain_window", gain_window, self.gain_batches)
        if plateau != "off" and self.gain_every == 0:
            raise _bad("gain_every", gain_every, f"an integer in [1, inf) when plateau={plateau!r}")
        self.plateau = plateau
        self.decay_factor = _check_float("decay_factor", decay_factor, 0.0, 1.0, lo_open=True, hi_open=True)
        self.confidence = _check_float("confidence", confidence, 0.0, 1.0, lo_open=True, hi_open=True)
        self.patience = _check_int("patience", patience, 1)
        self.cooldown = _check_int("cooldown", cooldown, 0)
        self.gain_tol = _check_float("gain_tol", gain_tol, 0.0, math.inf, lo_open=False, hi_open=True)
        self.grad_tol = _check_float("grad_tol", grad_tol, 0.0, 1.0, lo_open=False, hi_open=False)
        self.min_lr = _check_float("min_lr", min_lr, 0.0, math.inf, lo_open=False, hi_open=True)
        if loss_fn is not None and not callable(loss_fn):
            raise _bad("loss_fn", loss_fn, "None or a callable (pl_module, batch) -> loss tensor")
        self.loss_fn = loss_fn

        m = len(self.metrics)
        self._avg = CesaroAverage(m)
        self._win = WindowedAverage(self.window, m)
        self._gain_win = BatchMeansWindow(self.gain_window, self.gain_batches)
        self._gn_win: deque[float] = deque(maxlen=self.gain_window)
        self._gain_sum = 0.0
        self._gain_n = 0
        self._gn_sum = 0.0
        self._gn_n = 0
        self._gn_run_sum = 0.0
        self._gn_run_n = 0
        self._gain_skipped = 0
        self._phase_lr: float | None = None
        self._consecutive = 0
        self._armed = True
        self._cooldown_left = 0
        self._detected_since_log = False
        self._last_ci: tuple[float, float, float] = (math.nan, math.nan, math.nan)
        self.events: list[dict[str, Any]] = []
        # transient per-step state (not checkpointed: it never outlives a batch)
        self._step_at_start = -1
        self._rng_at_start: dict[str, Any] | None = None
        self._pending_gn: Tensor | None = None
        self._warned: set[str] = set()
        self._nan = torch.full((), math.nan, dtype=torch.float64)
        self._state_key = self._generate_state_key(metrics=self.metrics, window=self.window,
                                                   gain_every=self.gain_every)

    # ------------------------------------------------------------------ public read-outs

    @property
    def state_key(self) -> str:
        return self._state_key

    def time_averages(self) -> dict[str, float]:
        """Local Cesàro averages μ_k(φ) of the tracked metrics seen so far in this phase (host sync)."""
        pairs = zip(self.metrics, self._avg.mean().tolist(), strict=True)
        return {n: v for n, v in pairs if math.isfinite(v)}

    def window_averages(self) -> dict[str, float]:
        """Local averages over the last ``window`` steps (host sync)."""
        pairs = zip(self.metrics, self._win.mean().tolist(), strict=True)
        return {n: v for n, v in pairs if math.isfinite(v)}

    def gain_statistics(self) -> dict[str, float]:
        """Rank-averaged gain statistics: Cesàro ``mean`` of the phase, ``window_mean`` with its interval
        ``lo``/``hi``, sample counts, and the windowed / phase-average gradient norm used by the plateau
        test."""
        mean, lo, hi = self._last_ci
        return {
            "mean": self._gain_sum / self._gain_n if self._gain_n else math.nan,
            "window_mean": mean, "lo": lo, "hi": hi,
            "n": float(self._gain_n), "window_n": float(len(self._gain_win)),
            "grad_norm_window": self._grad_norm_levels()[0],
            "grad_norm_recent": self._grad_norm_levels()[1],
            "grad_norm_phase": self._gn_sum / self._gn_n if self._gn_n else math.nan,
            "grad_norm_run": self._grad_norm_levels()[2],
        }

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_device(pl_module.device)
        if trainer.lr_scheduler_configs:
            if self.plateau == "decay_lr":
                self._warn_once(
                    "sched",
                    "TimeAverageMonitor(plateau='decay_lr') runs alongside an LR scheduler: at a plateau it "
                    "multiplies every param group's lr and each scheduler's base_lrs by decay_factor; "
                    "chainable (StepLR, ExponentialLR, ReduceLROnPlateau) and base_lrs-based (LambdaLR, "
                    "CosineAnnealingLR) schedulers keep the decay, OneCycleLR/CyclicLR overwrite it.")
            if self.reset_on_lr_change and any(c.interval == "step" for c in trainer.lr_scheduler_configs):
                self._warn_once(
                    "step_sched",
                    "TimeAverageMonitor(reset_on_lr_change=True) with a per-step LR scheduler restarts the "
                    "time averages at every lr change; consider reset_on_lr_change=False.")
        if self.gain_every and not pl_module.automatic_optimization and self.loss_fn is None:
            self._warn_once("manual", "TimeAverageMonitor: manual optimisation without loss_fn, the per-step "
                                      "gain (and the plateau test) is skipped.")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._to_device(pl_module.device)
        lr = self._current_lr(trainer)
        if self._phase_lr is None:
            self._phase_lr = lr
        elif lr != self._phase_lr:
            self._phase_lr = lr
            if self.reset_on_lr_change:
                self._reset_phase()
        self._step_at_start = trainer.global_step
        self._pending_gn = None
        self._rng_at_start = None
        if self._gain_due(trainer.global_step + 1):
            self._rng_at_start = _capture_rng(pl_module.device, with_numpy=False)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._gain_due(trainer.global_step + 1):
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return
        dev = grads[0].device
        norms = torch._foreach_norm(grads)
        self._pending_gn = torch.linalg.vector_norm(torch.stack([n.to(dev, torch.float64) for n in norms]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._step_at_start:  # accumulation micro-batch or skipped step
            return
        values = self._metric_values(trainer, pl_module, outputs)
        self._avg.update(values)
        self._win.update(values)
        if self._gain_due(trainer.global_step):
            self._gain_step(trainer, pl_module, outputs, batch, batch_idx)
        if logs_this_step(trainer):  # Lightning's cadence (not should_stop, which may differ by rank)
            self._log(trainer, pl_module)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "metrics": list(self.metrics),
            "avg": self._avg.state_dict(),
            "win": self._win.state_dict(),
            "gain_win": self._gain_win.state_dict(),
            "gn_win": list(self._gn_win),
            "gain_sum": self._gain_sum, "gain_n": self._gain_n, "gain_skipped": self._gain_skipped,
            "gn_sum": self._gn_sum, "gn_n": self._gn_n,
            "gn_run_sum": self._gn_run_sum, "gn_run_n": self._gn_run_n,
            "phase_lr": self._phase_lr,
            "consecutive": self._consecutive, "armed": self._armed, "cooldown_left": self._cooldown_left,
            "detected_since_log": self._detected_since_log,
            "last_ci": list(self._last_ci),
            "events": [dict(e) for e in self.events],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["metrics"]) != list(self.metrics):
            raise ValueError(f"TimeAverageMonitor checkpoint tracks metrics {state_dict['metrics']}, this "
                             f"monitor tracks {list(self.metrics)}")
        self._avg.load_state_dict(state_dict["avg"])
        self._win.load_state_dict(state_dict["win"])
        self._gain_win.load_state_dict(state_dict["gain_win"])
        self._gn_win = deque((float(v) for v in state_dict["gn_win"]), maxlen=self.gain_window)
        self._gain_sum = float(state_dict["gain_sum"])
        self._gain_n = int(state_dict["gain_n"])
        self._gain_skipped = int(state_dict["gain_skipped"])
        self._gn_sum = float(state_dict["gn_sum"])
        self._gn_n = int(state_dict["gn_n"])
        self._gn_run_sum = float(state_dict["gn_run_sum"])
        self._gn_run_n = int(state_dict["gn_run_n"])
        lr = state_dict["phase_lr"]
        self._phase_lr = None if lr is None else float(lr)
        self._consecutive = int(state_dict["consecutive"])
        self._armed = bool(state_dict["armed"])
        self._cooldown_left = int(state_dict["cooldown_left"])
        self._detected_since_log = bool(state_dict["detected_since_log"])
        lo_hi = state_dict["last_ci"]
        self._last_ci = (float(lo_hi[0]), float(lo_hi[1]), float(lo_hi[2]))
        self.events = [dict(e) for e in state_dict["events"]]

    # ------------------------------------------------------------------ internals

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, UserWarning, stacklevel=2)

    def _to_device(self, device: torch.device) -> None:
        if self._avg.device != device:
            self._avg.to(device)
            self._win.to(device)

    @staticmethod
    def _current_lr(trainer: pl.Trainer) -> float:
        if not trainer.optimizers:
            return math.nan
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    def _gain_due(self, step: int) -> bool:
        return self.gain_every > 0 and step > 0 and step % self.gain_every == 0

    def _reset_phase(self) -> None:
        self._avg.reset()
        self._win.reset()
        self._gain_sum, self._gain_n = 0.0, 0
        self._gn_sum, self._gn_n = 0.0, 0
        self._reset_gain_window()

    def _reset_gain_window(self) -> None:
        self._gain_win.reset()
        self._gn_win.clear()
        self._consecutive = 0
        self._armed = True
        self._last_ci = (math.nan, math.nan, math.nan)

    def _loss_from_outputs(self, trainer: pl.Trainer, outputs: Any) -> Tensor | None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return None
        # automatic optimisation divides the returned loss by accumulate_grad_batches
        return loss.detach().reshape(()).to(torch.float64) * trainer.accumulate_grad_batches

    def _metric_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> Tensor:
        """The latest value of every tracked metric as one float64 vector on the device (NaN = absent)."""
        cm = trainer.callback_metrics
        dev, dtype = self._avg.device, self._avg.dtype
        if self._nan.device != dev:
            self._nan = self._nan.to(dev)
        vals: list[Tensor] = []
        for name in self.metrics:
            v = cm.get(name)
            if v is None:
                v = cm.get(f"{name}_step")
            if v is None and name == self.loss_key:
                v = self._loss_from_outputs(trainer, outputs)
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.detach().reshape(())
                vals.append(v if v.device == dev and v.dtype == dtype else v.to(dev, dtype))
            elif isinstance(v, int | float) and not isinstance(v, bool):
                vals.append(torch.tensor(float(v), dtype=dtype, device=dev))
            else:
                vals.append(self._nan)
        if not vals:
            return torch.zeros(0, dtype=dtype, device=dev)
        return torch.stack(vals)

    def _reevaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                    batch_idx: int) -> Tensor | None:
        """L_B(θ_{t+1}) on the step's batch without touching the trajectory (RNG, buffers, mode, logs)."""
        buffers = list(pl_module.buffers())
        saved = [b.detach().clone() for b in buffers]
        rng_now = _capture_rng(pl_module.device, with_numpy=True)
        own = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
        try:
            if self._rng_at_start is not None:
                _restore_rng(self._rng_at_start)
            pl_module.log = _noop  # type: ignore[method-assign]
            pl_module.log_dict = _noop  # type: ignore[method-assign]
            with torch.no_grad(), trainer.strategy.precision_plugin.train_step_context():
                if self.loss_fn is not None:
                    out = self.loss_fn(pl_module, batch)
                else:
                    out = pl_module.training_step(batch, batch_idx)
        finally:
            del pl_module.log
            del pl_module.log_dict
            pl_module.__dict__.update(own)
            _restore_rng(rng_now)
            with torch.no_grad():
                for b, s in zip(buffers, saved, strict=True):
                    b.copy_(s)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return None
        return loss.detach().reshape(()).to(torch.float64)

    def _gain_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int) -> None:
        dev = pl_module.device
        nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
        gain = nan
        can_eval = pl_module.automatic_optimization or self.loss_fn is not None
        before = self._loss_from_outputs(trainer, outputs) if can_eval else None
        if before is not None:
            after = self._reevaluate(trainer, pl_module, batch, batch_idx)
            if after is not None:
                gain = before.to(dev) - after.to(dev)
        gn = self._pending_gn.to(dev) if self._pending_gn is not None else nan
        vec = torch.stack([gain, gn])
        if is_dist():  # every rank reaches this on the same step: one all-gather, same decision everywhere
            vec = all_gather_vector(vec).mean(0)
        g, n = (float(x) for x in vec.tolist())
        self._pending_gn = None
        if not math.isfinite(g):
            self._gain_skipped += 1
            return
        self._gain_sum += g
        self._gain_n += 1
        self._gain_win.update(g)
        if math.isfinite(n):
            self._gn_sum += n
            self._gn_n += 1
            self._gn_run_sum += n
            self._gn_run_n += 1
            self._gn_win.append(n)
        self._last_ci = self._gain_win.ci(self.confidence)
        if self.plateau != "off":
            self._plateau_check(trainer, pl_module)

    def _plateau_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._gain_win.full:
            return
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            return
        mean, lo, hi = self._last_ci
        band = lo <= self.gain_tol and hi >= -self.gain_tol
        gn_win, gn_recent, gn_run = self._grad_norm_levels()
        away = gn_win > 0 and gn_recent >= self.grad_tol * gn_win and gn_win >= self.grad_tol * gn_run
        if not (band and away):
            self._consecutive = 0
            self._armed = True
            return
        self._consecutive += 1
        if self._consecutive < self.patience or not self._armed:
            return
        self._armed = False
        self._detected_since_log = True
        lr_before = self._current_lr(trainer)
        lr_after = lr_before
        if self.plateau == "decay_lr" and lr_before > self.min_lr:
            self._decay_lr(trainer)
            lr_after = self._current_lr(trainer)
            # the gain statistics restart now; the Cesàro averages restart at the next batch if
            # reset_on_lr_change (on_train_batch_start sees the new lr)
            self._reset_gain_window()
            self._cooldown_left = self.cooldown
        event = {"step": int(trainer.global_step), "gain_mean": mean, "gain_lo": lo, "gain_hi": hi,
                 "grad_norm_window": gn_win, "grad_norm_recent": gn_recent, "grad_norm_run": gn_run,
                 "lr_before": lr_before, "lr_after": lr_after}
        self.events.append(event)
        msg = (f"plateau at step {event['step']}: gain CI [{lo:.4g}, {hi:.4g}] (mean {mean:.4g}) meets "
               f"[-{self.gain_tol:.3g}, {self.gain_tol:.3g}] while the gradient norm stays away from 0 "
               f"(window {gn_win:.4g}, last batch {gn_recent:.4g}, run average {gn_run:.4g}); "
               f"lr {lr_before:.4g} -> {lr_after:.4g}")
        if trainer.is_global_zero:
            log.info(msg)
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_text("plateau/event", msg, global_step=trainer.global_step)

    def _grad_norm_levels(self) -> tuple[float, float, float]:
        """Gradient norm averaged over the gain window, over its last batch, and over the whole run."""
        if not self._gn_win:
            return math.nan, math.nan, math.nan
        vals = list(self._gn_win)
        m = max(1, len(vals) // self.gain_batches)
        win = math.fsum(vals) / len(vals)
        recent = math.fsum(vals[-m:]) / m
        run = self._gn_run_sum / self._gn_run_n if self._gn_run_n else math.nan
        return win, recent, run

    def _decay_lr(self, trainer: pl.Trainer) -> None:
        """lr ← max(lr · decay_factor, min_lr) in every param group, and the same for schedulers' base_lrs."""
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = max(float(group["lr"]) * self.decay_factor, self.min_lr)
        for cfg in trainer.lr_scheduler_configs:
            base = getattr(cfg.scheduler, "base_lrs", None)
            if isinstance(base, list):
                cfg.scheduler.base_lrs = [max(float(b) * self.decay_factor, self.min_lr) for b in base]

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        vals = torch.cat([self._avg.mean(), self._win.mean()])
        if is_dist():
            vals = torch.nanmean(all_gather_vector(vals), dim=0)
        host = vals.tolist()
        m = len(self.metrics)
        out: dict[str, float] = {}
        for i, name in enumerate(self.metrics):
            if math.isfinite(host[i]):
                out[f"time_avg/{name}"] = host[i]
            if math.isfinite(host[m + i]):
                out[f"window_avg/{name}"] = host[m + i]
        if self.gain_every and self._gain_n:
            out["time_avg/gain"] = self._gain_sum / self._gain_n
            mean, lo, hi = self._last_ci
            if math.isfinite(mean):
                out["window_avg/gain"] = mean
            if math.isfinite(lo) and math.isfinite(hi):
                out["time_avg/gain_lo"] = lo
                out["time_avg/gain_hi"] = hi
        if self.plateau != "off":
            out["plateau/detected"] = 1.0 if self._detected_since_log else 0.0
            self._detected_since_log = False
        for key, value in out.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
