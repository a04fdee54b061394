"""The notice every watcher delivers, the watcher contract, and the polling machinery.

Call order for a :class:`Watcher`::

    w = Ec2Watcher(...)             # cheap: no I/O
    w.start(on_notice)              # returns at once; a daemon thread probes, then polls
    ...                             # on_notice(Notice) runs on that thread, once per notice
    w.stop()                        # wakes the thread (an Event, not a sleep) and joins it

``instance_info()`` may be called at any time, from any thread, started or not; it never
blocks longer than its timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ConfigError, MetadataBusyError, NoticeError
from ..records.instance import InstanceInfo

__all__ = ["REBALANCE_MODES", "Notice", "PollingWatcher", "Watcher"]

log = logging.getLogger(__name__)

#: What to do on an EC2 rebalance recommendation (``SPOTRUN_REBALANCE``).
REBALANCE_MODES = ("checkpoint", "stop", "ignore")

# A passing error is logged at most this often, so a flapping metadata service cannot
# flood the training log.
_ERROR_LOG_EVERY = 60.0
# After a failed poll (or a busy answer at start-up) the next try comes after this, doubling
# on every failure in a row up to the poll interval: a struggling service recovers unseen
# within a fraction of a second, and is never asked more often than at start.
_RETRY_FIRST_S = 0.1


@dataclass(frozen=True)
class Notice:
    """One interruption notice (or rebalance recommendation) as spotrun saw it.

    ``stop`` tells the training loop what to do: True means checkpoint then exit (with
    ``EXIT_INTERRUPTED``); False means checkpoint and keep training (an EC2 rebalance
    recommendation under the default ``SPOTRUN_REBALANCE=checkpoint``).
    """

    source: str  # "signal" | "ec2" | "gcp" | "azure"
    # "terminate" | "stop" | "hibernate" | "rebalance" | "preempt" | "SIGTERM" | "SIGINT"
    action: str
    stop: bool
    detected_at: float  # time.time() when spotrun saw it
    notice_time: float | None = None  # when the provider posted it (epoch seconds)
    deadline: float | None = None  # when the machine is taken (epoch seconds), if known
    detail: dict = field(default_factory=dict)  # the provider's raw answer, for logs

    def seconds_left(self, now: float | None = None) -> float | None:
        """Seconds until ``deadline`` (never below 0), or None when the deadline is unknown."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.time() if now is None else now))


OnNotice = Callable[[Notice], None]
T = TypeVar("T")


class Watcher(ABC):
    """A source of interruption notices for this machine."""

    name: str

    @abstractmethod
    def start(self, on_notice: OnNotice) -> None:
        """Start watching in a daemon thread and return at once.

        ``on_notice`` is called from that thread, once per distinct notice: a notice that
        stays posted is not delivered again, and a rebalance recommendation at most once.
        """

    @abstractmethod
    def stop(self, timeout: float = 2.0) -> None:
        """Stop watching promptly and join the thread (waiting at most ``timeout``)."""

    @abstractmethod
    def instance_info(self, timeout: float = 1.0) -> InstanceInfo | None:
        """What the metadata service says about this machine, or None when off-cloud or
        unreachable. Never blocks longer than ``timeout``."""


