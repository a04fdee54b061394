"""Pieces both launchers (local simulator and EC2 controller) and ``status`` share."""

from __future__ import annotations

import logging
from typing import Any

from ..layout import DONE_MARKER
from ..storage import Storage

__all__ = ["cost_report", "is_done", "last_checkpoint"]

log = logging.getLogger("spotrun")


def last_checkpoint(storage: Storage) -> int | None:
    """The newest committed checkpoint's step, by number (never listing order).

    Manifests are read but payloads not verified: cheap enough to poll, and the training
    process verifies what it loads.
    """
    from ..commit import list_checkpoints, newest_valid

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
