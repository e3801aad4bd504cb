"""Lightning callbacks that log optimisation dynamics to TensorBoard (built on ``lightning_opt.stats``), and
:class:`AutoResume`, which makes a restarted job resume by itself."""

from lightning_opt.callbacks.auto_resume import AutoResume
from lightning_opt.callbacks.grad_norm import GradNormMonitor
from lightning_opt.callbacks.gradient_noise import GradientNoiseMonitor
from lightning_opt.callbacks.progress import ProgressBarMetrics
from lightning_opt.callbacks.random_iterate import RandomIterate
from lightning_opt.callbacks.sharpness import CURVATURE_ATTR, SharpnessMonitor
from lightning_opt.callbacks.time_average import TimeAverageMonitor

__all__ = [
    "AutoResume",
    "CURVATURE_ATTR",
    "GradNormMonitor",
    "GradientNoiseMonitor",
    "ProgressBarMetrics",
    "RandomIterate",
    "SharpnessMonitor",
    "TimeAverageMonitor",
]