class PollingWatcher(Watcher):
    """A watcher that polls a metadata service from a daemon thread.

    Subclasses implement three hooks:

    - :meth:`_probe` (on the thread, first): True when the service answers within the
      start-up budget. False ends the thread after one info-level log line, so an off-cloud
      machine pays about ``startup_timeout`` once and nothing after.
    - :meth:`_poll` (every ``poll_interval``): the notices posted now, each with a key that
      names it. The base class delivers each key once. Raise on a passing error; the thread
      logs it (at most once a minute) and keeps polling.
    - :meth:`_fetch_instance_info`: the machine's description (cached after the first
      success, since it never changes).
    """

    name = "metadata"

    def __init__(self, *, poll_interval: float = 5.0, startup_timeout: float = 1.0) -> None:
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval={poll_interval!r} must be > 0 seconds, e.g. 5")
        if not startup_timeout > 0:
            raise ConfigError(f"startup_timeout={startup_timeout!r} must be > 0 seconds, e.g. 1")
        self.poll_interval = float(poll_interval)
        self.startup_timeout = float(startup_timeout)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delivered: set[Any] = set()
        self._state = "idle"
        self._last_error_log = float("-inf")
        self._failing = False
        self._retry_delay = _RETRY_FIRST_S
        # What the service said when the probe did not get a usable answer: a passing error
        # (it is there: watch anyway) or a refusal (something else answers at that address).
        self._busy_answer: str | None = None
        self._refusal: str | None = None
        self._info: InstanceInfo | None = None
        self._info_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``idle`` (not started), ``probing``, ``polling``, ``unavailable`` (gave up at
        start-up: no such service here) or ``stopped``."""
        return self._state

    @property
    def running(self) -> bool:
        """True while the thread is alive (probing or polling)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, on_notice: OnNotice) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} watcher already started; make a new one")
        self._state = "probing"
        self._thread = threading.Thread(
            target=self._run, args=(on_notice,), name=f"spotrun-{self.name}-notices", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self._state in ("idle", "probing", "polling"):
            self._state = "stopped"

    def instance_info(self, timeout: float = 1.0) -> InstanceInfo | None:
        with self._info_lock:
            if self._info is not None:
                return self._info
        if self._state == "unavailable":
            return None
        deadline = time.monotonic() + timeout
        box: list[InstanceInfo | None] = [None]

        def fetch() -> None:
            try:
                box[0] = self._fetch_instance_info(deadline)
            except Exception as exc:  # noqa: BLE001 - unreachable, odd answer: "not known" is the answer
                log.debug("%s instance info unavailable: %s", self.name, exc)

        # The HTTP timeouts already track the deadline; the join makes the bound hard even
        # when a server trickles bytes slowly enough to dodge socket timeouts.
        worker = threading.Thread(target=fetch, name=f"spotrun-{self.name}-info", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        info = box[0] if not worker.is_alive() else None
        if info is not None:
            with self._info_lock:
                self._info = info
        return info

    def _retry_until(self, deadline: float, attempt: Callable[[], T]) -> T | None:
        """``attempt()``'s answer, retried briefly while the service refuses or stays silent
        (it may still be starting); None at ``deadline`` (time.monotonic()) or on stop.

        A :class:`MetadataBusyError` (HTTP 5xx/429) means the service is there but
        struggling: retried with backoff, and remembered in ``_busy_answer`` so that the probe
        can say "there" even when no try succeeded in time. Any other :class:`NoticeError`
        means something answered, but not as this service does: final, remembered in
        ``_refusal``. (requests' errors are OSErrors, so one clause covers refused and silent.)
        """
        delay = _RETRY_FIRST_S / 2
        while not self._stop.is_set():
            try:
                return attempt()
            except MetadataBusyError as exc:
                self._busy_answer = str(exc)
                delay = min(delay * 2, 0.4)
            except NoticeError as exc:
                self._refusal = str(exc)
                return None
            except OSError:
                delay = 0.1
            left = deadline - time.monotonic()
            if left <= 0.05:
                return None
            self._stop.wait(min(delay, left))
        return None

    # -- hooks --------------------------------------------------------------------------

    @abstractmethod
    def _probe(self, deadline: float) -> bool:
        """True when the service answers before ``deadline`` (time.monotonic())."""

    @abstractmethod
    def _poll(self) -> list[tuple[Any, Notice]]:
        """The notices posted now, as (key, notice); raise on a passing error."""

    @abstractmethod
    def _fetch_instance_info(self, deadline: float) -> InstanceInfo | None:
        """This machine's description, fetched before ``deadline`` (time.monotonic())."""

    def _unavailable_hint(self) -> str:
        """Appended to the one log line written when the service is not there."""
        return ""

    # -- the thread ---------------------------------------------------------------------

    def _run(self, on_notice: OnNotice) -> None:
        try:
            reachable = self._probe(time.monotonic() + self.startup_timeout)
        except Exception as exc:  # noqa: BLE001 - a probe that breaks means "not reachable"
            log.debug("%s probe failed: %s", self.name, exc)
            reachable = False
        if self._stop.is_set():
            self._state = "stopped"
            return
        if not reachable:
            self._state = "unavailable"
            if self._refusal is not None:
                # Something answered: saying "no service answered" would send the reader
                # looking for a network problem that is not there.
                log.info(
                    "the %s metadata address answered, but not as the %s service "
                    "does (%s); not watching for %s notices%s",
                    self.name, self.name, self._refusal, self.name, self._unavailable_hint(),
                )
            else:
                log.info(
                    "no %s metadata service answered; not watching for %s notices%s",
                    self.name,
                    self.name,
                    self._unavailable_hint(),
                )
            return
        self._state = "polling"
        if self._busy_answer is not None:
            log.info(
                "the %s metadata service is there but answered %s; watching its "
                "notices anyway, retrying with backoff", self.name, self._busy_answer,
            )
        log.debug("watching %s notices every %.3g s", self.name, self.poll_interval)
        while not self._stop.is_set():
            ok = self._poll_once(on_notice)
            if ok:
                self._retry_delay = _RETRY_FIRST_S
                wait = self.poll_interval
            else:
                wait = min(self.poll_interval, self._retry_delay)
                self._retry_delay = min(self.poll_interval, self._retry_delay * 2)
            if self._stop.wait(wait):
                break
        self._state = "stopped"

    def _poll_once(self, on_notice: OnNotice) -> bool:
        """One poll; False when it failed (the caller retries sooner, with backoff)."""
        try:
            posted = self._poll()
        except Exception as exc:  # noqa: BLE001 - the watcher thread must outlive any failed poll
            self._failing = True
            now = time.monotonic()
            if now - self._last_error_log >= _ERROR_LOG_EVERY:
                self._last_error_log = now
                log.warning(
                    "polling %s notices failed (%s); still polling every %.3g s",
                    self.name,
                    exc,
                    self.poll_interval,
                )
            return False
        if self._failing:
            self._failing = False
            log.info("%s metadata service answers again", self.name)
        for key, notice in posted:
            if key in self._delivered or self._stop.is_set():
                continue
            self._delivered.add(key)
            # info, not warning: the receiver (the Checkpointer) logs what it does about it.
            log.info(
                "%s notice: %s (stop=%s, %s s left)",
                notice.source,
                notice.action,
                notice.stop,
                "unknown" if notice.deadline is None else f"{notice.seconds_left():.0f}",
            )
            try:
                on_notice(notice)
            except Exception:
                # The callback's bug must not end notice watching: a later stop notice
                # still matters more than this one.
                log.exception("the %s notice handler raised", self.name)
        return True
