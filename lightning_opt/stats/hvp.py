"""Hessian-vector products of a scalar loss with respect to a module's trainable parameters (pure torch).

The Hessian here is ∇²L(θ) of thesis eq. (6.2) (the loss of one probe batch); its extreme eigenvalues are the
sharpness λ_max and the negative curvature λ_min. The operator works on *flat* vectors over the trainable
parameters (in ``module.parameters()`` order, ``requires_grad=True`` only), which is the interface
:func:`~lightning_opt.stats.lanczos.lanczos_extreme_eigs` consumes.

Two methods:

* ``"double_backward"`` (default, Pearlmutter's trick by reverse-over-reverse): one forward and one backward
  with ``create_graph=True`` when the operator is built; each product is then one more backward through the
  retained graph, ``Hv = ∂(∇L·v)/∂θ``. The forward runs once, so dropout masks and batch-norm batch statistics
  are the same for every product (the operator is a fixed symmetric matrix, as Lanczos requires) and running
  statistics are updated at most once.
* ``"func"`` (forward-over-reverse with ``torch.func.jvp`` of ``torch.func.grad`` through
  ``torch.func.functional_call``): nothing is retained between products, each product re-runs the forward.
  Needs a deterministic forward (dropout off) and batch norm in eval mode (``torch.func`` refuses in-place
  running-stat updates).

``.grad`` fields are never touched (``torch.autograd.grad`` with explicit inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_opt._tensors import flatten
from lightning_opt._validation import check_choice, invalid

__all__ = ["HessianVectorProduct", "flat_to_tensors", "flatten_tensors", "trainable_named_parameters"]

_METHODS = ("double_backward", "func")


def _twice_differentiable():
    """Route scaled-dot-product attention to its math kernel: the fused (flash / memory-efficient) kernels have no
    double backward, so an HVP through an attention model would fail with them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad`` (shared parameters once)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


flatten_tensors = flatten  # the name this module has always exported


def flat_to_tensors(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped (and cast) like ``like``."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[offset:offset + n].view_as(t).to(t.dtype))
        offset += n
    if offset != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} entries, the tensors hold {offset}")
    return out


class _Call(nn.Module):
    """Wrapper so that ``torch.func.functional_call`` can re-parametrise ``inner`` while running
    ``fn(inner)``."""

    def __init__(self, inner: nn.Module, fn: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self._fn = fn

    def forward(self) -> Tensor:
        return self._fn(self.inner)


class HessianVectorProduct:
    """``v ↦ ∇²L(θ) v`` on flat vectors, for ``L = loss_fn(module)`` at the module's current parameters.

    Args:
        module: the *unwrapped* model (not a ``DistributedDataParallel`` wrapper).
        loss_fn: ``module ↦ scalar loss`` on a fixed batch (it is called once for ``"double_backward"``, once
            per product for ``"func"``).
        method: ``"double_backward"`` or ``"func"`` (see the module docstring).
        reduce: optional map applied to every product and to the gradient, e.g. a mean over ranks so that the
            operator is the Hessian of the global-batch loss.
        dtype: dtype of the flat vectors (default: float32 or the parameters' dtype if wider).

    Attributes: ``dim``, ``device``, ``dtype``, ``n_matvec`` (products computed), ``loss`` (float) and
    :meth:`gradient` (flat ∇L at the current parameters).
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[nn.Module], Tensor],
        *,
        method: str = "double_backward",
        reduce: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise invalid("module", type(module).__name__, "an nn.Module")
        if not callable(loss_fn):
            raise invalid("loss_fn", loss_fn, "a callable (module -> scalar loss)")
        check_choice("method", method, _METHODS)
        named = trainable_named_parameters(module)
        if not named:
            raise ValueError("`module` has no trainable parameters (requires_grad=True)")
        self.module = module
        self.loss_fn = loss_fn
        self.method = method
        self.reduce = reduce
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        if dtype is None:
            dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        self.dtype = dtype
        self.n_matvec = 0
        self.loss = float("nan")
        self._grads: list[Tensor | None] | None = None
        self._flat_grad: Tensor | None = None
        if method == "double_backward":
            self._build_graph()

    # ------------------------------------------------------------------ construction
    def _build_graph(self) -> None:
        with torch.enable_grad(), _twice_differentiable():
            loss = self.loss_fn(self.module)
            self._check_loss(loss)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.loss = float(loss.detach())
        self._grads = list(grads)
        self._flat_grad = self._reduce(self._flatten_maybe_none(grads))

    @staticmethod
    def _check_loss(loss) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
                             f"{tuple(getattr(loss, 'shape', ()))}")
        if not loss.requires_grad:
            raise ValueError("`loss_fn` returned a loss that does not require grad "
                             "(is it computed under no_grad?)")

    def _reduce(self, v: Tensor) -> Tensor:
        return v if self.reduce is None else self.reduce(v)

    def _flatten_maybe_none(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return torch.cat([
            (torch.zeros(p.numel(), device=self.device, dtype=self.dtype) if t is None
             else t.detach().reshape(-1).to(self.dtype))
            for t, p in zip(tensors, self.params, strict=True)
        ])

    # ------------------------------------------------------------------ public
    def gradient(self) -> Tensor:
        """Flat ∇L at the current parameters (after ``reduce``)."""
        if self._flat_grad is None:
            with torch.enable_grad():
                loss = self.loss_fn(self.module)
                self._check_loss(loss)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            self.loss = float(loss.detach())
            self._flat_grad = self._reduce(self._flatten_maybe_none(grads))
        return self._flat_grad

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``v`` of length ``dim``."""
        if v.numel() != self.dim:
            raise ValueError(f"vector has {v.numel()} entries, expected dim={self.dim}")
        parts = flat_to_tensors(v.detach().reshape(-1), self.params)
        if self.method == "double_backward":
            hv = self._hvp_double_backward(parts)
        else:
            hv = self._hvp_func(parts)
        self.n_matvec += 1
        return self._reduce(hv)

    def release(self) -> None:
        """Free the retained graph (the operator can no longer be applied with ``"double_backward"``)."""
        self._grads = None

    # ------------------------------------------------------------------ products
    def _hvp_double_backward(self, parts: list[Tensor]) -> Tensor:
        if self._grads is None:
            raise RuntimeError("HessianVectorProduct was released")
        idx = [i for i, g in enumerate(self._grads) if g is not None and g.requires_grad]
        out: list[Tensor | None] = [None] * len(self.params)
        if idx:
            with torch.enable_grad():
                res = torch.autograd.grad([self._grads[i] for i in idx], self.params,
                                          grad_outputs=[parts[i] for i in idx], retain_graph=True,
                                          allow_unused=True)
            out = list(res)
        return self._flatten_maybe_none(out)

    def _hvp_func(self, parts: list[Tensor]) -> Tensor:
        from torch.func import functional_call, grad, jvp

        wrapper = _Call(self.module, self.loss_fn)
        names = ["inner." + n for n in self.names]

        def loss_of(params: tuple[Tensor, ...]) -> Tensor:
            return functional_call(wrapper, dict(zip(names, params, strict=True)), (), strict=False)

        primals = tuple(p.detach() for p in self.params)
        with torch.enable_grad(), _twice_differentiable():
            _, hv = jvp(grad(loss_of), (primals,), (tuple(parts),))
        return self._flatten_maybe_none(list(hv))
