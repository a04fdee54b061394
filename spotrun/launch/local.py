"""``spotrun launch --local``: play EC2 spot on this machine, with no AWS account.

The command runs as a child process, as it would on an instance, with:

* ``SPOTRUN_URL``: the run folder (default ``./runs/<name>``);
* ``SPOTRUN_SEGMENT_ID``: ``sim-<n>``, so the wrapper's ledger records join this segment;
* ``SPOTRUN_NOTICE_SOURCE=ec2`` and ``SPOTRUN_IMDS_ENDPOINT``: a
  :class:`~spotrun.notices.fake_server.FakeMetadataServer` on loopback, run by this process,
  serving instance type T on the spot market; ``SPOTRUN_POLL_INTERVAL`` (default 0.2 s).

Then it plays spot, ``--interruptions K`` times: it posts an interruption notice on the fake
metadata service, sends SIGTERM to the child's process group ``--grace`` seconds later if it
is still alive (AWS gives two minutes; the default is a few seconds), then SIGKILL of the
child and every process below it after as long again (the machine is gone), and starts the
command again: a fresh "instance".

When the notices come: by default after the child has committed its first new checkpoint in
the segment, plus a random delay (``--seed``); so every segment makes progress and, as long
as the job checkpoints more than K times, all K interruptions land before it finishes. With
``--mean-interval S`` the notice comes at a random time around S seconds into each segment.

**Several nodes** (``--nodes N``, ``--nproc-per-node G``): each attempt ``sim-K`` is N node
process groups ``sim-K-n0``..., each with its own fake metadata service and
``SPOTRUN_INSTANCE_ID``/``SPOTRUN_SEGMENT_ID`` set to its node id, each running ``python -m
spotrun.launch.node -- CMD`` (torchrun, in-process); before starting them the launcher writes
their cluster file (all on 127.0.0.1, a free port, rendezvous id = run id + attempt). A notice
goes to one node (drawn by ``--seed``): the all-rank agreement stops every rank at one step.
``--node-losses M`` plays M of the interruptions as a node vanishing without notice: SIGKILL
of its agent *and* its workers (torchrun puts each worker in a session of its own, so a
group kill would not reach them); the survivors' collectives fail and they exit 1, which
counts as an interruption, not a failure. With ``replace`` the attempt ends at the kill, as
after a silent loss (below): the launcher knows the machine is gone, as EC2's controller
knows from the instance's state, and the survivors' agents stop what is left of their attempt
when the next one's cluster file comes, instead of each waiting for its next collective to
fail (a long step away for FSDP2: 7-10 s measured on the loaded test machine). Otherwise,
once one node has exited the others get ``peer_exit_s`` (30 s) to follow, then SIGTERM, then
SIGKILL of their trees ``kill_after_s`` later; after a node loss 5 s, then SIGTERM, then
SIGKILL 2 s later (no checkpoint can commit without the lost node). Every node is its
own ledger segment with ``group`` = the attempt and ``node`` = its index, so the cost report
prices N nodes.

**Silent loss** (``--loss-mode silent``): a ``--node-losses`` loss played as an EC2 machine
that drops off the network without closing its connections (no FIN, no RST): SIGSTOP of the
node's agent and every process below it. The survivors' collectives then wait on a peer that
never answers (up to the process group's timeout, 30 min for gloo by default), so the
launcher, which knows the node is lost, does not wait for them: with ``replace`` the attempt
ends at the loss (the survivors kept, their ``rc`` unknown) and the next one's cluster files
make the survivors' node agents stop their dead attempt and rejoin (:mod:`.grow`). The stopped
processes get SIGKILL once every other node left the attempt (a stopped process on this host
would keep the run's lease forever: lease.py never takes over from a pid alive here), after
``vanish_kill_s``, or on any way out of the run; a guard process (its own session) kills them
if this launcher itself dies. Not the default (``kill``): the existing tests and the recovery
benchmark time the reset-connection case.

**Recovery** (``--recovery``, :func:`.attempt.next_step`): with ``replace`` (the default) an
interruption that took some of the nodes keeps the others' machines: their node agents note
the attempt's exit code in the run URL and wait (``rejoin_timeout_s``) for the next cluster
file; the launcher starts one new node per lost one, in the lost node's slot, under a new
attempt and rendezvous id (a survivor hosts the store). The replacement is asked for the moment
the loss is known, as EC2 would be: at the notice, or when the node vanishes, not once the
attempt has stopped. Its machine starts then (ledger segment, metadata service, local
directory; ``capacity_at`` in the books) and its node agent (``--segment sim-K+1``) imports
torch while it waits for the next attempt's cluster file, which is written only when that
attempt starts. When no attempt needs it (the run finished, a stop, a failure, a whole
relaunch) its machine is stopped and its segment ended (``stopped``: billed for the time it
ran); that attempt number is then skipped. One that dies while it waits (or waits past its
bound: the grace, kill and ``peer_exit_s`` times plus 120 s) is ended (``failed``) and another
is started in its slot with the attempt (two instances for that loss). A survivor is one machine billing
continuously: its ledger segment goes on (one start, one end), not a new one. A survivor
whose agent has exited cannot be kept: then every node is relaunched. With ``relaunch``,
or when every node was lost, every attempt is relaunched whole, from the last committed
checkpoint. Before each attempt that follows a loss the ledger gets a ``recovery_started``
record (lost and kept nodes, nodes started, when the loss was known and when every machine
ran).

**Logs.** The command's output (stdout and stderr) goes through this process to
``RUN_URL/logs/<segment>/node-<R>/`` (:mod:`spotrun.launch.logs`; segment ``sim-K``, node 0,
or each node's index in a multi-node attempt) and is echoed to this process's stdout.

It stops when ``done.json`` appears (the child exits 0). Any other exit (not 75, not killed
by the simulator) is a failure: reported, exit code 1. Ctrl-C (or ``spotrun stop``) forwards
one SIGINT to the child (to every node), waits for it to commit its checkpoint and exit, and
exits 130; run the same command again to continue. Every segment is recorded in the run ledger
(source ``"launcher"``), and the cost report, priced offline as instance type T, is printed at the
end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, ClassVar

from ..errors import ConfigError
from ..procfs import pid_gone
from ..records.events import EndReason
from ..records.launch_state import STOP_FILE, LaunchState, RunStatus, Segment, load_state, new_run_id
from ..records.ledger import Ledger
from ..storage import Storage
from .attempt import RECOVERY_MODES, Action, AttemptEnd, Decision, NodeEnd, classify_local, next_step
from .base import EventSink, LaunchEvent, LaunchEventKind, LaunchOutcome, log_events
from .book import RunBook
from .common import MAX_NODES, MAX_NPROC_PER_NODE, check_count, check_number, is_done, last_checkpoint
from .limits import CostGuard, Limits
from .local_nodes import LocalNodes, _Node, killpg
from .proctree import kill_tree

__all__ = ["ECHO_STDOUT", "LOCAL_BACKEND", "LocalBackend", "LocalLauncher", "LocalOptions", "default_run_url"]

#: ``--loss-mode``: how ``--node-losses`` plays a node vanishing (see "Silent loss" in the
#: module docstring).
LOSS_MODES = ("kill", "silent")
#: After a node loss in an attempt that is relaunched whole, the survivors get this long (at
#: most ``peer_exit_s``) to leave on their own, then SIGTERM, then SIGKILL this much later:
#: nothing of theirs can commit without the lost node (see ``_segment``).
LOST_PEER_EXIT_S = 5.0
LOST_PEER_KILL_S = 2.0

#: ``LocalLauncher(echo=...)`` default: this process's stdout, looked up when a segment starts.
ECHO_STDOUT = "stdout"


@dataclass
class LocalOptions:
    """What ``spotrun launch --local`` was asked to do."""

    run_url: str
    command: list[str]
    interruptions: int = 2
    instance_type: str = "g5.xlarge"
    #: Notice to SIGTERM (AWS: 120 s), and SIGTERM to SIGKILL.
    grace_s: float = 5.0
    kill_after_s: float | None = None  # default: grace_s
    seed: int | None = None
    mean_interval: float | None = None
    #: How often this process checks on the child.
    poll_s: float = 0.1
    #: How often it looks at the run URL (checkpoints, stop requests); default 0.1 s on
    #: local disk, 1 s on object stores (each look is a LIST and a HEAD).
    check_s: float | None = None
    #: SPOTRUN_POLL_INTERVAL for the child's EC2 watcher.
    notice_poll_s: float = 0.2
    max_failures: int = 0
    env: dict[str, str] = field(default_factory=dict)
    #: Nodes per attempt; each is its own process group running ``python -m
    #: spotrun.launch.node -- CMD`` (torchrun, c10d rendezvous on 127.0.0.1).
    nodes: int = 1
    #: torchrun processes per node; None with one node: the command runs as is, no torchrun.
    nproc_per_node: int | None = None
    #: Of the ``interruptions``, how many are a node vanishing without notice (SIGKILL of
    #: its processes) instead of a notice; which ones is drawn by ``seed``.
    node_losses: int = 0
    #: How a node loss is played: "kill" (SIGKILL of its processes: the kernel closes their
    #: sockets, the survivors' collectives fail at once) or "silent" (SIGSTOP of them: the
    #: sockets stay open and nothing answers, as an EC2 machine that drops off the network).
    loss_mode: str = "kill"
    #: "silent": the stopped machine's processes get SIGKILL this long after the loss, or when
    #: the run ends (every exit path), whichever comes first; never left behind.
    vanish_kill_s: float = 600.0
    #: Once one node has exited, how long the others get to exit on their own before they
    #: are stopped (SIGTERM, then SIGKILL of their processes ``kill_after_s`` later).
    peer_exit_s: float = 30.0
    #: ``--max-cost``: stop (keeping the checkpoint) once the ledger says the run spent
    #: this much, priced as ``spotrun status`` prices it (offline, as instance_type).
    max_cost_usd: float | None = None
    #: ``--recovery``: "replace" keeps the survivors of a partial loss and starts only
    #: replacements; "relaunch" starts every node again (see :mod:`.attempt`).
    recovery: str = "replace"
    #: How long a survivor's node agent waits for the next attempt's cluster file.
    rejoin_timeout_s: float = 60.0

    @property
    def cluster(self) -> bool:
        """Whether each attempt runs through torchrun node agents (not the bare command)."""
        return self.nodes > 1 or self.nproc_per_node is not None

    def validate(self) -> None:
        if not self.command:
            raise ConfigError("no command to run; put it after --, e.g. spotrun launch --local -- python train.py")
        check_count(self.interruptions, 0, None, f"--interruptions {self.interruptions!r} must be a whole number >= 0")
        check_count(self.nodes, 1, MAX_NODES, f"--nodes {self.nodes!r}: use 1 to {MAX_NODES}")
        if self.nproc_per_node is not None:
            check_count(self.nproc_per_node, 1, MAX_NPROC_PER_NODE,
                        f"--nproc-per-node {self.nproc_per_node!r}: use 1 to {MAX_NPROC_PER_NODE}")
        check_count(self.max_failures, 0, None, f"--max-failures {self.max_failures!r} must be a whole number >= 0")
        if not 0 <= self.node_losses <= self.interruptions:
            raise ConfigError(f"--node-losses {self.node_losses}: use 0 to --interruptions "
                              f"({self.interruptions}); they are counted among the interruptions")
        if self.recovery not in RECOVERY_MODES:
            raise ConfigError(f"--recovery {self.recovery!r}: use {' or '.join(RECOVERY_MODES)}")
        if self.loss_mode not in LOSS_MODES:
            raise ConfigError(f"--loss-mode {self.loss_mode!r}: use {' or '.join(LOSS_MODES)}")
        check_number(self.vanish_kill_s, 0.0, f"vanish_kill_s {self.vanish_kill_s!r} must be a number of "
                     "seconds >= 0")
        check_number(self.rejoin_timeout_s, 0.0, f"rejoin_timeout_s {self.rejoin_timeout_s!r} must be a number "
                     "of seconds >= 0")
        check_number(self.peer_exit_s, 0.0, f"peer_exit_s {self.peer_exit_s!r} must be a number of seconds >= 0")
        # nan would pass every comparison below and break the segment later: refused here.
        check_number(self.grace_s, 0.0, f"--grace {self.grace_s!r} must be a number of seconds >= 0")
        if self.kill_after_s is not None:
            check_number(self.kill_after_s, 0.0, f"kill_after_s {self.kill_after_s!r} must be a number of seconds >= 0")
        if self.mean_interval is not None:
            check_number(self.mean_interval, 0.0, f"--mean-interval {self.mean_interval!r} must be a positive "
                         "number of seconds", allow_low=False)
        check_number(self.poll_s, 0.0, f"poll_s {self.poll_s!r} must be a positive number of seconds",
                     allow_low=False)
        Limits(max_cost_usd=self.max_cost_usd).validate()


def default_run_url(command: list[str], name: str | None = None) -> str:
    """``./runs/<name>``; the name defaults to the script's stem and the current time."""
    if not name:
        script = next((a for a in command if a.endswith(".py")), command[0] if command else "run")
        stem = os.path.splitext(os.path.basename(script))[0] or "run"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join("runs", name)


