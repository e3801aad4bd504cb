"""Lightning callbacks that log optimisation dynamics to TensorBoard (built on ``lightning_opt.stats``)."""

from lightning_opt.callbacks.time_average import TimeAverageMonitor

__all__ = ["TimeAverageMonitor"]
