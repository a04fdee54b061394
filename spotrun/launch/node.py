"""One node of a multi-node job: find the cluster, then run torchrun on it.

A multi-node segment is N machines, each running ``python -m spotrun.launch.node -- CMD``.
They meet through torchrun's own c10d rendezvous; spotrun only tells each node where it is.
Once the launcher (local simulator or EC2 controller) knows every node of a segment, it
writes a **cluster file** under the run URL, ``launch/nodes/<instance id>.json``, one per
node with the same content (:class:`ClusterSpec`): the nodes in order (node 0 hosts the
rendezvous store), the port, and a rendezvous id unique to the attempt, so a relaunched job
never joins the rendezvous of the one before. Keyed by instance id because that is all an
EC2 node knows about itself at boot (from IMDS). No secrets, no fixed addresses.

The node then runs :func:`spotrun.distributed.torchrun` **in this process**, so this process
*is* torchrun's agent: a signal to the node's process group reaches the agent once, and the
agent forwards it once to each worker (torchrun starts each worker in a session of its own,
so the group signal does not reach the workers a second time). The exit code is the
wrapper's: 0 finished, 75 interrupted with a committed checkpoint, 1 failed (also when a
peer node vanished and this node's collectives failed), ``128 + signal`` otherwise.

A vanished peer is noticed quickly only when its connections are reset (its processes
died, its kernel answers): gloo then fails the next collective at once (2-9 s from the kill
to the survivor's exit 1 in tests/test_launch_node_e2e.py). A machine that drops off the
network without resetting them is noticed only at the process group's timeout, so a
launcher that sees a node gone writes the next attempt's cluster files, and a survivor's
agent that sees one naming it while torchrun still runs stops its workers and joins it
(see "Growing back" below and :mod:`spotrun.launch.grow`, "A dead attempt"). To play a vanished node
locally, kill the agent *and* its workers: the workers are in sessions of their own, and
with only the agent killed they train on (the survivor's agent then waits out torchrun's
300 s exit barrier).

The agent imports torch and torchrun's machinery (3 s of CPU) on a thread of its own from
its start, while it waits for its cluster file: a node started before its attempt (a
replacement the launcher asks for at the loss) is ready to run torchrun when the file comes.
An import that fails still fails after the wait, with the import's own exception.

Group ranks follow the cluster file: node ``i`` is rank ``i`` (in an elastic ``M:N`` attempt,
the nodes that joined numbered in slot order), so a survivor of a replacement keeps its rank
and its local copy (:mod:`spotrun.launch.ranks`: the slot rides in ``--rdzv-conf``, torchrun's
c10d rendezvous numbers by it). Which node hosts the store is separate: node ``host``, 0
unless the launcher names a survivor (see below).

**Rejoining** (``--rejoin-timeout S``, set by the launchers when ``--recovery replace``):
after torchrun returns, the node writes ``launch/nodes/exits/<segment>/<instance id>.json``
(its exit code for that attempt, which the local simulator reads to know the attempt is
over on a machine that stays). When the code says the attempt was interrupted (75: every
rank stopped at one step on a notice; 1: a peer vanished and the collectives failed; 143 or
130 when only the workers were stopped so, their stop checkpoint having missed its deadline
on a peer's notice, and not this agent: :func:`spotrun.distributed.last_agent_signal`) and
this machine has no interruption notice of its own, the node waits up to S seconds for a
cluster file of a *newer* attempt that names it (the launcher keeps the survivors and starts
only replacements) and runs torchrun again, under that attempt's new rendezvous id. No such
file in time, or a signal while waiting: it exits 75 (interrupted: its peer's loss stopped it,
the last committed checkpoint is intact; a 1 here would read as the command failing, after
the launcher already dealt with the loss). A notice for this machine, a signal to this agent (143/130 with the agent
signalled: the machine is shutting down), or any other code: it exits with torchrun's code,
as before (on EC2 the instance then shuts down).

**Growing back** (same flag): while torchrun runs, a node that may rejoin also watches its
cluster file for a newer attempt marked ``grow`` (the controller growing a ``--min-nodes``
job back to N once capacity returned); then it stops its own attempt with a SIGTERM to
torchrun (the ranks commit at one step and exit 75) and joins that attempt whatever the
code (:mod:`spotrun.launch.grow`). A newer attempt that does not grow, seen while torchrun
runs, means a peer was lost and replaced meanwhile (it vanished without resetting its
connections): the attempt is dead, so its workers are stopped at once (SIGTERM, SIGKILL 5 s
later) and the node joins the new one; a torchrun agent still blocked 10 s after that (1 s
when the lost node hosted the rendezvous store it blocks on) is left behind: the agent
notes exit 1 for the dead attempt and execs itself afresh for the new one
(:func:`_start_afresh`). Such a node also notes, before its first wait, that it waits
(``launch/nodes/waiting/<instance id>.json``): the controller writes a grown attempt's files
only once every new node is there, so the survivors train on while it boots.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ClusterWaitError, ConfigError, SpotrunError
from ..records.heartbeat import HeartbeatWriter
from ..records.layout import EXIT_INTERRUPTED, EXIT_STOP_UNSAVED, NODES_DIR
from ..recovery.peer import new_token, serve_attempt, valid_token
from ..storage import Storage
from ..validate import argparse_type, number
from . import warm
from .common import MAX_NODES, MAX_NPROC_PER_NODE, check_count
from .grow import DEAD_RETURN_S, GrowWatch, note_waiting
from .ranks import SLOT_KEY

__all__ = [
    "CLUSTER_VERSION",
    "DEFAULT_PORT",
    "REJOIN_CODES",
    "SIGNAL_REJOIN_CODES",
    "ClusterSpec",
    "attempt_exit_file",
    "cluster_file",
    "main",
    "next_cluster",
    "node_argv",
    "read_attempt_exit",
    "read_cluster",
    "torchrun_command",
    "wait_for_cluster",
    "wait_for_next_cluster",
    "write_attempt_exit",
    "write_cluster",
]

log = logging.getLogger("spotrun.launch.node")

CLUSTER_VERSION = 1
#: torchrun's own default rendezvous port.
DEFAULT_PORT = 29400
# A file name under the run URL, on every storage backend: no separators, no dot files.
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Interpreters the command may name; torchrun starts its own (this one) in their place.
_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")
#: torchrun's codes after which a node whose machine survived may join the next attempt:
#: the ranks stopped at one step on a notice (75), or a peer vanished mid-collective (1).
REJOIN_CODES = (EXIT_INTERRUPTED, 1)
#: torchrun's codes after which such a node rejoins only when its agent was not signalled:
#: its workers were stopped by a signal (143: the stop checkpoint missed its deadline, on a
#: peer's notice; 130: SIGINT). The agent signalled itself means this machine is going.
SIGNAL_REJOIN_CODES = (EXIT_STOP_UNSAVED, 128 + signal.SIGINT)


def cluster_file(instance_id: str) -> str:
    """Where the cluster file of the node ``instance_id`` lives, relative to the run URL."""
    if not _SAFE_ID.fullmatch(instance_id or ""):
        raise ConfigError(f"instance id {instance_id!r} cannot name a cluster file; use letters, "
                          "digits, '.', '_' and '-' only (as EC2 instance ids do)")
    return f"{NODES_DIR}/{instance_id}.json"


@dataclass(frozen=True)
class ClusterSpec:
    """Everything a node needs to join one attempt of a multi-node job."""

    #: The launcher's segment id for this attempt.
    segment: str
    #: ``{"instance_id", "address"}`` per node; node 0 hosts the rendezvous store.
    nodes: list[dict[str, str]]
    nproc_per_node: int
    #: torchrun's ``--rdzv-id``: new for every attempt (run id + segment).
    rdzv_id: str
    port: int = DEFAULT_PORT
    #: Elastic lower bound (``--nnodes MIN:MAX``); None means every node (``len(nodes)``).
    min_nodes: int | None = None
    version: int = field(default=CLUSTER_VERSION)
    #: The attempt's secret for the peer copy channel (spotrun.recovery.peer), new per spec;
    #: written only in the cluster file (never in a repr, so never in a log line; not part of
    #: equality: segment and rendezvous id name the attempt). Empty (an older cluster file):
    #: no peer copies.
    peer_token: str = field(default_factory=new_token, repr=False, compare=False)
    #: The index of the node that hosts the rendezvous store: 0, or a survivor when the
    #: launcher replaced node 0 (a replacement still booting cannot host the store the
    #: survivors connect to at once). Older readers ignore it and use node 0.
    host: int = 0
    #: The attempt's sequence number in the run (0: not numbered, an older launcher): a
    #: node waiting to rejoin joins only a file of a later attempt than its last.
    attempt: int = 0
    #: This attempt grows a shrunk job back (``--min-nodes``): a node running an older
    #: attempt when it appears stops that one at a step and joins this (spotrun.launch.grow).
    grow: bool = False

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("a cluster needs at least one node; list the segment's nodes")
        ids = []
        if not isinstance(self.nodes, list) or len(self.nodes) > MAX_NODES:
            raise ConfigError(f"cluster nodes must be a list of at most {MAX_NODES} nodes")
        for node in self.nodes:
            if (not isinstance(node, dict) or not isinstance(node.get("instance_id"), str)
                    or not node.get("address") or not isinstance(node.get("address"), str)):
                raise ConfigError(f"cluster node {node!r} needs an instance_id and an address (text)")
            cluster_file(node["instance_id"])  # validates the id
            ids.append(node["instance_id"])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"cluster nodes {ids} repeat an instance id; list each node once")
        # Each count through the one checker of whole numbers: a JSON ``true`` is no port
        # or count (it would become ``127.0.0.1:True``), nor is 10**6 processes per node.
        check_count(self.port, 1, 65535, f"rendezvous port {self.port!r} is not a TCP port; use 1-65535")
        check_count(self.nproc_per_node, 1, MAX_NPROC_PER_NODE, f"nproc_per_node {self.nproc_per_node!r} must "
               f"be a positive integer, at most {MAX_NPROC_PER_NODE}")
        check_count(self.attempt, 0, None, f"attempt number {self.attempt!r} must be a whole number >= 0")
        check_count(self.host, 0, len(self.nodes) - 1, f"rendezvous host {self.host!r} must index one of the "
                    f"{len(self.nodes)} nodes listed")
        if self.min_nodes is not None:
            check_count(self.min_nodes, 1, len(self.nodes), f"min_nodes {self.min_nodes!r} must be between 1 "
                   f"and the {len(self.nodes)} nodes listed")
        check_count(self.version, 1, None, f"cluster file version {self.version!r} is not a version number; "
               "rewrite it with write_cluster")
        if not isinstance(self.segment, str) or not _SAFE_ID.fullmatch(self.segment):
            # It names the attempt's folder under logs/ (and nothing may climb out of it).
            raise ConfigError(f"cluster file segment {self.segment!r}: use letters, digits, '.', '_', '-'")
        if not isinstance(self.rdzv_id, str) or not _SAFE_ID.fullmatch(self.rdzv_id):
            raise ConfigError(f"rendezvous id {self.rdzv_id!r}: use letters, digits, '.', '_', '-'")
        if self.peer_token and not valid_token(self.peer_token):
            raise ConfigError("cluster file peer_token is not 32-128 hex digits; rewrite it with write_cluster")
        if not isinstance(self.grow, bool):
            raise ConfigError(f"cluster file grow {self.grow!r} must be true or false")
        if self.version > CLUSTER_VERSION:
            raise ConfigError(f"cluster file version {self.version} is newer than this spotrun "
                              f"understands ({CLUSTER_VERSION}); upgrade spotrun on the node")

    @property
    def head(self) -> str:
        """The rendezvous endpoint, ``HOST:PORT`` (IPv6 hosts in brackets)."""
        host = self.nodes[self.host]["address"]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def peer_address(self, index: int) -> str:
        """``HOST:PORT`` of node ``index``'s peer copy server: its own address, port
        ``port + 1 + index`` (the nodes of a simulated cluster share one address)."""
        host = self.nodes[index]["address"]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = self.port + 1 + index
        if port > 65535:
            raise ConfigError(f"rendezvous port {self.port} leaves no peer port for node {index}; "
                              f"use a port below {65535 - len(self.nodes)}")
        return f"{host}:{port}"

    def index(self, instance_id: str) -> int:
        for i, node in enumerate(self.nodes):
            if node["instance_id"] == instance_id:
                return i
        raise ClusterWaitError(f"the cluster file of segment {self.segment} does not list node "
                               f"{instance_id!r}; the launcher must list every node it started")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ClusterSpec:
        if not isinstance(data, dict):
            raise ConfigError("a cluster file must hold a JSON object; rewrite it with write_cluster")
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}
        fields.setdefault("peer_token", "")  # an older file: no token, never one per node
        try:
            return cls(**fields)
        except TypeError as exc:  # a missing field
            raise ConfigError(f"cluster file is incomplete ({exc}); rewrite it with write_cluster") from None


def write_cluster(storage: Storage, spec: ClusterSpec) -> list[str]:
    """Write ``spec`` as every node's cluster file; returns the paths written.

    Each write replaces one whole file atomically, so a node reads the old file or this one.
    """
    data = json.dumps(spec.to_json(), indent=1, sort_keys=True).encode()
    paths = [cluster_file(node["instance_id"]) for node in spec.nodes]
    for path in paths:
        storage.write_bytes(path, data)
    return paths


def read_cluster(storage: Storage, instance_id: str) -> ClusterSpec | None:
    """The node's cluster file, or None when there is none yet."""
    path = cluster_file(instance_id)
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_bytes(path))
    except ValueError as exc:
        raise ConfigError(f"{storage.display(path)} is not JSON ({exc}); rewrite it") from None
    return ClusterSpec.from_json(data)


