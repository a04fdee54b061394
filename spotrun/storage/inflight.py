"""Transfers in flight, so a process that gives up on a save can clean up before it exits.

A stop checkpoint that misses its deadline is abandoned: the process leaves with 143 while a
background thread may still be inside an upload. What that upload started (an S3 multipart
upload, whose parts are billed until aborted) must not outlive the process. Each backend
that opens such a resource registers an aborter here while it is open; the stop path calls
:func:`abort_all` with what time is left, and every aborter runs at once, bounded by it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["abort_all", "register", "unregister"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_aborters: dict[int, tuple[str, Callable[[], None]]] = {}
_ids = itertools.count(1)


def register(what: str, abort: Callable[[], None]) -> int:
    """Record an open resource (``what`` names it in logs); returns the token to unregister."""
    token = next(_ids)
    with _lock:
        _aborters[token] = (what, abort)
    return token


def unregister(token: int) -> None:
    """The resource closed (completed or aborted) on its own."""
    with _lock:
        _aborters.pop(token, None)


def abort_all(timeout_s: float) -> int:
    """Abort every registered resource, all at once, waiting at most ``timeout_s``.

    Best effort: an aborter that fails or overruns is logged and left (a lifecycle rule
    cleans what a process could not). Returns how many aborters finished in time.
    """
    with _lock:
        pending = list(_aborters.items())
        _aborters.clear()
    if not pending:
        return 0
    done: list[str] = []

    def run(what: str, abort: Callable[[], None]) -> None:
        try:
            abort()
            done.append(what)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            logger.warning("could not abort %s: %s", what, exc)

    threads = [threading.Thread(target=run, args=item, daemon=True, name="spotrun-abort")
               for _, item in pending]
    for t in threads:
        t.start()
    end = time.monotonic() + max(0.0, timeout_s)
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    left = len(pending) - len(done)
    if left:
        logger.warning("%d transfer(s) not aborted within %.1fs; an S3 lifecycle rule "
                       "(AbortIncompleteMultipartUpload) removes what is left", left, timeout_s)
    return len(done)
