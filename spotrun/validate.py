"""One checker per kind of value a user hands spotrun (a flag, an environment variable, a
field of a file), so every command refuses the same bad input with the same one line.

Each returns the value in its proper type or raises :class:`~spotrun.errors.ConfigError`
naming ``name`` (the flag or variable as the user wrote it) and an example of a good value.
``argparse_type`` turns any of them into an ``argparse`` ``type=`` that reports through
argparse's own usage error (exit 2).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["argparse_type", "count", "duration", "number", "price"]

T = TypeVar("T")


def number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_minimum: bool = True,
    example: str = "1",
    text: bool = True,
) -> float:
    """A finite real number (a bool is not one) within ``[minimum, maximum]``; with
    ``allow_minimum=False`` the minimum itself is refused (``minimum=0`` then means "> 0").
    ``text=False``: a numeric string is refused too (a typed field checked in place, which
    the caller does not reassign: accepting ``"120"`` there would leave a str behind)."""
    if isinstance(value, str) and not text:
        raise ConfigError(f"{name}={value!r} is text; give it as a number, e.g. {example}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number; use e.g. {example}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is not a number; use e.g. {example}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not a finite number; use e.g. {example}")
    if minimum is not None and (value < minimum or (value == minimum and not allow_minimum)):
        bound = f">= {minimum:g}" if allow_minimum else f"> {minimum:g}"
        raise ConfigError(f"{name}={value:g} must be {bound}; use e.g. {example}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value:g} must be <= {maximum:g}; use e.g. {example}")
    return value


def count(
    value: Any,
    name: str,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    example: str = "1",
) -> int:
    """A whole number (a bool or a float is not one) within ``[minimum, maximum]``."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number; use e.g. {example}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is not a whole number; use e.g. {example}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name}={value} is out of range ({bound}); use e.g. {example}")
    return value


def price(value: Any, name: str, *, allow_zero: bool = False, example: str = "0.35") -> float:
    """A price in USD (per hour, or a total): finite, ``$`` allowed in front, above 0 (a price
    of 0 makes every cost and saving 0, a report of nothing) unless ``allow_zero``."""
    if isinstance(value, str) and value.strip().startswith("$"):
        value = value.strip()[1:]
    try:
        return number(value, name, minimum=0, allow_minimum=allow_zero, example=example)
    except ConfigError as exc:
        if "is not a number" in str(exc):  # not a number at all: say what kind of number
            raise ConfigError(f"{name}={_shown(value)} is not a price in USD; use e.g. {example}") from None
        raise


# 90, 90s, 1.5m, 15min, 2h, 1d, 1h30m: a number with an optional unit, or unit-tagged parts.
_DURATION_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(min|sec|[smhd])")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:min|sec|[smhd]))+")


def duration(
    value: Any,
    name: str,
    *,
    minimum: float = 0.0,
    allow_minimum: bool = True,
    example: str = "90s",
) -> float:
    """Seconds from plain seconds (``90``) or a duration with units (``90s``, ``15m``,
    ``15min``, ``2h``, ``1d``, ``1h30m``): finite, and ``>= minimum`` (``> minimum`` with
    ``allow_minimum=False``)."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if _DURATION.fullmatch(text):
            value = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{name}={_shown(value)} is not a duration; use e.g. {example} "
                                  "(plain seconds, or with s, m, h or d)") from None
    return number(value, name, minimum=minimum, allow_minimum=allow_minimum, example=example)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def argparse_type(check: Callable[..., T], name: str, **bounds: Any) -> Callable[[str], T]:
    """``check`` as an argparse ``type=``: the same message, reported as a usage error."""

    def parse(text: str) -> T:
        try:
            return check(text, name, **bounds)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse
