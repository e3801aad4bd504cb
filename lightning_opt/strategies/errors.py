"""Errors raised by the strategies (pure Python: one class shared by both Lightning packages' strategies).

:class:`NonFiniteError` is defined next to the consensus that raises it (``distributed/consensus.py``)."""

from lightning_opt.distributed.consensus import NonFiniteError

__all__ = ["NonFiniteError"]
