"""Errors raised by the strategies (pure Python: one class shared by both Lightning packages' strategies)."""


class NonFiniteError(RuntimeError):
    """Raised on every rank when some rank holds non-finite values at a synchronisation."""
