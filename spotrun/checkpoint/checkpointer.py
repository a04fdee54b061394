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
import json
import logging
import os
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from ..commit import DAMAGED_DIR, list_checkpoints, newest_valid, quarantine, verify_checkpoint
from ..config import (
    DEFAULT_STOP_MARGIN_S,
    DEFAULT_STOP_TIMEOUT_S,
    env_choice,
    env_float_or_default,
    env_str,
)
from ..data import ResumableLoader, rank_seed
from ..distributed import Group, note_exit
from ..errors import (
    AllCheckpointsDamagedError,
    CheckpointError,
    CheckpointUnreadableError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SaveError,
    StorageError,
    StorageNotFoundError,
    UnsupportedFormatError,
)
from ..events import (
    Event,
    NoticeReceived,
    SegmentEnded,
    SegmentStarted,
    TrainingResumed,
)
from ..layout import DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_STOP_UNSAVED, checkpoint_dir
from ..lease import acquire_run_lease, release_run_lease
from ..ledger import DEFAULT_FLUSH_S, BackgroundLedger, Ledger
from ..manifest import Manifest
from ..notices import Notice, Watcher
from ..snapshot import check_loadable, check_plain, open_payload, payload_name, read_payload
from ..state import (
    check_stateful,
    collect_rng_state,
    load_object_state,
    restore_rng_state,
    seed_everything,
    unwrap,
)
from ..storage import Storage, open_storage
from .artifacts import artifact_paths, capture_artifacts, restore_artifacts
from .interrupts import Interrupts
from .saver import Saver

__all__ = ["Checkpointer"]

log = logging.getLogger("spotrun")

PAYLOAD_FORMAT = 1
DEFAULT_EVERY_SECONDS = 300.0
#: A model can hold sharded state only once one of these is imported (by FSDP2, FSDP1, TP).
_SHARDING_MODULES = ("torch.distributed.tensor", "torch.distributed.fsdp",
                     "torch.distributed._shard")
#: What to do when every checkpoint is damaged (see ``if_all_damaged``), for launchers and
#: wrappers that cannot change the training code.
IF_ALL_DAMAGED_ENV = "SPOTRUN_IF_ALL_DAMAGED"
_IF_ALL_DAMAGED = ("fail", "start_fresh")


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


