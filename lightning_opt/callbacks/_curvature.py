"""SharpnessMonitor's measurement on one probe batch: λ_max and λ_min by Lanczos on Hessian-vector products, the
gradient, and the local smoothness along the last update; then the reduction over ranks (sources and the meaning of
every value in :mod:`lightning_opt.callbacks.sharpness`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_opt._tensors import LOW_PRECISION, flatten, unflatten_into
from lightning_opt.callbacks._common import collective_device
from lightning_opt.callbacks._probe import step_loss
from lightning_opt.distributed.buckets import all_reduce_flat, is_dist
from lightning_opt.distributed.scalars import all_gather_vector, rank, world_size
from lightning_opt.stats.hvp import HessianVectorProduct
from lightning_opt.stats.lanczos import lanczos_extreme_eigs
from lightning_opt.stats.smoothness import directional_curvature, local_smoothness

__all__ = ["CurvatureResult", "FixedProbe", "all_agree", "clone_batch", "mean_over_ranks", "measure_on_rank",
           "probe_batch_loss", "resolve_mode", "set_probe_modes", "time_products"]

LossOf = Callable[[nn.Module], Tensor]


@dataclass
class CurvatureResult:
    """One measurement (one rank's, or the mean over ranks). NaN: not measured (e.g. a non-finite product)."""

    lambda_max: float = math.nan
    lambda_min: float = math.nan
    grad_norm: float = math.nan
    smoothness: float = math.nan  #: ‖∇f(x_{t+1}) − ∇f(x_t)‖/‖d‖ along the last update d
    smoothness_dHd: float = math.nan  #: dᵀ∇²f(x_{t+1})d/‖d‖²
    probe_loss: float = math.nan
    matvecs: float = 0.0  #: Hessian-vector products used
    converged: float = 0.0  #: 1.0 when Lanczos met ``tol`` (on every rank, for a mean over ranks)

    def reduced(self, mode: str, device: torch.device) -> tuple[CurvatureResult, dict[str, float]]:
        """The mean over ranks (one all-gather; ``converged`` only if every rank converged) and, in ``"local"``
        mode, the rank extremes ``lambda_max_rank_max`` / ``lambda_min_rank_min``. Every rank must call it."""
        local = torch.tensor(astuple(self), dtype=torch.float64)
        gathered = all_gather_vector(local.to(device)).to("cpu", torch.float64)
        names = [f.name for f in fields(self)]
        mean = dict(zip(names, gathered.mean(0).tolist(), strict=True))
        column = dict(zip(names, gathered.T, strict=True))
        mean["converged"] = float(column["converged"].min())
        extremes = {}
        if mode == "local":
            extremes = {"lambda_max_rank_max": float(column["lambda_max"].max()),
                        "lambda_min_rank_min": float(column["lambda_min"].min())}
        return CurvatureResult(**mean), extremes

    def as_floats(self) -> CurvatureResult:
        """The same values, each a Python float (what a reduction returns)."""
        return CurvatureResult(*(float(v) for v in astuple(self)))


# ------------------------------------------------------------------------------------------ probe setting


def resolve_mode(requested: str, params: list[Tensor]) -> str:
    """``"global"`` / ``"local"`` as requested; ``"auto"``: global when the weights are identical on every rank
    (one all-gather of three checksums). Without a process group: global."""
    if not is_dist():
        return "global"
    if requested != "auto":
        return requested
    flat = flatten(params, torch.float64)
    sig = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()])
    gathered = all_gather_vector(sig)
    return "global" if bool((gathered == gathered[0]).all()) else "local"


def mean_over_ranks(v: Tensor) -> Tensor:
    (_, flat), = all_reduce_flat([v])  # one tensor: one bucket
    return flat.view_as(v) / world_size()


def all_agree(done: bool) -> bool:
    """Whether ``done`` holds on every rank (Lanczos stops together in global mode)."""
    flags = all_gather_vector(torch.tensor([float(done)], device=collective_device()))
    return bool(flags.min() > 0)


