"""One process's segment of a run: what every training-loop wrapper shares.

The :class:`~spotrun.Checkpointer` (state it saves itself) and
:class:`~spotrun.integrations._session.RunSession` (folders a trainer writes: Hugging Face,
Lightning, Accelerate) differ in what a checkpoint is; everything around it is this one
class: the run lease, the signals-and-notices inbox, the ledger records, the segment's
begin and end, the bounded stop checkpoint, the done marker.

Call order (every rank)::

    seg = RunSegment(storage, handle_signals=..., watchers=...)
    group = seg.join()                   # the process group; the stop knobs, checked
    seg.begin()                          # lease, signal handlers, watchers, segment_started
    seg.drain(step)                      # at each step boundary: notices into the ledger
    seg.save_before_stop(step, save)     # on a stop: bounded; True when it committed
    seg.finish(step)                     # done.json, segment_ended(finished)
    seg.stop_listening(); seg.release(...); seg.record_end(reason)   # on the way out

The stop deadline lives here and only here (:meth:`save_before_stop`): a save that misses
it is abandoned and the process leaves with :data:`~spotrun.records.layout.EXIT_STOP_UNSAVED` at
once, through ``os._exit`` (:meth:`leave_abandoned`), because the abandoned writer thread
may still be inside ``torch.save`` or an upload, and an interpreter shutting down under it
can crash (SIGSEGV, abort) and turn "relaunch, it resumes" into a signal death.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from ..config import StopKnobs, env_str, stop_knobs
from ..distributed import Group, note_exit, note_started, settle_comm_threads
from ..errors import SaveError, StorageError
from ..notices import Notice, Watcher
from ..records.events import Event, NoticeReceived, SegmentEnded, SegmentStarted, TrainingResumed
from ..records.layout import DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_STOP_UNSAVED
from ..records.lease import Lease, acquire_run_lease, release_run_lease
from ..records.ledger import BackgroundLedger, Ledger
from ..storage import Storage, inflight
from .interrupts import Interrupts

__all__ = ["RunSegment", "process_start_time"]

log = logging.getLogger(__name__)

#: Longest wait, after a missed stop deadline, for open uploads to be aborted.
ABORT_BUDGET_S = 5.0
#: ... and at least this long, even at the deadline itself (SPOTRUN_STOP_MARGIN=0): the abort
#: requests must get out, and a second more cannot cost a checkpoint that is already lost.
ABORT_MIN_S = 1.0


def process_start_time() -> float:
    """When this process started (epoch seconds), for the restart-overhead figure.

    Includes interpreter start and imports (torch alone can take seconds), which a resumed
    run really pays. Falls back to "now" where /proc is not available.
    """
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class RunSegment:
    """One training process's hold on a run, from :meth:`begin` to :meth:`release`."""

    def __init__(
        self,
        storage: Storage,
        *,
        handle_signals: bool = True,
        watchers: Sequence[Watcher] | None = None,
    ) -> None:
        self.storage = storage
        self.segment_id = env_str("SPOTRUN_SEGMENT_ID") or uuid.uuid4().hex[:12]
        self.interrupts = Interrupts(handle_signals=handle_signals, watchers=watchers)
        # Ledger writes go through one background thread: a hanging storage must not
        # block the start or a step (it once blocked a start for 9 minutes).
        self._ledger = BackgroundLedger(Ledger(storage))
        self.knobs = StopKnobs()
        self.group: Group | None = None
        self.lease: Lease | None = None
        self.started_at = time.time()
        self.active = False
        #: ``done.json`` is written: the segment's end is recorded, nothing more to say.
        self.finished = False
        self._ended = False  # record_end() ran
        #: Completed training steps and when the last one ended (for ``segment_ended``).
        self.steps_done = 0
        self.last_step_at: float | None = None
        #: What the restore before training cost (:meth:`restored`), for ``training_resumed``.
        self._restore: dict[str, float | int] = {}

    # -- begin -----------------------------------------------------------------------------

    def join(self) -> Group:
        """The run folder exists, the process group is known, the stop knobs are checked
        (a bad ``SPOTRUN_STOP_*`` refuses the start: nothing is held yet)."""
        self.knobs = stop_knobs()
        self.storage.ensure_root(create=True)
        self.group = Group()
        return self.group

    def begin(self) -> Lease | None:
        """Take the run's lease (rank 0), start listening, record ``segment_started``."""
        group = self.group if self.group is not None else self.join()
        # One writer per run: rank 0 holds the lease until release() (raises LeaseHeldError,
        # on every rank, when another trainer has it).
        self.lease = acquire_run_lease(self.storage, group, self.segment_id)
        try:
            self.interrupts.start()
        except BaseException:  # e.g. a bad SPOTRUN_NOTICE_SOURCE: leave nothing held
            self.interrupts.restore_signal_handlers()
            release_run_lease(self.lease, writing=False)
            raise
        self.active = True
        self._ended = False
        self.started_at = process_start_time()
        if group.is_main:
            self.emit(SegmentStarted(segment_id=self.segment_id,
                                     instance=self.interrupts.instance_info(),
                                     started_at=self.started_at))
        return self.lease

    # -- during ----------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue a ledger record for the background writer; returns at once. A failing or
        hanging ledger never stops or stalls training."""
        self._ledger.submit(event)

    def restored(self, started_at: float, seconds: float, bytes_by_source: dict[str, int]) -> None:
        """A checkpoint was restored: when the restore began, how long it took and its
        bytes by source (``local``, ``peer``, ``url``; on rank 0 every rank's together).
        :meth:`training_started` records them with the first step: the cost report's
        recovery split."""
        self._restore = {
            "restore_started_at": float(started_at), "restore_s": max(0.0, float(seconds)),
            **{f"bytes_{key}": int(bytes_by_source.get(key, 0)) for key in ("local", "peer", "url")},
        }

    def training_started(self, step: int) -> None:
        """Where training (re)starts: the cost report's restart overhead and recovery split
        (rank 0 records; with the restore's figures when :meth:`restored` was told them)."""
        self.steps_done = step
        note_started()  # under spotrun's torchrun: the agent's cue for its next standbys
        if self.group is not None and self.group.is_main:
            self.emit(TrainingResumed(segment_id=self.segment_id, step=step,
                                      process_started_at=self.started_at,
                                      first_step_at=time.time(), **self._restore))  # type: ignore[arg-type]

    def drain(self, steps_done: int) -> None:
        """A step ended: count it, log and record every notice that arrived since the last."""
        self.steps_done = steps_done
        self.last_step_at = time.time()
        self.interrupts.drain(steps_done, self._on_notice)

    def _on_notice(self, n: Notice) -> None:
        # Every rank records what it saw (often only one rank sees a notice); the
        # ledger takes concurrent writers without losing records.
        self.emit(NoticeReceived(segment_id=self.segment_id, source=n.source, action=n.action,
                                 notice_time=n.notice_time, detected_at=n.detected_at,
                                 deadline=n.deadline))

    # -- the stop deadline ------------------------------------------------------------------

    def stop_bound(self, now: float) -> tuple[float, str]:
        """When the stop checkpoint must have committed, and why (for the log line): the
        notice's deadline minus ``SPOTRUN_STOP_MARGIN`` when it is known, else
        ``SPOTRUN_STOP_TIMEOUT`` counted from the signal or request (the machine's clock
        started then, not at this step's end)."""
        notice = self.interrupts.stop_notice
        if notice is not None and notice.deadline is not None:
            return (notice.deadline - self.knobs.margin_s,
                    f"the notice's deadline minus SPOTRUN_STOP_MARGIN={self.knobs.margin_s:g}s")
        start = notice.detected_at if notice is not None else now
        return (start + self.knobs.timeout_s,
                f"SPOTRUN_STOP_TIMEOUT={self.knobs.timeout_s:g}s after the stop request")

    def save_before_stop(
        self,
        step: int,
        save: Callable[[], None],
        *,
        previous: int | None,
        typical_s: float | None = None,
        abandon: Callable[[], None] | None = None,
        tell_others: Callable[[], None] | None = None,
    ) -> bool:
        """Run ``save`` (it writes and commits the stop checkpoint of ``step``) within the
        time the machine has left (:meth:`stop_bound`; at least a second, so a fast save to
        local disk still lands when the step ran late).

        The save runs on a daemon thread, so a hanging store cannot hold the process past
        the bound. Returns True when it committed, False when it failed with a storage error
        (logged, naming ``previous``, the checkpoint that stays the latest); any other error
        (a state_dict that raises...) is a bug and is raised. When the bound passes first,
        the save is abandoned and this process does not return: :meth:`leave_abandoned`
        (``abandon`` forgets the save in flight first; ``tell_others`` lets ranks waiting
        for this one's answer learn it did not commit).
        """
        notice = self.interrupts.stop_notice
        now = time.time()
        left = notice.seconds_left(now) if notice is not None else None
        bound_at, bound_why = self.stop_bound(now)
        budget = max(bound_at - now, 1.0)
        if left is not None and typical_s is not None and typical_s > left:
            log.warning(
                "%.1fs left before the machine goes but saves have taken up to %.1fs; "
                "trying anyway (the previous checkpoint stays the latest if this one cannot finish)",
                left, typical_s,
            )
        t0 = time.time()
        done = threading.Event()
        failure: list[BaseException] = []
        # The CUDA device is per thread: NCCL collectives and staging copies on the helper
        # thread must use this rank's device, not device 0.
        device = _current_cuda_device()

        def run() -> None:
            try:
                if device is not None:
                    import torch

                    torch.cuda.set_device(device)
                save()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="spotrun-stop-save", daemon=True).start()
        finished = done.wait(budget)
        if finished and not failure:
            now = time.time()
            if notice is not None and notice.source in ("signal", "user"):
                # A signal or request has no provider posting time: say what it was.
                why = notice.action if notice.source == "signal" else "a stop request"
                log.warning("stop after %s: received %s, committed %s (%.1fs after it)", why,
                            _fmt_time(notice.detected_at), _fmt_time(now), now - notice.detected_at)
            elif notice is not None:
                log.warning(
                    "stop after notice: posted %s, detected %s, committed %s (%.1fs after detection)",
                    _fmt_time(notice.notice_time), _fmt_time(notice.detected_at),
                    _fmt_time(now), now - notice.detected_at,
                )
            else:
                log.info("stop checkpoint committed in %.1fs", now - t0)
            return True
        if failure and not isinstance(failure[0], (SaveError, StorageError, OSError)):
            raise failure[0]
        if previous is not None and previous != step:
            kept = (f"the checkpoint at step {previous} is intact and stays the latest; "
                    "relaunch and the run resumes from it")
        else:
            kept = "no earlier checkpoint was committed, so a relaunch starts from the beginning"
        if finished:
            log.error("stop checkpoint at step %d failed (%s); exiting with code %d: %s",
                      step, failure[0], EXIT_STOP_UNSAVED, kept)
            return False
        log.error(
            "stop checkpoint at step %d did not commit within %.1fs (%s); giving up on it "
            "and exiting with code %d: %s. If the store is slow rather than down, raise "
            "SPOTRUN_STOP_TIMEOUT or lower SPOTRUN_STOP_MARGIN", step, time.time() - t0,
            bound_why, EXIT_STOP_UNSAVED, kept,
        )
        if abandon is not None:
            abandon()
        if tell_others is not None:
            tell_others()
        self.leave_abandoned()
        return False  # not reached: leave_abandoned() does not return

    def leave_abandoned(self) -> None:
        """Exit with :data:`EXIT_STOP_UNSAVED` now, a stop save still running on a thread.

        What must outlive the process is done first, each bounded: open uploads the save
        started are aborted (:func:`spotrun.storage.inflight.abort_all`, at most
        :data:`ABORT_BUDGET_S` or the time left before the deadline, at least
        :data:`ABORT_MIN_S`), the lease stops being
        renewed (the save may still write, so it is not released), ``segment_ended`` is
        written, logs and streams are flushed. Then ``os._exit``: no interpreter shutdown
        runs under the abandoned writer, so the exit code is 143 every time.
        """
        notice = self.interrupts.stop_notice
        left = notice.seconds_left() if notice is not None else None
        budget = ABORT_BUDGET_S if left is None else max(ABORT_MIN_S, min(ABORT_BUDGET_S, left))
        with contextlib.suppress(Exception):
            inflight.abort_all(budget)
        self.interrupts.stop_watchers()
        self.active = False  # nothing more to give back: release() does nothing after this
        with contextlib.suppress(Exception):
            release_run_lease(self.lease, writing=True)
        with contextlib.suppress(Exception):
            self.record_end("interrupted")
        _flush_logs()
        _exit_now(EXIT_STOP_UNSAVED)

    # -- end -------------------------------------------------------------------------------

    def finish(self, step: int) -> None:
        """The run is complete (every rank calls): ``done.json`` and ``segment_ended``."""
        group = self.group
        assert group is not None
        self.steps_done = step
        if group.is_main:
            marker = {"step": step, "finished_at": time.time(), "segment_id": self.segment_id}
            self.storage.write_bytes(DONE_MARKER, json.dumps(marker).encode())
            self.emit(SegmentEnded(segment_id=self.segment_id, reason="finished",
                                   ended_at=time.time(), steps_done=step,
                                   last_step_at=self.last_step_at))
        group.barrier()
        settle_comm_threads()
        self.finished = True
        # After the barrier every rank knows done.json exists: tell the wrapper, which may not
        # be able to read the run URL (a script that takes it as an argument).
        note_exit(EXIT_FINISHED)
        log.info("run finished at step %d", step)

    def stop_listening(self) -> None:
        """Notice watchers off (the first thing on the way out)."""
        self.interrupts.stop_watchers()

    def release(self, *, interrupted: bool, lease_writing: bool = False) -> None:
        """Give back what :meth:`begin` took: signal handlers and the lease. Idempotent.

        ``interrupted``: the stop checkpoint is committed and the process leaves with 75:
        SIGTERM stays ignored to the end (see :meth:`Interrupts.hold_until_exit`).
        ``lease_writing``: a save may still be writing, so the lease is not released (it
        stops being renewed and expires).
        """
        if not self.active:
            return
        self.active = False
        if interrupted:
            settle_comm_threads()
            note_exit(EXIT_INTERRUPTED)  # for python -m spotrun.distributed, if it is ours
            held = self.interrupts.handlers_installed
            self.interrupts.hold_until_exit()
            if held:
                # A trainer may put its own Python handlers back on its way out (Lightning's
                # teardown does), and the interpreter resets Python handlers to the default
                # action while it finalises: a supervisor's second SIGTERM then would end
                # the process with -15 although the stop checkpoint is committed. SIG_IGN,
                # set again at exit, is a kernel disposition that holds to the end.
                atexit.register(_ignore_sigterm)
        else:
            self.interrupts.restore_signal_handlers()
        release_run_lease(self.lease, writing=lease_writing)

    def record_end(self, reason: str | None) -> None:
        """``segment_ended`` with ``reason`` (rank 0, unless :meth:`finish` recorded it or
        ``reason`` is None), then wait, bounded, for the queued ledger records."""
        if self._ended:
            return
        self._ended = True
        if (reason is not None and not self.finished and self.group is not None
                and self.group.is_main):
            self.emit(SegmentEnded(segment_id=self.segment_id, reason=reason,  # type: ignore[arg-type]
                                   ended_at=time.time(), steps_done=self.steps_done,
                                   last_step_at=self.last_step_at))
        self._ledger.close(self.knobs.ledger_flush_s)


def _current_cuda_device() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return None


def _flush_logs() -> None:
    """Everything logged so far reaches its file or terminal (``os._exit`` skips this)."""
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        logger = logger.parent if logger.propagate else None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_now(code: int) -> None:
    """Leave without the interpreter's shutdown (a seam: in-process tests replace it)."""
    os._exit(code)
