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

Signals and notices only set flags; all I/O happens in the training thread at a step
boundary, so a signal can never land inside a half-built checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from .commit import (
    DAMAGED_DIR,
    commit,
    list_checkpoints,
    prune,
    quarantine,
    read_manifest,
    verify_checkpoint,
)
from .config import env_choice, env_str
from .distributed import Group
from .errors import (
    AllCheckpointsDamagedError,
    CheckpointError,
    CheckpointUnreadableError,
    ConfigError,
    CorruptCheckpointError,
    SaveError,
    StorageError,
    StorageNotFoundError,
    UnsupportedFormatError,
)
from .instance import InstanceInfo
from .layout import DONE_MARKER, EXIT_INTERRUPTED, checkpoint_dir
from .ledger import Ledger
from .manifest import Manifest
from .notices import Notice, Watcher, watchers_from_env
from .snapshot import (
    StagingBuffers,
    check_loadable,
    check_plain,
    open_payload,
    payload_name,
    read_payload,
    write_payload,
)
from .state import check_stateful, collect_rng_state, load_object_state, restore_rng_state, unwrap
from .storage import Storage, open_storage

__all__ = ["Checkpointer"]

log = logging.getLogger("spotrun")

PAYLOAD_FORMAT = 1
DEFAULT_EVERY_SECONDS = 300.0
#: Niceness of the background save thread (0-19; higher yields more to training).
BACKGROUND_NICE = 10
#: What to do when every checkpoint is damaged (see ``if_all_damaged``), for launchers and
#: wrappers that cannot change the training code.
IF_ALL_DAMAGED_ENV = "SPOTRUN_IF_ALL_DAMAGED"
_IF_ALL_DAMAGED = ("fail", "start_fresh")


