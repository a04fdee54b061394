"""What every launch backend shares: the outcome, the events, the ``Launcher`` protocol and
the registry that ``spotrun status``/``stop`` use to reach a run's backend.

A backend is one module that provides

* a launcher class (``run() -> LaunchOutcome``) that keeps the command running and reports
  what it does as :class:`LaunchEvent` values (it never prints or prompts: the CLI does);
* a :class:`Backend` object for the run's later life: what ``status`` shows about the
  running segment, and how ``stop`` ends it;

and one line in :data:`BACKENDS`, naming the mode it records in ``launch/state.json``.
"""

from __future__ import annotations

import enum
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..errors import LaunchError
from ..records.launch_state import LaunchState, Segment
from ..storage import Storage

__all__ = [
    "BACKENDS",
    "Backend",
    "EventSink",
    "LaunchEvent",
    "LaunchEventKind",
    "LaunchOutcome",
    "Launcher",
    "backend_for",
    "log_events",
]

log = logging.getLogger(__name__)


@dataclass
class LaunchOutcome:
    """How a launcher ended. ``exit_code`` is what the CLI returns.

    ``status``: finished | failed | stopped | detached (Ctrl-C left compute running, or
    nothing to account yet).
    """

    status: str
    exit_code: int
    message: str
    segments: int = 0
    interruptions: int = 0


class LaunchEventKind(str, enum.Enum):
    """What a :class:`LaunchEvent` is about (the CLI may colour or filter by it)."""

    INFO = "info"
    SEGMENT_STARTED = "segment_started"
    SEGMENT_ENDED = "segment_ended"
    NOTICE = "notice"  # a (simulated) interruption notice, SIGTERM, SIGKILL
    CAPACITY = "capacity"  # no capacity in a pool, fallback to on-demand
    WARNING = "warning"
    OUTCOME = "outcome"  # the last word of a run: finished, failed, stopped


@dataclass(frozen=True)
class LaunchEvent:
    """One thing a launcher did or saw, in words (``message``) and in fields (``data``)."""

    kind: LaunchEventKind
    message: str
    segment_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[LaunchEvent], None]


def log_events(event: LaunchEvent) -> None:
    """The default sink: the ``spotrun`` logger (library users who want lines pass their own)."""
    level = logging.WARNING if event.kind is LaunchEventKind.WARNING else logging.INFO
    log.log(level, "%s", event.message)


class Launcher(Protocol):
    """Keeps a run's command going until the run is done, fails or is stopped."""

    mode: ClassVar[str]
    state: LaunchState

    def run(self) -> LaunchOutcome: ...


@runtime_checkable
class Backend(Protocol):
    """A launch mode's part in ``spotrun status`` and ``spotrun stop``."""

    mode: str

    def current_details(self, state: LaunchState, segment: Segment, *, live: bool) -> dict[str, Any]:
        """Extra fields about the running segment for ``status`` (may ask the cloud when live)."""
        ...

    def nodes_details(self, state: LaunchState, segments: list[Segment], *,
                      live: bool) -> dict[str, dict[str, Any]]:
        """:meth:`current_details` for every node of the running attempt, by instance id."""
        ...

    def stop(self, storage: Storage, state: LaunchState, *, wait_s: float | None,
             sleep: Callable[[float], None]) -> dict[str, Any]:
        """End the run's compute, keep its checkpoints; returns what was done."""
        ...


#: mode recorded in launch/state.json -> "module:attribute" of its Backend (imported lazily:
#: ``status`` on a local run must not import boto3).
BACKENDS: dict[str, str] = {
    "local": "spotrun.launch.local:LOCAL_BACKEND",
    "ec2": "spotrun.launch.ec2_backend:EC2_BACKEND",
}


def backend_for(mode: str) -> Backend:
    """The backend that launched runs of ``mode``; LaunchError when this spotrun has none."""
    where = BACKENDS.get(mode)
    if where is None:
        raise LaunchError(
            f"launch mode {mode!r} (recorded in launch/state.json) is not known to this spotrun "
            f"(it knows {', '.join(sorted(BACKENDS))}); upgrade spotrun"
        )
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr)
