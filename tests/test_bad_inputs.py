"""Bad-input sweep (issue 13): every public constructor rejects invalid values with a ``ValueError`` whose message
names the argument.

The public classes are discovered from the ``__all__`` of ``lightning_opt.strategies``, ``lightning_opt.optim``,
``lightning_opt.callbacks`` and ``lightning_opt.examples`` (plus ``lightning_opt.tensorboard.DashboardCallback``):
a new class fails ``test_every_public_class_has_an_entry`` until it gets rows in ``TABLE`` (or a reason in
``EXEMPT``), and a new constructor argument fails ``test_every_constructor_argument_is_covered`` until it gets a
row (or a reason in ``UNCHECKED``). Rows for classes that are not public (yet) are ignored.

This is the one validation table per constructor: a row is ``(kwargs, arg)`` or ``(kwargs, arg, states)``, where
``states`` (a string, or a tuple of strings) is text the message must contain, typically the accepted range or
values; a row with ``states`` also checks that the message repeats the rejected value. Optimizer messages also name
the class (``"ClippedSGD: invalid lr=-0.1; ..."``).
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

import lightning_opt.callbacks
import lightning_opt.examples
import lightning_opt.optim
import lightning_opt.strategies
import lightning_opt.tensorboard

pytestmark = pytest.mark.timeout(400)

NAN, INF = math.nan, math.inf
MODULES = (lightning_opt.strategies, lightning_opt.optim, lightning_opt.callbacks, lightning_opt.examples)


def _public_classes() -> dict[str, type]:
    found = {name: getattr(m, name) for m in MODULES for name in m.__all__ if inspect.isclass(getattr(m, name))}
    found["DashboardCallback"] = lightning_opt.tensorboard.DashboardCallback
    return found


PUBLIC = _public_classes()

EXEMPT = {
    "NonFiniteError": "an exception raised by the strategies, not configured by users",
    "NonFiniteGradientError": "an exception raised by the optimizers, not configured by users",
    "PeriodSchedule": "abstract base of the period schedules; takes no arguments",
}

# Arguments that accept any value by design (checked neither here nor by the constructor).
_LIGHTNING_PLUMBING = {a: "Lightning plumbing, validated by DDPStrategy / the Trainer" for a in (
    "accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin",
    "process_group_backend")}
UNCHECKED: dict[str, dict[str, str]] = {
    "PeriodicSyncStrategy": _LIGHTNING_PLUMBING,
    "DigitsDataModule": {"data_dir": "any path; only read when dataset='cifar10'"},
    "CharDataModule": {"text_path": "a path (None: the standard library's sources); missing files raise OSError"},
    "ImageClassifier": {"pretrained": "not exercised: a non-bool truthy value makes timm try to download weights "
                                      "(see the report of issue 13)"},
}

class Exact(str):
    """``states`` that is the whole accepted-values text: the message must be exactly "invalid arg=value; expected
    <text>", after "<Class>: " for the classes that name themselves (a partial ``states`` only has to appear)."""


_STRATEGY_COMMON = [
    ({"period": 0}, "period"), ({"period": 2.5}, "period", Exact("an int with period >= 1, or a PeriodSchedule")),
    ({"period": "4"}, "period"), ({"period": True}, "period"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"nonfinite": "ignore"}, "nonfinite"), ({"nonfinite": None}, "nonfinite"),
    ({"bucket_cap_mb": 0}, "bucket_cap_mb"), ({"bucket_cap_mb": NAN}, "bucket_cap_mb"),
    ({"bucket_cap_mb": 1000000.5}, "bucket_cap_mb", "bucket_cap_mb in (0, 1e+06]"),
    ({"timeout": 0}, "timeout"), ({"timeout": -5.0}, "timeout"), ({"timeout": NAN}, "timeout"),
    ({"timeout": "60"}, "timeout"), ({"start_method": "thread"}, "start_method"),
]
_AVERAGE_BUFFERS = [({"average_buffers": "yes"}, "average_buffers"), ({"average_buffers": 1}, "average_buffers")]
_OPTIM_COMMON = [
    ({"lr": -0.1}, "lr", "lr >= 0"), ({"lr": NAN}, "lr", "lr >= 0"), ({"lr": INF}, "lr", "lr >= 0"),
    ({"lr": "0.1"}, "lr", "lr >= 0"), ({"weight_decay": -1.0}, "weight_decay", "weight_decay >= 0"),
    ({"maximize": "no"}, "maximize", "True or False"), ({"foreach": "yes"}, "foreach", "True, False or None"),
    ({"nonfinite": "ignore"}, "nonfinite", "'skip', 'raise'"),
]

TABLE: dict[str, list[tuple]] = {
    # ---------------------------------------------------------------- strategies and schedules
    "PeriodicSyncStrategy": _STRATEGY_COMMON + _AVERAGE_BUFFERS,
    "LocalSGDStrategy": _STRATEGY_COMMON + _AVERAGE_BUFFERS + [
        ({"outer_lr": 0.0}, "outer_lr"), ({"outer_lr": -1.0}, "outer_lr"), ({"outer_lr": NAN}, "outer_lr"),
        ({"outer_lr": INF}, "outer_lr"), ({"outer_momentum": 1.0}, "outer_momentum"),
        ({"outer_momentum": -0.1}, "outer_momentum"), ({"outer_nesterov": "yes"}, "outer_nesterov"),
        ({"outer_nesterov": True}, "outer_nesterov",  # Nesterov without momentum
         Exact("False with outer_momentum=0 (Nesterov needs momentum in (0, 1))")),
        ({"outer_lr": 100.5}, "outer_lr", "outer_lr in (0, 100]"),
        ({"fragments": 0}, "fragments"), ({"fragments": 2.0}, "fragments"),
        ({"period": 4, "fragments": 5}, "fragments", "[1, period=4]"),
        ({"overlap_steps": -1}, "overlap_steps"),
        ({"period": 4, "overlap_steps": 4}, "overlap_steps",
         Exact("an int in [0, period=4) (a fragment's outer gradient must arrive before its next sync)")),
        ({"merge_mix": 0.0}, "merge_mix"), ({"merge_mix": 1.5}, "merge_mix"), ({"merge_mix": NAN}, "merge_mix"),
        ({"comm_dtype": "fp8"}, "comm_dtype"), ({"comm_dtype": torch.int8}, "comm_dtype"),
        ({"outer_optimizer": "sgd"}, "outer_optimizer", Exact(
            "None or a callable taking the anchors and returning a torch Optimizer (e.g. "
            "functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True))")),
        ({"outer_optimizer": torch.optim.SGD, "outer_lr": 0.7}, "outer_optimizer",
         Exact("None when outer_lr/outer_momentum/outer_nesterov are set (they are the SGD shorthand for it)")),
        ({"outer_optimizer": torch.optim.SGD, "outer_momentum": 0.5}, "outer_optimizer", "the SGD shorthand"),
        ({"period": lightning_opt.strategies.ConstantHorizon(0.4), "fragments": 2}, "period", Exact(
            "an int with fragments > 1, overlap_steps > 0, comm_dtype other than 'float32' or an outer_optimizer (a "
            "schedule would move the fragments' sync steps)")),
    ],
    "LSGDStrategy": _STRATEGY_COMMON + _AVERAGE_BUFFERS + [
        ({"pull": 0.0}, "pull"), ({"pull": 1.5}, "pull"), ({"pull": NAN}, "pull"),
        ({"global_pull": 0.0}, "global_pull"), ({"global_pull": 2.0}, "global_pull"),
        ({"leader_window": 0}, "leader_window"), ({"leader_window": 2.5}, "leader_window"),
        ({"group_size": 0}, "group_size"), ({"group_size": 1.5}, "group_size"),
        ({"period": 2, "global_period": 3}, "global_period", "a multiple of `period` (2)"),
        ({"period": 2, "global_period": 0}, "global_period"),
        ({"period": lightning_opt.strategies.ConstantHorizon(0.4), "global_period": 16}, "global_period", Exact(
            "None with period=ConstantHorizon(horizon=0.4, max_period=10000): a global period needs a fixed integer "
            "`period` (global pulls happen every global_period / period local syncs)")),
        ({"eval_weights": "best"}, "eval_weights"), ({"score_key": 3}, "score_key", Exact("a non-empty metric name")),
    ],
    "LookaheadStrategy": _STRATEGY_COMMON + _AVERAGE_BUFFERS + [
        ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": NAN}, "alpha"),
        ({"mode": "async"}, "mode"), ({"pullback_momentum": "keep"}, "pullback_momentum"),
        ({"mode": "sync", "fragments": 2}, "mode", Exact("'local' with fragments, overlap_steps, merge_mix or "
                                                         "comm_dtype (mode 'sync' sends gradients every step, not "
                                                         "outer gradients)")),
        ({"mode": "local", "comm_dtype": "int8", "pullback_momentum": "reset"}, "pullback_momentum",
         Exact("'none' with fragments, overlap_steps, merge_mix or comm_dtype")),
        ({"momentum_keys": ("exp_avg", 3)}, "momentum_keys",
         Exact("a non-empty sequence of non-empty optimizer state keys")),
        ({"mode": "local", "outer_optimizer": torch.optim.SGD}, "outer_optimizer", "the outer step is alpha"),
    ],
    "EASGDStrategy": _STRATEGY_COMMON + _AVERAGE_BUFFERS + [
        ({"beta": 0.0}, "beta", "beta in (0, 1]"), ({"beta": 1.5}, "beta", "beta in (0, 1]"),
        ({"beta": -0.1}, "beta", "beta in (0, 1]"), ({"beta": NAN}, "beta", "beta in (0, 1]"),
        ({"beta": "0.4"}, "beta", "beta in (0, 1]"),
    ],
    "ConstantPeriod": [({"period": 0}, "period"), ({"period": 2.5}, "period"), ({"period": True}, "period")],
    "ConstantHorizon": [
        ({"horizon": 0}, "horizon"), ({"horizon": -1.0}, "horizon"), ({"horizon": NAN}, "horizon"),
        ({"horizon": INF}, "horizon"), ({"horizon": "1"}, "horizon"),
        ({"horizon": 1.0, "max_period": 0}, "max_period"), ({"horizon": 1.0, "max_period": True}, "max_period"),
    ],
    "CurvatureAdaptivePeriod": [
        ({"c": 0.0}, "c"), ({"c": INF}, "c"), ({"c": NAN}, "c"), ({"min_period": 0}, "min_period"),
        ({"min_period": 4, "max_period": 2}, "max_period"), ({"max_period": 1.5}, "max_period"),
        ({"min_period": 2, "default_period": 1}, "default_period"),
        ({"max_period": 10, "default_period": 11}, "default_period"),
    ],
    # ---------------------------------------------------------------- optimizers
    "ClippedSGD": _OPTIM_COMMON + [
        ({"max_norm": 0.0}, "max_norm", "max_norm > 0"), ({"max_norm": -1.0}, "max_norm", "max_norm > 0"),
        ({"max_norm": INF}, "max_norm", "max_norm > 0"), ({"momentum": 1.0}, "momentum", "momentum in [0, 1)"),
        ({"momentum": -0.1}, "momentum", "momentum in [0, 1)"), ({"nesterov": True}, "nesterov", "momentum in (0, 1)"),
        ({"nesterov": "yes"}, "nesterov", "True or False"), ({"scope": "layer"}, "scope", "'global', 'coordinate'"),
        ({"clip": "weights"}, "clip", "'gradient', 'momentum'"), ({"clip": "momentum"}, "clip", "scope='coordinate'"),
    ],
    "NormalizedSGD": _OPTIM_COMMON + [
        ({"beta": -1.0}, "beta", "beta >= 0"), ({"beta": NAN}, "beta", "beta >= 0"),
        ({"momentum": 1.0}, "momentum", "momentum in [0, 1)"), ({"nesterov": True}, "nesterov", "momentum in (0, 1)"),
        ({"nesterov": 1}, "nesterov", "True or False"),
    ],
    "ACClip": _OPTIM_COMMON + [
        ({"betas": (0.9,)}, "betas", "pair"), ({"betas": 0.9}, "betas", "pair"),
        ({"betas": (1.0, 0.99)}, "betas", "betas[0] in [0, 1)"),
        ({"betas": (0.9, -0.1)}, "betas", "betas[1] in [0, 1)"),
        ({"alpha": 0.0}, "alpha", "alpha in (0, 2]"), ({"alpha": 2.5}, "alpha", "alpha in (0, 2]"),
        ({"eps": 0.0}, "eps", "eps > 0"), ({"eps": -1e-8}, "eps", "eps > 0"),
        ({"adaptive": "yes"}, "adaptive", "True or False"), ({"adaptive": True, "alpha": 1.0}, "alpha", "alpha=2"),
    ],
    "StochasticINGD": _OPTIM_COMMON + [
        ({"beta": 1.0}, "beta", "beta in [0, 1)"), ({"beta": -0.5}, "beta", "beta in [0, 1)"),
        ({"p": -1.0}, "p", "p >= 0"), ({"q": -1.0}, "q", "q >= 0"), ({"p": 0.0, "q": 0.0}, "p", "p + q > 0"),
        ({"seed": -1}, "seed", "an int with seed >= 0"), ({"seed": 1.5}, "seed", "an int with seed >= 0"),
        ({"seed": True}, "seed", "an int with seed >= 0"),
    ],
    # ---------------------------------------------------------------- callbacks
    "GradNormMonitor": [
        ({"every_n_steps": 0}, "every_n_steps", "expected an int with every_n_steps >= 1"),
        ({"every_n_steps": 1.5}, "every_n_steps", "expected an int with every_n_steps >= 1"),
        ({"every_n_steps": True}, "every_n_steps", "expected an int with every_n_steps >= 1"),
        ({"norm_type": 0.0}, "norm_type", "expected a number with norm_type in (0, inf]"),
        ({"norm_type": -2.0}, "norm_type", "expected a number with norm_type in (0, inf]"),
        ({"norm_type": NAN}, "norm_type", "expected a number with norm_type in (0, inf]"),
        ({"norm_type": "l2"}, "norm_type", "expected a number with norm_type in (0, inf]"),
        ({"per_layer": "yes"}, "per_layer", "expected True or False"),
    ],
    "GradientNoiseMonitor": [
        ({"every_n_steps": 0}, "every_n_steps", "expected an int with every_n_steps >= 1"),
        ({"num_batches": 1}, "num_batches", "expected an int with num_batches >= 2"),
        ({"source": "batch"}, "source", "expected one of 'probe', 'micro'"),
        ({"histogram": "yes"}, "histogram", "expected True or False"),
        ({"histogram": 1}, "histogram", "expected True or False"),
        ({"max_coords": 8}, "max_coords", "expected an int with max_coords >= 16"),
        ({"bootstrap": -1}, "bootstrap", "expected an int with bootstrap >= 0"),
        ({"level": 0.0}, "level", "expected a finite number with level in (0, 1)"),
        ({"level": 1.0}, "level", "expected a finite number with level in (0, 1)"),
        ({"block": 1}, "block", "expected None or an int with block >= 2"),
        ({"sample_block": 1}, "sample_block", "expected None or an int with sample_block >= 2"),
        ({"sample_block": 0}, "sample_block", "expected None or an int with sample_block >= 2"),
        ({"hill_k": 0}, "hill_k", "expected None or an int with hill_k >= 1"),
        ({"batch_size": 0}, "batch_size", "expected None or an int with batch_size >= 1"),
        ({"ema_decay": 1.0}, "ema_decay", "expected a finite number with ema_decay in [0, 1)"),
        ({"ema_decay": -0.1}, "ema_decay", "expected a finite number with ema_decay in [0, 1)"),
        ({"max_alpha": 0.0}, "max_alpha", "expected a number with max_alpha in (0, inf]"),
        ({"seed": -1}, "seed", "expected an int with seed >= 0"),
    ],
    "TimeAverageMonitor": [
        ({"metrics": "train/loss"}, "metrics"), ({"metrics": ["a", "a"]}, "metrics"), ({"metrics": [""]}, "metrics"),
        ({"loss_key": ""}, "loss_key"), ({"loss_key": 3}, "loss_key"), ({"window": 0}, "window"),
        ({"reset_on_lr_change": "yes"}, "reset_on_lr_change"), ({"gain_every": -1}, "gain_every"),
        ({"gain_every": 0, "plateau": "log"}, "gain_every"), ({"gain_batches": 1}, "gain_batches"),
        ({"gain_window": 4, "gain_batches": 5}, "gain_window"), ({"plateau": "warn"}, "plateau"),
        ({"decay_factor": 1.0}, "decay_factor"), ({"decay_factor": 0.0}, "decay_factor"),
        ({"confidence": 1.0}, "confidence"), ({"patience": 0}, "patience"), ({"cooldown": -1}, "cooldown"),
        ({"gain_tol": -1.0}, "gain_tol"), ({"gain_tol": INF}, "gain_tol"), ({"grad_tol": 1.5}, "grad_tol"),
        ({"min_lr": -1.0}, "min_lr"), ({"loss_fn": 3}, "loss_fn"),
    ],
    "SharpnessMonitor": [
        ({"every_n_steps": 0}, "every_n_steps", Exact("an int with every_n_steps >= 1")),
        ({"probe": "random"}, "probe"), ({"max_iter": 1}, "max_iter"),
        ({"tol": 0.0}, "tol"), ({"tol": 1.0}, "tol"), ({"bn_mode": "frozen"}, "bn_mode"),
        ({"smoothness": "yes"}, "smoothness"), ({"dropout_mode": "off"}, "dropout_mode"),
        ({"loss_fn": 3}, "loss_fn"), ({"hvp_method": "finite_differences"}, "hvp_method"),
        ({"hvp_method": "func", "bn_mode": "train"}, "hvp_method"), ({"ddp_mode": "all"}, "ddp_mode"),
        ({"warm_start": "yes"}, "warm_start"), ({"fit_on": "loss"}, "fit_on"), ({"save_probe": 1}, "save_probe"),
        ({"fit_on": "smoothness", "smoothness": False}, "fit_on"), ({"fit_decay": 0.0}, "fit_decay"),
        ({"seed": -1}, "seed"), ({"prefix": ""}, "prefix"), ({"max_overhead": 0.0}, "max_overhead"),
        ({"max_overhead": 1.0}, "max_overhead", Exact("a finite number with max_overhead in (0, 1)")),
        ({"max_overhead": "2%"}, "max_overhead"),
        ({"every_n_steps": 10, "max_overhead": 0.02}, "max_overhead", Exact(
            "None with every_n_steps=10 (max_overhead sets the cost-aware schedule, every_n_steps=None: pass one of "
            "them)")),
    ],
    "RandomIterate": [
        ({"lag": -1}, "lag", "expected an int with lag >= 0"), ({"lag": 1.5}, "lag", "expected an int with lag >= 0"),
        ({"lag": True}, "lag", "expected an int with lag >= 0"),
        ({"seed": -1}, "seed", "expected None or an int with seed >= 0"),
    ],
    "AutoResume": [
        ({"dirpath": ""}, "dirpath", "a non-empty path"), ({"dirpath": 3}, "dirpath", "a non-empty path"),
        ({"dirpath": "run", "every_n_syncs": 0}, "every_n_syncs", "every_n_syncs >= 1"),
        ({"dirpath": "run", "every_n_steps": 0}, "every_n_steps", "None or an int with every_n_steps >= 1"),
        ({"dirpath": "run", "every_n_steps": 2.0}, "every_n_steps"),
        ({"dirpath": "run", "keep": 0}, "keep", "keep >= 1"),
    ],
    "DashboardCallback": [({"layout": []}, "layout"), ({"layout": "default"}, "layout")],
    "ProgressBarMetrics": [({"keys": {"grad/norm": 1}}, "keys"), ({"keys": ["grad/norm"]}, "keys"),
                           ({"show_sync": "yes"}, "show_sync")],
    # ---------------------------------------------------------------- examples
    "ImageClassifier": [
        ({"model_name": "no_such_model"}, "model_name"), ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"), ({"lr": 0.0}, "lr"), ({"lr": NAN}, "lr"),
        ({"momentum": 1.0}, "momentum"), ({"momentum": -0.5}, "momentum"), ({"weight_decay": -1.0}, "weight_decay"),
        ({"in_chans": 0}, "in_chans"),
    ],
    "CharTransformerLM": [
        ({"vocab_size": 1}, "vocab_size"), ({"d_model": 0}, "d_model"), ({"n_layers": 0}, "n_layers"),
        ({"n_heads": 0}, "n_heads"), ({"d_model": 6, "n_heads": 4}, "d_model"), ({"block_size": 0}, "block_size"),
        ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"lr": 0.0}, "lr"), ({"lr": NAN}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
    "DigitsDataModule": [
        ({"batch_size": 0}, "batch_size"), ({"image_size": 4}, "image_size"), ({"image_size": 1024}, "image_size"),
        ({"val_fraction": 0.0}, "val_fraction"), ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": NAN}, "val_fraction"), ({"seed": -1}, "seed"), ({"num_workers": -1}, "num_workers"),
        ({"dataset": "mnist"}, "dataset"),
    ],
    "CharDataModule": [
        ({"block_size": 0}, "block_size"), ({"batch_size": 0}, "batch_size"),
        ({"block_size": 8, "max_chars": 10}, "max_chars"), ({"val_fraction": 1.0}, "val_fraction"),
        ({"seed": -1}, "seed"), ({"samples_per_epoch": 0}, "samples_per_epoch"), ({"num_workers": -1}, "num_workers"),
    ],
}

