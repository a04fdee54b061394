"""The training-loop wrapper: resume, checkpoint on a schedule and on notice, stop cleanly.

Call order::

    with Checkpointer(url, model=model, optimizer=opt, data=loader) as ckpt:
        for step in ckpt.range(total_steps):     # restore() happens here; starts at 0 or the
            train_one_step(...)                  #   saved step; saves on schedule and on notice;
                                                 #   on a stop: commits, raises SystemExit(75)
    # range() ran to its end: final checkpoint committed, done marker written, exit code 0

or, for loops that are not a simple range::

    with Checkpointer(...) as ckpt:
        step = ckpt.restore()
        while step < total_steps:
            train_one_step(...)
            step += 1
            ckpt.step(step)          # may save; on a stop request it saves and exits (75)
        ckpt.finish()

or, without re-indenting a loop into a ``with`` block (the same guarantees: on the way out
a save in flight commits, the lease is released, signal handlers are put back)::

    ckpt = Checkpointer(...).start()
    for step in ckpt.range(total_steps):
        train_one_step(...)
    ckpt.close()          # optional: an exit hook closes it too, also after an exception

``break`` out of :meth:`Checkpointer.range` skips the final checkpoint and the done marker:
call :meth:`Checkpointer.finish` after the loop (a clean close without it warns).

Signals and notices only set flags; all I/O happens in the training thread at a step
boundary, so a signal can never land inside a half-built checkpoint.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from .. import config
from ..config import IF_ALL_DAMAGED_ENV  # noqa: F401 - importable from here, as before
from ..distributed import Group
from ..errors import ConfigError
from ..notices import Watcher
from ..records.layout import DONE_MARKER, EXIT_INTERRUPTED, EXIT_STOP_UNSAVED
from ..records.lease import Lease
from ..recovery.local import LocalCopy
from ..storage import Storage, open_storage
from ..units import format_bytes
from .artifacts import artifact_paths, capture_artifacts
from .data import ResumableLoader
from .restore import PAYLOAD_FORMAT, RestoreProgress, Restorer
from .saver import Saver
from .segment import RunSegment, process_start_time  # noqa: F401 - importable from here
from .training_state import TrainingState

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)

DEFAULT_EVERY_SECONDS = 300.0


class Checkpointer:
    """Wrap a training loop so it survives interruptions and resumes exactly.

    Args:
        url: where the run lives: a path, ``file://``, ``s3://bucket/prefix``, ``memory://``
            or any fsspec URL. Default: ``$SPOTRUN_URL``.
        model, optimizer, scheduler, scaler: an object or a list of them. A DDP or
            ``torch.compile`` model saves its inner module. Saved once (by rank 0).
        data: the data loader(s) (e.g. :class:`~spotrun.ResumableLoader`); saved per rank.
        objects: more stateful objects (``state_dict``/``load_state_dict``), saved once.
        per_rank: stateful objects that differ between ranks, saved by each rank.
        values: initial plain values: numbers, strings, None, tensors, and lists, tuples
            and dicts of them (str or int keys). Read and update them through
            :attr:`values`; they are saved and restored with the rest, tuples as tuples,
            tensors with their dtype, shape and exact bits (on the CPU: move them back to
            your device after :meth:`restore`). This is the place for step-local state
            that exact resume needs: a batch prefetched for the next step, an RNN hidden
            state carried across batches.
        metadata: JSON-serialisable facts recorded in each manifest (config, git hash...).
        every_steps: checkpoint when the completed-step count is a multiple of this.
        every_seconds: checkpoint when this long has passed since the last one. When neither
            is given, every 300 s; notices and signals always checkpoint.
        keep_last: committed checkpoints to keep (older ones are deleted after a newer commit).
        async_save: copy the state into reusable host buffers and write it from a background
            thread, so training pauses only for the copy. False: write before returning.
        when_busy: when a save is due while the previous one is still being written:
            ``"wait"`` for it (training pauses) or ``"skip"`` this one.
        save_rng: save and restore every RNG (required for exact resume).
        weights_only: load with ``torch.load(weights_only=True)``; only set False for storage
            you trust, since unpickling can run code.
        artifacts: local files or folders your script writes and reads back (a best
            model, a tokenizer, eval outputs). Rank 0 copies them into every checkpoint,
            as they are at the step being saved (listed with sizes and checksums in the
            manifest, committed with it), and :meth:`restore` puts back the restored
            checkpoint's copies (on each machine's local rank 0): a path that did not
            exist at that step is removed, a folder gets exactly the saved files. Held in
            memory between the step and the write: meant for files up to a few hundred MB.
        handle_signals: install SIGTERM/SIGINT handlers while the checkpointer is active
            (the ``with`` block, or :meth:`start` to :meth:`close`).
        watchers: interruption-notice sources; default: from the environment (see
            :func:`spotrun.notices.watchers_from_env`); ``[]`` for none.
        storage_options: passed to fsspec (e.g. S3 endpoint, profile).
        sharded: save the model and optimizer through ``torch.distributed.checkpoint``, each
            rank writing its own shards, and reshard on restore (any number of ranks).
            Default (None): when the model's parameters are DTensors / ShardedTensors
            (FSDP2 ``fully_shard``, tensor parallel, FSDP1 with sharded state dicts). Needs
            exactly one model. Everything else (scheduler, ``objects=``, ``values=``,
            ``per_rank=``, RNG) is saved as for replicated runs.
        if_all_damaged: what :meth:`restore` does when checkpoints exist but every one of
            them failed verification: ``"fail"`` (refuse to start, with
            :class:`~spotrun.errors.AllCheckpointsDamagedError` listing them) or
            ``"start_fresh"`` (move them aside under ``damaged/`` and start at step 0).
            Default: ``$SPOTRUN_IF_ALL_DAMAGED``, else ``"fail"``. Damaged folders are never
            overwritten either way.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        data: Any = None,
        objects: Mapping[str, Any] | None = None,
        per_rank: Mapping[str, Any] | None = None,
        values: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int = 2,
        async_save: bool = True,
        when_busy: Literal["wait", "skip"] = "wait",
        save_rng: bool = True,
        weights_only: bool = True,
        handle_signals: bool = True,
        watchers: Sequence[Watcher] | None = None,
        storage_options: dict[str, Any] | None = None,
        sharded: bool | None = None,
        if_all_damaged: Literal["fail", "start_fresh"] | None = None,
        artifacts: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        if every_steps is not None and every_steps < 1:
            raise ConfigError(f"every_steps={every_steps} must be a positive number of steps")
        if every_seconds is not None and every_seconds <= 0:
            raise ConfigError(f"every_seconds={every_seconds} must be positive")
        if keep_last < 1:
            raise ConfigError(f"keep_last={keep_last} must be at least 1 (the newest checkpoint)")
        if when_busy not in ("wait", "skip"):
            raise ConfigError(f"when_busy={when_busy!r} must be 'wait' or 'skip'")
        self.if_all_damaged = config.if_all_damaged(if_all_damaged)
        self.storage: Storage = open_storage(url, storage_options)
        #: What is saved: named objects, per-rank objects, values (see TrainingState).
        self._state = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, data=data, objects=objects,
                                    per_rank=per_rank, values=values, sharded=sharded)
        self.objects = self._state.objects
        self.per_rank = self._state.per_rank
        #: The plain values saved with the state (read and update them in place).
        self.values = self._state.values
        self._sharded_saver: Any = None
        self.artifacts: list[str] = artifact_paths(artifacts)
        self.metadata = dict(metadata or {})
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        if every_steps is None and every_seconds is None:
            self.every_seconds = DEFAULT_EVERY_SECONDS
        self.keep_last = keep_last
        self.async_save = async_save
        self.when_busy = when_busy
        self.save_rng = save_rng
        self.weights_only = weights_only
        self.handle_signals = handle_signals

        self.finished = False
        #: Everything around the checkpoints: lease, signals and notices, ledger, the stop bound.
        self._seg = RunSegment(self.storage, handle_signals=handle_signals, watchers=watchers)
        self._interrupts = self._seg.interrupts
        self._group: Group | None = None
        self._lease: Lease | None = None
        self._saver: Saver | None = None
        self._entered = False
        self._restored = False
        # The step range() handed out last, until step() counts it (see finish()).
        self._range_at: int | None = None
        self._stepped = False  # step() ran in this process
        self._raised: BaseException | None = None  # the SystemExit step() raised
        self._last_value_at_start: Any = None

    @property
    def steps_done(self) -> int:
        """Completed training steps (restored on resume)."""
        return self._seg.steps_done

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self._seg.steps_done = value

    @property
    def segment_id(self) -> str:
        """This process's segment of the run (``$SPOTRUN_SEGMENT_ID`` under a launcher)."""
        return self._seg.segment_id

    # -- context ---------------------------------------------------------------------------

    def start(self) -> Checkpointer:
        """Activate without a ``with`` block: ``ckpt = Checkpointer(...).start()``.

        The same as entering the block: the lease is taken, signal handlers and notice
        watchers start. :meth:`close` leaves it; if the script never gets there (an
        exception, the ``SystemExit(75)`` of a stop, the end of the script), an exit hook
        closes it as the block would have, before the interpreter shuts its thread pools.
        """
        return self.__enter__()

    def close(self) -> None:
        """Leave what :meth:`start` began: commit a save in flight, release the lease, put
        the previous signal handlers back, record how the segment ended. Idempotent.

        Called inside an ``except`` block, the exception being handled counts as the
        reason the segment ended, as it would for a ``with`` block.
        """
        self._close(sys.exc_info()[1])

    def __enter__(self) -> Checkpointer:
        if self._entered:
            raise RuntimeError("Checkpointer is already active; use one 'with' block (or one "
                               "start()/close() pair) per run")
        seg = self._seg
        self._group = seg.join()
        self._state.decide_sharded()  # before the lease: it may refuse the config
        self._lease = seg.begin()  # the lease (rank 0), signal handlers, notice watchers
        try:
            if self.sharded:
                from ..format.sharded import ShardedSaver

                # Collective (it makes the saver's own process group): every rank is here.
                self._sharded_saver = self._state.sharded_saver = ShardedSaver(self.storage)
        except BaseException:
            seg.release(interrupted=False)
            raise
        self._local = LocalCopy.from_env(self.storage.display())
        self._saver = Saver(
            self.storage, self._group, keep_last=self.keep_last, async_save=self.async_save,
            when_busy=self.when_busy, metadata=self.metadata, segment_id=self.segment_id,
            emit=seg.emit, sharded=self._sharded_saver, lease=self._lease, local=self._local,
        )
        self._entered = True
        self._last_value_at_start = getattr(sys, "last_value", None)
        self._raised = None
        _open_checkpointers.add(self)
        _register_exit_hook()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._close(exc)

    def _close_at_exit(self) -> None:
        """The exit hook's close: the exception that is ending the program, if any."""
        exc = self._raised
        if exc is None:
            last = getattr(sys, "last_value", None)  # set for an uncaught exception
            if last is not None and last is not self._last_value_at_start:
                exc = last
        if (exc is None and self._group is not None and self._group.distributed
                and not torch.distributed.is_initialized() and self._saver is not None):
            # The process group is gone (destroy_process_group before the end): no
            # collectives are possible, so a save in flight ends its write uncommitted.
            if self._saver.in_flight:
                log.warning("the process group was destroyed before ckpt.close(); the save "
                            "still in flight is not committed (call ckpt.close() before "
                            "destroy_process_group())")
            self._saver.finish_inflight(RuntimeError("process group destroyed"))
            self._saver.abandon()
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        """Leave the active state (``__exit__``, :meth:`close`, the exit hook)."""
        _open_checkpointers.discard(self)
        if not self._entered:
            return
        exc_type = type(exc) if exc is not None else None
        seg = self._seg
        seg.stop_listening()
        try:
            if self._saver is not None:
                self._saver.finish_inflight(exc)
        finally:
            self._entered = False
            # A save still writing (a second Ctrl-C) keeps the lease until this process ends.
            seg.release(interrupted=isinstance(exc, SystemExit) and exc.code == EXIT_INTERRUPTED,
                        lease_writing=self._saver is not None and self._saver.writing)
        if self._group is None or not self._group.is_main or self.finished:
            seg.record_end(None)
            return
        if exc is None:
            self._warn_unfinished()
        if isinstance(exc, SystemExit) and exc.code in (EXIT_INTERRUPTED, EXIT_STOP_UNSAVED):
            # Both mean the machine was taken; EXIT_STOP_UNSAVED only says the stop
            # checkpoint did not make it (the previous one is the latest).
            reason = "interrupted"
        elif exc_type is None or isinstance(exc, KeyboardInterrupt):
            reason = "stopped"
        else:
            reason = "failed"
        seg.record_end(reason)

    def _warn_unfinished(self) -> None:
        """A clean way out without :meth:`finish`: no done.json, which launchers read as a
        failed run. Say so, and what to do."""
        if self._range_at is not None:
            log.warning(
                "left ckpt.range() at step %d (a break?) and closed without ckpt.finish(): "
                "no final checkpoint and no done.json, so `spotrun launch` and check-resume "
                "read this run as failed; call ckpt.finish() after the loop",
                self._range_at - 1)
        elif self._stepped:
            log.warning(
                "closed at step %d without ckpt.finish(): no done.json, so `spotrun launch` "
                "reads an exit 0 as a failed run; call ckpt.finish() when training is done",
                self.steps_done)

    def _require_active(self) -> tuple[Group, Saver]:
        if not self._entered or self._group is None or self._saver is None:
            raise RuntimeError("the Checkpointer is not active: use it inside a 'with' block, "
                               "or call ckpt.start() first (and ckpt.close() at the end)")
        return self._group, self._saver

    # -- signals and notices ---------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and exit at the next step boundary (thread-safe)."""
        self._interrupts.request_stop()

    @property
    def should_stop(self) -> bool:
        """True once a signal or notice asked this process to stop."""
        return self._interrupts.stop_requested

    # -- the loop --------------------------------------------------------------------------

    def range(self, total_steps: int) -> Iterator[int]:
        """Yield step indices from the restored position up to ``total_steps``.

        After each step's body it calls :meth:`step`; when the range ends it calls
        :meth:`finish`. A ``break`` does neither: call :meth:`finish` after the loop when
        the run is done (it counts the step you broke out of as completed), else the run
        has no done.json and launchers read it as failed (a clean close warns).
        """
        start = self.restore()
        for i in range(start, total_steps):
            self._range_at = i + 1
            yield i
            self.step(i + 1)
        self._range_at = None
        self.finish()

    def step(self, steps_done: int | None = None) -> None:
        """Tell the checkpointer a training step has completed.

        ``steps_done`` is the count of completed steps (default: one more than before). Saves
        when a schedule or notice says so; after a stop request, saves, waits for the commit
        and raises ``SystemExit(EXIT_INTERRUPTED)`` so a supervisor knows to relaunch
        (``SystemExit(EXIT_STOP_UNSAVED)`` when the stop checkpoint failed; when it cannot
        commit in the time left the process leaves with that code at once, through
        ``os._exit``, since the abandoned writer thread is still running: ``finally`` blocks
        and exit hooks do not run, the ledger and logs are flushed first). A background save
        that failed is raised here as :class:`SaveError`.
        """
        group, saver = self._require_active()
        inbox = self._interrupts
        self.steps_done = self.steps_done + 1 if steps_done is None else int(steps_done)
        self._range_at = None
        self._stepped = True
        for obj in self.per_rank.values():
            if isinstance(obj, ResumableLoader):
                obj.mark_consumed()  # the step used every batch handed out so far
        self._seg.drain(self.steps_done)
        busy = saver.poll()
        time_due = (
            self.every_seconds is not None
            and time.time() - saver.last_save_time >= self.every_seconds
        )
        stop, requested, time_due, any_busy = group.agree(
            stop=inbox.stop_requested, save=inbox.save_requested, time_due=time_due, busy=busy
        )
        saver.agreed()  # a commit gathered before this agreement has happened
        if not any_busy:
            saver.commit_written()
        step_due = self.every_steps is not None and self.steps_done % self.every_steps == 0
        if stop:
            inbox.stop_requested = True
            committed = self._save_before_stop()
            if committed and self._local is not None and self._local.peer is not None:
                # The stop checkpoint's peer copy is what a replacement node restores from:
                # its send gets the time the machine has left (bounded), before this exits.
                from ..recovery.peer import finish_sends

                finish_sends(self._seg.stop_bound(time.time())[0])
            # Kept for the exit hook: without a with block, nothing else sees this exit.
            self._raised = SystemExit(EXIT_INTERRUPTED if committed else EXIT_STOP_UNSAVED)
            raise self._raised
        if requested or time_due or step_due:
            inbox.save_requested = False
            self.save()

    def _save_before_stop(self) -> bool:
        """Commit a checkpoint before stopping, within the time the machine has left.

        The bound: the notice's deadline minus ``SPOTRUN_STOP_MARGIN`` when the deadline is
        known, else ``SPOTRUN_STOP_TIMEOUT`` counted from the signal or request. The save
        runs on a daemon thread (a hanging store cannot hold the process past the bound).
        True when it committed; False (logged as an error naming the checkpoint that stays
        the latest) when it failed: the caller then exits with ``EXIT_STOP_UNSAVED``, and a
        relaunch resumes from the previous checkpoint. When it does not commit in time the
        process leaves with ``EXIT_STOP_UNSAVED`` from here (see
        :meth:`RunSegment.leave_abandoned`).
        """
        _, saver = self._require_active()

        def save_and_commit() -> None:
            self.save()
            self.wait()

        return self._seg.save_before_stop(self.steps_done, save_and_commit,
                                          previous=saver.last_saved_step,
                                          typical_s=saver.typical_duration,
                                          abandon=saver.abandon)

    def finish(self, steps_done: int | None = None) -> None:
        """Mark the run complete: commit a final checkpoint and write the done marker.

        After a ``break`` out of :meth:`range`, the step you broke out of counts as
        completed (its update is in the model); pass ``steps_done`` to say otherwise (e.g.
        ``finish(step)`` when the break came before that step's work).
        """
        self._require_active()
        if steps_done is not None:
            self.steps_done = int(steps_done)
        elif self._range_at is not None and self._range_at == self.steps_done + 1:
            self.steps_done = self._range_at
        self._range_at = None
        self.save()
        self.wait()
        self._seg.finish(self.steps_done)
        self.finished = True

    # -- saving ----------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """True when model and optimizer state go through DCP (decided on ``__enter__``)."""
        return self._state.sharded

    def save(self) -> None:
        """Checkpoint the current step (all ranks must call it together).

        Synchronous mode returns once the checkpoint is committed. Async mode (the default)
        returns as soon as the state is copied into reusable host buffers (the only pause
        training sees); a background thread writes and commits it. At most one save is in
        flight: when the next one is due first, ``when_busy="wait"`` waits for it,
        ``"skip"`` skips this one (both logged). Payload first, manifest last: whatever
        fails, the previous checkpoint stays the latest, untouched.
        """
        group, saver = self._require_active()
        capture = (lambda: capture_artifacts(self.artifacts)) if self.artifacts and group.is_main else None
        state = self._state
        saver.save(self.steps_done,
                   lambda: state.payload(group, self.steps_done, save_rng=self.save_rng,
                                         fmt=PAYLOAD_FORMAT),
                   state.sharded_state if state.sharded else None, artifacts=capture)

    @property
    def save_in_flight(self) -> bool:
        """True while a background save is still being written or awaits its commit."""
        return self._saver is not None and self._saver.in_flight

    def wait(self) -> None:
        """Block until the save in flight is written and committed (all ranks call it)."""
        _, saver = self._require_active()
        saver.wait()

    # -- restoring -------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the latest valid checkpoint into every object; return the step to start at.

        A fresh run returns 0. A damaged newest checkpoint (sizes, hashes, a manifest or
        payload that cannot be parsed or names another step, a listed file missing) is
        skipped with a warning, moved aside under ``damaged/`` (never overwritten by a
        later save) and the one before it is used. Anything else that stops a checkpoint
        from being read (access denied, network, throttling after the retries) fails with
        :class:`~spotrun.errors.CheckpointUnreadableError` and changes nothing. When every
        checkpoint is damaged, see ``if_all_damaged``. Every rank takes each decision
        together, so a rank that finds damage in its own files moves all of them to the
        older checkpoint. Idempotent: a second call returns the same step.
        """
        group, saver = self._require_active()
        if self._restored:
            return self.steps_done
        with RestoreProgress(self.storage.display()) as progress:
            restorer = Restorer(
                self.storage, group, replicated=self._state.replicated(),
                per_rank=self.per_rank, values=self.values, artifacts=self.artifacts,
                weights_only=self.weights_only, save_rng=self.save_rng,
                policy=self.if_all_damaged, progress=progress, local=self._local,
                sharded=self._state.sharded_target(),
            )
            step = restorer.newest_valid()
        if step is not None:
            self.steps_done = step
            saver.last_saved_step = step
            log.info("resumed from step %d at %s (%s, restored in %.2fs; %s)", step,
                     self.storage.display(), format_bytes(restorer.restored_bytes),
                     progress.elapsed, restorer.sources)
            self._seg.restored(progress.started_at, progress.elapsed, restorer.bytes_read)
            if group.is_main and self.storage.exists(DONE_MARKER):
                log.info("this run already finished (done marker present)")
        self._restored = True
        saver.last_save_time = time.time()
        self._seg.training_started(self.steps_done)
        return self.steps_done


#: Checkpointers started and not yet closed, for the exit hook.
_open_checkpointers: set[Checkpointer] = set()
_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Close checkpointers still open when the interpreter exits (start() without close()).

    Registered with threading's exit hooks where Python has them: those run before
    ``concurrent.futures`` shuts its thread pools (which a save in flight may still use:
    the storage layer hashes on one) and before non-daemon threads are joined. Imported
    first, so that pool's hook is registered earlier and therefore runs later.
    """
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    import concurrent.futures.thread  # noqa: F401 - registers its own hook before ours

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading exit hooks")
        register(_close_open_at_exit)
    except RuntimeError:
        atexit.register(_close_open_at_exit)
    _exit_hook_registered = True


def _close_open_at_exit() -> None:
    for ckpt in list(_open_checkpointers):
        try:
            ckpt._close_at_exit()
        except BaseException as exc:  # noqa: BLE001 - the interpreter is exiting; say why
            log.error("closing the checkpointer at exit failed: %s: %s", type(exc).__name__, exc)
