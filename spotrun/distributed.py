"""All ranks agreeing, under ``torch.distributed``, on when to save and when to stop.

A notice or a signal often reaches one rank only (the one whose node is reclaimed, or the one
the launcher signalled first). If that rank stopped alone, the others would block forever in
their next collective. Instead, every :meth:`Checkpointer.step` ends with one tiny all-reduce
of a few flags, so every rank sees the same decision at the same step. The cost is one
small collective per step, not one per tensor: 0.2-0.4 ms with 2 CPU ranks on gloo
(``scripts/bench_agreement.py``; see docs/notices.md, "torchrun / multi-node").

Without an initialised process group everything here degrades to a single process.

**torchrun's exit code.** When its workers exit 75 (``EXIT_INTERRUPTED``: checkpoint
committed, relaunch me), torchrun itself exits 1, as for any worker failure, and a launcher
can no longer tell "interrupted, resumable" from "crashed". :func:`torchrun` (``python -m
spotrun.distributed ...``, same arguments as ``torchrun``) runs the same launcher and maps
the outcome back: 75 when any worker exited 75, also when torchrun itself was signalled
(it forwards the signal to the workers, which checkpoint and exit 75, but it does not report
their exit codes, so each worker leaves a one-line note in a folder the wrapper gives it,
``SPOTRUN_EXIT_NOTES``), ``128 + signal`` when torchrun was signalled and no worker says it
committed a stop checkpoint, otherwise what torchrun would have returned, except that a
failure after the run finished (``done.json`` at ``$SPOTRUN_URL`` written during this launch;
gloo's teardown sometimes aborts a worker after it) is 0, with a warning naming the codes.
When every failed worker exited ``128 + SIGTERM`` (``EXIT_STOP_UNSAVED``: its stop checkpoint
missed the deadline) or ``128 + SIGINT``, that code comes back too (the larger of the two
when both), not 1: the node was interrupted and resumes from the previous checkpoint, which a
launcher must not count as a failure of the command (``--max-failures``). When the rendezvous
store becomes unreachable while the workers run (its host, node 0's agent, vanished), torchrun
raises instead of returning; that is 1 too (a peer lost mid-attempt), so a node agent that
stays to rejoin the next attempt does, with a survivor hosting the store.

**Node ranks.** A node agent (spotrun.launch.node) passes its slot in the cluster file as
``--rdzv-conf ...,spotrun_slot=I``; :func:`torchrun` takes it out and makes the c10d
rendezvous number the nodes by slot (:mod:`spotrun.launch.ranks`), so a survivor of a replaced
node keeps its rank (and restores its own local copy).

**torchrun's shutdown bound.** Once signalled, torchrun's agent forwards the signal and waits
``--shutdown-timeout`` seconds (torch's default: 30) before it SIGKILLs its workers, while a
worker's stop checkpoint may take up to ``SPOTRUN_STOP_TIMEOUT`` (90 s): a stop of more than
30 s (a large state to S3, a planned stop to grow the job) was killed half-written, the steps
since the previous checkpoint lost. :func:`torchrun` therefore waits
``SPOTRUN_STOP_TIMEOUT`` + :data:`SHUTDOWN_SLACK_S` unless ``--shutdown-timeout`` or
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says otherwise: the wrapper's own bound decides when a stop
is abandoned (it exits 143), torchrun's kill stays the last resort after it.

**A finished worker stuck on its way out.** torchrun waits for every worker to exit; one that
noted its exit (run finished, or stop checkpoint committed) and then deadlocked in torch's
gloo teardown (:data:`FINISHED_STUCK_S`) is killed by :func:`torchrun`'s watch, and the wrapper
exits as the notes say (0 or 75).

**Rendezvous polls.** torch's c10d rendezvous makes a node that joined wait for the round to
close by sleeping ``_delay(seconds=1)`` between polls and answering a poll from a state cache
kept 1 s (``dynamic_rendezvous``), so each node but the last to join sees the round complete up
to 1 s late, rank 0 among them, whose published store address every node then waits for.
:func:`torchrun` makes both :data:`RDZV_POLL_S` for up to :data:`RDZV_POLL_NODES` nodes, and
proportionally longer above (at most torch's 1 s), so the store answers at most about
``RDZV_POLL_NODES / RDZV_POLL_S`` state reads a second; ``SPOTRUN_RDZV_POLL_S`` sets it
exactly (1: torch's pace). The first round's random skew and every timeout stay as torch has
them; a torch whose rendezvous waits some other way keeps its own pace, with one log line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Sequence
from typing import Any

import torch

from .config import env_float_or_default
from .procfs import stat_fields
from .records.layout import DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_STOP_UNSAVED

__all__ = ["Group", "last_agent_signal", "note_exit", "note_started", "preload", "settle_comm_threads",
           "torchrun"]

#: Set by :func:`torchrun` for its workers: where each leaves its exit code (see note_exit).
EXIT_NOTES_ENV = "SPOTRUN_EXIT_NOTES"

#: Seconds torchrun waits for its signalled workers beyond ``SPOTRUN_STOP_TIMEOUT``: their
#: own bound ends a stop that cannot commit (exit 143) before torchrun kills them.
SHUTDOWN_SLACK_S = 15.0

#: A worker that noted its exit (the run finished: ``done.json`` written, every rank past the
#: last barrier; or its stop checkpoint committed) and then used under :data:`STUCK_CPU_SHARE`
#: of a core for this long is stuck on its way out: torch's gloo process
#: group destructor can deadlock on the GIL (``~ProcessGroupGloo`` joins a thread that waits
#: for the GIL; pytorch issue 56297), and torchrun's agent would wait for it forever (on EC2:
#: an instance billed to the end of time). :func:`torchrun` kills it (SIGKILL of its
#: session) and exits as the notes say (0: finished, 75: interrupted, checkpoint committed).
#: ``SPOTRUN_FINISHED_STUCK_S``; 0 turns it off.
FINISHED_STUCK_S = 300.0
FINISHED_STUCK_ENV = "SPOTRUN_FINISHED_STUCK_S"
#: "Not working": the deadlocked worker's waiting thread polls the GIL every 5 ms (measured:
#: 0.4% of a core), so "no CPU at all" would never see it; an upload or an evaluation after
#: the note uses far more than 1%.
STUCK_CPU_SHARE = 0.01

log = logging.getLogger("spotrun.distributed")

#: Seconds between a waiting node's polls of the rendezvous state (torch: 1 s); see
#: "Rendezvous polls" above. A poll is one small store operation per waiting node.
RDZV_POLL_S = 0.1
RDZV_POLL_ENV = "SPOTRUN_RDZV_POLL_S"
#: Up to this many nodes poll every RDZV_POLL_S; more poll proportionally less often (the
#: state read grows with the nodes too): at most ~160 reads a second of the store's host.
RDZV_POLL_NODES = 16

#: Worker exit codes that mean "stopped by a signal, stop checkpoint not committed": a worker
#: whose stop save missed its deadline exits 143; a shell passes a SIGINT on as 130.
SIGNAL_EXITS = frozenset({EXIT_STOP_UNSAVED, 128 + signal.SIGINT})

# The signal torchrun's agent (this process) received in the last torchrun() call, or None.
_agent_signal: int | None = None


def last_agent_signal() -> int | None:
    """The signal this process (torchrun's agent) received during the last :func:`torchrun`
    call, or None when none did. Both ways to 143 or 130 look alike in the code: the agent
    signalled (its machine shutting down, it forwarded the signal), or only the workers
    stopped so (their stop checkpoint missed its deadline on a peer's notice) while this
    agent and its machine stay. spotrun's node agent rejoins the next attempt only in the
    second case (spotrun.launch.node, "Rejoining")."""
    return _agent_signal


class Group:
    """The process group a checkpointer runs in (world size 1 when not distributed)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world_size = self._dist.get_world_size() if self._dist else 1
        self._device = torch.device("cpu")
        if self._dist is not None and self._dist.get_backend() == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._flags = torch.zeros(4, dtype=torch.int32, device=self._device)

    @property
    def distributed(self) -> bool:
        return self._dist is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, **flags: bool) -> tuple[bool, ...]:
        """Each flag (in the order given) becomes True on every rank if it is True on any."""
        if self._dist is None:
            return tuple(bool(v) for v in flags.values())
        if self._flags.numel() != len(flags):
            self._flags = torch.zeros(len(flags), dtype=torch.int32, device=self._device)
        for i, v in enumerate(flags.values()):
            self._flags[i] = int(v)
        self._dist.all_reduce(self._flags, op=self._dist.ReduceOp.MAX)
        return tuple(bool(v) for v in self._flags.tolist())

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self._dist is None:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank), on every rank: one
        tensor collective, no pickling (what a decision that usually says "all fine" wants)."""
        if self._dist is None:
            return [list(values)]
        mine = torch.tensor(list(values), dtype=torch.int64, device=self._device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._dist.all_gather(out, mine)
        return [[int(v) for v in t.tolist()] for t in out]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), as a list on every rank."""
        if self._dist is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` as a list on rank 0; None elsewhere."""
        if self._dist is None:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._dist.gather_object(obj, out, dst=0)
        return out


#: How long :func:`settle_comm_threads` lets go of the GIL (see there).
SETTLE_S = 0.1


def settle_comm_threads() -> None:
    """After this process's last collective (the run's final barrier, or the stop's commit):
    let go of the GIL for a moment, so gloo's run-loop threads finish with the works they ran.

    Why: gloo's barrier work holds every work queued before it (the commit's gather among
    them), and its run-loop thread frees it after the barrier returned here; freeing the
    gather's tensors takes the GIL (torch keeps their Python objects alive from C++). A
    script that then frees DDP's reducer (``main()`` returning) destroys the process group in
    ``~ProcessGroupGloo``, which joins that thread *holding* the GIL: a deadlock (pytorch
    issue 56297), seen in this repository's suite with ranks that imported torch ahead (warm
    forks and standby workers; why they meet it more often is not known), with this exact stack
    (``~AsyncBarrierWork`` -> ``~AsyncGatherWork`` -> decref, waiting for the GIL). A sleep
    releases the GIL; the waiting thread takes it at once. A no-op without a process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    time.sleep(SETTLE_S)


def note_exit(code: int) -> None:
    """Under :func:`torchrun`, tell the wrapper how this worker is about to exit.

    Called by the Checkpointer once its stop checkpoint is committed (75) and once the run
    finished on every rank (0); a no-op elsewhere.
    """
    folder = os.environ.get(EXIT_NOTES_ENV)
    if not folder:
        return
    with contextlib.suppress(OSError):  # a note is a courtesy: never fail the exit over it
        with open(os.path.join(folder, str(os.getpid())), "w") as f:
            f.write(str(code))


#: A worker's note that it trained its attempt's first step (see note_started).
STARTED_SUFFIX = ".started"


def note_started() -> None:
    """Under :func:`torchrun`, tell the agent this worker trained its attempt's first step:
    its restart is over, so a node agent with warm workers starts the next attempt's standbys
    now (:mod:`spotrun.launch.warm`) instead of competing with the restart. A no-op elsewhere."""
    folder = os.environ.get(EXIT_NOTES_ENV)
    if not folder:
        return
    with contextlib.suppress(OSError):  # a courtesy: the agent falls back to a timer
        open(os.path.join(folder, f"{os.getpid()}{STARTED_SUFFIX}"), "w").close()


def _noted_started(folder: str) -> bool:
    with contextlib.suppress(OSError):
        return any(name.endswith(STARTED_SUFFIX) for name in os.listdir(folder))
    return False


def _cpu_ticks(pid: int, parent: int) -> int | None:
    """User + system CPU ticks of ``pid`` (all its threads); None when it is gone or is not a
    child of ``parent`` (a pid reused by someone else's process)."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 13 or fields[0] == "Z" or int(fields[1]) != parent:
        return None
    return int(fields[11]) + int(fields[12])


class _FinishedWatch:
    """While torchrun runs: kill a worker that noted its exit (0 or 75) and then used under
    :data:`STUCK_CPU_SHARE` of a core for ``stuck_s`` (see :data:`FINISHED_STUCK_S`). A worker
    still doing anything (an upload, an evaluation) uses more and is left alone."""

    def __init__(self, notes: str, stuck_s: float) -> None:
        self._notes, self._stuck_s = notes, stuck_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotrun-finished-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me, hz = os.getpid(), os.sysconf("SC_CLK_TCK")
        seen: dict[int, tuple[int, float]] = {}  # pid -> (CPU ticks, when) since it last worked
        while not self._stop.wait(min(5.0, self._stuck_s / 4)):
            now = time.monotonic()
            exited = [pid for pid, code in _exit_notes(self._notes).items()
                      if code in (EXIT_FINISHED, EXIT_INTERRUPTED)]
            for pid in exited:
                ticks = _cpu_ticks(pid, me)
                if ticks is None:
                    seen.pop(pid, None)
                    continue
                last = seen.get(pid)
                if last is None or ticks - last[0] > STUCK_CPU_SHARE * hz * max(now - last[1], 1.0):
                    seen[pid] = (ticks, now)  # working (or first seen): the window starts again
                elif now - last[1] >= self._stuck_s:
                    log.warning("worker %d noted its exit and then used under 1%% of a core for %.0fs: stuck on "
                                "its way out (torch's gloo teardown can deadlock); killing it "
                                "(%s=0 turns this off)", pid, now - last[1], FINISHED_STUCK_ENV)
                    with contextlib.suppress(OSError):
                        if os.getsid(pid) == pid:
                            os.killpg(pid, signal.SIGKILL)
                        else:
                            os.kill(pid, signal.SIGKILL)
                    seen[pid] = (ticks, float("inf"))

    def stop(self) -> None:
        self._stop.set()


def _finished_stuck_s() -> float:
    value = env_float_or_default(FINISHED_STUCK_ENV, FINISHED_STUCK_S)  # a bad one: named, default
    if value < 0:
        log.warning("ignoring %s=%g (seconds, e.g. 300; 0: off); using %g", FINISHED_STUCK_ENV, value,
                    FINISHED_STUCK_S)
        return FINISHED_STUCK_S
    return value


def _exit_notes(folder: str) -> dict[int, int]:
    """The workers' exit notes (:func:`note_exit`): {pid: code}."""
    notes: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.endswith(STARTED_SUFFIX):
                continue
            with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, name)) as f:
                notes[int(name)] = int(f.read().strip())
    return notes


def _noted_codes(folder: str) -> set[int]:
    return set(_exit_notes(folder).values())


def _done_marker() -> bytes | None:
    """The run's done.json (at ``$SPOTRUN_URL``, as launchers set it), or None.

    Compared before and after the workers run, so only a marker this launch wrote counts.
    """
    if not os.environ.get("SPOTRUN_URL"):
        return None
    try:
        from .storage import open_storage

        storage = open_storage()
        return bytes(storage.read_bytes(DONE_MARKER)) if storage.exists(DONE_MARKER) else None
    except Exception as exc:  # noqa: BLE001 - unreadable: trust the exit codes as before
        log.warning("could not read %s under $SPOTRUN_URL: %s", DONE_MARKER, exc)
        return None


def preload() -> None:
    """Import what :func:`torchrun` imports when it runs (torchrun's agent and its elastic
    machinery: about 0.5 s on top of ``import torch``), so a node agent can have it done while
    it still waits for its cluster file (spotrun.launch.node)."""
    import torch.distributed.elastic.multiprocessing.api
    import torch.distributed.elastic.multiprocessing.errors
    import torch.distributed.run  # noqa: F401


#: torchrun's agent loggers that log a record with a traceback on the way out of an attempt
#: (a worker that exited non-zero, a failed rendezvous shutdown, ...).
_AGENT_LOGGERS = (
    "torch.distributed.elastic.multiprocessing.api",
    "torch.distributed.elastic.multiprocessing.errors",
    "torch.distributed.elastic.multiprocessing.tail_log",
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.rendezvous.registry",
    "torch.distributed.elastic.utils.distributed",
    "torch.distributed.launcher.api",
)


class _PlainTraceback(logging.Filter):
    """Formats a record's traceback the standard library's way before torch's handler sees it.

    torch's log formatter (``torch._logging``) imports ``torch._dynamo`` to format any record
    that carries ``exc_info`` (to read one config flag): sympy, inductor and dynamo, 3-7 s of
    CPU on this 2-core machine. torchrun's multiprocessing context (warm workers) logs every
    worker that exits non-zero with ``logger.exception``, so each survivor's agent paid that
    import between its workers' exit 75 (or 1) and torchrun returning: measured 4.5-12 s on a
    script that only exits 75, against 1 s with subprocess workers, whose failure is logged
    without a traceback. The same text is logged: ``exc_text`` is what the formatter would
    have appended."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


_PLAIN_TRACEBACK = _PlainTraceback()


def _plain_agent_tracebacks() -> None:
    """Install :class:`_PlainTraceback` on torchrun's agent loggers (once per process)."""
    for name in _AGENT_LOGGERS:
        logger = logging.getLogger(name)
        if _PLAIN_TRACEBACK not in logger.filters:
            logger.addFilter(_PLAIN_TRACEBACK)


def _warm_workers(notes: str) -> None:
    """Where a node agent started standby interpreters (``SPOTRUN_WARM_WORKERS``, on by
    default; :mod:`spotrun.launch.warm`), torchrun's workers run in them, and the agent's next
    standbys start once a worker noted its first step in ``notes``. torchrun run by hand (no
    agent, no standbys) starts its workers as usual."""
    from .launch import warm

    pool = warm.current()
    if pool is None or not warm.enabled() or not warm.install():
        return
    pool.first_step = lambda: _noted_started(notes)


def torchrun(argv: Sequence[str] | None = None) -> int:
    """Run ``torch.distributed.run`` (torchrun) with ``argv``; return spotrun's exit code.

    0 when every worker finished; ``EXIT_INTERRUPTED`` (75) when any worker exited 75 (the
    ranks agree before stopping, so one rank's 75 means the stop checkpoint was committed
    by all of them; ranks that torchrun then killed while they were tearing down do not
    change that), whether the signal reached the workers directly or through torchrun;
    ``128 + signum`` when torchrun was signalled and no worker committed a stop
    checkpoint; 0 also when workers failed after writing ``done.json`` (at
    ``$SPOTRUN_URL``) during this launch; ``128 + signum`` when every failed worker exited
    with one of :data:`SIGNAL_EXITS` (the largest, 143 before 130); 1 for any other failure,
    after printing torchrun's failure summary. "Written during this launch" is known from the workers' exit notes
    (every rank notes 0 once done.json is written), or from ``$SPOTRUN_URL`` when the
    workers died before noting.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import parse_args, run

    global _agent_signal
    _agent_signal = None
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    _slot_ranks(args)
    quick_rendezvous_polls(_scaled_poll(args))
    _patient_shutdown(args)
    _plain_agent_tracebacks()
    notes = tempfile.mkdtemp(prefix="spotrun-exit-")
    os.environ[EXIT_NOTES_ENV] = notes  # inherited by the workers torchrun starts
    done_before = _done_marker()
    _warm_workers(notes)
    stuck_s = _finished_stuck_s()
    finished_watch = _FinishedWatch(notes, stuck_s) if stuck_s > 0 else None
    try:
        run(args)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        # A noted 75 is the same promise as an exit 75 (the stop checkpoint committed on every
        # rank): a worker killed after its note (stuck on its way out) does not undo it.
        if EXIT_INTERRUPTED in codes or EXIT_INTERRUPTED in _noted_codes(notes):
            log.warning("workers stopped on an interruption (exit codes %s); "
                        "checkpoint committed, exiting %d", codes, EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        done_now = _done_marker()
        noted_finished = EXIT_FINISHED in _noted_codes(notes)
        if noted_finished or (done_now is not None and done_now != done_before):
            # done.json is written after every rank's final checkpoint committed: the run is
            # finished, whatever a worker did after it (gloo's teardown can abort a worker,
            # "terminate called without an active exception", about 1 run in 5).
            log.warning("the run finished (done.json written) but workers then exited "
                        "with codes %s; exiting %d", codes, EXIT_FINISHED)
            return EXIT_FINISHED
        if codes and set(codes) <= SIGNAL_EXITS:
            # Every worker that ended was stopped by a signal and could not commit its stop
            # checkpoint in time: an interruption that loses the steps since the previous
            # checkpoint, not a failure of the command (torchrun alone would exit 1).
            log.warning("workers were stopped by a signal and did not commit a stop checkpoint "
                        "(exit codes %s); exiting %d", codes, max(codes))
            return max(codes)
        print(exc.format_msg(), file=sys.stderr)
        return 1
    except RendezvousConnectionError as exc:
        # The rendezvous store is gone: the node hosting it (node 0's agent) vanished. torchrun
        # asks the store how many nodes wait at every monitoring pass while the workers run,
        # and raises out of run() (its agent stops the workers first). That is a peer lost
        # mid-attempt, as a failed collective is: exit 1 like one, so a node agent that stays
        # to rejoin (spotrun.launch.node) can, instead of dying of the exception, which made
        # the launcher relaunch every node when node 0 vanished.
        codes = _noted_codes(notes)
        if EXIT_INTERRUPTED in codes:
            return EXIT_INTERRUPTED
        if EXIT_FINISHED in codes:
            return EXIT_FINISHED
        log.warning("the rendezvous store is unreachable (%s: its host node is gone?); "
                    "exiting 1", exc.__cause__ or exc)
        return 1
    except SignalException as exc:
        _agent_signal = int(exc.sigval)
        # torchrun forwarded the signal and waited for its workers, but reports none of
        # their exit codes: their notes say whether the stop checkpoint was committed.
        if EXIT_INTERRUPTED in _noted_codes(notes):
            log.warning("torchrun got signal %d; its workers committed a stop "
                        "checkpoint, exiting %d", int(exc.sigval), EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        return 128 + int(exc.sigval)
    finally:
        if finished_watch is not None:
            finished_watch.stop()
        shutil.rmtree(notes, ignore_errors=True)
    return 0


def _slot_ranks(args: Any) -> None:
    """Node ranks by the cluster file's slot (spotrun.launch.ranks): a node agent passes its
    slot in ``--rdzv-conf``; taken out here (torch never sees it) and installed for the
    rendezvous this call runs. No slot (torchrun called by hand): torch's own order."""
    from .launch import ranks

    conf, slot = ranks.take_slot(getattr(args, "rdzv_conf", None))
    if slot is not None:
        args.rdzv_conf = conf
    ranks.install(slot)


def _rdzv_poll_s() -> float:
    raw = os.environ.get(RDZV_POLL_ENV, "").strip()
    if not raw:
        return RDZV_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.01 <= value <= 1.0:
        log.warning("ignoring %s=%r (seconds between rendezvous polls, 0.01-1, e.g. 0.1); "
                    "using %g", RDZV_POLL_ENV, raw, RDZV_POLL_S)
        return RDZV_POLL_S
    return value


def _scaled_poll(args: Any) -> float | None:
    """The poll for this launch: ``SPOTRUN_RDZV_POLL_S`` when set, else :data:`RDZV_POLL_S`
    scaled by the most nodes the rendezvous may hold (``--nnodes N`` or ``M:N``) above
    :data:`RDZV_POLL_NODES`, at most 1 s. None (the default poll) when ``--nnodes`` is unreadable."""
    if os.environ.get(RDZV_POLL_ENV, "").strip():
        return None
    try:
        from torch.distributed.run import parse_min_max_nnodes

        most = int(parse_min_max_nnodes(str(args.nnodes))[1])
    except Exception:  # noqa: BLE001 - torchrun reports a bad --nnodes itself
        return None
    return min(1.0, RDZV_POLL_S * max(1.0, most / RDZV_POLL_NODES))


#: The poll the patched rendezvous uses now (None: not patched); read at each delay and at
#: each state holder's creation, so a later call with another value takes effect.
_rdzv_poll: list[float | None] = [None]


def quick_rendezvous_polls(poll_s: float | None = None) -> bool:
    """Make torch's c10d rendezvous look at its state every ``poll_s`` seconds (default
    :func:`_rdzv_poll_s`) instead of every second while a node waits for its round (see
    "Rendezvous polls" in the module docstring): the executor's fixed one-second delay
    between polls, and the state holder's one-second cache that serves a poll without asking
    the store. The first round's random skew and every other delay pass through. False, with
    one log line, when this torch's rendezvous does not wait through those two pieces."""
    poll = _rdzv_poll_s() if poll_s is None else poll_s
    try:
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr
    except ImportError as exc:
        log.info("rendezvous polls: torch's dynamic rendezvous not importable (%s)", exc)
        return False
    current = getattr(dr, "_delay", None)
    executor = getattr(dr, "_DistributedRendezvousOpExecutor", None)
    run = getattr(getattr(executor, "run", None), "__code__", None)
    holder = getattr(dr, "_BackendRendezvousStateHolder", None)
    init_fn = getattr(holder, "__init__", None)
    init = getattr(getattr(init_fn, "_spotrun_original", init_fn), "__code__", None)
    sync = getattr(getattr(holder, "sync", None), "__code__", None)
    if not callable(current) or not isinstance(run, types.CodeType) \
            or "_delay" not in run.co_names or 1 not in run.co_consts \
            or not isinstance(init, types.CodeType) or "cache_duration" not in init.co_varnames \
            or not isinstance(sync, types.CodeType) or "_cache_duration" not in sync.co_names:
        log.info("rendezvous polls: this torch's rendezvous does not poll through "
                 "_delay(seconds=1) and a state cache of cache_duration; keeping its own pace")
        return False
    _rdzv_poll[0] = poll
    if not hasattr(current, "_spotrun_original"):
        original_delay = current

        def _delay(seconds: float | tuple[float, float]) -> None:
            # Only the SYNC poll asks for exactly 1 s; anything else is torch's own choice.
            quick = _rdzv_poll[0]
            original_delay(quick if seconds == 1 and quick is not None else seconds)

        _delay._spotrun_original = original_delay  # type: ignore[attr-defined]
        dr._delay = _delay
    if not hasattr(holder.__init__, "_spotrun_original"):
        original_init = holder.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            quick = _rdzv_poll[0]
            # torch's default (1 s) only: a caller's own cache_duration stays.
            if quick is not None and self._cache_duration == 1 and "cache_duration" not in kwargs \
                    and len(args) < 3:
                self._cache_duration = quick

        __init__._spotrun_original = original_init  # type: ignore[attr-defined]
        holder.__init__ = __init__
    if poll != 1:
        log.debug("rendezvous polls every %g s (torch: 1 s)", poll)
    return True


def _patient_shutdown(args: Any) -> None:
    """Let signalled workers finish their stop checkpoint (see the module docstring): a
    ``--shutdown-timeout`` of ``SPOTRUN_STOP_TIMEOUT`` + slack, unless the user gave one. A
    torch without the option (older than 2.9) keeps its fixed 30 s."""
    if not hasattr(args, "shutdown_timeout") or args.shutdown_timeout is not None \
            or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        return
    import math

    from .config import stop_knobs
    from .errors import ConfigError

    try:
        stop_s = stop_knobs().timeout_s
    except ConfigError:
        return  # each worker's wrapper refuses the value with its one-line error
    args.shutdown_timeout = math.ceil(stop_s + SHUTDOWN_SLACK_S)


if __name__ == "__main__":
    sys.exit(torchrun())
