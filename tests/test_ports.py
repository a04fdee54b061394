"""The simulated cluster's port block: outside the kernel's ephemeral range, all free."""

from __future__ import annotations

import socket

import pytest

from spotrun.errors import LaunchError
from spotrun.launch import ports


def _bindable(first: int, following: int) -> bool:
    socks = []
    try:
        for port in range(first, first + 1 + following):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def test_a_block_is_free_and_outside_the_range_the_kernel_hands_to_client_sockets():
    low, high = ports.ephemeral_range()
    for _ in range(20):
        first = ports.free_port(following=3)
        assert all(not low <= first + i <= high for i in range(4)), (first, low, high)
        assert _bindable(first, 3)


def test_a_taken_port_in_the_block_is_never_handed_out(monkeypatch):
    # Three first ports to pick from; the second is taken, so only the third's block is free.
    monkeypatch.setattr(ports, "_candidates", lambda following: [(20100, 20102)])
    if not _bindable(20100, 3):
        pytest.skip("ports 20100-20103 are in use on this machine")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 20101))
        busy.listen()
        assert {ports.free_port(following=1) for _ in range(10)} == {20102}


def test_no_room_outside_the_range_falls_back_to_the_kernels_pick(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    first = ports.free_port(following=2)
    assert _bindable(first, 2)


def test_no_free_block_at_all_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ports, "_candidates", lambda following: [])
    monkeypatch.setattr(ports, "_block_free", lambda first, following: False)
    with pytest.raises(LaunchError, match="no block of 3 free TCP ports"):
        ports.free_port(following=2)
