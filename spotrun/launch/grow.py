"""Growing a shrunk multi-node job back to N nodes, the node agent's side: a planned stop.

An attempt that went on with the survivors alone (``--min-nodes``, the EC2 controller's
``ec2_replace``) runs on fewer nodes than asked for. Once capacity for the missing nodes is
back the controller writes the next attempt's cluster file, ``grow`` set, naming the
survivors (in their slots) and the new machines. Nothing else reaches a running command, so
the survivors' node agents look for it themselves: while torchrun runs, :class:`GrowWatch`
reads this node's cluster file every ``poll_s`` seconds (the look the rejoin wait makes
after an attempt), and when a newer attempt that grows is there, sends SIGTERM to its own
process: torchrun's agent forwards it to the ranks, which agree on one step, commit the stop
checkpoint there and exit 75 (no step lost). The node then joins that attempt whatever
torchrun's code was (``spotrun.launch.node``'s loop).

Why a signal to the agent and not to the workers: the agent is what a launcher signals in
every other stop, it knows its workers (warm ones too, ``SPOTRUN_WARM_WORKERS``),
and it waits for them to exit. The signal is sent only once torchrun's own handler is in
place (a Python handler for SIGTERM; before that the default would kill the agent), and
never after :meth:`GrowWatch.stop`, which the node calls the moment torchrun returns. A
signal already sent may still be raised (torchrun's handler stays installed after it returns)
in the node's code around the call; the node treats an exception while :attr:`GrowWatch.sent`
as that planned stop.

**A dead attempt.** The same look finds a newer attempt naming this node that does *not*
grow when the launcher declared a peer lost and replaced it while this attempt still runs: a
peer that vanished silently (no RST: on EC2 a machine gone from the network) leaves the
ranks waiting in a collective up to the process group's timeout; after one that vanished with
its connections reset, a rank computing a long step meets the failure only at its next
collective (the launcher declares the loss at once in both cases). Such an attempt can never
finish, and its ranks never run a signal handler while they wait, so the watch does not ask
them to stop at a step: it sends SIGTERM to each worker's session
(:func:`.proctree.worker_sessions` started since the attempt began: torchrun's workers, warm
ones too, not an idle standby waiting for the next attempt, never a session the agent's
process led before),
SIGKILL of what is left after :data:`DEAD_STOP_GRACE_S`, and the node joins that attempt from
the last committed checkpoint. torchrun's agent normally returns once its workers died; one
still blocked :data:`DEAD_RETURN_S` later (its store calls wait 60 s each on a rendezvous host
that never answers; ``stuck_s`` may depend on the new attempt: 1 s when the store's host is
not in it) is left behind through ``on_stuck`` (the node agent execs itself afresh).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..procfs import pid_gone
from ..records.layout import NODES_DIR
from ..storage import Storage
from . import warm
from .proctree import kill_tree, sessions_started_after

__all__ = ["GrowWatch", "note_waiting", "noted_waiting", "waiting_file"]

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def waiting_file(instance_id: str) -> str:
    """Where a node agent notes that it waits for its first cluster file (relative to the run
    URL): the controller writes a grown attempt's files only once every new node's agent is
    there, so the survivors train on while a new machine boots."""
    if not _SAFE_ID.fullmatch(instance_id or ""):
        raise ConfigError(f"instance id {instance_id!r} cannot name a file; use letters, digits, '.', '_', '-'")
    return f"{NODES_DIR}/waiting/{instance_id}.json"


def note_waiting(storage: Storage, instance_id: str) -> None:
    storage.write_bytes(waiting_file(instance_id), json.dumps({"instance_id": instance_id,
                                                               "time": time.time()}).encode())


def noted_waiting(storage: Storage, instance_id: str) -> bool:
    """Whether ``instance_id``'s agent noted it waits (a store error reads as not yet)."""
    try:
        return storage.exists(waiting_file(instance_id))
    except OSError as exc:
        log.warning("cannot look for %s's waiting note yet (%s)", instance_id, exc)
        return False

#: How often, once a grow was found, to look whether torchrun's SIGTERM handler is in place.
_HANDLER_POLL_S = 0.05

#: A dead attempt's workers (see "A dead attempt" above): SIGTERM, then SIGKILL this much
#: later. Short: a rank blocked in a collective with a vanished peer never runs its Python
#: handler, and no save of a dead attempt can commit (its gather needs the lost rank), so
#: nothing is waited for; the last committed checkpoint is the restore point. A rank still
#: uploading a save that can never commit (seen: 5.7 s of 256 MiB to S3) is cut as kill -9
#: cuts any save: the committed checkpoint stays intact.
DEAD_STOP_GRACE_S = 2.0

#: After the SIGKILL, how long torchrun's agent gets to return. It can take minutes when the
#: lost node hosted the rendezvous store: the agent's store calls (its monitoring pass, its
#: shutdown) each wait 60 s on a host that never answers. Past this the watch calls
#: ``on_stuck`` (the node agent starts itself afresh: ``spotrun.launch.node``).
DEAD_RETURN_S = 10.0


