"""Pieces both launchers (local simulator and EC2 controller) and ``status`` share."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError
from ..records.layout import DONE_MARKER
from ..storage import Storage
from ..validate import count, number

__all__ = ["MAX_NODES", "MAX_NPROC_PER_NODE", "check_count", "check_number", "cost_report", "is_done",
           "last_checkpoint"]

#: The most nodes of one job, and processes per node, spotrun accepts: far above any real
#: cluster or machine, a bound so that a typo like 10**6 is refused instead of tried.
MAX_NODES = 1024
MAX_NPROC_PER_NODE = 256


def check_count(value: Any, low: int, high: int | None, message: str) -> int:
    """:func:`spotrun.validate.count` (a bool or a float is no count), refused in the
    caller's own words (options, cluster files and flags keep the messages they had)."""
    if isinstance(value, str):  # a field of a file or an option, not a flag's text: "8" is no 8
        raise ConfigError(message)
    try:
        return count(value, "value", minimum=low, maximum=high)
    except ConfigError:
        raise ConfigError(message) from None


def check_number(value: Any, low: float, message: str, *, allow_low: bool = True) -> float:
    """:func:`spotrun.validate.number` (finite, >= ``low``, or > it without ``allow_low``),
    refused in the caller's own words."""
    if isinstance(value, str):  # as in check_count
        raise ConfigError(message)
    try:
        return number(value, "value", minimum=low, allow_minimum=allow_low)
    except ConfigError:
        raise ConfigError(message) from None

log = logging.getLogger(__name__)


def last_checkpoint(storage: Storage) -> int | None:
    """The newest committed checkpoint's step, by number (never listing order).

    Manifests are read but payloads not verified: cheap enough to poll, and the training
    process verifies what it loads.
    """
    from ..format.commit import list_checkpoints, newest_valid

    found, _ = newest_valid(list_checkpoints(storage), where=storage.display(), warn=False)
    return None if found is None else found.step


def is_done(storage: Storage) -> bool:
    return storage.exists(DONE_MARKER)


def cost_report(storage: Storage, *, offline: bool) -> Any | None:
    """The run's cost report, or None (with a warning) when it cannot be computed."""
    try:
        from ..cost import report_for_run
    except ImportError:  # pragma: no cover - the cost package ships with spotrun
        from ..cost.report import report_for_run
    try:
        return report_for_run(storage, offline=offline)
    except Exception as exc:  # noqa: BLE001 - a report must never hide the run's outcome
        log.warning("could not compute the cost report: %s", exc)
        return None
