"""TensorBoard dashboard: a custom-scalars layout that groups what the strategies and monitors log.

``DashboardCallback`` writes the layout once (rank 0) into the run's TensorBoard event file, so the
"Custom Scalars" tab shows Optimization, Clipping, Curvature (λ_max on the same chart as the 2/lr edge of
stability), Noise, Time averages and Communication. ``dashboard_layout()`` returns the layout for use with any
``SummaryWriter.add_custom_scalars``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_opt._ownership import RankLocal
from lightning_opt._validation import invalid

Layout = dict[str, dict[str, list[Any]]]


def dashboard_layout() -> Layout:
    """Category → chart title → ``["Multiline", [tag regexes]]`` (or ``["Margin", [value, lower, upper]]``)."""
    return {
        "Optimization": {
            "loss": ["Multiline", ["train/loss", "val/loss", r"time_avg/train/loss", r"window_avg/train/loss"]],
            "learning rate": ["Multiline", [r"lr-.*", r"lr"]],
            "gradient norm": ["Multiline", ["grad/norm", "grad/norm_max", r"time_avg/grad/norm"]],
        },
        "Clipping": {
            "pre / post clip norm": ["Multiline", ["grad/grad_norm", "grad/post_clip_norm"]],
            "clip scale and fraction": ["Multiline", ["grad/clip_scale", "grad/clip_fraction"]],
            "skipped non-finite steps": ["Multiline", ["grad/skipped"]],
        },
        "Curvature": {
            "lambda_max vs 2/lr (edge of stability)": ["Multiline", ["curvature/lambda_max", "curvature/two_over_lr"]],
            "lambda_min": ["Multiline", ["curvature/lambda_min"]],
            "ratios": ["Multiline", ["curvature/eos_ratio", "curvature/neg_pos_ratio"]],
            "smoothness": ["Multiline", [r"curvature/smoothness.*", r"curvature/L0", r"curvature/L1"]],
            "monitor cost (share of fit time)": ["Multiline", ["curvature/overhead"]],
        },
        "Noise": {
            "noise norm": ["Multiline", ["noise/norm", "noise/b_simple"]],
            "tail index (coordinates)": ["Margin", ["noise/tail_alpha_coord", "noise/tail_alpha_coord_lo",
                                                    "noise/tail_alpha_coord_hi"]],
            "tail index (samples)": ["Margin", ["noise/tail_alpha_sample", "noise/tail_alpha_sample_lo",
                                                "noise/tail_alpha_sample_hi"]],
            "tail index (Hill)": ["Margin", ["noise/tail_alpha_hill", "noise/tail_alpha_hill_lo",
                                             "noise/tail_alpha_hill_hi"]],
        },
        "Time averages": {
            "Cesàro averages": ["Multiline", [r"time_avg/.*"]],
            # Multiline, not Margin: the interval is only logged once its window has enough gain samples, and a
            # Margin chart refuses tags whose steps differ.
            "per-step gain": ["Multiline", ["time_avg/gain", "time_avg/gain_lo", "time_avg/gain_hi",
                                            "window_avg/gain"]],
            "plateau": ["Multiline", [r"plateau/.*"]],
        },
        "Communication": {
            "bytes (vs DDP)": ["Multiline", ["comm/bytes", "comm/ddp_bytes"]],
            "syncs and period": ["Multiline", ["comm/syncs", "comm/period"]],
            "sync seconds": ["Multiline", ["comm/sync_seconds", "comm/overlap_wait_seconds"]],
            "peak bytes per sync": ["Multiline", ["comm/peak_bytes_per_sync"]],
            "LSGD leader": ["Multiline", ["lsgd/leader", "lsgd/score_spread", "lsgd/leader_score"]],
        },
    }


class DashboardCallback(RankLocal, pl.Callback):
    """Writes :func:`dashboard_layout` into every ``TensorBoardLogger`` of the trainer on rank 0 at fit start."""

    def __init__(self, layout: Layout | None = None) -> None:
        if layout is not None:
            _check_layout(layout)
        self.layout = layout or dashboard_layout()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(self.layout)
                logger.experiment.flush()


def _check_layout(layout: Any) -> None:
    """``ValueError`` (naming ``layout``) unless it is {category: {title: [kind, tags]}} with kind Multiline/Margin."""
    if not isinstance(layout, dict) or not all(isinstance(c, dict) for c in layout.values()):
        raise invalid("layout", layout, "a dict of categories, each a dict of charts")
    for category, charts in layout.items():
        for title, chart in charts.items():
            ok = isinstance(chart, (list, tuple)) and len(chart) == 2 and chart[0] in ("Multiline", "Margin")
            ok = ok and isinstance(chart[1], (list, tuple)) and all(isinstance(t, str) for t in chart[1])
            ok = ok and (chart[0] != "Margin" or len(chart[1]) == 3)
            if not ok:
                raise invalid(f"layout[{category!r}][{title!r}]", chart,
                              "['Multiline', [tags...]] or ['Margin', [value, lower, upper]]")
