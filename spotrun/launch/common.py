"""Pieces both launchers (local simulator and EC2 controller) and ``status`` share."""

from __future__ import annotations

import logging
from typing import Any, TextIO

from ..instance import InstanceInfo
from ..layout import DONE_MARKER
from ..storage import Storage

__all__ = ["cost_report_text", "last_checkpoint", "record_segment_end", "record_segment_start"]

log = logging.getLogger("spotrun")

SOURCE = "launcher"


def record_segment_start(storage: Storage, *, segment_id: str, instance: InstanceInfo, started_at: float) -> None:
    """Note in the run ledger that a segment began (the cost report prices it from here)."""
    from ..ledger import Ledger

    Ledger(storage).segment_started(
        segment_id=segment_id, instance=instance, started_at=started_at, source=SOURCE
    )


def record_segment_end(storage: Storage, *, segment_id: str, reason: str, ended_at: float) -> None:
    from ..ledger import Ledger

    Ledger(storage).segment_ended(segment_id=segment_id, reason=reason, ended_at=ended_at, source=SOURCE)


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


def cost_report_text(storage: Storage, *, offline: bool, out: TextIO) -> None:
    """Print the cost report to ``out`` (or one line saying why there is none)."""
    report = cost_report(storage, offline=offline)
    if report is None:
        print("spotrun: no cost report (see the warning above)", file=out)
        return
    from ..cost.render import report_text

    print(report_text(report), file=out)
