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
from typing import Any, Callable, TypeVar

from .errors import ConfigError

__all__ = ["argparse_type", "count", "number"]

T = TypeVar("T")


def number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_minimum: bool = True,
    example: str = "1",
) -> float:
    """A finite real number (a bool is not one) within ``[minimum, maximum]``; with
    ``allow_minimum=False`` the minimum itself is refused (``minimum=0`` then means "> 0")."""
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


def argparse_type(check: Callable[..., T], name: str, **bounds: Any) -> Callable[[str], T]:
    """``check`` as an argparse ``type=``: the same message, reported as a usage error."""

    def parse(text: str) -> T:
        try:
            return check(text, name, **bounds)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse
