"""Optimizers (pure torch): clipped SGD (GClip / CClip), normalised SGD, ACClip, Stochastic INGD."""

from lightning_opt.optim._base import NonFiniteGradientError
from lightning_opt.optim.acclip import ACClip
from lightning_opt.optim.clipped_sgd import ClippedSGD
from lightning_opt.optim.ingd import StochasticINGD
from lightning_opt.optim.normalized_sgd import NormalizedSGD

__all__ = ["ACClip", "ClippedSGD", "NonFiniteGradientError", "NormalizedSGD", "StochasticINGD"]