class LocalLauncher:
    """Runs the command until the run is done, interrupting it like spot would.

    Args:
        storage: the run URL (any backend; local disk is the usual one).
        options: see :class:`LocalOptions`.
        on_event: receives every :class:`LaunchEvent` (default: the ``spotrun`` logger).
        echo: where the command's output is echoed as it is shipped to ``RUN_URL/logs/``
            (a binary stream; default this process's stdout; None: ship only).
        clock, sleep: injectable for tests.
    """

    mode: ClassVar[str] = "local"

    def __init__(
        self,
        storage: Storage,
        options: LocalOptions,
        *,
        on_event: EventSink = log_events,
        echo: BinaryIO | str | None = ECHO_STDOUT,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        options.validate()
        self.storage = storage
        self.options = options
        self.on_event = on_event
        self.echo = echo
        self.clock = clock
        self.sleep = sleep
        self.rng = random.Random(options.seed)
        self._stop_signal: int | None = None
        self._stop_count = 0
        self._interrupted_last = False
        #: Segments whose whole process group this launcher saw end: their run lease may be
        #: taken over at once by the next segment (SPOTRUN_LEASE_TAKEOVER).
        self._gone_segments: list[str] = []
        #: Seconds between successive checkpoints, as observed (None until two are seen).
        self._ckpt_gap: float | None = None
        if options.check_s is None:
            options.check_s = 0.1 if storage.is_local else 1.0
        #: Prices the run every couple of seconds while a --max-cost is set.
        self.cost_guard = (CostGuard(Limits(max_cost_usd=options.max_cost_usd), storage, min_interval_s=2.0)
                           if options.max_cost_usd is not None else None)
        self._limit_reason: str | None = None
        #: The survivors of the last attempt, by index, kept for the next (Action.REPLACE).
        self._kept: dict[int, _Node] = {}
        #: Replacements started at the loss (``--recovery replace``), by the lost node's index,
        #: waiting for attempt ``_early_k``'s cluster file (see "Recovery" in the docstring).
        self._early: dict[int, _Node] = {}
        self._early_k: int | None = None
        #: Replacements started at a loss that died before their attempt started (counted
        #: among the instances that recovery started).
        self._early_dead = 0
        #: Machines that vanished silently (SIGSTOP), until their processes get SIGKILL.
        self._vanished: list[_Vanished] = []
        self._vanish_look_at = 0.0
        #: What the next attempt recovers from: the RecoveryStarted fields known so far.
        self._recovery: dict[str, Any] | None = None
        self.state = self._load_or_new_state()
        self.nodes = LocalNodes(self)
        self.book = RunBook(storage, self.state, heartbeat_s=options.check_s)
        # The previous launcher died with a child running: close the books.
        self.book.close_open(EndReason.STOPPED, "launcher died")

    def _load_or_new_state(self) -> LaunchState:
        state = load_state(self.storage)
        if state is None:
            return LaunchState(mode="local", run_id=new_run_id(), created_at=time.time(),
                               options=asdict(self.options))
        if state.mode != "local":
            raise ConfigError(
                f"{self.storage.display()} is an EC2 launch (run id {state.run_id}); "
                f"use spotrun launch --resume {self.storage.display()}"
            )
        if (state.status == RunStatus.RUNNING and state.controller_host == socket.gethostname()
                and state.controller_pid and state.controller_pid != os.getpid()
                and not pid_gone(state.controller_pid) and state.controller_alive()):
            raise ConfigError(
                f"another spotrun launch (pid {state.controller_pid}) is running {self.storage.display()}; "
                "stop it first (spotrun stop URL) or pick another --run-url"
            )
        state.status = RunStatus.RUNNING
        state.failures = 0
        state.options = asdict(self.options)
        return state

    # -- output and state --------------------------------------------------------------

    def _say(self, msg: str, kind: LaunchEventKind = LaunchEventKind.INFO,
             segment_id: str | None = None) -> None:
        self.on_event(LaunchEvent(kind, msg, segment_id))

    def _save(self) -> None:
        self.book.save()

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        self._stop_count += 1

    def _install(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    # -- the run -----------------------------------------------------------------------

    def run(self) -> LaunchOutcome:
        """Run segments until done, failure or Ctrl-C; returns how it ended."""
        self.storage.ensure_root(create=True)
        if is_done(self.storage):
            self._say(f"{self.storage.display()} is already finished (done.json exists)", LaunchEventKind.OUTCOME)
            self.state.status = RunStatus.FINISHED
            self._save()
            return LaunchOutcome(RunStatus.FINISHED, 0, "already finished", len(self.state.segments),
                                 self.state.interruptions)
        self._save()
        previous = self._install()
        planned = self.options.interruptions
        kinds = ["notice"] * planned
        if self.options.node_losses:  # drawn only then: other runs keep their random sequence
            for i in self.rng.sample(range(planned), self.options.node_losses):
                kinds[i] = "loss"
        done_interruptions = 0
        try:
            while True:
                if self.cost_guard is not None and self._limit_reason is None:
                    self._limit_reason = self.cost_guard.check(self.clock())
                if self._limit_reason is not None:
                    return self._limit_stop()
                interrupt = kinds[done_interruptions] if done_interruptions < planned else None
                decision = self._segment(interrupt=interrupt)
                self.state.interruptions += decision.interruptions
                self.state.failures += decision.failures
                if decision.action is Action.FINISH:
                    if done_interruptions < planned:
                        self._say(f"the run finished after {done_interruptions} of {planned} "
                                  "interruptions (it checkpoints too rarely to interrupt more; "
                                  "try --mean-interval)")
                    return self._end(RunStatus.FINISHED, 0, "done.json written")
                if decision.action is Action.STOP:
                    if self._limit_reason is not None:
                        return self._limit_stop()
                    step = last_checkpoint(self.storage)
                    where = f"checkpoint at step {step}" if step is not None else "no checkpoint yet"
                    return self._end(RunStatus.STOPPED, 130,
                                     f"stopped ({decision.why}); {where} kept in {self.storage.display()}. "
                                     f"Continue with: spotrun launch --local --run-url "
                                     f"{self.storage.display()} -- {' '.join(self.options.command)}")
                self._save()
                if decision.action is Action.FAIL:
                    return self._end(RunStatus.FAILED, 1, decision.why)
                if decision.interruptions:
                    if self._interrupted_last:
                        done_interruptions += 1
                    continue
                self._say(f"{decision.why}; restarting ({self.state.failures} of "
                          f"{self.options.max_failures} failure(s) allowed)")
        finally:
            # A run that ends between attempts (a limit, an error) leaves no survivor waiting,
            # and no silently vanished machine stopped.
            self._reap_vanished(force=True)
            self._release_kept(EndReason.STOPPED, "the run ended before the next attempt")
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _limit_stop(self) -> LaunchOutcome:
        step = last_checkpoint(self.storage)
        where = f"checkpoint at step {step}" if step is not None else "no checkpoint yet"
        return self._end(RunStatus.STOPPED, 1,
                         f"{self._limit_reason}; {where} kept in {self.storage.display()}. To go on, "
                         f"run the same command with a higher --max-cost")

    def _end(self, status: str, code: int, message: str) -> LaunchOutcome:
        self._release_kept(EndReason.STOPPED if status != RunStatus.FINISHED else EndReason.FINISHED, message)
        self.state.status = status
        self.state.message = message
        self._save()
        self._say(f"run {status}: {message}", LaunchEventKind.OUTCOME)
        return LaunchOutcome(status, code, message, len(self.state.segments), self.state.interruptions)

    def _notice_delay(self) -> float:
        """Random wait before the notice, once armed (see the module docstring)."""
        if self.options.mean_interval is not None:
            return self.rng.uniform(0.5, 1.5) * self.options.mean_interval
        # Within half a checkpoint interval: the notice lands between two scheduled
        # checkpoints (so there is work to lose, as on real spot) but long before the job
        # could run out of steps.
        gap = self._ckpt_gap if self._ckpt_gap is not None else 0.5
        return self.rng.uniform(0.0, min(2.0, 0.5 * gap))

    def _attempt_number(self) -> int:
        """The next attempt's number: segments without a group count once each, the N nodes
        of a multi-node attempt once together (so ``sim-K`` never repeats across modes)."""
        return len({s.group if s.group is not None else s.segment_id for s in self.state.segments}) + 1

    def _echo_stream(self) -> BinaryIO | None:
        if self.echo is not ECHO_STDOUT:
            return self.echo  # type: ignore[return-value]
        return getattr(sys.stdout, "buffer", None)

    def _segment(self, *, interrupt: str | None) -> Decision:
        """One attempt: start its node(s) (keeping the survivors of the one before), play
        ``interrupt`` ("notice" or "loss") on one of them, wait until all have exited (or
        noted their exit and wait to rejoin); returns what happens next."""
        o = self.options
        k = self._early_k if self._early else self._attempt_number()
        start_step = last_checkpoint(self.storage)
        started = self.clock()
        kept, self._kept = self._kept, {}
        early = self._take_early()
        group, nodes = self.nodes.start(k, start_step, keep=kept, early=early)
        fresh = [n for n in nodes if n.index not in kept and n.index not in early]
        self._record_recovery(group, started=len(nodes) - len(kept) + self._early_dead,
                              capacity_at=None if fresh or not early else max(n.seg.started_at for n in early.values()))
        self._early_dead = 0
        rejoining = o.cluster and o.recovery == "replace"
        multi = len(nodes) > 1
        # Which node the interruption hits (drawn only with several: one node's runs keep
        # the random sequence they always had).
        victim = nodes[self.rng.randrange(len(nodes)) if multi and interrupt else 0]
        notice_at: float | None = None
        if interrupt and o.mean_interval is not None:
            notice_at = started + self._notice_delay()
        posted = lost = term_at = kill_at = None
        first_exit: _Node | None = None
        #: The node that vanished silently in this attempt (``--loss-mode silent``).
        silent: _Node | None = None
        #: The lost node when the attempt ended at its loss (silent, or killed with the
        #: survivors kept): the survivors' ``rc`` is then unknown, their agents stop it.
        cut: _Node | None = None
        peers_term_at = peers_kill_at = None
        forwarded = 0
        next_check = next_note = started
        seen_step, seen_at = start_step, None
        kill_after = o.grace_s if o.kill_after_s is None else o.kill_after_s
        try:
            while True:
                now = self.clock()
                self._reap_vanished()
                notes = rejoining and now >= next_note
                if notes:
                    next_note = now + o.check_s  # type: ignore[operator]
                for node in nodes:
                    if node.rc is not None:
                        continue
                    if node.proc.poll() is not None:  # type: ignore[union-attr]
                        node.rc = node.proc.returncode  # type: ignore[union-attr]
                        what = "{} exited with code {}"
                    elif notes:
                        # Its agent stays to rejoin: the attempt is over for it once it noted so.
                        from .node import read_attempt_exit  # not at the top: see REJOIN_CODES below

                        node.rc = read_attempt_exit(self.storage, group, node.seg.segment_id)
                        what = "{}: torchrun exited with code {}; its node agent stays to rejoin"
                    if node.rc is not None:
                        first_exit = first_exit or node
                        if multi:
                            self._say(what.format(node.seg.segment_id, node.rc), LaunchEventKind.INFO, group)
                alive = [n for n in nodes if n.rc is None]
                if not alive:
                    break
                if first_exit is not None and first_exit.exited_at is None:
                    first_exit.exited_at = now
                if self._stop_count > forwarded:
                    sig = signal.SIGINT if self._stop_signal == signal.SIGINT else signal.SIGTERM
                    what = "the command" if not multi else f"every node ({len(alive)})"
                    self._say(f"forwarding {sig.name} to {what}; waiting for its checkpoint"
                              if forwarded == 0 else f"forwarding another {sig.name}")
                    for node in alive:
                        killpg(node.proc, sig)  # type: ignore[arg-type]
                    forwarded = self._stop_count
                if now >= next_check:
                    next_check = now + o.check_s  # type: ignore[operator]
                    if forwarded == 0 and self.storage.exists(STOP_FILE):
                        self.storage.remove(STOP_FILE)
                        self._stop_signal, self._stop_count = signal.SIGINT, 1
                        continue
                    if forwarded == 0 and self.cost_guard is not None:
                        self._limit_reason = self.cost_guard.check(now)
                        if self._limit_reason is not None:
                            # Stopped like Ctrl-C: one SIGINT, the command commits, exits.
                            self._say(f"{self._limit_reason}: stopping", LaunchEventKind.OUTCOME)
                            self._stop_signal, self._stop_count = signal.SIGINT, 1
                            continue
                    step = last_checkpoint(self.storage) if notice_at is None or self._ckpt_gap is None else None
                    if step is not None and step != seen_step:
                        if seen_at is not None and seen_step != start_step:
                            self._ckpt_gap = now - seen_at
                        seen_step, seen_at = step, now
                    if (interrupt and notice_at is None and forwarded == 0 and step is not None
                            and (start_step is None or step > start_step)):
                        notice_at = now + self._notice_delay()
                vid = victim.seg.segment_id
                if (notice_at is not None and posted is None and lost is None and forwarded == 0
                        and now >= notice_at and victim.rc is None):
                    if interrupt == "loss" and o.loss_mode == "silent":
                        lost = now
                        self._say(f"{vid}{_of(victim, multi)} vanished silently: SIGSTOP of its processes "
                                  "(their sockets stay open, nothing answers; SIGKILL once the others left the "
                                  f"attempt, at the run's end or in {o.vanish_kill_s:g}s)",
                                  LaunchEventKind.NOTICE, group)
                        self._vanish(victim, group, [n for n in nodes if n is not victim])
                        # The launcher knows the machine is gone (EC2: its instance state):
                        # it counts as exited now, with the code of a killed machine.
                        victim.rc, victim.exited_at = -signal.SIGKILL, now
                        first_exit = first_exit or victim
                        silent = victim
                    elif interrupt == "loss":
                        lost = now
                        self._say(f"{vid}{_of(victim, multi)} vanished without notice: SIGKILL of its "
                                  "processes", LaunchEventKind.NOTICE, group)
                        kill_tree(victim.proc.pid)  # type: ignore[union-attr]
                        if rejoining and multi:
                            # Known gone now (EC2: its instance state), as a silent loss: the
                            # attempt ends at the loss rather than when each survivor's next
                            # collective fails, which after a long step took seconds.
                            victim.rc, victim.exited_at = -signal.SIGKILL, now
                            first_exit = first_exit or victim
                            cut = victim
                    else:
                        victim.server.post_interruption("terminate", in_seconds=o.grace_s)
                        posted = now
                        self._say(f"spot interruption notice for {vid}{_of(victim, multi)}: SIGTERM in "
                                  f"{o.grace_s:g}s", LaunchEventKind.NOTICE, group)
                    if rejoining and multi:
                        self._start_early(victim, group)
                    cut = cut or silent
                    if cut is not None and rejoining and multi:
                        # The survivors' attempt is dead: after a silent loss their collectives
                        # wait on a peer that never answers (up to the process group's timeout,
                        # 30 min by default); after a kill they fail at their next collective,
                        # which may be a long step away. It ends now; the next attempt's
                        # cluster file, which names them, makes their node agents stop it (if
                        # it has not failed by then) and rejoin (node.py, grow.py).
                        self._say(f"{', '.join(n.seg.segment_id for n in alive if n is not victim)}: "
                                  "their attempt cannot finish without the lost node; the next "
                                  "attempt's cluster file stops it", LaunchEventKind.INFO, group)
                        break
                if posted is not None and term_at is None and now >= posted + o.grace_s:
                    term_at = now
                    if victim.rc is None:
                        self._say(f"{vid}: grace period over, SIGTERM", LaunchEventKind.NOTICE, group)
                        killpg(victim.proc, signal.SIGTERM)  # type: ignore[arg-type]
                if term_at is not None and kill_at is None and now >= term_at + kill_after:
                    kill_at = now
                    if victim.rc is None:
                        self._say(f"{vid}: the machine is gone, SIGKILL", LaunchEventKind.NOTICE, group)
                        # The whole tree: a process in a session of its own (torchrun's
                        # workers, a detached helper) would outlive a group kill.
                        kill_tree(victim.proc.pid)  # type: ignore[union-attr]
                # After a lost node the survivors' attempt is dead: every checkpoint, a stop's
                # too, needs all ranks, so a SIGTERM has nothing left to commit, and the waits
                # that give a stop checkpoint its time (ours, then torchrun's shutdown timeout,
                # the stop timeout + 15 s) only held a survivor whose worker sat in a
                # collective that never failed: 30 + 105 s measured (bench_recovery, FSDP2).
                # EC2 terminates those machines at once; here they get a short bound.
                peer_exit_s, peers_kill_after = ((min(o.peer_exit_s, LOST_PEER_EXIT_S), LOST_PEER_KILL_S)
                                                 if lost is not None else (o.peer_exit_s, kill_after))
                if (multi and first_exit is not None and peers_term_at is None
                        and now >= first_exit.exited_at + peer_exit_s):  # type: ignore[operator]
                    peers_term_at = now
                    self._say(f"{', '.join(n.seg.segment_id for n in alive)} still running "
                              f"{peer_exit_s:g}s after {first_exit.seg.segment_id} exited: SIGTERM",
                              LaunchEventKind.WARNING, group)
                    for node in alive:
                        killpg(node.proc, signal.SIGTERM)  # type: ignore[arg-type]
                if (peers_term_at is not None and peers_kill_at is None
                        and now >= peers_term_at + peers_kill_after):
                    peers_kill_at = now
                    self._say(f"{', '.join(n.seg.segment_id for n in alive)}: SIGKILL",
                              LaunchEventKind.WARNING, group)
                    for node in alive:
                        kill_tree(node.proc.pid)  # type: ignore[union-attr]
                self.sleep(o.poll_s)
        except BaseException:
            self._reap_vanished(force=True)
            self.nodes.abandon([n for n in nodes if n is not silent])
            self._end_early("the launcher stopped")
            raise
        self._interrupted_last = posted is not None or lost is not None
        verdict = classify_local(self._attempt_end(nodes, victim, posted=posted is not None,
                                                   lost=lost is not None, stopped=forwarded > 0,
                                                   first=first_exit, done=is_done(self.storage)))
        decision = next_step(verdict, failures=self.state.failures, max_failures=o.max_failures,
                             nodes=[n.seg.segment_id for n in nodes], recovery=o.recovery)
        keep = [n for n in nodes if n.seg.segment_id in decision.kept] if decision.action is Action.REPLACE else []
        # Imported here: spotrun.launch imports this module, and a module-level import of
        # .node would make `python -m spotrun.launch.node` warn that it was already imported.
        from .node import REJOIN_CODES

        # A survivor of an attempt that ended at its loss may still be in it (rc None): its
        # agent stops it when the next attempt's cluster file comes, and joins that.
        stuck = [n for n in keep if n.proc.poll() is not None  # type: ignore[union-attr]
                 or (n.rc not in REJOIN_CODES and not (cut is not None and n.rc is None))]
        if stuck:
            self._say(f"cannot keep {', '.join(n.seg.segment_id for n in stuck)} (its node agent exited "
                      f"{', '.join(str(n.rc) for n in stuck)} instead of waiting to rejoin): relaunching every node",
                      LaunchEventKind.WARNING, group)
            decision = Decision(Action.RELAUNCH, verdict.detail, interruptions=decision.interruptions,
                                lost=decision.lost)
            keep = []
        lost_slots = {n.index for n in nodes if n.seg.segment_id in decision.lost} if keep else set()
        for index in [i for i in self._early if i not in lost_slots]:
            # No attempt will use it (finished, stopped, failed, relaunched whole).
            self._release_early(index, decision.action.value, group)
        gone = [n for n in nodes if n not in keep]
        # The silently vanished machine stays stopped (its sockets open) until _reap_vanished;
        # it can never write again, so its run lease may be taken over at once.
        stopped = [n for n in gone if n is not silent]
        self._stop_waiting(stopped, kill_after)
        self.nodes.close(stopped)
        for node in gone:
            # A node killed at the loss (``cut``) is judged moments after its SIGKILL: its
            # processes may not all be reaped yet, so it gets a moment to go (its run lease
            # is then taken over at once instead of at the lease's expiry).
            if node is silent or _group_gone(node.proc.pid,  # type: ignore[union-attr]
                                             wait_s=2.0 if node is cut else 0.0):
                self._gone_segments.append(node.seg.segment_id)
        ended = self.clock()
        for node in gone:
            self.book.end(node.seg, verdict.reason, ended_at=ended, exit_code=node.rc,
                          detail=verdict.detail if not multi else f"{verdict.detail}; this node exited {node.rc}")
        for node in keep:  # the same machines go on: their segments stay open (billed once)
            node.rc = node.exited_at = None
        self._kept = {n.index: n for n in keep}
        self._recovery = None
        if decision.interruptions and decision.lost:
            self._recovery = {"lost_at": posted if posted is not None else lost if lost is not None else ended,
                              "mode": "replace" if keep else "relaunch", "lost": decision.lost,
                              "kept": tuple(n.seg.segment_id for n in keep)}
        self._say(f"{group} ended: {verdict.reason} ({verdict.detail})"
                  + (f"; keeping {', '.join(n.seg.segment_id for n in keep)}" if keep else ""),
                  LaunchEventKind.SEGMENT_ENDED, group)
        return decision

    def _stop_waiting(self, nodes: list[_Node], grace_s: float) -> None:
        """Node agents still alive after their attempt (waiting to rejoin one that will not
        come, or a lost machine's agent): SIGTERM ends the wait; SIGKILL of the tree after
        ``grace_s``."""
        alive = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
        for node in alive:
            killpg(node.proc, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + grace_s
        for node in alive:
            try:
                node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - TimeoutExpired: the machine is gone anyway
                kill_tree(node.proc.pid)  # type: ignore[union-attr]
                node.proc.wait()  # type: ignore[union-attr]

    def _vanish(self, node: _Node, group: str, others: list[_Node]) -> None:
        """``--loss-mode silent``: SIGSTOP of ``node``'s agent and every process below it
        (torchrun's workers are in sessions of their own): its connections stay open and
        nothing answers on them, as with a machine that dropped off the network (no FIN, no
        RST). SIGKILL follows in :meth:`_reap_vanished`."""
        pid = node.proc.pid  # type: ignore[union-attr]
        stopped = [pid, *kill_tree(pid, signal.SIGSTOP)]
        # A guard outside this process kills them should this launcher die without its
        # cleanup (SIGKILL): stopped processes can do nothing for themselves.
        guard = None
        try:
            guard = subprocess.Popen([sys.executable, "-c", _GUARD, f"{self.options.vanish_kill_s:g}",
                                      *map(str, stopped)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     start_new_session=True)
        except OSError as exc:
            self._say(f"no guard for the stopped processes of {node.seg.segment_id} ({exc}); they are killed "
                      "when this launcher ends", LaunchEventKind.WARNING, group)
        self._vanished.append(_Vanished(node, group, others, time.monotonic() + self.options.vanish_kill_s, guard))

    def _reap_vanished(self, *, force: bool = False) -> None:
        """SIGKILL of a silently vanished machine's processes once every other node of its
        attempt has left that attempt (noted its exit, or its process ended: nobody talks to
        the stopped machine any more), or its bound passed, or at once with ``force`` (every
        way out of the run calls it: stopped processes are never left behind); then its
        machine is closed (metadata service, local directory, the last of its output).

        Why not later: a stopped process on this host still holds what its rank 0 held,
        the run's lease, and a lease whose pid is alive on the same host is never taken over
        (lease.py), while on EC2 it expires (``SPOTRUN_LEASE_TTL``) once its machine is gone.
        Killing it after the survivors left changes nothing they see."""
        if not self._vanished:
            return
        now = time.monotonic()
        if not force and now < self._vanish_look_at:
            return
        self._vanish_look_at = now + (self.options.check_s or 0.1)
        from .node import read_attempt_exit  # not at the top: see REJOIN_CODES in _segment

        for v in list(self._vanished):
            if not (force or now >= v.kill_at or all(
                    o.proc is None or o.proc.poll() is not None
                    or read_attempt_exit(self.storage, v.group, o.seg.segment_id) is not None for o in v.others)):
                continue
            self._vanished.remove(v)
            node = v.node
            if v.guard is not None:  # first: it must never signal pids reused after this kill
                v.guard.kill()
                v.guard.wait()
                if v.guard.stdin is not None:
                    v.guard.stdin.close()
            # A new child a stopped parent forked just before the stop is found too: the tree
            # is listed again after each kill until nothing is left (bounded).
            for _ in range(5):
                if not kill_tree(node.proc.pid) and node.proc.poll() is not None:  # type: ignore[union-attr]
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=2)  # type: ignore[union-attr]
            self.nodes.close([node])

    def _start_early(self, victim: _Node, group: str) -> None:
        """Ask for ``victim``'s replacement now, at the loss (the notice, or the node seen
        gone), as EC2 would be asked, instead of once the attempt has stopped: its machine is
        up, its agent imported torch and waits for the next attempt's cluster file by the
        time the survivors are ready for it. A machine that cannot start is only a warning:
        the next attempt starts the replacement then, as before."""
        if victim.index in self._early:
            return
        k = self._early_k if self._early else self._attempt_number()
        try:
            node = self.nodes.start_early(k, victim.index)
        except Exception as exc:  # noqa: BLE001 - LaunchError, an OSError of the services
            self._say(f"could not start {victim.seg.segment_id}'s replacement at the loss ({exc}); "
                      "starting it with the next attempt", LaunchEventKind.WARNING, group)
            return
        self._early[victim.index], self._early_k = node, k
        self._say(f"{node.seg.segment_id}: replacement for {victim.seg.segment_id} started at the loss; "
                  f"it waits for attempt sim-{k}", LaunchEventKind.INFO, group)

    def _take_early(self) -> dict[int, _Node]:
        """The early replacements for the attempt starting now. One whose agent already
        exited (it died, or waited past its bound) is not used: its machine is ended (FAILED)
        and the slot gets a new node, started now (counted: two instances for that loss)."""
        early, self._early, self._early_k = self._early, {}, None
        for index, node in list(early.items()):
            if node.proc is not None and node.proc.poll() is None:
                continue
            del early[index]
            code = node.proc.returncode if node.proc is not None else None
            self._say(f"{node.seg.segment_id}: the replacement started at the loss exited {code} before its "
                      "attempt started; starting another", LaunchEventKind.WARNING, node.seg.group)
            self.nodes.close([node])
            if node.seg.open:
                self.book.end(node.seg, EndReason.FAILED, ended_at=self.clock(), exit_code=code,
                              detail="replacement started at the loss; its node agent exited before its attempt")
            self._early_dead += 1
        return early

    def _release_early(self, index: int, why: str, group: str) -> None:
        """An early replacement no attempt will use: stop its machine, end its segment
        (billed for the time it ran, like any machine)."""
        node = self._early.pop(index)
        if not self._early:
            self._early_k = None
        self._say(f"{node.seg.segment_id}: the replacement started at the loss is not needed "
                  f"({why}); stopping its machine", LaunchEventKind.INFO, group)
        self._stop_waiting([node], 5.0)
        self.nodes.close([node])
        if node.seg.open:
            self.book.end(node.seg, EndReason.STOPPED, ended_at=self.clock(),
                          exit_code=node.proc.returncode if node.proc is not None else None,
                          detail=f"replacement started at the loss, not needed ({why})", unused=True)

    def _end_early(self, why: str) -> None:
        for index in list(self._early):
            self._release_early(index, why, "")

    def _release_kept(self, reason: str, detail: str) -> None:
        """Survivors kept for an attempt that will not start: stop them, end their segments;
        and any replacement started for it."""
        self._end_early(detail)
        kept, self._kept = list(self._kept.values()), {}
        if not kept:
            return
        self._stop_waiting(kept, 5.0)
        self.nodes.close(kept)
        ended = self.clock()
        for node in kept:
            if node.seg.open:
                self.book.end(node.seg, reason, ended_at=ended, exit_code=node.proc.returncode,  # type: ignore[union-attr]
                              detail=f"kept for an attempt that did not start: {detail}")

    def _record_recovery(self, group: str, *, started: int, capacity_at: float | None = None) -> None:
        """The ledger's ``recovery_started`` for an attempt that follows a loss (both modes).
        ``capacity_at``: when the last of its new machines was up (a replacement started at
        the loss); default now (they were started with the attempt)."""
        if self._recovery is None:
            return
        fields, self._recovery = self._recovery, None
        try:
            Ledger(self.storage).recovery_started(segment_id=group, instances_started=started,
                                                  capacity_at=self.clock() if capacity_at is None else capacity_at,
                                                  **fields)
        except Exception as exc:  # noqa: BLE001 - the books never stop the run
            self._say(f"could not record the recovery in the ledger: {exc}", LaunchEventKind.WARNING, group)

    @staticmethod
    def _attempt_end(nodes: list[_Node], victim: _Node, *, posted: bool, lost: bool, stopped: bool,
                     first: _Node | None, done: bool) -> AttemptEnd:
        """What the launcher saw of an attempt, as the policy's plain values."""
        return AttemptEnd(
            nodes=tuple(NodeEnd(n.seg.segment_id, n.rc, rank=n.index) for n in nodes), done=done,
            stop_requested=stopped, notice_posted=posted, node_lost=lost, hit=victim.seg.segment_id,
            first=first.seg.segment_id if first is not None else None)

    def _classify_nodes(self, nodes: list[_Node], victim: _Node, *, posted: bool, lost: bool,
                        stopped: bool, first: _Node | None) -> tuple[EndReason, str]:
        """An attempt of several nodes ends as one (:func:`.attempt.classify_local`)."""
        verdict = classify_local(self._attempt_end(nodes, victim, posted=posted, lost=lost, stopped=stopped,
                                                   first=first, done=is_done(self.storage)))
        return verdict.reason, verdict.detail


@dataclass(eq=False)
class _Vanished:
    """A machine that vanished silently (``--loss-mode silent``): its stopped node, its
    attempt, the attempt's other nodes, and the bound on its SIGKILL (monotonic)."""

    node: _Node
    group: str
    others: list[_Node]
    kill_at: float
    #: The guard process (:data:`_GUARD`), None when it could not start.
    guard: subprocess.Popen | None = None


#: ``python -c _GUARD BOUND PID...``: SIGKILL of the stopped processes (each and its group)
#: when its stdin closes (the launcher died) or after BOUND seconds. The launcher kills the
#: guard itself before it kills them on its own exit paths.
_GUARD = """
import os, select, signal, sys
select.select([sys.stdin], [], [], float(sys.argv[1]))
for pid in map(int, sys.argv[2:]):
    for send in (os.kill, os.killpg):
        try:
            send(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _group_gone(pgid: int, wait_s: float = 0.0) -> bool:
    """True when no process of the child's session is left (one could still be writing),
    looking again for up to ``wait_s`` seconds."""
    end = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)


def _of(node: _Node, multi: bool) -> str:
    return f" (node {node.index})" if multi else ""


class LocalBackend:
    """The local simulator's part in ``spotrun status`` and ``spotrun stop``."""

    mode = "local"

    def current_details(self, state: LaunchState, segment: Segment, *, live: bool) -> dict[str, Any]:
        return {}

    def nodes_details(self, state: LaunchState, segments: list[Segment], *,
                      live: bool) -> dict[str, dict[str, Any]]:
        return {s.instance_id: {} for s in segments}

    def stop(self, storage: Storage, state: LaunchState, *, wait_s: float | None,
             sleep: Callable[[float], None]) -> dict[str, Any]:
        """SIGINT to the launcher when it runs on this host (it forwards it to the command and
        waits for its checkpoint); else a stop request in the run URL, which it polls."""
        pid = state.controller_pid
        if state.status == RunStatus.RUNNING and pid and state.controller_host == socket.gethostname():
            try:
                os.kill(pid, signal.SIGINT)
                return {"signalled": pid}
            except ProcessLookupError:
                pass
        storage.write_bytes(STOP_FILE, json.dumps({"requested_at": time.time()}).encode())
        return {"signalled": None}


LOCAL_BACKEND = LocalBackend()