# Invalid values that are accepted today (or rejected with another exception): product bugs, one row each.
_NO_OVERFLOW = ("_validation.py as_timeout: timedelta(seconds=inf) raises OverflowError, not ValueError; "
                "reject non-finite (and > timedelta.max) seconds")
# Gaps the sweep found and that are now fixed (kept as rows, with the original finding as a note).
FIXED_GAPS: list[tuple[str, dict, str, str]] = [
    ("LocalSGDStrategy", {"timeout": INF}, "timeout", _NO_OVERFLOW),
    ("LSGDStrategy", {"timeout": 1e20}, "timeout", _NO_OVERFLOW),
    ("LookaheadStrategy", {"momentum_keys": ()}, "momentum_keys", "empty key list"),
    ("LookaheadStrategy", {"momentum_keys": ["exp_avg", ""]}, "momentum_keys", "empty key"),
    ("LSGDStrategy", {"score_key": ""}, "score_key",
     "LSGDStrategy: score_key is not validated (an empty or non-string key is accepted and never found in "
     "callback_metrics under manual optimisation)"),
    ("ConstantHorizon", {"horizon": True}, "horizon",
     "ConstantHorizon: a bool horizon is accepted as 1.0 (isinstance(True, int)); ConstantPeriod rejects bools"),
    ("ImageClassifier", {"lr": INF}, "lr", "ImageClassifier: `not lr > 0` accepts lr=inf (and weight_decay=inf)"),
    ("ImageClassifier", {"lr": "0.1"}, "lr",
     "ImageClassifier: a non-numeric lr raises TypeError from the comparison instead of ValueError"),
    ("ImageClassifier", {"in_chans": True}, "in_chans", "ImageClassifier: a bool in_chans is accepted"),
    ("ImageClassifier", {"small_input": "no"}, "small_input", "ImageClassifier: small_input is not validated"),
    ("ImageClassifier", {"model_kwargs": [1]}, "model_kwargs",
     "ImageClassifier: a non-dict model_kwargs fails inside timm.create_model with TypeError"),
    ("CharTransformerLM", {"lr": INF}, "lr", "CharTransformerLM: `not lr > 0` accepts lr=inf"),
    ("CharTransformerLM", {"dropout": "0.1"}, "dropout",
     "CharTransformerLM: a non-numeric dropout raises TypeError from the comparison instead of ValueError"),
    ("CharTransformerLM", {"tie_weights": "yes"}, "tie_weights", "CharTransformerLM: tie_weights is not validated"),
    ("DigitsDataModule", {"download": "yes"}, "download", "DigitsDataModule: download is not validated"),
    ("DigitsDataModule", {"shard": "yes"}, "shard", "DigitsDataModule: shard is not validated"),
    ("CharDataModule", {"shard": "yes", "max_chars": 1000}, "shard", "CharDataModule: shard is not validated"),
    ("DashboardCallback", {"layout": {"Optimization": {"loss": ["Histogram", ["train/loss"]]}}}, "layout",
     "DashboardCallback: only the layout's type is checked; unknown chart kinds (not 'Multiline'/'Margin') and "
     "malformed charts are accepted and only fail in add_custom_scalars at fit start"),
]
for _name, _kwargs, _arg, _ in FIXED_GAPS:
    TABLE.setdefault(_name, []).append((_kwargs, _arg))


