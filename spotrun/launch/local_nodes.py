"""The local simulator's machines: each node of an attempt is a process group of its own
(its own session, so a terminal's Ctrl-C reaches only the launcher), with its own fake EC2
metadata service, its ledger segment, and its output shipped to ``RUN_URL/logs/``.

:class:`LocalNodes` starts an attempt's nodes (writing their cluster file first, for a
multi-node attempt), and stops and closes them; :mod:`.local` plays spot on them. A node kept
from the attempt before (``--recovery replace``) is the same machine: the same process group
(its node agent waits to rejoin), metadata service, ledger segment and local directory.

Each machine has its own node-local directory, ``SPOTRUN_LOCAL_DIR=<base>/<machine id>``
(base: the launcher's ``SPOTRUN_LOCAL_DIR``, default ``/dev/shm/spotrun``; none when it is
``off``), deleted when the machine ends, as a lost machine's memory is: no node can read
another's copy except through the peer channel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LaunchError
from ..records.events import Cloud, EndReason, Market
from ..records.instance import InstanceInfo
from ..records.launch_state import Segment
from .base import LaunchEventKind
from .ports import free_port
from .proctree import kill_tree

if TYPE_CHECKING:
    from .local import LocalLauncher

__all__ = ["LocalNodes", "killpg", "local_dir_base"]

REGION = "us-east-1"
ZONE = "us-east-1a"


class LocalNodes:
    """Starts and stops the node process groups of ``launcher``'s attempts."""

    def __init__(self, launcher: LocalLauncher) -> None:
        self.launcher = launcher

    def start(self, k: int, start_step: int | None, keep: dict[int, _Node] | None = None,
              early: dict[int, _Node] | None = None) -> tuple[str, list[_Node]]:
        """Record and start the attempt's node(s); returns (log segment id, nodes). ``keep``:
        the survivors of the attempt before, by index, whose machines this attempt reuses
        (their agents wait for this attempt's cluster file); ``early``: replacements started
        at the loss (:meth:`start_early`), by index, whose agents wait for it too; the other
        slots get new nodes."""
        ctrl = self.launcher  # the launcher whose nodes these are
        o = ctrl.options
        keep = keep or {}
        early = early or {}
        ready = {**keep, **early}
        group = f"sim-{k}"
        count = o.nodes if o.cluster else 1
        ids = ([ready[i].seg.segment_id if i in ready else self._new_id(group, i) for i in range(count)]
               if o.cluster else [group])
        if o.cluster:
            from .node import ClusterSpec, write_cluster

            # Before the new nodes start: each finds its file at once (the attempt and its
            # rendezvous id are new, so no node can join an older attempt's rendezvous). A
            # survivor hosts the store when there is one: it is up already.
            try:
                write_cluster(ctrl.storage, ClusterSpec(
                    segment=group, nproc_per_node=o.nproc_per_node or 1,
                    rdzv_id=f"{ctrl.state.run_id}-{group}", port=free_port(following=len(ids)),
                    nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ids],
                    host=min(keep) if keep else 0, attempt=k))
            except BaseException:
                self.abandon(list(ready.values()))
                raise
            command = self._node_command(group, 120.0)
        else:
            command = list(o.command)
        nodes: list[_Node] = []
        try:
            for index, node_id in enumerate(ids):
                if index in ready:
                    nodes.append(ready[index])  # its agent already waits for this attempt
                    continue
                nodes.append(self._machine(index, node_id, group, command))
        except BaseException as exc:
            # Nothing started may outlive a failed start (a node is in its own session), nor
            # a kept machine waiting for an attempt that will not come.
            nodes += [n for n in ready.values() if n not in nodes]
            self.abandon(nodes)
            if not isinstance(exc, OSError):
                raise
            for node in nodes:
                if node.seg.open:
                    ctrl.book.end(node.seg, EndReason.FAILED, ended_at=ctrl.clock(), detail=str(exc))
            raise LaunchError(f"cannot start {command[0]!r}: {exc}") from exc
        where = (f"{count} simulated {o.instance_type} spot nodes x {o.nproc_per_node or 1} process(es), "
                 f"{', '.join(ids)}" if o.cluster else f"{group}, simulated {o.instance_type} spot")
        if keep:
            where += f"; kept {', '.join(keep[i].seg.segment_id for i in sorted(keep))}"
        if early:
            where += f"; {', '.join(early[i].seg.segment_id for i in sorted(early))} started at the loss"
        ctrl._say(f"segment {k} ({where}): {' '.join(o.command)}"
                  + (f" (resuming after step {start_step})" if start_step is not None else ""),
                  LaunchEventKind.SEGMENT_STARTED, group)
        return group, nodes

    def _new_id(self, group: str, index: int) -> str:
        """``sim-K-nI``, or ``sim-K-nI-J`` when a replacement started at the loss for that
        slot died before the attempt and already holds the plain id."""
        taken = {s.segment_id for s in self.launcher.state.segments}
        node_id, j = f"{group}-n{index}", 1
        while node_id in taken:
            j += 1
            node_id = f"{group}-n{index}-{j}"
        return node_id

    def start_early(self, k: int, index: int) -> _Node:
        """Start the machine that replaces node ``index`` in attempt ``k`` now, before that
        attempt starts, as EC2 is asked for one at the loss: its node agent waits (``--segment
        sim-K``) for the attempt's cluster file, which :meth:`start` writes once the attempt
        before has stopped, and imports torch meanwhile. Its machine (ledger segment, fake
        metadata service, local directory) starts now. Raises LaunchError when it cannot."""
        ctrl = self.launcher
        o = ctrl.options
        group = f"sim-{k}"
        # Bounded, and long enough for the attempt before to end however it ends: the notice's
        # grace and kill, the other nodes' peer_exit_s and kill, then their stop.
        kill_after = o.grace_s if o.kill_after_s is None else o.kill_after_s
        timeout = 120.0 + o.grace_s + 3 * kill_after + o.peer_exit_s
        command = self._node_command(group, timeout)
        try:
            return self._machine(index, f"{group}-n{index}", group, command)
        except OSError as exc:
            raise LaunchError(f"cannot start {command[0]!r}: {exc}") from exc

    def _node_command(self, group: str, timeout_s: float) -> list[str]:
        o = self.launcher.options
        rejoin = o.rejoin_timeout_s if o.recovery == "replace" else 0.0
        # --grow-poll: how soon a survivor of a silent loss sees the next attempt's cluster
        # file while its own attempt hangs (two reads of local disk a second).
        return [sys.executable, "-m", "spotrun.launch.node", "--timeout", f"{timeout_s:g}", "--poll", "0.2",
                "--rejoin-timeout", f"{rejoin:g}", "--grow-poll", "1", "--segment", group, "--", *o.command]

    def _machine(self, index: int, node_id: str, group: str, command: list[str]) -> _Node:
        """One simulated machine, up: its metadata service, ledger segment, local directory
        and process group running ``command``. What it started is stopped again when the
        start fails (its segment then ended FAILED)."""
        ctrl = self.launcher
        o = ctrl.options
        from ..notices.fake_server import FakeMetadataServer
        from .logs import LogShipper, pump_in_thread

        info = InstanceInfo(cloud=Cloud.SIMULATED.value, instance_id=node_id, instance_type=o.instance_type,
                            region=REGION, availability_zone=ZONE, market=Market.SPOT.value)
        server = FakeMetadataServer("ec2", instance=info).start()
        seg = Segment(segment_id=node_id, instance_id=node_id, instance_type=o.instance_type,
                      market=Market.SPOT.value, started_at=ctrl.clock(), availability_zone=ZONE,
                      group=group if o.cluster else None, node=index if o.cluster else None)
        node = _Node(index, seg, server)
        ctrl.book.begin(seg, info)
        env = {**os.environ, **o.env,
               "SPOTRUN_URL": ctrl.storage.url,
               "SPOTRUN_SEGMENT_ID": node_id,
               "SPOTRUN_NOTICE_SOURCE": "ec2",
               "SPOTRUN_IMDS_ENDPOINT": server.url,
               "SPOTRUN_POLL_INTERVAL": str(o.notice_poll_s),
               "PYTHONUNBUFFERED": "1"}
        if o.cluster:
            env["SPOTRUN_INSTANCE_ID"] = node_id
        base = local_dir_base({**os.environ, **o.env})
        if base is not None:
            node.local_dir = os.path.join(base, node_id)
            env["SPOTRUN_LOCAL_DIR"] = node.local_dir
        if ctrl._gone_segments:
            env["SPOTRUN_LEASE_TAKEOVER"] = ",".join(ctrl._gone_segments)
        try:
            # Its own session: a terminal's Ctrl-C reaches only us, and we forward one
            # SIGINT (a second would make the wrapper abort without its checkpoint).
            # Its output goes through us to RUN_URL/logs/<segment>/node-<R>/.
            node.proc = subprocess.Popen(command, env=env, start_new_session=True,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, bufsize=0)
            node.shipper = LogShipper(ctrl.storage, group, node=index, echo=ctrl._echo_stream())
            node.pump = pump_in_thread(node.proc.stdout, node.shipper)  # type: ignore[arg-type]
        except BaseException as exc:
            self.abandon([node])
            ctrl.book.end(seg, EndReason.FAILED, ended_at=ctrl.clock(), detail=str(exc))
            raise
        return node

    def abandon(self, nodes: list[_Node]) -> None:
        """Never leave a node behind (each is in its own session, so nobody else would)."""
        alive = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
        for node in alive:
            killpg(node.proc, signal.SIGINT)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        for node in alive:
            try:
                node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                kill_tree(node.proc.pid)  # type: ignore[union-attr]
                node.proc.wait()  # type: ignore[union-attr]
        self.close(nodes)

    def close(self, nodes: list[_Node]) -> None:
        """The machines are gone: stop the fake metadata services, ship the last of each
        node's output, delete each one's local directory."""
        for node in nodes:
            node.server.stop()
            if node.local_dir is not None:
                shutil.rmtree(node.local_dir, ignore_errors=True)
        for node in nodes:
            # Before the state leaves "running": `spotrun logs --follow` stops soon after.
            if node.pump is not None:
                node.pump.join(10)
            if node.shipper is not None:
                node.shipper.close(timeout=10)
            if node.proc is not None and node.proc.stdout is not None:
                node.proc.stdout.close()
            node.pump = node.shipper = None


