"""Ports for the simulated cluster: a rendezvous port with the peer-copy ports after it.

The local launcher's nodes share 127.0.0.1, so an attempt needs a block of free ports: the
rendezvous store at ``port`` and node ``i``'s peer copy server at ``port + 1 + i``
(:meth:`~spotrun.launch.node.ClusterSpec.peer_address`). They are picked now and bound later,
by other processes (the head's torchrun, each node agent), seconds apart.

**Why below the ephemeral range.** A port asked of the kernel with ``bind(port 0)`` comes
from the ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999 by default), the same
range every outgoing connection's local port comes from. Free when checked, such a port and
its neighbours were handed to some client socket before the node agent bound them, on a
busy machine (seen in the test suite under load, 3 runs in 7: "Connection refused" from a
peer whose server could not bind, so a replacement read its files from the run URL). The
kernel never hands out a port outside that range unless a process asks for it by number, so
a block picked below it and checked free stays free unless another launcher picks the same
block in the same moment (a random pick among ~12000 ports makes that rare; the check still
runs). Where the range leaves no room below (or above) it, the kernel's pick is used as
before.
"""

from __future__ import annotations

import contextlib
import random
import socket

from ..errors import LaunchError

__all__ = ["ephemeral_range", "free_port"]

_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
#: Lowest port picked: above the registered ports most services listen on.
_LOWEST = 20000
_TRIES = 100


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux; the usual default elsewhere)."""
    try:
        with open(_RANGE_FILE, encoding="ascii") as f:
            low, high = (int(x) for x in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _candidates(following: int) -> list[tuple[int, int]]:
    """Spans ``[a, b]`` of first ports whose whole block lies outside the ephemeral range."""
    low, high = ephemeral_range()
    spans = [(_LOWEST, low - 1 - following), (high + 1, 65535 - following)]
    return [(a, b) for a, b in spans if a <= b]


def _block_free(first: int, following: int) -> bool:
    with contextlib.ExitStack() as held:
        try:
            for port in range(first, first + 1 + following):
                held.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(following: int = 0) -> int:
    """A TCP port free on 127.0.0.1 now, with the ``following`` ports after it free too,
    outside the kernel's ephemeral range where it has room (see the module docstring)."""
    spans = _candidates(following)
    pick = random.SystemRandom()
    for _ in range(_TRIES if spans else 0):
        a, b = pick.choice(spans)
        first = pick.randint(a, b)
        if _block_free(first, following):
            return first
    for _ in range(_TRIES):  # no room outside the range (or all taken): the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + following <= 65535 and _block_free(first, following):
            return first
    raise LaunchError(f"no block of {following + 1} free TCP ports on 127.0.0.1 after {2 * _TRIES} "
                      "tries; free some ports, or run fewer --nodes")
