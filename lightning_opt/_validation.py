"""The argument checks of every public constructor (pure Python; no torch or Lightning imported).

One vocabulary for the whole package: ``check_<kind>(name, value, <range>, *, owner=None)`` returns the accepted
value or raises ``ValueError("<owner>: invalid <name>=<value!r>; expected <what is accepted>")``; the message
names the argument, repeats the rejected value and states the accepted range or values. ``owner`` (the class name)
is given where several classes share argument names (the optimizers' ``lr``).
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta
from typing import Any

__all__ = ["as_timeout", "check_bool", "check_choice", "check_float", "check_int", "invalid"]


def invalid(name: str, value: Any, expected: str, *, owner: str | None = None) -> ValueError:
    """The error for a rejected argument, for checks the `check_*` functions cannot express (raise it)."""
    prefix = f"{owner}: " if owner else ""
    return ValueError(f"{prefix}invalid {name}={value!r}; expected {expected}")


def _num(x: float) -> str:
    return f"{x:g}"


def check_int(name: str, value: Any, low: int, high: int | None = None, *, owner: str | None = None,
              optional: bool = False) -> int | None:
    """An int in ``[low, high]`` (``high=None``: no upper bound); ``optional`` also accepts None."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f"{name} >= {low}" if high is None else f"{name} in [{low}, {high}]"
        raise invalid(name, value, ("None or " if optional else "") + f"an int with {rng}", owner=owner)
    return value


def _interval(name: str, low: float, high: float, low_open: bool, high_open: bool) -> str:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    if high == math.inf and high_open:
        return f"{name} {'>' if low_open else '>='} {_num(low)}"
    return f"{name} in {lo}{_num(low)}, {_num(high)}{hi}"


def _as_real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (a one-element tensor counts, as ``torch.optim`` accepts
    tensor learning rates); None otherwise."""
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars and Fractions count
        return None
    return float(value)


def check_float(name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
                high_open: bool | None = None, owner: str | None = None, optional: bool = False) -> float | None:
    """A real number in the interval from ``low`` to ``high``, each end closed unless ``*_open``.
    ``high_open`` defaults to True for ``high=inf`` (finite numbers only) and False otherwise; ``high=inf`` with
    ``high_open=False`` also accepts ``inf``. NaN is always rejected; ``optional`` also accepts None."""
    if optional and value is None:
        return None
    if high_open is None:
        high_open = high == math.inf
    v = _as_real(value)
    ok = v is not None and not math.isnan(v)
    if ok:
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        kind = "a number" if high == math.inf and not high_open else "a finite number"
        expected = ("None or " if optional else "") + f"{kind} with " + _interval(name, low, high, low_open, high_open)
        raise invalid(name, value, expected, owner=owner)
    return v


def check_choice(name: str, value: Any, choices: tuple[Any, ...], *, owner: str | None = None) -> Any:
    """One of ``choices`` (compared with ``==``)."""
    choices = tuple(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise invalid(name, value, "one of " + ", ".join(map(repr, choices)), owner=owner)
    return value


def check_bool(name: str, value: Any, *, owner: str | None = None, optional: bool = False) -> bool | None:
    """True or False (``optional``: or None)."""
    if optional and value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(name, value, "True, False or None" if optional else "True or False", owner=owner)
    return value


def as_timeout(value: Any) -> timedelta:
    """A collective timeout: a ``timedelta`` or seconds, in (0, 1e8]."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds)
            or not 0 < seconds <= 1e8):
        raise invalid("timeout", value, "a timedelta or seconds in (0, 1e8]")
    return timedelta(seconds=float(seconds))