def local_dir_base(env: dict[str, str]) -> str | None:
    """Where the simulated machines' local directories go (one folder each), or None when
    the node-local copy is off (``SPOTRUN_LOCAL_DIR=off``)."""
    from ..recovery.local import DEFAULT_LOCAL_DIR, LOCAL_DIR_ENV

    raw = env.get(LOCAL_DIR_ENV)
    if raw is not None and raw.strip().lower() in ("off", "0", "none", "false"):
        return None
    if raw is None and not os.path.isdir(os.path.dirname(DEFAULT_LOCAL_DIR)):
        return None  # no /dev/shm (macOS): no default copy, as LocalCopy.from_env decides
    return raw or DEFAULT_LOCAL_DIR


def killpg(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@dataclass(eq=False)
class _Node:
    """One simulated machine of an attempt: its segment, metadata service, process, logs."""

    index: int
    seg: Segment
    server: Any  # FakeMetadataServer
    proc: subprocess.Popen | None = None
    shipper: Any = None  # LogShipper
    pump: threading.Thread | None = None
    #: This attempt's exit code: the process's, or the one its node agent noted for the
    #: attempt while it stays to rejoin (``--recovery replace``).
    rc: int | None = None
    exited_at: float | None = None
    #: This machine's SPOTRUN_LOCAL_DIR (None when off), deleted with the machine.
    local_dir: str | None = None