def wait_for_cluster(storage: Storage, instance_id: str, timeout_s: float = 600.0,
                     poll_s: float = 2.0, *, segment: str | None = None) -> ClusterSpec:
    """Poll until this node's cluster file exists (for ``segment``, when given); return it.

    A file of another segment (left by an earlier attempt that reused the id) is waited
    past, not joined. Raises :class:`ClusterWaitError` after ``timeout_s``.
    """
    path = cluster_file(instance_id)
    deadline = time.monotonic() + timeout_s
    seen_other = None
    while True:
        spec = read_cluster(storage, instance_id)
        if spec is not None and (segment is None or spec.segment == segment):
            spec.index(instance_id)  # a file that does not list this node is a launcher bug
            return spec
        if spec is not None:
            seen_other = spec.segment
        if time.monotonic() >= deadline:
            other = f" (found one of segment {seen_other}, not {segment})" if seen_other else ""
            raise ClusterWaitError(
                f"no cluster file at {storage.display(path)} after {timeout_s:g}s{other}; the "
                "launcher writes it once every node of the segment is up: check the launcher, "
                "or wait longer (--timeout)")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def wait_for_next_cluster(storage: Storage, instance_id: str, after: ClusterSpec, timeout_s: float,
                          poll_s: float = 2.0) -> ClusterSpec | None:
    """Poll until this node's cluster file names a newer attempt than ``after`` (another
    segment and rendezvous id, not a lower attempt number: a controller rewriting an older
    attempt's file must not send a node back to it); None after ``timeout_s``. A file that cannot be read yet (a
    store error, a half-written object on a store without atomic writes) is looked at again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            spec = next_cluster(storage, instance_id, after)
        except (ConfigError, OSError) as exc:
            log.warning("cannot read the cluster file of %s yet (%s); looking again", instance_id, exc)
            spec = None
        if spec is not None:
            return spec
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def next_cluster(storage: Storage, instance_id: str, after: ClusterSpec) -> ClusterSpec | None:
    """One look: this node's cluster file when it names a newer attempt than ``after``, else
    None (see :func:`wait_for_next_cluster`). Raises what reading it raises."""
    spec = read_cluster(storage, instance_id)
    if (spec is not None and spec.segment != after.segment and spec.rdzv_id != after.rdzv_id
            and spec.attempt >= after.attempt):
        spec.index(instance_id)
        return spec
    return None


def _next_grow(storage: Storage, instance_id: str, after: ClusterSpec) -> ClusterSpec | None:
    """:func:`next_cluster` when that attempt grows the job (the planned stop's trigger)."""
    spec = next_cluster(storage, instance_id, after)
    return spec if spec is not None and spec.grow else None


def _look_next(storage: Storage, instance_id: str, after: ClusterSpec) -> ClusterSpec | None:
    """The running attempt's watch (:class:`GrowWatch`): :func:`next_cluster`. One that grows
    is a planned stop; any other newer attempt naming this node means the launcher replaced
    a lost peer while this attempt runs, so this attempt is dead (its collectives wait on
    the lost peer) and is stopped at once."""
    return next_cluster(storage, instance_id, after)


def attempt_exit_file(segment: str, instance_id: str) -> str:
    """Where a node notes torchrun's exit code for one attempt, relative to the run URL."""
    cluster_file(instance_id)  # validates the id
    if not _SAFE_ID.fullmatch(segment or ""):
        raise ConfigError(f"segment {segment!r}: use letters, digits, '.', '_', '-'")
    return f"{NODES_DIR}/exits/{segment}/{instance_id}.json"


def write_attempt_exit(storage: Storage, segment: str, instance_id: str, exit_code: int) -> None:
    """Note that this node's torchrun for ``segment`` returned ``exit_code`` (the machine may
    stay to rejoin, so its process's own end says nothing)."""
    data = {"segment": segment, "instance_id": instance_id, "exit_code": int(exit_code), "time": time.time()}
    storage.write_bytes(attempt_exit_file(segment, instance_id), json.dumps(data).encode())


def read_attempt_exit(storage: Storage, segment: str, instance_id: str) -> int | None:
    """The exit code ``instance_id`` noted for ``segment``, or None when it noted none (yet)."""
    path = attempt_exit_file(segment, instance_id)
    try:
        if not storage.exists(path):
            return None
        code = json.loads(storage.read_bytes(path)).get("exit_code")
    except (OSError, ValueError, AttributeError):
        return None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _own_notice() -> bool:
    """Whether this machine has an interruption notice posted now (then it is going too, and
    its node does not wait to rejoin). Unreachable metadata counts as no notice: the wait
    is bounded anyway."""
    try:
        from ..notices.base import PollingWatcher
        from ..notices.detect import watchers_from_env

        for watcher in watchers_from_env(rebalance="ignore"):
            # One poll, now (the watcher's thread would deliver it a poll later).
            if isinstance(watcher, PollingWatcher) and any(n.stop for _key, n in watcher._poll()):
                return True
    except Exception as exc:  # noqa: BLE001 - a failed look is no notice
        log.warning("could not ask the metadata service for a notice (%s); assuming none", exc)
    return False


class _Leave(BaseException):
    """A signal arrived after the node's attempt (while it waited to rejoin, or before).
    Not an Exception: the broad excepts around best-effort steps must not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_leave(signum: int, _frame: Any) -> None:
    raise _Leave(signum)


def _rejoin(storage: Storage, instance_id: str, spec: ClusterSpec, code: int, timeout_s: float,
            poll_s: float, *, signalled: bool = False) -> tuple[ClusterSpec | None, int]:
    """(the next attempt's cluster file, None when this node should not or cannot join one;
    the code to exit with then: see "Rejoining"). ``signalled``: torchrun's agent (this
    process) got a signal during the attempt."""
    if timeout_s <= 0 or not (code in REJOIN_CODES or (code in SIGNAL_REJOIN_CODES and not signalled)):
        return None, code
    if _own_notice():
        log.info("spotrun node %s: this machine has an interruption notice; not waiting to rejoin", instance_id)
        return None, code
    log.info("spotrun node %s: torchrun exited %d; waiting up to %gs for the next attempt's cluster file "
             "(this machine stays)", instance_id, code, timeout_s)
    previous = {sig: signal.signal(sig, _raise_leave) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        nxt = wait_for_next_cluster(storage, instance_id, spec, timeout_s, poll_s)
    except _Leave as leave:
        log.info("spotrun node %s: signal %d while waiting to rejoin; exiting %d", instance_id, leave.signum,
                 EXIT_INTERRUPTED)
        return None, EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if nxt is None:
        log.warning("spotrun node %s: no newer cluster file naming this node after %gs; exiting %d",
                    instance_id, timeout_s, EXIT_INTERRUPTED)
    return nxt, EXIT_INTERRUPTED


def _agent_signal() -> int | None:
    """The signal torchrun's agent (this process) got in its last run, from
    :func:`spotrun.distributed.last_agent_signal` (None: none, or a module without it)."""
    getter = getattr(sys.modules.get("spotrun.distributed"), "last_agent_signal", None)
    return getter() if callable(getter) else None


def _run_torchrun(torchrun: Any, argv: list[str], watch: GrowWatch | None) -> int:
    """``torchrun(argv)``, the grow watch stopped the moment it returns. The watch's own
    SIGTERM raised outside torchrun's handling of it (it came as torchrun was starting or
    returning: its handler stays installed) is that planned stop, not an error: 1, and the
    node joins the growing attempt from the last committed checkpoint."""
    try:
        try:
            return int(torchrun(argv))
        finally:
            if watch is not None:
                watch.stop()
    except Exception as exc:
        if watch is None or not watch.sent:
            raise
        log.warning("the planned stop's signal ended torchrun outside its own handling (%s: %s)",
                    type(exc).__name__, exc)
        return 1


def _look_again(storage: Storage, instance_id: str, after: ClusterSpec) -> ClusterSpec | None:
    try:
        return next_cluster(storage, instance_id, after)
    except (ConfigError, OSError) as exc:
        log.warning("cannot read the cluster file of %s (%s); using the one read before", instance_id, exc)
        return None


def torchrun_command(command: Sequence[str]) -> list[str]:
    """The user's command as torchrun's trailing arguments (script and its args).

    ``python[3[.x]] [-u] train.py ...`` and ``train.py ...`` -> ``train.py ...``;
    ``python -m pkg ...`` -> ``--module pkg ...``; any other program (or an interpreter by a
    path that is not the one running spotrun) -> ``--no-python PROGRAM ...``, run as is.
    """
    cmd = list(command)
    if not cmd or not cmd[0]:
        raise ConfigError("no command to run; give it after '--', e.g. -- python train.py")
    first = cmd[0]
    name = os.path.basename(first)
    ours = "/" not in first or os.path.realpath(first) == os.path.realpath(sys.executable)
    if _PYTHON.fullmatch(name) and ours:
        rest = cmd[1:]
        while rest and rest[0] == "-u":  # torchrun runs python -u already
            rest = rest[1:]
        if not rest:
            raise ConfigError(f"{' '.join(cmd)!r} names no script; give one, e.g. python train.py")
        if rest[0] == "-m":
            if len(rest) < 2:
                raise ConfigError("'python -m' names no module; give one, e.g. python -m pkg.train")
            return ["--module", rest[1], *rest[2:]]
        if rest[0].startswith("-"):
            raise ConfigError(f"torchrun cannot pass the interpreter option {rest[0]!r}; "
                              "set it through the environment (PYTHONWARNINGS, ...) instead")
        return rest
    if first.startswith("-"):
        raise ConfigError(f"command {first!r} starts with an option; name the program first")
    if name.endswith(".py"):
        return cmd
    return ["--no-python", *cmd]


def node_argv(spec: ClusterSpec, instance_id: str, command: Sequence[str]) -> list[str]:
    """The arguments of ``python -m spotrun.distributed`` (torchrun's) for this node."""
    index = spec.index(instance_id)
    n = len(spec.nodes)
    low = n if spec.min_nodes is None else spec.min_nodes
    return [
        "--nnodes", str(n) if low == n else f"{low}:{n}",
        "--nproc-per-node", str(spec.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", spec.head,
        "--rdzv-id", spec.rdzv_id,
        # Explicit, never guessed from the hostname: two "nodes" on one machine would both
        # think they are the host (and on EC2 a private DNS name may not match).
        # The slot: node ranks follow the cluster file, not torchrun's sort of the nodes
        # that joined (spotrun.launch.ranks; the wrapper takes it out of torch's config).
        "--rdzv-conf", f"is_host={1 if index == spec.host else 0},{SLOT_KEY}={index}",
        "--local-addr", spec.nodes[index]["address"],
        # torchrun restarting its workers in place would not replace a lost node; spotrun's
        # launcher relaunches the whole job from the last committed checkpoint instead.
        "--max-restarts", "0",
        *torchrun_command(command),
    ]


def _instance_id() -> str:
    for name in ("SPOTRUN_INSTANCE_ID", "SPOTRUN_SEGMENT_ID"):
        if os.environ.get(name):
            return os.environ[name]
    raise ConfigError("this node does not know its id; set SPOTRUN_INSTANCE_ID "
                      "(the launcher sets it on every node)")


class _Preload:
    """``spotrun.distributed`` (torch and torchrun's machinery, 3 s of CPU here) imported on a
    thread of its own from the agent's start, while it waits for its cluster file: a node
    started before its attempt (a replacement asked for at the loss) is then ready to run
    torchrun the moment the file comes, instead of starting the import then.

    Why a thread and not the import before the wait: the wait itself (opening the run URL,
    boto3 on S3) overlaps it, and an import that fails still fails where it failed before the
    preload, after the wait, with the same exception: :meth:`torchrun` joins the thread (the
    main thread never imports the module while the thread does) and raises what the import
    raised."""

    def __init__(self, tail: tuple[str, ...] | None) -> None:
        self._tail = tail  # what a warm worker's standby runs (spotrun.launch.warm.worker_tail)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spotrun-preload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if warm.enabled():
            # torchrun's first worker will run in it (SPOTRUN_WARM_WORKERS): a standby imports
            # torch in a process of its own, alongside this import, before the cluster file
            # comes (the attempt's worker count comes with the file; torchrun starts the rest).
            warm.pool().fill(1, self._tail)
        try:
            module = importlib.import_module("spotrun.distributed")
        except BaseException as exc:  # noqa: BLE001 - raised again by torchrun(), in the main thread
            self._error = exc
            return
        try:
            preload = getattr(module, "preload", None)  # a stand-in module (tests) has none
            if preload is not None:
                preload()
        except Exception as exc:  # noqa: BLE001 - torchrun() imports these itself and raises then
            log.debug("preloading torchrun's modules failed (%s); torchrun imports them again", exc)

    def torchrun(self) -> Any:
        """:func:`spotrun.distributed.torchrun`, once the thread's import is done."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        from ..distributed import torchrun

        return torchrun


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spotrun.launch.node [--timeout S] -- CMD...``; exits with torchrun's code."""
    beats: list[HeartbeatWriter] = []
    try:
        return _main(argv, beats)
    finally:
        for beat in beats:  # an agent run in-process (tests) leaves no writer behind
            beat.stop()
        warm.close()  # nor idle standbys (a real agent leaves by os._exit: they see EOF)


def _main(argv: Sequence[str] | None, beats: list[HeartbeatWriter]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotrun.launch.node",
        description="Wait for this node's cluster file under $SPOTRUN_URL, then run CMD under "
                    "torchrun (spotrun.distributed) with the c10d rendezvous it names.")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the cluster file (default 600)")
    parser.add_argument("--poll", type=float, default=2.0,
                        help="seconds between looks for the cluster file (default 2)")
    parser.add_argument("--segment", default=None,
                        help="join only a cluster file of this segment (wait past older ones)")
    parser.add_argument("--rejoin-timeout", default=0.0,
                        type=argparse_type(number, "--rejoin-timeout", minimum=0.0, example="900"),
                        help="after an interrupted attempt, wait this long for a newer cluster file "
                             "naming this node and run again (default 0: exit)")
    parser.add_argument("--grow-poll", default=10.0,
                        type=argparse_type(number, "--grow-poll", minimum=0.05, example="10"),
                        help="with --rejoin-timeout, while torchrun runs: seconds between looks for a "
                             "newer cluster file (one that grows the job, or replaces a lost peer while "
                             "this attempt hangs; default 10; two small reads each)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    base_env = dict(os.environ)  # before any attempt's own variables (see _start_afresh)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from ..storage import open_storage

        url = os.environ.get("SPOTRUN_URL")
        if not url:
            raise ConfigError("SPOTRUN_URL is not set; the launcher sets it to the run URL")
        # A command it cannot run fails before any waiting.
        tail = warm.worker_tail(torchrun_command(command))
        instance_id = _instance_id()
        preload = _Preload(tail)
        storage = open_storage(url)
        if args.rejoin_timeout > 0:
            try:  # a new node of a grown attempt: the controller writes its file once this is there
                note_waiting(storage, instance_id)
            except Exception as exc:  # noqa: BLE001 - the note only times a grow; its absence bounds it
                log.warning("could not note that this node waits in the run URL: %s", exc)
        spec = wait_for_cluster(storage, instance_id, args.timeout, args.poll, segment=args.segment)
        argv_ = node_argv(spec, instance_id, command)
    except SpotrunError as exc:
        print(f"spotrun: error: {exc}", file=sys.stderr)
        return exc.exit_code
    torchrun = preload.torchrun()
    # Liveness for the EC2 controller's --node-silence, from the node's first attempt on,
    # through its rejoin waits; the lambda reads the attempt the loop below runs now.
    beat = HeartbeatWriter.start(storage, instance_id, attempt=lambda: spec.segment)
    if beat is not None:
        beats.append(beat)

    while True:  # one pass per attempt this machine runs (see "Rejoining")
        index = spec.index(instance_id)
        log.info("spotrun node %s: node %d of %d in segment %s, rendezvous %s (id %s, %s), "
                 "%d process(es) per node", instance_id, index, len(spec.nodes), spec.segment,
                 spec.head, spec.rdzv_id, "host" if index == spec.host else "joining", spec.nproc_per_node)
        code, previous = 1, None
        # A survivor of a shrunk job watches for the attempt that grows it back (spotrun.launch.grow).
        # And for an attempt that replaces a lost peer while this one still runs: a peer that
        # vanished silently leaves this attempt's collectives waiting (spotrun.launch.grow).
        watch = (GrowWatch(lambda s=spec: _look_next(storage, instance_id, s), args.grow_poll, name=instance_id,
                           stuck_s=lambda nxt, old=spec: _stuck_s(old, nxt),
                           on_stuck=lambda nxt, old=spec: _start_afresh(args, command, base_env, storage,
                                                                        instance_id, old, nxt))
                 if args.rejoin_timeout > 0 else None)
        if warm.enabled():
            # Standby interpreters for this attempt's workers (spotrun.launch.warm): the first
            # came with the agent's start; a no-op where they wait already. A machine that may
            # run the next attempt too starts its next ones after this attempt's first step.
            standbys = warm.pool()
            standbys.fill(spec.nproc_per_node, tail)
            if watch is not None:
                standbys.keep(spec.nproc_per_node, tail)
        try:
            with serve_attempt(spec, index) as peer_env:
                os.environ.update(peer_env)  # torchrun's workers inherit the agent's environment
                try:
                    code = _run_torchrun(torchrun, argv_, watch)
                finally:
                    for key in peer_env:  # this attempt's token and addresses end with it
                        os.environ.pop(key, None)
                    # torchrun's own signal handlers stay installed after it returns and would
                    # raise its SignalException inside whatever runs next (the peer server's
                    # linger, the exit note, the notice check), where a broad except swallowed
                    # it: the launcher's SIGTERM then went unheard for its whole grace period.
                    previous = {sig: signal.signal(sig, _raise_leave) for sig in (signal.SIGTERM, signal.SIGINT)}
                # Noted before the peer server's linger (serve_attempt's exit): the launcher
                # starts the next attempt once every node noted, so the linger overlaps its
                # work instead of adding to it. Nothing is cut by that: every worker sends its
                # copies before it exits, so once all nodes noted, no transfer is under way.
                try:
                    write_attempt_exit(storage, spec.segment, instance_id, code)
                except Exception as exc:  # noqa: BLE001 - the note helps the launcher; its absence ends no run
                    log.warning("could not note this node's exit code in the run URL: %s", exc)
            if watch is not None and watch.spec is not None:
                # The planned stop for a grow: join that attempt whatever the code (a newer
                # file written since wins, as in the rejoin wait).
                nxt = _look_again(storage, instance_id, spec) or watch.spec
                log.info("spotrun node %s: torchrun exited %d on the %s; joining attempt %s (%d nodes)",
                         instance_id, code, "stop of a dead attempt" if watch.dead else "planned stop",
                         nxt.segment, len(nxt.nodes))
            else:
                signalled = _agent_signal() is not None
                nxt, code = _rejoin(storage, instance_id, spec, code, args.rejoin_timeout, args.poll,
                                    signalled=signalled)
        except _Leave as leave:
            code = EXIT_INTERRUPTED if code in REJOIN_CODES else code
            log.info("spotrun node %s: signal %d after its attempt; exiting %d", instance_id, leave.signum, code)
            return code
        except SpotrunError as exc:
            print(f"spotrun: error: {exc}", file=sys.stderr)
            return code
        finally:
            for sig, handler in (previous or {}).items():
                signal.signal(sig, handler)
        if nxt is None:
            return code
        spec, argv_ = nxt, node_argv(nxt, instance_id, command)

def _stuck_s(old: ClusterSpec, nxt: ClusterSpec) -> float:
    """How long a dead attempt's torchrun agent gets to return once its workers were killed:
    briefly when its rendezvous store's host is not in the next attempt (lost: every store
    call the agent makes waits 60 s on it, measured over 2 min in all), else the default."""
    host = old.nodes[old.host]["instance_id"] if 0 <= old.host < len(old.nodes) else None
    return 1.0 if host not in {n["instance_id"] for n in nxt.nodes} else DEAD_RETURN_S


def _start_afresh(args: argparse.Namespace, command: list[str], env: dict[str, str], storage: Storage,
                  instance_id: str, old: ClusterSpec, nxt: ClusterSpec) -> None:
    """A dead attempt's torchrun agent that does not return once its workers were killed
    (GrowWatch): blocked in a call to a rendezvous store on the lost node, where no signal
    helps. This process becomes a fresh node agent for ``nxt`` (exec: the same pid, so the
    launcher and EC2's user data still see their node; the same stdout), with the
    environment it started with. Nothing is lost: the workers are dead, the run URL holds
    the last committed checkpoint, and sockets and pipes (peer server, idle standbys: they leave) close
    with the old image."""
    try:
        write_attempt_exit(storage, old.segment, instance_id, 1)
    except Exception as exc:  # noqa: BLE001 - the note helps a launcher; its absence ends no run
        log.warning("could not note this node's exit code in the run URL: %s", exc)
    notes = os.environ.get("SPOTRUN_EXIT_NOTES")  # spotrun.distributed's, left by its torchrun()
    if notes and notes != env.get("SPOTRUN_EXIT_NOTES"):
        shutil.rmtree(notes, ignore_errors=True)
    argv = [sys.executable, "-m", "spotrun.launch.node", "--timeout", f"{args.timeout:g}", "--poll", f"{args.poll:g}",
            "--rejoin-timeout", f"{args.rejoin_timeout:g}", "--grow-poll", f"{args.grow_poll:g}",
            "--segment", nxt.segment, "--", *command]
    log.warning("spotrun node %s: starting this node agent afresh for attempt %s (exit 1 noted for %s)",
                instance_id, nxt.segment, old.segment)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.execve(sys.executable, argv, env)


def _leave(code: int) -> None:
    """Exit with ``code`` once the output is flushed, without finalizing the interpreter: this
    agent's attempts are over (exit note written, peer server stopped, torchrun returned), and
    finalizing an interpreter that imported torch took 1.2-2.5 s on the loaded 2-core test
    machine (0.05-0.09 s without). The local launcher waits for a leaving machine's agent (a
    noticed node's) before it starts the next attempt, and an EC2 node shuts down after it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush to
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _leave(main())