def set_probe_modes(module: nn.Module, bn_mode: str, dropout_mode: str, *, local_ddp: bool,
                    warn: Callable[[str, str], None]) -> None:
    """Batch-norm and dropout layers in the requested modes (a :class:`TrajectoryGuard` restores them)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            train = bn_mode == "train"
            if train and local_ddp and isinstance(m, nn.SyncBatchNorm):
                warn("syncbn", "SharpnessMonitor: SyncBatchNorm probed in eval mode in 'local' DDP mode (its "
                     "collectives would deadlock)")
                train = False
            m.training = train
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.training = dropout_mode == "train"


# ------------------------------------------------------------------------------------------ measurement


def _smoothness(out: CurvatureResult, op: HessianVectorProduct, module: nn.Module, loss_of: LossOf,
                reset: Callable[[], None], grad: Tensor, prev: Tensor,
                reduce: Callable[[Tensor], Tensor] | None) -> None:
    """``out.smoothness`` = ‖∇f(x) − ∇f(x_prev)‖/‖d‖ and ``out.smoothness_dHd`` = dᵀ∇²f(x)d/‖d‖² along
    d = x − x_prev (one product, counted; ``op`` is released). The weights are set to x_prev for one gradient
    and put back bitwise."""
    params = op.params
    d = flatten(params, op.dtype) - prev
    out.smoothness_dHd = directional_curvature(op, d)
    out.matvecs += 1
    op.release()
    saved = [p.detach().clone() for p in params]
    try:
        unflatten_into(prev, params)
        reset()
        g_prev = HessianVectorProduct(module, loss_of, method="func", reduce=reduce, dtype=op.dtype).gradient()
    finally:
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    out.smoothness = local_smoothness(grad, g_prev, d)


def measure_on_rank(module: nn.Module, loss_of: LossOf, reset: Callable[[], None], *, method: str,
                    reduce: Callable[[Tensor], Tensor] | None, dtype: torch.dtype, max_iter: int, tol: float,
                    v0: Tensor | None, generator: torch.Generator, stop_reducer: Callable[[bool], bool] | None,
                    prev_params: Tensor | None) -> tuple[CurvatureResult, Tensor | None, FloatingPointError | None]:
    """This rank's measurement at ``module``'s weights, run inside a :class:`TrajectoryGuard` whose ``reset``
    is called before every fresh forward. Returns the result (what was measured before a non-finite product
    stopped it, NaN after), the Ritz vectors for the next warm start (None if Lanczos did not finish) and that
    error (None when all went well)."""
    out, ritz = CurvatureResult(), None
    try:
        reset()
        op = HessianVectorProduct(module, loss_of, method=method, reduce=reduce, dtype=dtype)
        if v0 is not None and v0.shape[-1] != op.dim:
            v0 = None
        device = op.device
        res = lanczos_extreme_eigs(op, op.dim, max_iter=max_iter, tol=tol,
                                   v0=None if v0 is None else v0.to(device=device, dtype=dtype),
                                   device=device, dtype=dtype, generator=generator, stop_reducer=stop_reducer)
        out.lambda_max, out.lambda_min = res.lambda_max, res.lambda_min
        out.matvecs, out.converged = res.n_matvec, float(res.converged)
        ritz = res.ritz_vectors.detach()
        grad = op.gradient()
        out.grad_norm = float(torch.linalg.vector_norm(grad))
        out.probe_loss = op.loss
        if prev_params is not None and prev_params.numel() == op.dim:
            _smoothness(out, op, module, loss_of, reset, grad, prev_params.to(device=device, dtype=dtype), reduce)
        op.release()
    except FloatingPointError as err:
        return out, ritz, err
    return out, ritz, None


def time_products(module: nn.Module, loss_of: LossOf, reset: Callable[[], None], *, method: str,
                  reduce: Callable[[Tensor], Tensor] | None, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds to build the operator (one gradient) and for one warm product, on ``loss_of``'s batch."""
    reset()
    t = time.perf_counter()
    op = HessianVectorProduct(module, loss_of, method=method, reduce=reduce, dtype=dtype)
    op.gradient()
    build = time.perf_counter() - t
    v = torch.full((op.dim,), op.dim ** -0.5, device=op.device, dtype=dtype)
    product = math.nan
    for _ in range(2):  # the first product through a fresh graph is slower: time the second
        t = time.perf_counter()
        op(v)
        product = time.perf_counter() - t
    op.release()
    return build, product


def probe_batch_loss(module: nn.Module, batch: Any, loss_fn: Callable[[Any, Any], Any] | None) -> LossOf:
    """``module ↦`` the probe loss on ``batch``: ``loss_fn(module, batch)`` or ``training_step(batch, 0)`` (its
    ``"loss"`` entry for a dict), in float32 or wider."""
    def loss_of(_module: nn.Module) -> Tensor:
        out = loss_fn(module, batch) if loss_fn is not None else module.training_step(batch, 0)
        loss = step_loss(out)
        if loss is None:
            raise ValueError(f"SharpnessMonitor: the probe loss must be a scalar tensor, got {type(out)}")
        return loss.float() if loss.dtype in LOW_PRECISION else loss

    return loss_of


# ------------------------------------------------------------------------------------------ the probe batch


def clone_batch(batch: Any, device: torch.device | None = None) -> Any:
    """A detached copy of every tensor in ``batch`` (on ``device`` if given)."""
    def f(t: Tensor) -> Tensor:
        t = t.detach()
        return t.to(device, copy=True) if device is not None else t.clone()

    return apply_to_collection(batch, Tensor, f)


class FixedProbe:
    """``probe="fixed"``: the first training batch this rank sees (``batch``), kept for the whole run; checkpoints
    can hold every rank's (gathered), and each rank takes its own back on resume (``loaded`` until then)."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.loaded: list[Any] | None = None

    def take(self, batch: Any, module: nn.Module) -> Any:
        """The fixed batch: from the checkpoint if one was loaded, else a copy of ``batch``."""
        if self.batch is None:
            self.batch = self.take_loaded(module)
            if self.batch is None:
                self.batch = clone_batch(batch)
        return self.batch

    def take_loaded(self, module: nn.Module) -> Any:
        """This rank's batch from the loaded checkpoint (rank 0's if it had none), on ``module``'s device."""
        if self.loaded is None:
            return None
        probes, self.loaded = self.loaded, None
        r = rank() if is_dist() else 0
        batch = probes[r] if r < len(probes) else probes[0]
        return move_data_to_device(batch, next(module.parameters()).device)

    def gathered(self) -> list[Any] | None:
        """Every rank's batch (CPU copies) for a checkpoint: a collective when a process group is up."""
        if self.batch is None and self.loaded is None:
            return None
        mine = None if self.batch is None else clone_batch(self.batch, torch.device("cpu"))
        if is_dist():
            gathered: list[Any] = [None] * world_size()
            dist.all_gather_object(gathered, mine)
            return gathered
        return [mine] if mine is not None else self.loaded

    def load(self, probes: list[Any] | None) -> None:
        if probes is not None and any(p is not None for p in probes):
            first = next(q for q in probes if q is not None)
            self.loaded = [p if p is not None else first for p in probes]
            self.batch = None
