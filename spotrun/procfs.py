"""What Linux's ``/proc`` says of a process: ``/proc/PID/stat``, parsed in one place.

Several parts of spotrun ask it: whether a lease or ledger writer's pid is gone or reused
(:mod:`spotrun.records.lease`, :mod:`spotrun.records.ledger`), the process tree a launcher
signals (:mod:`spotrun.launch.proctree`), how much CPU a finished worker still uses
(:mod:`spotrun.distributed`). The one trap they share: the command name (field 2) may hold
spaces and parentheses, so the fields are split after its last ``)``.
"""

from __future__ import annotations

__all__ = ["stat_fields"]


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name: index 0 the state (``Z``: a
    zombie), 1 the parent pid, 11 and 12 user and system CPU ticks, 19 the start time (clock
    ticks since boot). None where it cannot be read (no such process, no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    _, paren, fields = stat.rpartition(")")
    return fields.split() if paren else None
