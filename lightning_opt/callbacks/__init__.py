"""Lightning callbacks that log optimisation dynamics to TensorBoard (built on ``lightning_opt.stats``)."""

from lightning_opt.callbacks.grad_norm import GradNormMonitor
from lightning_opt.callbacks.gradient_noise import GradientNoiseMonitor
from lightning_opt.callbacks.progress import ProgressBarMetrics
from lightning_opt.callbacks.random_iterate import RandomIterate
from lightning_opt.callbacks.sharpness import CURVATURE_ATTR, SharpnessMonitor
from lightning_opt.callbacks.time_average import TimeAverageMonitor

__all__ = [
    "CURVATURE_ATTR",
    "GradNormMonitor",
    "GradientNoiseMonitor",
    "ProgressBarMetrics",
    "RandomIterate",
    "SharpnessMonitor",
    "TimeAverageMonitor",
]
