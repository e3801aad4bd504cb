"""Argument validation shared by the strategies: every error names the argument, the value and the range."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from lightning_opt._validation import check_bool, check_choice, check_float, check_int

__all__ = ["as_timeout", "check_bool", "check_choice", "check_float", "check_int"]


def as_timeout(value: Any) -> timedelta:
    """Collective timeout: a ``timedelta`` or seconds (> 0)."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    else:
        seconds = value
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds)
            or not 0 < seconds <= 1e8):
        raise ValueError(f"`timeout` must be a timedelta or seconds in (0, 1e8], got {value!r}")
    return timedelta(seconds=float(seconds))