def _named(kind: str, obj: Any) -> dict[str, Any]:
    """``model=m`` -> {"model": m}; ``model=[a, b]`` -> {"model.0": a, "model.1": b}."""
    if obj is None:
        return {}
    if isinstance(obj, (list, tuple)):
        return {f"{kind}.{i}": o for i, o in enumerate(obj)}
    return {kind: obj}


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
        if if_all_damaged is None:
            if_all_damaged = env_choice(IF_ALL_DAMAGED_ENV, _IF_ALL_DAMAGED, "fail")  # type: ignore[assignment]
        elif if_all_damaged not in _IF_ALL_DAMAGED:
            raise ConfigError(f"if_all_damaged={if_all_damaged!r} must be 'fail' or 'start_fresh'")
        self.if_all_damaged = if_all_damaged
        self._state_loaded_from: int | None = None
        self.storage: Storage = open_storage(url, storage_options)
        self._model_names = list(_named("model", model))
        self._optimizer_names = list(_named("optimizer", optimizer))
        self._sharded_arg = sharded
        #: True when model and optimizer state go through DCP (decided on ``__enter__``).
        self.sharded = False
        self._sharded_saver: Any = None
        self.objects: dict[str, Any] = {}
        for group in (
            _named("model", model),
            _named("optimizer", optimizer),
            _named("scheduler", scheduler),
            _named("scaler", scaler),
            dict(objects or {}),
        ):
            self.objects.update(group)
        self.per_rank: dict[str, Any] = {**_named("data", data), **dict(per_rank or {})}
        clash = set(self.objects) & set(self.per_rank)
        if clash:
            raise ConfigError(f"names used twice: {sorted(clash)}; give each object one name")
        for name, obj in {**self.objects, **self.per_rank}.items():
            check_stateful(name, unwrap(obj))
        self.values: dict[str, Any] = dict(values or {})
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

        #: Completed training steps (restored on resume).
        self.steps_done = 0
        self._last_step_at: float | None = None
        self.finished = False
        self.segment_id = env_str("SPOTRUN_SEGMENT_ID") or uuid.uuid4().hex[:12]
        self._group: Group | None = None
        self._saver: Saver | None = None
        # Ledger writes go through one background thread: a hanging storage must not
        # block __enter__ or a step (it once blocked __enter__ for 9 minutes).
        self._ledger_writer = BackgroundLedger(Ledger(self.storage))
        self._entered = False
        self._restored = False
        self._interrupts = Interrupts(handle_signals=handle_signals, watchers=watchers)
        # The step range() handed out last, until step() counts it (see finish()).
        self._range_at: int | None = None
        self._stepped = False  # step() ran in this process
        self._raised: BaseException | None = None  # the SystemExit step() raised
        self._last_value_at_start: Any = None

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
        self.storage.ensure_root(create=True)
        self._group = Group()
        self.sharded = self._decide_sharded()  # before the lease: it may refuse the config
        # One writer per run: rank 0 holds the run's lease from here to __exit__ (raises
        # LeaseHeldError, on every rank, when another trainer has it).
        self._lease = acquire_run_lease(self.storage, self._group, self.segment_id)
        if self.sharded:
            from ..sharded import ShardedSaver

            # Collective (it makes the saver's own process group): every rank is here.
            self._sharded_saver = ShardedSaver(self.storage)
        self._saver = Saver(
            self.storage, self._group, keep_last=self.keep_last, async_save=self.async_save,
            when_busy=self.when_busy, metadata=self.metadata, segment_id=self.segment_id,
            emit=self._emit, sharded=self._sharded_saver, lease=self._lease,
        )
        self._entered = True
        self._process_started_at = process_start_time()
        try:
            self._interrupts.start()
        except BaseException:  # e.g. a bad SPOTRUN_NOTICE_SOURCE: leave nothing held
            self._interrupts.restore_signal_handlers()
            release_run_lease(self._lease, writing=False)
            self._entered = False
            raise
        if self._group.is_main:
            self._emit(SegmentStarted(segment_id=self.segment_id,
                                      instance=self._interrupts.instance_info(),
                                      started_at=self._process_started_at))
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
        self._interrupts.stop_watchers()
        try:
            if self._saver is not None:
                self._saver.finish_inflight(exc)
        finally:
            if isinstance(exc, SystemExit) and exc.code == EXIT_INTERRUPTED:
                note_exit(EXIT_INTERRUPTED)  # for python -m spotrun.distributed, if it is ours
                self._interrupts.hold_until_exit()
            else:
                self._interrupts.restore_signal_handlers()
            self._entered = False
            # A save still writing (a second Ctrl-C) keeps the lease until this process ends.
            release_run_lease(self._lease, writing=self._saver is not None and self._saver.writing)
        if self._group is None or not self._group.is_main or self.finished:
            self._flush_ledger()
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
        self._emit(SegmentEnded(segment_id=self.segment_id, reason=reason, ended_at=time.time(),
                                steps_done=self.steps_done, last_step_at=self._last_step_at))
        self._flush_ledger()

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

    def _on_notice(self, n: Notice) -> None:
        # Every rank records what it saw (often only one rank sees a notice); the
        # ledger takes concurrent writers without losing records.
        self._emit(NoticeReceived(segment_id=self.segment_id, source=n.source, action=n.action,
                                  notice_time=n.notice_time, detected_at=n.detected_at,
                                  deadline=n.deadline))

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
        (``SystemExit(EXIT_STOP_UNSAVED)`` when the stop checkpoint could not commit in the
        time left). A background save that failed is raised here as :class:`SaveError`.
        """
        group, saver = self._require_active()
        inbox = self._interrupts
        self.steps_done = self.steps_done + 1 if steps_done is None else int(steps_done)
        self._range_at = None
        self._stepped = True
        self._last_step_at = time.time()
        for obj in self.per_rank.values():
            if isinstance(obj, ResumableLoader):
                obj.mark_consumed()  # the step used every batch handed out so far
        inbox.drain(self.steps_done, self._on_notice)
        busy = saver.poll()
        time_due = (
            self.every_seconds is not None
            and time.time() - saver.last_save_time >= self.every_seconds
        )
        stop, requested, time_due, any_busy = group.agree(
            stop=inbox.stop_requested, save=inbox.save_requested, time_due=time_due, busy=busy
        )
        if not any_busy:
            saver.commit_written()
        step_due = self.every_steps is not None and self.steps_done % self.every_steps == 0
        if stop:
            inbox.stop_requested = True
            committed = self._save_before_stop()
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
        the latest) when it failed or did not commit in time: the caller then exits with
        ``EXIT_STOP_UNSAVED``, and a relaunch resumes from the previous checkpoint.
        """
        _, saver = self._require_active()
        notice = self._interrupts.stop_notice
        now = time.time()
        left = notice.seconds_left(now) if notice else None
        if notice is not None and notice.deadline is not None:
            margin = _stop_knob("SPOTRUN_STOP_MARGIN", DEFAULT_STOP_MARGIN_S)
            bound_at = notice.deadline - margin
            bound_why = f"the notice's deadline minus SPOTRUN_STOP_MARGIN={margin:g}s"
        else:
            limit = _stop_knob("SPOTRUN_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT_S)
            # Counted from the signal: the machine's clock started then, not at this step's end.
            bound_at = (notice.detected_at if notice else now) + limit
            bound_why = f"SPOTRUN_STOP_TIMEOUT={limit:g}s after the stop request"
        # At least a second, so a fast save (local disk) still lands when the step ran late.
        budget = max(bound_at - now, 1.0)
        typical = saver.typical_duration
        if left is not None and typical is not None and typical > left:
            log.warning(
                "%.1fs left before the machine goes but saves have taken up to %.1fs; "
                "trying anyway (the previous checkpoint stays the latest if this one cannot finish)",
                left, typical,
            )
        t0 = time.time()
        done = threading.Event()
        failure: list[BaseException] = []
        # The CUDA device is per thread: NCCL collectives and staging copies on the helper
        # thread must use this rank's device, not device 0.
        device = (torch.cuda.current_device()
                  if torch.cuda.is_available() and torch.cuda.is_initialized() else None)

        def save_and_commit() -> None:
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                self.save()
                self.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=save_and_commit, name="spotrun-stop-save", daemon=True).start()
        finished = done.wait(budget)
        if finished and not failure:
            if notice is not None:
                log.warning(
                    "stop after notice: posted %s, detected %s, committed %s (%.1fs after detection)",
                    _fmt_time(notice.notice_time), _fmt_time(notice.detected_at),
                    _fmt_time(time.time()), time.time() - notice.detected_at,
                )
            else:
                log.info("stop checkpoint committed in %.1fs", time.time() - t0)
            return True
        if failure and not isinstance(failure[0], (SaveError, StorageError)):
            raise failure[0]  # a bug (a state_dict that raises...), not a storage failure
        step, previous = self.steps_done, saver.last_saved_step
        if previous is not None and previous != step:
            kept = (f"the checkpoint at step {previous} is intact and stays the latest; "
                    "relaunch and the run resumes from it")
        else:
            kept = ("no earlier checkpoint was committed, so a relaunch starts from the "
                    "beginning")
        if finished:
            log.error("stop checkpoint at step %d failed (%s); exiting with code %d: %s",
                      step, failure[0], EXIT_STOP_UNSAVED, kept)
        else:
            log.error(
                "stop checkpoint at step %d did not commit within %.1fs (%s); giving up on it "
                "and exiting with code %d: %s. If the store is slow rather than down, raise "
                "SPOTRUN_STOP_TIMEOUT or lower SPOTRUN_STOP_MARGIN", step, time.time() - t0,
                bound_why, EXIT_STOP_UNSAVED, kept,
            )
            # The abandoned save runs on daemon threads that die with the process; forget
            # it so the way out (__exit__) does not wait for it.
            saver.abandon()
        return False

    def finish(self, steps_done: int | None = None) -> None:
        """Mark the run complete: commit a final checkpoint and write the done marker.

        After a ``break`` out of :meth:`range`, the step you broke out of counts as
        completed (its update is in the model); pass ``steps_done`` to say otherwise (e.g.
        ``finish(step)`` when the break came before that step's work).
        """
        group, _ = self._require_active()
        if steps_done is not None:
            self.steps_done = int(steps_done)
        elif self._range_at is not None and self._range_at == self.steps_done + 1:
            self.steps_done = self._range_at
        self._range_at = None
        self.save()
        self.wait()
        if group.is_main:
            marker = {"step": self.steps_done, "finished_at": time.time(), "segment_id": self.segment_id}
            self.storage.write_bytes(DONE_MARKER, json.dumps(marker).encode())
            self._emit(SegmentEnded(segment_id=self.segment_id, reason="finished",
                                    ended_at=time.time(), steps_done=self.steps_done,
                                    last_step_at=self._last_step_at))
        group.barrier()
        self.finished = True
        # After the barrier every rank knows done.json exists: tell the wrapper, which may not
        # be able to read the run URL (a script that takes it as an argument).
        note_exit(EXIT_FINISHED)
        log.info("run finished at step %d", self.steps_done)

    # -- saving ----------------------------------------------------------------------------

    def _decide_sharded(self) -> bool:
        if self._sharded_arg is False:
            return False
        if not self._sharded_arg and not any(m in sys.modules for m in _SHARDING_MODULES):
            # No DTensor / FSDP / ShardedTensor class was ever imported, so no model holds
            # one: skip importing DCP (about a second, paid again at every restart).
            return False
        from ..sharded import is_sharded

        detected = any(is_sharded(unwrap(self.objects[n])) for n in self._model_names)
        if not (detected or self._sharded_arg):
            return False
        if len(self._model_names) != 1:
            raise ConfigError(
                f"sharded checkpoints take exactly one model, got {len(self._model_names)}; "
                "wrap the models in one nn.Module (or pass sharded=False)"
            )
        log.info("sharded model: model and optimizer state go through "
                 "torch.distributed.checkpoint, every rank writing its own shards")
        return True

    def _replicated_objects(self) -> dict[str, Any]:
        """The objects saved in rank 0's payload (all but model and optimizer when sharded)."""
        if not self.sharded:
            return self.objects
        dcp_names = {*self._model_names, *self._optimizer_names}
        return {n: o for n, o in self.objects.items() if n not in dcp_names}

    def _sharded_state(self) -> dict[str, Any]:
        """Model and optimizer state as DCP wants it: each rank's own shards, no gather."""
        from ..sharded import get_state

        model = unwrap(self.objects[self._model_names[0]])
        optimizers = [self.objects[n] for n in self._optimizer_names]
        if self._sharded_saver is not None:  # built once, reused while it fits (issue 24)
            return self._sharded_saver.state(model, optimizers)
        return get_state(model, optimizers)

    def _payload(self, group: Group) -> dict[str, Any]:
        payload: dict[str, Any] = {"format": PAYLOAD_FORMAT, "step": self.steps_done}
        if group.is_main:
            payload["objects"] = {n: unwrap(o).state_dict()
                                  for n, o in self._replicated_objects().items()}
            # Every entry is checked against what a weights_only load accepts (a walk, no
            # serialisation): state that saves but cannot load back would strand the run.
            for n, state in payload["objects"].items():
                check_loadable(f"{n}.state_dict()", state)
            for k, v in self.values.items():
                check_plain(k, v)
            payload["values"] = dict(self.values)
        payload["per_rank"] = {n: unwrap(o).state_dict() for n, o in self.per_rank.items()}
        for n, state in payload["per_rank"].items():
            check_loadable(f"{n}.state_dict()", state)
        if self.save_rng:
            payload["rng"] = collect_rng_state()
        return payload

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
        saver.save(self.steps_done, lambda: self._payload(group),
                   self._sharded_state if self.sharded else None, artifacts=capture)

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
        step = self._restore_newest_valid(group)
        if step is not None:
            self.steps_done = step
            saver.last_saved_step = step
            log.info("resumed from step %d at %s", step, self.storage.display())
            if group.is_main and self.storage.exists(DONE_MARKER):
                log.info("this run already finished (done marker present)")
        self._restored = True
        saver.last_save_time = time.time()
        if group.is_main:
            self._emit(TrainingResumed(segment_id=self.segment_id, step=self.steps_done,
                                       process_started_at=self._process_started_at,
                                       first_step_at=time.time()))
        return self.steps_done

    def _restore_newest_valid(self, group: Group) -> int | None:
        """Load the newest committed checkpoint whose files check out; return its step.

        Rank 0 lists the checkpoints; every rank walks the same list, newest first, loads
        its part of each candidate and agrees with the others on the outcome (see
        :meth:`_agree`). Every payload's checksums are verified before any of it is loaded
        (see :func:`~spotrun.snapshot.open_payload`), so a damaged checkpoint leaves the
        objects untouched and the older one is loaded into them. Only proven
        damage skips a checkpoint; damaged ones are moved aside once a usable one is found
        (or a fresh start was asked for), so no later save writes into them.
        """
        self._state_loaded_from = None
        listed: Any = None
        if group.is_main:
            try:
                listed = list_checkpoints(self.storage)
            except StorageError as exc:
                listed = _Outcome("unreadable", (
                    f"cannot list or read the checkpoints ({exc}); that is not damage, so "
                    f"nothing at {self.storage.display()} was skipped or changed: fix access "
                    "(permissions, credentials, network) and start again"))
        listed = group.broadcast(listed)
        if isinstance(listed, _Outcome):
            raise CheckpointUnreadableError(listed.message)
        newest = next((i for i in reversed(listed) if i.manifest is not None), None)
        if newest is not None and newest.manifest.world_size != group.world_size:
            log.warning(
                "checkpoint at step %d was written by %d ranks, this run has %d: resuming "
                "on another world size (see the README's exact-resume rules)",
                newest.step, newest.manifest.world_size, group.world_size,
            )
        chosen, damaged = newest_valid(
            listed, lambda info: self._try_load(info.step, info.manifest, group),
            where=self.storage.display())
        found = None if chosen is None else chosen.step
        if damaged and found is None and self.if_all_damaged != "start_fresh":
            listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
            raise AllCheckpointsDamagedError(
                f"all {len(damaged)} checkpoints at {self.storage.display()} are damaged, "
                f"refusing to start over them ({listing}); see `spotrun verify "
                f"{self.storage.display()}`; to start from step 0 anyway (the damaged folders "
                f"are moved under {DAMAGED_DIR}/, not deleted) pass if_all_damaged='start_fresh' "
                f"or set {IF_ALL_DAMAGED_ENV}=start_fresh"
            )
        if group.is_main:
            for step, problem in damaged:
                quarantine(self.storage, step, problem)
        group.barrier()  # the damaged folders are out of the way before anyone saves
        if damaged and found is None:
            if self._state_loaded_from is not None:
                # A hash failed only after its state was loaded (verified while loading):
                # the objects no longer hold their initial state, so step 0 from here would
                # not be a fresh start. The folders are out of the way; a new process is.
                raise AllCheckpointsDamagedError(
                    f"every checkpoint at {self.storage.display()} was damaged and has been "
                    f"moved under {DAMAGED_DIR}/, but this process had already loaded state "
                    f"from the damaged step {self._state_loaded_from}; start it again to "
                    "begin from step 0 with freshly built objects"
                )
            log.warning("every checkpoint at %s was damaged (moved under %s/); starting from "
                        "step 0 as asked (if_all_damaged='start_fresh')",
                        self.storage.display(), DAMAGED_DIR)
        return found

    def _try_load(self, step: int, manifest: Manifest, group: Group) -> str | None:
        """Load one committed checkpoint on every rank; None when it loaded, else its damage.

        Three phases, each ending in an agreement so no rank is left in a collective alone:
        rank 0 checks that every listed file is there with its size (cheap, and catches a
        partial copy); a sharded checkpoint's model and optimizer load through DCP (a
        collective that reshards to this world size); each rank loads rank 0's payload
        (shared state) and its own, verifying their hashes.
        """
        outcome: _Outcome | None = None
        if group.is_main:
            outcome = self._attempt(lambda: self._check_present(step, manifest))
        outcome = self._agree(group, outcome)
        if outcome is None and manifest.sharded:
            outcome = self._agree(group, self._attempt(lambda: self._load_sharded(manifest)))
        if outcome is None:
            outcome = self._agree(group, self._attempt(lambda: self._load_payloads(manifest, group)))
        if outcome is None and (self.artifacts or manifest.artifacts):
            # The same checkpoint's files, so state and artifacts never come from two saves.
            outcome = self._agree(group, self._attempt(lambda: self._put_back_artifacts(manifest)))
        if outcome is None:
            return None
        if outcome.kind == "damaged":
            return outcome.message
        if outcome.kind == "unreadable":
            raise CheckpointUnreadableError(
                f"cannot read the checkpoint at step {step} ({outcome.message}); that is not "
                f"damage, so it was not skipped and nothing at {self.storage.display()} was "
                "changed: fix access (permissions, credentials, network) and start again"
            )
        if outcome.error is not None:
            raise outcome.error  # this rank's own failure, with its traceback
        raise CheckpointError(f"restore failed on another rank: {outcome.message}")

    @staticmethod
    def _attempt(load: Any) -> _Outcome | None:
        """Run one load phase; classify its failure (only proven damage may be skipped)."""
        try:
            load()
        except (CorruptCheckpointError, StorageNotFoundError) as exc:
            # A listed file that is gone is damage, like a wrong size.
            return _Outcome("damaged", str(exc))
        except StorageError as exc:
            return _Outcome("unreadable", str(exc))
        except Exception as exc:  # noqa: BLE001 - passed on, then raised on this rank
            return _Outcome("error", f"{type(exc).__name__}: {exc}", exc)
        return None

    def _agree(self, group: Group, mine: _Outcome | None) -> _Outcome | None:
        """The outcome every rank acts on: the worst of all ranks' (error > unreadable > damaged)."""
        if not group.distributed:
            return mine
        everyone = group.gather(None if mine is None else (mine.kind, mine.message))
        decision = None
        if group.is_main:
            assert everyone is not None
            failed = [(r, o) for r, o in enumerate(everyone) if o is not None]
            for kind in ("error", "unreadable", "damaged"):
                hits = [(r, msg) for r, (k, msg) in failed if k == kind]
                if hits:
                    decision = (kind, "; ".join(f"rank {r}: {m}" for r, m in hits))
                    break
        decision = group.broadcast(decision)
        if decision is None:
            return None
        kind, message = decision
        if mine is not None and mine.kind == kind:
            return _Outcome(kind, message, mine.error)
        return _Outcome(kind, message)

    def _check_present(self, step: int, manifest: Manifest) -> None:
        problems = verify_checkpoint(self.storage, manifest, deep=False)
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
        if payload_name(0) not in manifest.files:
            raise CorruptCheckpointError(
                f"{self.storage.display(checkpoint_dir(step))}: manifest lists no {payload_name(0)}")

    def _put_back_artifacts(self, manifest: Manifest) -> None:
        """This checkpoint's artifacts, verified, back at their local paths (one rank per
        machine: local rank 0, where torchrun says, else rank 0)."""
        assert self._group is not None
        local_rank = int(os.environ.get("LOCAL_RANK", self._group.rank))
        if local_rank == 0:
            restore_artifacts(self.storage, manifest, self.artifacts)

    def _load_sharded(self, manifest: Manifest) -> None:
        """Model and optimizer from DCP's files, resharded to this run's world size."""
        if not self.sharded:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {manifest.step} holds a sharded model (FSDP / tensor "
                "parallel) but this run's model is not sharded; shard it the same way (or "
                "pass sharded=True)"
            )
        from ..sharded import read_sharded, set_state

        state = self._sharded_state()  # this world size's own (empty) shards, filled in place
        self._state_loaded_from = manifest.step
        read_sharded(self.storage, manifest, state)
        set_state(unwrap(self.objects[self._model_names[0]]),
                  [self.objects[n] for n in self._optimizer_names], state)

    def _load_payloads(self, manifest: Manifest, group: Group) -> None:
        """Rank 0's payload (shared state) and this rank's own, loaded and verified."""
        if self.sharded and not manifest.sharded:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {manifest.step} holds a replicated model but this "
                "run's model is sharded; restore it without sharding (sharded=False), or "
                "start a new run URL"
            )
        step, shared_name = manifest.step, payload_name(0)
        shared, verification = open_payload(self.storage, step, shared_name,
                                            manifest.files[shared_name],
                                            weights_only=self.weights_only)
        own: dict | None = shared
        if not group.is_main:
            verification.check()  # another rank's file: verified before anything is used
            mine = payload_name(group.rank)
            own = (read_payload(self.storage, step, mine, manifest.files[mine],
                                weights_only=self.weights_only)
                   if mine in manifest.files else None)
        # From here the live objects may hold this checkpoint's state, proven good or not.
        self._state_loaded_from = step
        try:
            self._apply(shared, own, group, step)
        except CheckpointError:
            verification.check()  # damage explains a misfit better than the misfit
            raise
        verification.check()

    def _apply(self, shared: dict, own: dict | None, group: Group, step: int) -> None:
        """Put rank 0's shared state and this rank's own into the live objects.

        A rank with no saved state of its own (the run resumes on more ranks than saved it)
        takes rank 0's copy of a :class:`~spotrun.ResumableLoader` (its position is global,
        the same on every rank) and seeds its RNGs from ``(seed, rank, step)``, so resuming
        the same checkpoint on the same world size always gives the same streams. Other
        per-rank objects start fresh, with a warning.
        """
        if shared.get("format", 0) > PAYLOAD_FORMAT:
            raise UnsupportedFormatError(
                f"checkpoint payload format {shared.get('format')} is newer than this spotrun "
                "understands; upgrade spotrun"
            )
        saved_objects = shared.get("objects", {})
        for name, obj in self._replicated_objects().items():
            if name not in saved_objects:
                raise CheckpointError(
                    f"checkpoint has no state for {name!r} (it has {sorted(saved_objects)}); "
                    "pass the same objects under the same names as the run that saved it"
                )
            load_object_state(name, obj, saved_objects[name])
        self.values.update(shared.get("values", {}))
        if own is None:
            self._start_new_rank(shared, group, step)
            return
        for name, obj in self.per_rank.items():
            if name in own.get("per_rank", {}):
                load_object_state(name, obj, own["per_rank"][name])
            else:
                log.warning("checkpoint has no %r state for rank %d; it starts fresh",
                            name, group.rank)
        if self.save_rng and "rng" in own:
            restore_rng_state(own["rng"])

    def _start_new_rank(self, shared: dict, group: Group, step: int) -> None:
        """A rank the checkpoint had no files for: global state from rank 0, a fresh seed."""
        seed = 0
        for name, obj in self.per_rank.items():
            inner = unwrap(obj)
            if isinstance(inner, ResumableLoader) and name in shared.get("per_rank", {}):
                load_object_state(name, obj, shared["per_rank"][name])
                seed = inner.seed
            else:
                log.warning("checkpoint has no %r state for rank %d (it was saved by fewer "
                            "ranks); it starts fresh", name, group.rank)
        if self.save_rng:
            seed_everything(rank_seed(seed, group.rank, step))

    # -- events ----------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        """Queue a ledger record for the background writer; returns at once. A failing or
        hanging ledger never stops or stalls training."""
        self._ledger_writer.submit(event)

    def _flush_ledger(self) -> None:
        """Wait, with a bound, for queued ledger records (segment_ended among them)."""
        self._ledger_writer.close(env_float_or_default("SPOTRUN_LEDGER_FLUSH_S", DEFAULT_FLUSH_S))


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


class _Outcome:
    """Why one restore phase failed on a rank: ``damaged`` (skip to an older checkpoint),
    ``unreadable`` (stop, change nothing) or ``error`` (anything else: stop)."""

    def __init__(self, kind: str, message: str, error: BaseException | None = None) -> None:
        self.kind, self.message, self.error = kind, message, error

    def __reduce__(self) -> tuple:  # broadcast between ranks without the exception
        return (_Outcome, (self.kind, self.message))


def _stop_knob(name: str, default: float) -> float:
    # A bad value must not cost the stop checkpoint: say so and use the default.
    value = env_float_or_default(name, default)
    if value < 0:
        log.error("%s=%g must be 0 or more; using %gs", name, value, default)
        return default
    return value


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"

