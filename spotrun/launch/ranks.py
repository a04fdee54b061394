"""Node ranks that follow the cluster file's slots, not the order torchrun's rendezvous sorts.

torchrun's c10d rendezvous numbers the nodes of an attempt by ``sorted(participants)``, each
participant a ``_NodeDesc(addr, pid, local_id)`` (torch's ``dynamic_rendezvous``,
``_mark_rendezvous_complete``): on EC2 by private-IP string, on the local simulator (every
node 127.0.0.1) by agent pid. After one node of an attempt is replaced, a survivor's rank
then often changes, and it restores its *new* rank's shard from a peer while its own local
copy (of its old rank's shard) goes unread; the replacement, numbered by its address or its
young pid, lands in an arbitrary rank.

Here node ``i`` of the cluster file (:class:`~spotrun.launch.node.ClusterSpec`) is group rank
``i``: for a fixed-size attempt its slot, for an elastic ``M:N`` attempt the rank of its slot
among the nodes that joined (survivors in slot order, dense). So a survivor keeps its rank and
restores from its own local copy, and the replacement takes the lost node's rank and reads only
that node's share, from its buddy (spotrun.recovery.peer).

How: ``spotrun.launch.node`` passes the node's slot in torchrun's ``--rdzv-conf``
(``spotrun_slot=I``, :data:`SLOT_KEY`); the wrapper (:func:`spotrun.distributed.torchrun`)
takes it out again (:func:`take_slot`) and calls :func:`install` before torchrun runs:

- the slot travels *in the node descriptor* every participant already publishes in the
  rendezvous state: this agent's ``_NodeDesc.local_id`` (a process-wide counter torch uses
  only to tell two handlers of one process apart) becomes ``BASE + n * STRIDE + slot``, still
  unique per process, so nothing new is exchanged and no extra round trip is paid;
- whichever node completes the rendezvous (the last to join, or the one whose last-call
  deadline passed) assigns the ranks: after torch's own assignment, a wrapper of that method
  renumbers the participants by their slots, when every participant carries one and no two
  carry the same. Otherwise (a node without the hook, say a mixed-version cluster) torch's own
  order stays, with one log line.

Why not ``--rdzv-backend static --node-rank I``: the static rendezvous makes node rank 0 host
the store every node connects to, so when node 0 is replaced the survivors wait for the
replacement to boot before they can even meet (the launcher names a survivor as ``host`` for
exactly that reason), a vanished rank-0 node takes the store with it, and static has no
``M:N`` (a shrunk ``--min-nodes`` attempt, growing back). The c10d rendezvous keeps all of
that as it is: the store stays on the ``host`` node, only the numbering changes.

Robustness: :func:`install` checks torch's private pieces it relies on (the generator, the
descriptor's fields, the op executor's method and state) and, when one differs, logs one line
and leaves torch's order (every node then restores what its rank needs, as before, only from
a peer or the run URL more often). tests/test_stable_ranks.py runs a real c10d rendezvous of
three handlers and fails when the ranks stop following the slots on the installed torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .common import MAX_NODES

__all__ = ["SLOT_KEY", "install", "slot_of", "take_slot"]

log = logging.getLogger("spotrun.launch.ranks")

#: The ``--rdzv-conf`` key that carries this node's slot from node_argv to the wrapper.
SLOT_KEY = "spotrun_slot"
#: ``local_id`` values at or above this carry a slot; torch's own counter starts at 0 and
#: counts handlers of one process, far below it.
BASE = 1 << 40
#: ``local_id = BASE + n * STRIDE + slot``: room for every slot a cluster may have.
STRIDE = 1 << 16
assert STRIDE > MAX_NODES

_lock = threading.Lock()
_torch_generator: Any = None  # torch's own generator, put back by install(None)
_patched = False
# One counter for the process, as torch's: two handlers of one agent (one per attempt it
# runs) never share a descriptor, whichever slots they had.
_counter = itertools.count()


def take_slot(rdzv_conf: str | None) -> tuple[str, int | None]:
    """``(rdzv_conf without SLOT_KEY, the slot or None)``: torchrun never sees the key.

    A slot that is not a whole number in ``0..MAX_NODES-1`` is dropped with a warning
    (torch's order then), never an error: the rank order is an optimisation of where
    restores read from, not something a run may fail over.
    """
    if not rdzv_conf:
        return rdzv_conf or "", None
    kept, slot = [], None
    for item in rdzv_conf.split(","):
        key, _sep, value = item.partition("=")
        if key.strip() != SLOT_KEY:
            kept.append(item)
            continue
        try:
            slot = int(value.strip())
        except ValueError:
            slot = None
        if slot is None or not 0 <= slot < MAX_NODES:
            log.warning("ignoring %s=%r in --rdzv-conf (not a node slot 0-%d); torchrun's "
                        "rendezvous orders the nodes", SLOT_KEY, value, MAX_NODES - 1)
            slot = None
    return ",".join(kept), slot


def slot_of(local_id: Any) -> int | None:
    """The slot a descriptor's ``local_id`` carries, or None (torch's own counter)."""
    if not isinstance(local_id, int) or local_id < BASE:
        return None
    return (local_id - BASE) % STRIDE


def slot_order(participants: Iterable[Any]) -> list[Any] | None:
    """The participants in slot order, or None when one carries no slot or two share one."""
    nodes = list(participants)
    slots = [slot_of(getattr(n, "local_id", None)) for n in nodes]
    if any(s is None for s in slots) or len(set(slots)) != len(slots):
        return None
    return [n for _, n in sorted(zip(slots, nodes, strict=True), key=lambda p: p[0])]


class _SlotDescGenerator:
    """torch's ``_NodeDescGenerator``, with this node's slot in every ``local_id``."""

    def __init__(self, desc_type: Any, slot: int) -> None:
        self._desc_type, self.slot = desc_type, slot

    def generate(self, local_addr: str | None = None) -> Any:
        import socket

        with _lock:
            n = next(_counter)
        return self._desc_type(local_addr or socket.getfqdn(), os.getpid(), BASE + n * STRIDE + self.slot)


def _torch_parts() -> tuple[Any, Any, Any] | str:
    """(handler class, descriptor class, op executor class), or why they are not usable."""
    try:
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr
    except Exception as exc:  # noqa: BLE001 - any import failure: torch's order
        return f"cannot import torch's dynamic rendezvous ({exc})"
    handler = getattr(dr, "DynamicRendezvousHandler", None)
    desc = getattr(dr, "_NodeDesc", None)
    executor = getattr(dr, "_DistributedRendezvousOpExecutor", None)
    if handler is None or desc is None or executor is None:
        return "torch's dynamic rendezvous lacks DynamicRendezvousHandler/_NodeDesc/_DistributedRendezvousOpExecutor"
    if not hasattr(getattr(handler, "_node_desc_generator", None), "generate"):
        return "DynamicRendezvousHandler has no _node_desc_generator"
    try:
        fields = [f.name for f in dataclasses.fields(desc)]
    except TypeError:
        fields = []
    if fields != ["addr", "pid", "local_id"]:
        return f"_NodeDesc's fields are {fields}, not addr, pid, local_id"
    if not callable(getattr(executor, "_mark_rendezvous_complete", None)):
        return "_DistributedRendezvousOpExecutor has no _mark_rendezvous_complete"
    return handler, desc, executor


def _by_slot(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """``_mark_rendezvous_complete`` that renumbers the participants by slot after torch."""

    def _mark_rendezvous_complete(self: Any) -> None:
        original(self)
        try:
            participants = self._state.participants
            order = slot_order(participants)
            if order is None:
                if any(slot_of(getattr(n, "local_id", None)) is not None for n in participants):
                    log.warning("rendezvous: not every node carries a slot (or two share one): %s; "
                                "ranks in torchrun's order", sorted(participants))
                return
            for rank, node in enumerate(order):
                participants[node] = rank
        except Exception as exc:  # noqa: BLE001 - torch's assignment stands
            log.warning("rendezvous: ranks by slot failed (%s: %s); ranks in torchrun's order",
                        type(exc).__name__, exc)

    _mark_rendezvous_complete.__wrapped__ = original  # type: ignore[attr-defined]
    return _mark_rendezvous_complete


def install(slot: int | None) -> bool:
    """Make this process's next rendezvous carry ``slot`` and number nodes by slot.

    ``None`` puts torch's own descriptor generator back (a torchrun call without a slot).
    False, with one log line, when this torch's internals are not the ones this relies on.
    """
    global _torch_generator, _patched
    parts = _torch_parts()
    if isinstance(parts, str):
        if slot is not None:
            log.warning("node ranks follow torchrun's rendezvous order, not the cluster file's "
                        "slots: %s", parts)
        return False
    handler, desc, executor = parts
    with _lock:
        current = handler._node_desc_generator
        if _torch_generator is None and not isinstance(current, _SlotDescGenerator):
            _torch_generator = current
        if slot is None:
            if _torch_generator is not None:
                handler._node_desc_generator = _torch_generator
            return False
        if not _patched:
            executor._mark_rendezvous_complete = _by_slot(executor._mark_rendezvous_complete)
            _patched = True
        handler._node_desc_generator = _SlotDescGenerator(desc, slot)
    log.info("rendezvous: this node is slot %d; node ranks follow the cluster file's slots", slot)
    return True
