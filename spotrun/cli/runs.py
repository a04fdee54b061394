"""Is there a run at this URL? Commands that report on a run (``cost``, ``status``) refuse a
folder that holds none, instead of a report of "n/a" and exit 0 that reads like a free run."""

from __future__ import annotations

from ..errors import StorageNotFoundError
from ..records.layout import DAMAGED_DIR, DONE_MARKER, LAUNCH_DIR, LEASE, LEDGER_DIR, LOGS_DIR, parse_step
from ..storage import Storage

__all__ = ["require_run"]

# What only a run writes at its top level (besides checkpoint folders, named by their step).
_RUN_ENTRIES = frozenset({LEDGER_DIR, LAUNCH_DIR, LOGS_DIR, LEASE, DONE_MARKER, DAMAGED_DIR})


def require_run(storage: Storage) -> None:
    """Raise :class:`~spotrun.errors.StorageNotFoundError` (exit 2) when nothing at the URL
    was written by spotrun: no checkpoint folder, ledger, launch state, logs, lease or done
    marker (a typo, the wrong folder, a run that never started)."""
    names = storage.list_dir("")
    if any(n in _RUN_ENTRIES or parse_step(n) is not None for n in names):
        return
    if not names:
        raise StorageNotFoundError(
            f"no run at {storage.display()}: nothing is stored there (no ledger, checkpoints or "
            "launch state); check the run URL"
        )
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise StorageNotFoundError(
        f"no run at {storage.display()}: it holds {len(names)} other entr"
        f"{'y' if len(names) == 1 else 'ies'} ({shown}) but no checkpoint, ledger, launch state "
        "or logs; check the run URL (a run's own folder, not its parent)"
    )
