"""What Linux's ``/proc`` says of a process: ``/proc/PID/stat``, parsed in one place.

Several parts of spotrun ask it: whether a lease or ledger writer's pid, or a launch
controller, is gone or its pid reused (:func:`pid_gone`: :mod:`spotrun.records.lease`,
:mod:`spotrun.records.ledger`, :mod:`spotrun.launch.local`, :mod:`spotrun.launch.ec2_backend`,
:mod:`spotrun.launch.grow`), the process tree a launcher signals
(:mod:`spotrun.launch.proctree`), how much CPU a finished worker still uses
(:mod:`spotrun.distributed`). The one trap they share: the command name (field 2) may hold
spaces and parentheses, so the fields are split after its last ``)``.
"""

from __future__ import annotations

import os

__all__ = ["pid_gone", "pid_started", "stat_fields"]


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


def pid_started(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``; tells a reused pid apart."""
    fields = stat_fields(pid)
    try:
        return None if fields is None else int(fields[19])
    except (ValueError, IndexError):
        return None


def pid_gone(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` (started at ``started`` clock ticks, or None: unknown) has exited: no
    such process, a zombie not yet reaped, or its pid reused by a later process.

    The one rule wherever spotrun asks whether a process of this host is gone. A pid that
    exists but belongs to another user (``kill`` says EPERM) is not gone unless ``/proc``
    says it is a zombie or a later process: "alive" on EPERM alone kept a zombie controller
    running, "gone" on it would take a live writer's lease."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    fields = stat_fields(pid)
    try:
        if fields is None:
            return False
        if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
            return True
        return started is not None and int(fields[19]) != started  # the pid was reused
    except (ValueError, IndexError):
        return False