def _make(name: str, **kwargs):
    cls = PUBLIC[name]
    if issubclass(cls, torch.optim.Optimizer):
        return cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    return cls(**kwargs)


def _names_the_argument(message: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", message) is not None


def _states_the_value(message: str, arg: str, value) -> bool:
    """``arg=value`` (``_validation``'s "invalid arg=value") or, for one element of a container, ``arg[i]=``."""
    a, v = re.escape(arg), re.escape(repr(value))
    return re.search(rf"(?<![A-Za-z0-9_]){a}={v}(?![A-Za-z0-9_.])|(?<![A-Za-z0-9_]){a}(\[[^\]]*\])+=",
                     message) is not None


def _rows():
    return [pytest.param(name, row[0], row[1], row[2] if len(row) > 2 else None, id=f"{name}-{row[1]}-{i}")
            for name, rows in TABLE.items() if name in PUBLIC for i, row in enumerate(rows)]


def test_every_public_class_has_an_entry():
    missing = sorted(set(PUBLIC) - set(TABLE) - set(EXEMPT))
    assert not missing, f"public classes without rows in tests/test_bad_inputs.py TABLE (or EXEMPT): {missing}"
    assert {"LocalSGDStrategy", "ClippedSGD", "TimeAverageMonitor", "ImageClassifier"} <= set(PUBLIC)


def test_every_constructor_argument_is_covered():
    uncovered = {}
    for name, cls in PUBLIC.items():
        if name in EXEMPT:
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        args = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self", "params"}
        covered = {row[1] for row in TABLE.get(name, [])}
        covered |= set(UNCHECKED.get(name, {}))
        if args - covered:
            uncovered[name] = sorted(args - covered)
    assert not uncovered, f"constructor arguments without an invalid-value row (or UNCHECKED reason): {uncovered}"


@pytest.mark.parametrize("name,kwargs,arg,states", _rows())
def test_invalid_value_raises_value_error_naming_the_argument(name, kwargs, arg, states):
    with pytest.raises(ValueError) as info:
        _make(name, **kwargs)
    message = str(info.value)
    assert _names_the_argument(message, arg), f"{name}({kwargs}) -> {message} does not name `{arg}`"
    owner = f"{name}: " if _names_itself(name) else ""
    assert message.startswith(f"{owner}invalid "), message
    assert _states_the_value(message, arg, kwargs[arg]), f"{name}({kwargs}) -> {message} omits the value"
    assert "; expected " in message, f"{name}({kwargs}) -> {message} does not say what is accepted"
    for text in () if states is None else (states,) if isinstance(states, str) else states:
        assert text in message, f"{name}({kwargs}) -> {message} does not state {text!r}"
    if isinstance(states, Exact):
        assert message == f"{owner}invalid {arg}={kwargs[arg]!r}; expected {states}", message


def _names_itself(name: str) -> bool:
    """The optimizers and callbacks say whose argument was refused ("ClippedSGD: invalid lr=..."): in a training
    script several of them are built side by side; the strategies and examples are one per Trainer."""
    return PUBLIC[name].__module__.startswith(("lightning_opt.optim.", "lightning_opt.callbacks."))


# The accepted side of the boundaries the rows above reject just past (a range check off by one either way fails
# one of the two), and every accepted choice of the choice arguments.
EDGES = [
    ("LocalSGDStrategy", {"outer_lr": 100.0}), ("LocalSGDStrategy", {"period": 4, "fragments": 4}),
    ("LocalSGDStrategy", {"period": 4, "overlap_steps": 3}), ("LocalSGDStrategy", {"bucket_cap_mb": 1e6}),
    ("LocalSGDStrategy", {"bucket_cap_mb": 0.5}),
    *[("LocalSGDStrategy", {"start_method": m}) for m in ("popen", "spawn", "fork", "forkserver")],
    *[("LSGDStrategy", {"eval_weights": m}) for m in ("center", "leader", "local")],
    ("LSGDStrategy", {"leader_window": 1}), ("LSGDStrategy", {"group_size": 1}),
    ("LSGDStrategy", {"period": 1, "global_period": 1}),
    ("ConstantHorizon", {"horizon": 1e-9, "max_period": 1}), ("LookaheadStrategy", {"alpha": 1.0}),
    ("LookaheadStrategy", {"mode": "local", "period": 4, "fragments": 4}),
]


@pytest.mark.parametrize("name,kwargs", EDGES, ids=[f"{n}-{sorted(k.items())}" for n, k in EDGES])
def test_boundary_values_are_accepted(name, kwargs):
    made = _make(name, **kwargs)
    for arg, value in kwargs.items():
        stored = {"period": "schedule", "start_method": "_start_method"}.get(arg, arg)
        kept = getattr(made, stored)
        assert (kept.period if arg == "period" else kept) == value, arg


DEFAULT_REPRS = {
    "PeriodicSyncStrategy": "PeriodicSyncStrategy(period=ConstantPeriod(1), warmup_steps=0)",
    "LocalSGDStrategy": "LocalSGDStrategy(period=ConstantPeriod(1), warmup_steps=0, outer_lr=1.0, outer_momentum=0.0, "
                        "outer_nesterov=False)",
    "EASGDStrategy": "EASGDStrategy(period=ConstantPeriod(1), beta=0.43, warmup_steps=0, nonfinite='raise')",
    "CurvatureAdaptivePeriod": "CurvatureAdaptivePeriod(c=0.5, min_period=1, max_period=1000, default_period=1)",
}


@pytest.mark.parametrize("name", list(DEFAULT_REPRS))
def test_defaults_are_the_documented_ones(name):
    """Every default shows in the repr (LSGD's and Lookahead's are pinned in their rules files)."""
    assert repr(PUBLIC[name]()) == DEFAULT_REPRS[name]


def test_schedule_defaults():
    schedules = lightning_opt.strategies
    assert repr(schedules.ConstantHorizon(0.4)) == "ConstantHorizon(horizon=0.4, max_period=10000)"
    assert schedules.CurvatureAdaptivePeriod(c=0.5).period_for(0.05, -2.0) == 5  # horizon factor 1 by default


def test_lightning_arguments_reach_ddp_strategy_and_the_defaults():
    """The plumbing arguments ``UNCHECKED`` leaves to Lightning arrive where ``DDPStrategy`` keeps them."""
    from datetime import timedelta

    from scripts._common import pl
    from threaded import ThreadRank

    given = {"accelerator": pl.accelerators.CPUAccelerator(), "parallel_devices": [torch.device("cpu")] * 2,
             "cluster_environment": ThreadRank(0, 2), "checkpoint_io": pl.plugins.TorchCheckpointIO(),
             "precision_plugin": pl.plugins.DoublePrecision()}
    made = PUBLIC["LocalSGDStrategy"](process_group_backend="gloo", start_method="spawn", timeout=30, **given)
    for arg, value in given.items():
        assert getattr(made, arg) is value, arg
    assert (made._process_group_backend, made._start_method, made._timeout) == ("gloo", "spawn", timedelta(seconds=30))
    default = PUBLIC["LocalSGDStrategy"]()
    assert (default.bucket_cap_mb, default._timeout, default._start_method) == (25.0, timedelta(seconds=600), "popen")


@pytest.mark.parametrize("name", [n for n, c in PUBLIC.items() if issubclass(c, torch.optim.Optimizer)])
def test_optimizers_validate_param_groups_too(name):
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as info:
        PUBLIC[name]([{"params": [p]}, {"params": [q], "lr": -1.0}])
    assert _names_the_argument(str(info.value), "lr")
    opt = PUBLIC[name]([p])
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [q], "weight_decay": NAN})
    assert _names_the_argument(str(info.value), "weight_decay")