def _process_start_time() -> float:
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
        values: initial plain values (numbers, strings, lists, dicts, tensors). Read and
            update them through :attr:`values`; they are saved and restored with the rest.
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
        handle_signals: install SIGTERM/SIGINT handlers while inside the ``with`` block.
        watchers: interruption-notice sources; default: from the environment (see
            :func:`spotrun.notices.watchers_from_env`); ``[]`` for none.
        storage_options: passed to fsspec (e.g. S3 endpoint, profile).
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
        if_all_damaged: Literal["fail", "start_fresh"] | None = None,
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
        self._watchers_arg = watchers

        #: Completed training steps (restored on resume).
        self.steps_done = 0
        self._last_step_at: float | None = None
        self.finished = False
        self.segment_id = env_str("SPOTRUN_SEGMENT_ID") or uuid.uuid4().hex[:12]
        self._group: Group | None = None
        self._ledger = Ledger(self.storage)
        self._entered = False
        self._restored = False
        self._last_saved_step: int | None = None
        self._last_save_time = time.time()
        self._save_durations: collections.deque[float] = collections.deque(maxlen=5)
        self._staging = StagingBuffers()
        self._job: _Job | None = None  # the save being written in the background, if any
        self._pending_step: int | None = None
        # Distributed: (step, file entry, t0, stall) written by this rank, awaiting commit.
        self._uncommitted: tuple[int, Any, float, float] | None = None
        # Written from signal handlers and watcher threads: deque appends and plain
        # attribute stores are atomic under the GIL, and no lock means no deadlock when a
        # signal interrupts the main thread while it holds one.
        self._notices: collections.deque[Notice] = collections.deque()
        self._stop_requested = False
        self._save_requested = False
        self._sigint_seen = False
        self._prev_handlers: dict[int, Any] = {}
        self._watchers: list[Watcher] = []
        self._stop_notice: Notice | None = None

    # -- context ---------------------------------------------------------------------------

    def __enter__(self) -> Checkpointer:
        if self._entered:
            raise RuntimeError("Checkpointer is already active; use one 'with' block per run")
        self.storage.ensure_root(create=True)
        self._group = Group()
        self._entered = True
        self._process_started_at = _process_start_time()
        if self.handle_signals:
            self._install_signal_handlers()
        self._start_watchers()
        if self._group.is_main:
            info = self._instance_info()
            self._record(
                "segment_started",
                segment_id=self.segment_id,
                instance=info,
                started_at=self._process_started_at,
                source="wrapper",
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        for w in self._watchers:
            w.stop()
        try:
            self._finish_inflight(exc)
        finally:
            self._restore_signal_handlers()
            self._entered = False
        if self._group is None or not self._group.is_main or self.finished:
            return
        if isinstance(exc, SystemExit) and exc.code == EXIT_INTERRUPTED:
            reason = "interrupted"
        elif exc_type is None or isinstance(exc, KeyboardInterrupt):
            reason = "stopped"
        else:
            reason = "failed"
        self._record("segment_ended", segment_id=self.segment_id, reason=reason,
                     ended_at=time.time(), source="wrapper", steps_done=self.steps_done,
                     last_step_at=self._last_step_at)

    def _finish_inflight(self, exc: BaseException | None) -> None:
        """On the way out, let a save in flight reach its commit (unless aborting)."""
        job = self._job
        if job is None or isinstance(exc, KeyboardInterrupt):
            return  # a second Ctrl-C means now; the last commit is intact
        if self._group is not None and self._group.distributed and exc is not None:
            # Other ranks may be gone: no collectives. The write finishes, nothing commits.
            job.done.wait()
            return
        try:
            self.wait()
        except SaveError as err:
            if exc is None:
                raise
            log.error("%s", err)

    def _require_active(self) -> Group:
        if not self._entered or self._group is None:
            raise RuntimeError("use the Checkpointer inside a 'with' block")
        return self._group

    # -- signals and notices ---------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread; SIGTERM/SIGINT handlers not installed")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._prev_handlers.items():
            signal.signal(sig, handler)
        self._prev_handlers.clear()

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self._sigint_seen:
                # Second Ctrl-C: the user means it. Abort now; the last committed
                # checkpoint is intact because commits are atomic.
                raise KeyboardInterrupt
            self._sigint_seen = True
        self._deliver(Notice(source="signal", action=signal.Signals(signum).name,
                             stop=True, detected_at=time.time()))

    def _deliver(self, notice: Notice) -> None:
        """Record a notice from any thread or a signal handler; acted on at the next step."""
        self._notices.append(notice)
        if notice.stop:
            self._stop_requested = True
        else:
            self._save_requested = True

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and exit at the next step boundary (thread-safe)."""
        self._deliver(Notice(source="user", action="stop", stop=True, detected_at=time.time()))

    @property
    def should_stop(self) -> bool:
        """True once a signal or notice asked this process to stop."""
        return self._stop_requested

    def _start_watchers(self) -> None:
        watchers = watchers_from_env() if self._watchers_arg is None else list(self._watchers_arg)
        for w in watchers:
            w.start(self._deliver)
        self._watchers = watchers

    def _instance_info(self) -> InstanceInfo:
        for w in self._watchers:
            info = w.instance_info(timeout=1.0)
            if info is not None:
                return info
        return InstanceInfo()

    def _drain_notices(self) -> None:
        while self._notices:
            n = self._notices.popleft()
            left = n.seconds_left()
            log.warning(
                "%s notice %r%s; %s at the end of step %d",
                n.source,
                n.action,
                f", {left:.0f}s before the machine goes" if left is not None else "",
                "checkpointing and stopping" if n.stop else "checkpointing",
                self.steps_done,
            )
            if n.stop and self._stop_notice is None:
                self._stop_notice = n
            # Every rank records what it saw (often only one rank sees a notice); the
            # ledger takes concurrent writers without losing records.
            self._record("notice_received", segment_id=self.segment_id, source=n.source,
                         action=n.action, notice_time=n.notice_time,
                         detected_at=n.detected_at, deadline=n.deadline)

    # -- the loop --------------------------------------------------------------------------

    def range(self, total_steps: int) -> Iterator[int]:
        """Yield step indices from the restored position up to ``total_steps``.

        After each step's body it calls :meth:`step`; when the range ends it calls
        :meth:`finish`. Breaking out of the loop does neither (the run is not done).
        """
        start = self.restore()
        for i in range(start, total_steps):
            yield i
            self.step(i + 1)
        self.finish()

    def step(self, steps_done: int | None = None) -> None:
        """Tell the checkpointer a training step has completed.

        ``steps_done`` is the count of completed steps (default: one more than before). Saves
        when a schedule or notice says so; after a stop request, saves, waits for the commit
        and raises ``SystemExit(EXIT_INTERRUPTED)`` so a supervisor knows to relaunch. A
        background save that failed is raised here as :class:`SaveError`.
        """
        group = self._require_active()
        self.steps_done = self.steps_done + 1 if steps_done is None else int(steps_done)
        self._last_step_at = time.time()
        self._drain_notices()
        busy = self._poll_background()
        time_due = (
            self.every_seconds is not None
            and time.time() - self._last_save_time >= self.every_seconds
        )
        stop, requested, time_due, any_busy = group.agree(
            stop=self._stop_requested, save=self._save_requested, time_due=time_due, busy=busy
        )
        if not any_busy and self._uncommitted is not None:
            self._commit_distributed()
        step_due = self.every_steps is not None and self.steps_done % self.every_steps == 0
        if stop:
            self._stop_requested = True
            self._save_before_stop()
            raise SystemExit(EXIT_INTERRUPTED)
        if requested or time_due or step_due:
            self._save_requested = False
            self.save()

    def _save_before_stop(self) -> None:
        notice = self._stop_notice
        left = notice.seconds_left() if notice else None
        typical = max(self._save_durations) if self._save_durations else None
        if left is not None and typical is not None and typical > left:
            log.warning(
                "%.1fs left before the machine goes but saves have taken up to %.1fs; "
                "trying anyway (the previous checkpoint stays the latest if this one cannot finish)",
                left, typical,
            )
        t0 = time.time()
        self.save()
        self.wait()
        if notice is not None:
            log.warning(
                "stop after notice: posted %s, detected %s, committed %s (%.1fs after detection)",
                _fmt_time(notice.notice_time), _fmt_time(notice.detected_at),
                _fmt_time(time.time()), time.time() - notice.detected_at,
            )
        else:
            log.info("stop checkpoint committed in %.1fs", time.time() - t0)

    def finish(self) -> None:
        """Mark the run complete: commit a final checkpoint and write the done marker."""
        group = self._require_active()
        self.save()
        self.wait()
        if group.is_main:
            marker = {"step": self.steps_done, "finished_at": time.time(), "segment_id": self.segment_id}
            self.storage.write_bytes(DONE_MARKER, json.dumps(marker).encode())
            self._record("segment_ended", segment_id=self.segment_id, reason="finished",
                         ended_at=time.time(), source="wrapper", steps_done=self.steps_done,
                         last_step_at=self._last_step_at)
        group.barrier()
        self.finished = True
        log.info("run finished at step %d", self.steps_done)

    # -- saving ----------------------------------------------------------------------------

    def _payload(self, group: Group) -> dict[str, Any]:
        payload: dict[str, Any] = {"format": PAYLOAD_FORMAT, "step": self.steps_done}
        # Every entry is checked against what a weights_only load accepts (a walk, no
        # serialisation): state that saves but cannot load back would strand the run.
        if group.is_main:
            payload["objects"] = {n: unwrap(o).state_dict() for n, o in self.objects.items()}
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
        group = self._require_active()
        step = self.steps_done
        if step in (self._last_saved_step, self._pending_step):
            return
        t0 = time.time()
        if self._job is not None and not self._job.done.is_set():
            if self.when_busy == "skip":
                log.info("save at step %d skipped: the save of step %d is still being written",
                         step, self._pending_step)
                return
            log.info("save at step %d waits for the save of step %d to finish writing",
                     step, self._pending_step)
        # The previous save must be durable before its staging buffers are reused.
        self.wait()
        payload = self._payload(group)
        if self.async_save:
            payload = self._staging.stage(payload)
        stall = time.time() - t0
        self._pending_step = step
        self._last_save_time = time.time()
        job = _Job(self._persist, step, payload, group, t0, stall)
        self._job = job
        if self.async_save:
            job.start()
        else:
            job.run()
            self.wait()

    def _persist(self, step: int, payload: dict[str, Any], group: Group, t0: float, stall: float) -> Any:
        """Write one rank's payload; single-process runs also commit (background thread)."""
        try:
            entry = write_payload(self.storage, step, group.rank, payload)
            if group.distributed:
                return entry  # committed from the main thread once every rank has written
            self._commit(step, [entry], world_size=1, t0=t0, stall=stall)
            return None
        except (StorageError, OSError, RuntimeError) as exc:
            raise SaveError(
                f"checkpoint at step {step} failed ({exc}); the previous checkpoint is intact"
            ) from exc

    def _commit(self, step: int, entries: list[tuple[str, Any]], *, world_size: int,
                t0: float, stall: float) -> None:
        manifest = Manifest(step=step, files=dict(entries), world_size=world_size,
                            metadata=self.metadata, save_seconds=round(time.time() - t0, 6))
        commit(self.storage, manifest)
        elapsed = time.time() - t0
        self._save_durations.append(elapsed)
        log.info("checkpoint at step %d committed (%.1f MB, training paused %.3fs, written in %.2fs)",
                 step, manifest.total_bytes / 1e6, stall, elapsed)
        self._record("checkpoint_committed", segment_id=self.segment_id, step=step,
                     committed_at=time.time(), stall_s=stall, save_s=elapsed,
                     nbytes=manifest.total_bytes, captured_at=t0)
        prune(self.storage, keep_last=self.keep_last, newest_committed=step)

    def _poll_background(self) -> bool:
        """True while this rank's save is still being written; raises a failed one."""
        job = self._job
        if job is None:
            return False
        if not job.done.is_set():
            return True
        self._collect(job)
        return False

    def _collect(self, job: _Job) -> None:
        self._job = None
        step = self._pending_step
        self._pending_step = None
        if job.error is not None:
            self._uncommitted = None
            raise job.error
        if job.result is not None:  # distributed: written, not yet committed
            self._uncommitted = (step, job.result, job.args[3], job.args[4])
        else:
            self._last_saved_step = step

    def _commit_distributed(self) -> None:
        """Every rank has written its payload: rank 0 commits (main thread, all ranks call)."""
        assert self._uncommitted is not None and self._group is not None
        step, entry, t0, stall = self._uncommitted
        self._uncommitted = None
        entries = self._group.gather(entry)
        if self._group.is_main:
            assert entries is not None
            self._commit(step, entries, world_size=self._group.world_size, t0=t0, stall=stall)
        self._last_saved_step = step

    @property
    def save_in_flight(self) -> bool:
        """True while a background save is still being written or awaits its commit."""
        return (self._job is not None and not self._job.done.is_set()) or self._uncommitted is not None

    def wait(self) -> None:
        """Block until the save in flight is written and committed (all ranks call it)."""
        group = self._require_active()
        job = self._job
        if job is not None:
            job.done.wait()
            self._collect(job)
        if group.distributed:
            group.barrier()  # every rank has written its payload
            if self._uncommitted is not None:
                self._commit_distributed()
            group.barrier()  # the manifest exists before anyone moves on

    # -- restoring -------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the latest valid checkpoint into every object; return the step to start at.

        A fresh run returns 0. A damaged newest checkpoint (sizes, hashes, a manifest or
        payload that cannot be parsed or names another step, a listed file missing) is
        skipped with a warning, moved aside under ``damaged/`` (never overwritten by a
        later save) and the one before it is used. Anything else that stops a checkpoint
        from being read (access denied, network, throttling after the retries) fails with
        :class:`~spotrun.errors.CheckpointUnreadableError` and changes nothing. When every
        checkpoint is damaged, see ``if_all_damaged``. Idempotent: a second call returns
        the same step.
        """
        group = self._require_active()
        if self._restored:
            return self.steps_done
        # Rank 0 picks (and loads) the checkpoint; the others load the step it names. A
        # failure on rank 0 is passed on, so the other ranks fail too instead of waiting.
        if group.is_main:
            try:
                chosen: Any = self._restore_newest_valid(group)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    group.broadcast(_RestoreFailed(str(exc) or type(exc).__name__))
                raise
            step = group.broadcast(chosen)
        else:
            step = group.broadcast(None)
            if isinstance(step, _RestoreFailed):
                raise CheckpointError(f"rank 0 could not restore: {step.message}")
        if step is not None:
            if not group.is_main:
                self._apply(self._load_other_rank(read_manifest(self.storage, step), group), group)
            self.steps_done = step
            self._last_saved_step = step
            log.info("resumed from step %d at %s", step, self.storage.display())
            if group.is_main and self.storage.exists(DONE_MARKER):
                log.info("this run already finished (done marker present)")
        self._restored = True
        self._last_save_time = time.time()
        if group.is_main:
            self._record("training_resumed", segment_id=self.segment_id, step=self.steps_done,
                         process_started_at=self._process_started_at, first_step_at=time.time())
        return self.steps_done

    def _restore_newest_valid(self, group: Group) -> int | None:
        """Load the newest committed checkpoint whose files check out; return its step.

        Its hash is verified while the state loads (see :class:`~spotrun.snapshot.Verification`);
        when the hash fails, the objects are loaded again from an older checkpoint, so
        nothing of a damaged one survives. Only proven damage skips a checkpoint; damaged
        ones are moved aside once a usable one is found (or a fresh start was asked for),
        so no later save writes into them.
        """
        damaged: list[tuple[int, str]] = []
        found: int | None = None
        self._state_loaded_from = None
        try:
            infos = list_checkpoints(self.storage)
        except StorageError as exc:
            raise CheckpointUnreadableError(
                f"cannot list or read the checkpoints ({exc}); that is not damage, so "
                f"nothing at {self.storage.display()} was skipped or changed: fix access "
                "(permissions, credentials, network) and start again"
            ) from exc
        for info in reversed(infos):
            if info.status == "incomplete":
                continue  # a save that never committed: not a checkpoint
            if info.status == "invalid" or info.manifest is None:
                log.warning("skipping checkpoint at step %d: %s", info.step, info.problem)
                damaged.append((info.step, info.problem or "invalid manifest"))
                continue
            manifest = info.manifest
            if manifest.world_size != group.world_size:
                log.warning(
                    "checkpoint at step %d was written by %d ranks, this run has %d; "
                    "per-rank state (RNG, data position) of missing ranks starts fresh",
                    info.step, manifest.world_size, group.world_size,
                )
            try:
                self._load_checkpoint(info.step, manifest, group)
            except CorruptCheckpointError as exc:
                log.warning("skipping damaged checkpoint at step %d (%s); trying an older one",
                            info.step, exc)
                damaged.append((info.step, str(exc)))
                continue
            except StorageNotFoundError as exc:
                # The manifest lists it and it is not there: damage, like a wrong size.
                log.warning("skipping damaged checkpoint at step %d (a listed file is missing: "
                            "%s); trying an older one", info.step, exc)
                damaged.append((info.step, f"listed file missing: {exc}"))
                continue
            except StorageError as exc:
                raise CheckpointUnreadableError(
                    f"cannot read the checkpoint at step {info.step} ({exc}); that is not "
                    f"damage, so it was not skipped and nothing at {self.storage.display()} was "
                    "changed: fix access (permissions, credentials, network) and start again"
                ) from exc
            found = info.step
            break
        if damaged and found is None and self.if_all_damaged != "start_fresh":
            listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
            raise AllCheckpointsDamagedError(
                f"all {len(damaged)} checkpoints at {self.storage.display()} are damaged, "
                f"refusing to start over them ({listing}); see `spotrun verify "
                f"{self.storage.display()}`; to start from step 0 anyway (the damaged folders "
                f"are moved under {DAMAGED_DIR}/, not deleted) pass if_all_damaged='start_fresh' "
                f"or set {IF_ALL_DAMAGED_ENV}=start_fresh"
            )
        for step, problem in damaged:
            quarantine(self.storage, step, problem)
        if damaged and found is None:
            if self._state_loaded_from is not None:
                # Its hash failed only after its state was loaded (verified while loading):
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

    def _load_checkpoint(self, step: int, manifest: Manifest, group: Group) -> None:
        """Load rank 0's payload of a committed checkpoint into every object, verified.

        Raises CorruptCheckpointError (or StorageNotFoundError for a listed file that is
        gone) on damage; StorageError on any other read failure.
        """
        # Every rank's file present with its size: cheap, and catches a partial copy.
        problems = verify_checkpoint(self.storage, manifest, deep=False)
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
        name = payload_name(0)
        if name not in manifest.files:
            raise CorruptCheckpointError(
                f"{self.storage.display(checkpoint_dir(step))}: manifest lists no {name}")
        payload, verification = open_payload(self.storage, step, name, manifest.files[name],
                                             weights_only=self.weights_only)
        # From here the live objects may hold this checkpoint's state, proven good or not.
        self._state_loaded_from = step
        try:
            self._apply((payload, payload), group)
        except CheckpointError:
            verification.check()  # damage explains a misfit better than the misfit
            raise
        verification.check()

    def _load_other_rank(self, manifest: Manifest, group: Group) -> tuple[dict, dict | None]:
        """Rank 0's shared state and this rank's own, both verified before use."""
        shared = read_payload(self.storage, manifest.step, payload_name(0),
                              manifest.files[payload_name(0)], weights_only=self.weights_only)
        mine = payload_name(group.rank)
        own = (
            read_payload(self.storage, manifest.step, mine, manifest.files[mine],
                         weights_only=self.weights_only)
            if mine in manifest.files else None
        )
        return shared, own

    def _apply(self, payloads: tuple[dict, dict | None], group: Group) -> None:
        shared, own = payloads
        if shared.get("format", 0) > PAYLOAD_FORMAT:
            raise UnsupportedFormatError(
                f"checkpoint payload format {shared.get('format')} is newer than this spotrun "
                "understands; upgrade spotrun"
            )
        saved_objects = shared.get("objects", {})
        for name, obj in self.objects.items():
            if name not in saved_objects:
                raise CheckpointError(
                    f"checkpoint has no state for {name!r} (it has {sorted(saved_objects)}); "
                    "pass the same objects under the same names as the run that saved it"
                )
            load_object_state(name, obj, saved_objects[name])
        self.values.update(shared.get("values", {}))
        if own is None:
            return
        for name, obj in self.per_rank.items():
            if name in own.get("per_rank", {}):
                load_object_state(name, obj, own["per_rank"][name])
            else:
                log.warning("checkpoint has no %r state for rank %d; it starts fresh",
                            name, group.rank)
        if self.save_rng and "rng" in own:
            restore_rng_state(own["rng"])

    # -- ledger ----------------------------------------------------------------------------

    def _record(self, method: str, **fields: Any) -> None:
        """Write a ledger record; a failing ledger never stops training."""
        try:
            getattr(self._ledger, method)(**fields)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not kill the run
            log.warning("could not write the run ledger (%s): %s", method, exc)


class _RestoreFailed:
    """Rank 0's restore failure, broadcast so the other ranks fail instead of waiting."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Job:
    """One background save: a daemon thread (a second Ctrl-C must not wait for it)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def start(self) -> None:
        threading.Thread(target=self._run_in_background, name="spotrun-save", daemon=True).start()

    def _run_in_background(self) -> None:
        # Training comes first: on a busy CPU the writer (serialising, hashing, syscalls)
        # yields to the training threads instead of stretching their steps. Linux applies
        # nice per thread, and threads this one starts (the hash pool) inherit it.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        self.run()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self.error = exc
        finally:
            self.done.set()


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"

