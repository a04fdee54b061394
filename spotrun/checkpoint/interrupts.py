"""The interrupts inbox: signals and interruption notices become flags the loop reads.

Signal handlers and watcher threads only append to a deque and set plain attributes (both
atomic under the GIL, and lock-free, so a signal landing while the main thread holds a lock
cannot deadlock). The training thread drains the inbox at a step boundary, where all I/O
happens, so a signal can never land inside a half-built checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from ..notices import Notice, Watcher, watchers_from_env
from ..records.instance import InstanceInfo
from ..records.layout import EXIT_INTERRUPTED

__all__ = ["Interrupts"]

log = logging.getLogger(__name__)


class Interrupts:
    """What asked this process to save or stop, and the machinery that listens for it.

    Call order: :meth:`start` (handlers + watchers) once, :meth:`drain` at every step
    boundary, :meth:`close` once on the way out.
    """

    def __init__(self, *, handle_signals: bool, watchers: Sequence[Watcher] | None) -> None:
        self.handle_signals = handle_signals
        self._watchers_arg = watchers
        self._watchers: list[Watcher] = []
        self._inbox: collections.deque[Notice] = collections.deque()
        self._prev_handlers: dict[int, Any] = {}
        self._sigint_seen = False
        #: A notice or signal asked to stop (checkpoint, then exit 75).
        self.stop_requested = False
        #: A notice asked for a checkpoint without stopping (e.g. a rebalance recommendation).
        self.save_requested = False
        #: The first stopping notice, for its deadline and the "stop after notice" log line.
        self.stop_notice: Notice | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.handle_signals:
            self._install_signal_handlers()
        watchers = watchers_from_env() if self._watchers_arg is None else list(self._watchers_arg)
        for w in watchers:
            w.start(self.deliver)
        self._watchers = watchers

    def stop_watchers(self) -> None:
        for w in self._watchers:
            w.stop()

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._prev_handlers.items():
            signal.signal(sig, handler)
        self._prev_handlers.clear()

    def hold_until_exit(self) -> None:
        """After a committed stop checkpoint, instead of restoring the old handlers.

        The process is on its way out with EXIT_INTERRUPTED, but the interpreter's teardown
        (threads, torch, atexit, the ledger flush) can take a while; a supervisor's second
        SIGTERM landing then would kill it with the default action (-15), and the relaunch
        logic would read "crashed" although the checkpoint is safe. SIGTERM is therefore
        ignored from here on (SIG_IGN is a kernel disposition, so it holds to the very end
        of finalisation); a Ctrl-C still means "now" and ends the process at once, with 75,
        because the stop checkpoint is committed.
        """
        if not self._prev_handlers:
            return  # handle_signals=False or not the main thread: the user's signals
        for sig in self._prev_handlers:
            if sig == signal.SIGTERM:
                signal.signal(sig, signal.SIG_IGN)
            else:
                signal.signal(sig, _exit_interrupted_now)
        self._prev_handlers.clear()

    @property
    def handlers_installed(self) -> bool:
        """Whether :meth:`start` put this object's SIGTERM/SIGINT handlers in place (main
        thread, ``handle_signals=True``) and they have not been given back yet."""
        return bool(self._prev_handlers)

    def reclaim_signal_handlers(self) -> None:
        """Point SIGTERM/SIGINT at this object again, after other code installed handlers
        over it (a trainer's own); the handlers saved at :meth:`start` stay the ones that
        :meth:`restore_signal_handlers` puts back."""
        if self._prev_handlers:
            for sig in self._prev_handlers:
                signal.signal(sig, self._on_signal)

    def instance_info(self) -> InstanceInfo:
        """The machine this runs on, from the first watcher whose metadata service answers."""
        for w in self._watchers:
            info = w.instance_info(timeout=1.0)
            if info is not None:
                return info
        return InstanceInfo()

    # -- producers (any thread, or a signal handler) -----------------------------------------

    def deliver(self, notice: Notice) -> None:
        """Record a notice; acted on at the next step boundary."""
        self._inbox.append(notice)
        if notice.stop:
            self.stop_requested = True
        else:
            self.save_requested = True

    def request_stop(self) -> None:
        self.deliver(Notice(source="user", action="stop", stop=True, detected_at=time.time()))

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread; SIGTERM/SIGINT handlers not installed")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self._sigint_seen:
                # Second Ctrl-C: the user means it. Abort now; the last committed
                # checkpoint is intact because commits are atomic.
                raise KeyboardInterrupt
            self._sigint_seen = True
        self.deliver(Notice(source="signal", action=signal.Signals(signum).name,
                            stop=True, detected_at=time.time()))

    # -- consumer (the training thread) ------------------------------------------------------

    def drain(self, steps_done: int, on_notice: Callable[[Notice], None]) -> None:
        """Log and hand over every notice that arrived since the last step boundary."""
        while self._inbox:
            n = self._inbox.popleft()
            left = n.seconds_left()
            log.warning(
                "%s notice %r%s; %s at the end of step %d",
                n.source,
                n.action,
                f", {left:.0f}s before the machine goes" if left is not None else "",
                "checkpointing and stopping" if n.stop else "checkpointing",
                steps_done,
            )
            if n.stop and self.stop_notice is None:
                self.stop_notice = n
            on_notice(n)


def _exit_interrupted_now(signum: int, frame: types.FrameType | None) -> None:
    """SIGINT after a committed stop checkpoint: leave now, saying "interrupted, resumable"."""
    with contextlib.suppress(Exception):  # a flush interrupted mid-write may refuse; fine
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)
