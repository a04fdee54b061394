"""Killing a process and everything below it, as a reclaimed machine would go.

A process group is not enough: torchrun starts each worker in a session of its own, so
``killpg`` of the agent's group leaves the workers training on (and a user's command may
detach helpers the same way). :func:`kill_tree` finds every descendant first (by parent
pid, from ``/proc``, or ``ps`` where there is no ``/proc``), then signals the group, each
descendant and each descendant's own group. It never signals the caller's own group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable

from ..procfs import pid_started, stat_fields

__all__ = ["descendants", "kill_tree", "sessions_started_after", "worker_sessions"]


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible to us."""
    out: dict[int, int] = {}
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = stat_fields(entry)  # None: it ended while we looked
            if fields is not None and len(fields) > 1:
                out[int(entry)] = int(fields[1])
        return out
    try:  # macOS and other systems without /proc
        text = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True,
                              timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, their children, ...), not ``pid`` itself."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in found or p == pid:
            continue
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid``'s process group, ``pid``, every descendant and their groups.

    The descendants are listed before anything is signalled (once a parent dies its children
    are re-parented and could no longer be found). Returns the descendants signalled.
    """
    below = descendants(pid)
    own = os.getpgrp()
    groups: set[int] = set()
    for p in [pid, *below]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(p))
    # The group of a child started with start_new_session is its pid; signal it even when
    # the leader has already gone (its group can outlive it).
    groups.add(pid)
    for target in [pid, *below]:
        _signal(os.kill, target, sig)
    for group in groups - {own, 0, 1}:
        _signal(os.killpg, group, sig)
    return below


def _signal(send: Callable[[int, int], None], target: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already, or not ours
        send(target, sig)


def worker_sessions(pid: int) -> list[int]:
    """The processes below ``pid`` that lead a session of their own: torchrun's workers
    (started with ``start_new_session``), and warm workers' standby interpreters (started so
    too: :func:`spotrun.launch.warm.idle_pids` tells the idle ones)."""
    out = []
    for p in descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(p) == p:
                out.append(p)
    return out


def sessions_started_after(pid: int) -> Callable[[], list[int]]:
    """A function giving :func:`worker_sessions` of ``pid`` less those that run now: the
    sessions started from here on (an attempt's workers), never one that was there before
    (an in-process agent's host process may lead other sessions: a test's servers)."""
    # (pid, start time): a later process that reuses a pid that was there is still new.
    before = {(p, pid_started(p)) for p in worker_sessions(pid)}
    return lambda: [p for p in worker_sessions(pid) if (p, pid_started(p)) not in before]