class GrowWatch:
    """Watch for a growing attempt while torchrun runs (see the module docstring).

    ``look()`` returns this node's next attempt's cluster spec when there is one that grows
    (None otherwise); it is called every ``poll_s`` seconds on a thread of its own. A look
    that raises is logged and tried again (a half-written file on a store without atomic
    writes, a store error): a planned stop is never worth ending the attempt over.
    """

    def __init__(self, look: Callable[[], Any | None], poll_s: float, *, name: str = "",
                 dead_grace_s: float = DEAD_STOP_GRACE_S,
                 stuck_s: float | Callable[[Any], float] = DEAD_RETURN_S,
                 on_stuck: Callable[[Any], None] | None = None,
                 workers: Callable[[], list[int]] | None = None) -> None:
        self._look = look
        #: The dead attempt's workers: the worker sessions this agent (torchrun, in process)
        #: starts from now on; none that was there before the attempt.
        self._workers = workers or sessions_started_after(os.getpid())
        self._dead_grace_s = dead_grace_s
        self._stuck_s = stuck_s
        self._on_stuck = on_stuck
        #: Whether the attempt was found dead (a newer attempt that does not grow) and its
        #: workers were stopped.
        self.dead = False
        self._poll_s = max(0.05, float(poll_s))
        self._name = name
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._running = True
        #: The growing attempt's spec, once found.
        self.spec: Any | None = None
        #: Whether the SIGTERM was sent to this process.
        self.sent = False
        self._thread = threading.Thread(target=self._run, name="spotrun-grow-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self._poll_s if self.spec is None else _HANDLER_POLL_S):
            if self.spec is None:
                try:
                    spec = self._look()
                except Exception as exc:  # noqa: BLE001 - looked at again next poll
                    log.warning("spotrun node %s: cannot read the cluster file (%s); looking again", self._name, exc)
                    continue
                if spec is None:
                    continue
                with self._lock:
                    if not self._running:
                        return
                    self.spec = spec
                if not getattr(spec, "grow", True):
                    self._stop_dead(spec)
                    return
                log.info("spotrun node %s: attempt %s grows the job to %d node(s); stopping this attempt at a "
                         "step (SIGTERM to torchrun: the ranks commit a checkpoint) to join it", self._name,
                         getattr(spec, "segment", "?"), len(getattr(spec, "nodes", ())))
            with self._lock:
                if not self._running:
                    return
                # A Python handler: torchrun's (raising its SignalException, which makes it
                # forward the signal to the workers). SIG_DFL would kill this agent.
                if callable(signal.getsignal(signal.SIGTERM)):
                    os.kill(os.getpid(), signal.SIGTERM)
                    self.sent = True
                    return

    def _stop_dead(self, spec: Any) -> None:
        """A newer attempt names this node and does not grow: the launcher declared a peer
        lost and replaced it while this attempt still runs (its ranks wait in a collective
        on a peer that never answers). Stop its workers: SIGTERM to each worker's session,
        SIGKILL of what is left after the grace; torchrun's agent then sees its workers fail
        and returns, and the node joins ``spec``. Not a signal to the agent (the planned
        stop's): the ranks would try to agree on a stop step with the lost peer."""
        self.dead = True
        # Warm workers: standbys run this attempt's workers though started before it; idle
        # ones (sessions of their own too) wait for the next attempt and are spared.
        idle = warm.idle_pids()
        workers = sorted({*self._workers(), *warm.worker_pids()} - idle)
        log.warning("spotrun node %s: attempt %s replaces a lost node while this attempt runs: it cannot "
                    "finish; stopping its %d worker(s) (SIGTERM, SIGKILL after %gs) to join it from the last "
                    "committed checkpoint", self._name, getattr(spec, "segment", "?"), len(workers),
                    self._dead_grace_s)
        for sig, wait_s in ((signal.SIGTERM, self._dead_grace_s), (signal.SIGKILL, 0.0)):
            with self._lock:
                if not self._running:  # torchrun returned: these workers are gone already
                    return
                for pid in workers:
                    kill_tree(pid, sig)
            end = time.monotonic() + wait_s
            while time.monotonic() < end and any(not pid_gone(p, None) for p in workers):
                if self._done.wait(0.1):
                    return
        stuck_s = self._stuck_s(spec) if callable(self._stuck_s) else self._stuck_s
        if self._done.wait(stuck_s) or self._on_stuck is None:
            return
        with self._lock:
            if not self._running:
                return
            log.warning("spotrun node %s: torchrun's agent has not returned %gs after its workers were killed "
                        "(its rendezvous store was on the lost node?); leaving it behind", self._name, stuck_s)
            self._on_stuck(spec)  # does not return when it starts the agent afresh

    def stop(self) -> None:
        """No signal and no new spec from now on (torchrun returned); the thread ends at its
        next look (not joined: a slow store read must not hold the node up)."""
        with self._lock:
            self._running = False
        self._done.set()
