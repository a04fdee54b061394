"""The saver: capture a step's state, write it (in the background), commit it, prune.

One commit path for one rank and many: every rank writes its own payload files, then
:meth:`Saver._commit` writes the manifest (rank 0) once *every* rank's files are durable,
and retention runs after that. With one rank "every rank has written" is true the moment
its write ends, so the commit follows at once in the writer thread; with several ranks it
is known at the first step boundary where the ranks agree that no save is still being
written, nor, with peer copies, still on its way to the peers (bounded: :meth:`Saver.poll`)
(:meth:`Saver.commit_written`, main thread, a collective). Whatever fails, the
previous checkpoint stays the latest, untouched.

A sharded run (FSDP2, tensor parallel) has two kinds of payload per rank: its DCP shard files
(model and optimizer, written through :class:`~spotrun.format.sharded.ShardedSaver` on its own
process group, so the background write never interleaves with the training thread's
collectives) and its ``rank-NNNNN.pt`` (everything else). Both are written before the commit,
and the manifest lists every file of every rank.

Artifacts (local files the script asked to keep, see :mod:`.artifacts`) are rank 0's extra
payload: captured in the training thread with the state, written beside ``rank-00000.pt``,
listed in the same manifest. A crash before the commit leaves them in an uncommitted
folder, so no checkpoint ever pairs one save's state with another save's artifacts.

Call order (all ranks together, training thread)::

    saver.save(step, payload_fn, sharded_fn)  # stage (the only pause), write in the background
    saver.poll()                    # each step: still writing? raises a failed write
    saver.commit_written()          # each step, once no rank is busy (distributed only)
    saver.wait()                    # block until written and committed
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..distributed import Group
from ..errors import SaveError, StorageError
from ..format.commit import BackgroundRetention, commit
from ..format.manifest import FileEntry, Manifest
from ..format.snapshot import StagingBuffers, write_payload
from ..records.events import CheckpointCommitted, EventSink
from ..records.lease import Lease
from ..storage import Storage, inflight
from ..units import format_bytes
from .artifacts import Captured, write_artifacts

if TYPE_CHECKING:
    from ..format.sharded import ShardedSaver
    from ..recovery.local import LocalCopy

__all__ = ["Saver"]

log = logging.getLogger(__name__)

#: Niceness of the background save thread (0-19; higher yields more to training).
BACKGROUND_NICE = 10
#: How long the background save thread waits for the next save before it ends.
WRITER_IDLE_S = 60.0
#: On the way out, how long to wait for retention still deleting old checkpoints.
RETENTION_EXIT_WAIT_S = 30.0
#: A distributed rank that fails with a save being written (a peer gone: the commit, a
#: collective, cannot happen): how long the aborts of its open uploads may take, then how long
#: its write then gets to end before it is left running (see :meth:`Saver.finish_inflight`).
DEAD_ABORT_S = 5.0
DEAD_WRITE_WAIT_S = 2.0

Entries = list[tuple[str, FileEntry]]


@dataclass
class _Written:
    """One rank's files of a step, written and awaiting the commit."""

    step: int
    entries: Entries
    captured_at: float
    stall: float
    artifacts: dict[str, Any] | None = None  # the manifest's artifacts index (rank 0)
    written_at: float = 0.0  # when the last file was written (time.time())


class Saver:
    """Writes and commits checkpoints for one run; at most one save in flight."""

    def __init__(
        self,
        storage: Storage,
        group: Group,
        *,
        keep_last: int,
        async_save: bool,
        when_busy: Literal["wait", "skip"],
        metadata: Mapping[str, Any],
        segment_id: str,
        emit: EventSink,
        lease: Lease | None = None,
        sharded: ShardedSaver | None = None,
        local: LocalCopy | None = None,
    ) -> None:
        self.storage = storage
        self.group = group
        self.keep_last = keep_last
        self.async_save = async_save
        self.when_busy = when_busy
        self.metadata = metadata
        self.segment_id = segment_id
        self._emit = emit
        self._lease = lease
        self._sharded = sharded
        self._local = local  # this machine's copy of the newest checkpoint (recovery/local.py)
        self._staging = StagingBuffers()
        self._writer = _Writer()  # one background thread for every save of this saver
        self._job: _Job | None = None  # the save being written in the background, if any
        self._pending_step: int | None = None
        self._written: _Written | None = None  # distributed: written here, not yet committed
        # Distributed, not rank 0: the step gathered last, whose commit this rank has not seen
        # proven yet (its older local copy is kept until then: see _committed).
        self._unconfirmed: int | None = None
        self._abandoned = False  # a stop save given up on: its thread may still write
        self._retention = BackgroundRetention(storage)  # retention of the newest commit
        #: The newest step this process saw committed (or restored from).
        self.last_saved_step: int | None = None
        self.last_save_time = time.time()
        self._durations: collections.deque[float] = collections.deque(maxlen=5)

    @property
    def typical_duration(self) -> float | None:
        """The longest of the last few saves (capture to commit), or None before the first."""
        return max(self._durations) if self._durations else None

    @property
    def writing(self) -> bool:
        """True while a background write is still running (or was abandoned running)."""
        return self._abandoned or (self._job is not None and not self._job.done.is_set())

    @property
    def in_flight(self) -> bool:
        """True while a background save is still being written or awaits its commit."""
        return (self._job is not None and not self._job.done.is_set()) or self._written is not None

    # -- saving --------------------------------------------------------------------------------

    def save(self, step: int, payload: Callable[[], dict[str, Any]],
             sharded: Callable[[], dict[str, Any]] | None = None,
             *, artifacts: Callable[[], Captured] | None = None) -> None:
        """Checkpoint ``step``: ``payload()`` is this rank's ``torch.save`` state,
        ``sharded()`` (sharded runs) the model and optimizer state for DCP, and
        ``artifacts()`` (rank 0) the local files to keep, read now, at this step."""
        if step in (self.last_saved_step, self._pending_step):
            return
        t0 = time.time()
        if self._job is not None and not self._job.done.is_set():
            if self.when_busy == "skip":
                log.info("save at step %d skipped: the save of step %d is still being written",
                         step, self._pending_step)
                return
            log.info("save at step %d waits for the save of step %d to finish writing",
                     step, self._pending_step)
        # The previous save must be durable before its staging buffers are reused. With
        # nothing in flight there is nothing to wait for, and wait()'s barriers would only
        # add the slowest rank's lateness to every rank's stall: ranks save the same steps
        # and commit together, so when nothing is in flight here, nothing is anywhere.
        if self._job is not None or self._written is not None:
            self.wait()
        state = payload()
        captured = artifacts() if artifacts is not None else None
        shards = sharded() if sharded is not None and self._sharded is not None else None
        if self.async_save:
            state = self._staging.stage(state)
            if shards is not None:
                assert self._sharded is not None
                shards = self._sharded.stage(shards)
        stall = time.time() - t0
        self._pending_step = step
        self.last_save_time = time.time()
        job = _Job(self._write, step, state, shards, captured, t0, stall)
        self._job = job
        if self.async_save:
            self._writer.submit(job)
        else:
            job.run()
            self.wait()

    def _write(self, step: int, state: dict[str, Any], shards: dict[str, Any] | None,
               captured: Captured | None, t0: float, stall: float) -> _Written | None:
        """Write this rank's files (background thread); commit at once when it is the only rank."""
        try:
            if self._lease is not None:
                self._lease.check()  # a writer whose lease was taken over writes nothing more
            entries: Entries = []
            # This rank's files, its DCP shards included, also go to the machine's local copy
            # as they pass (never a cost to the save: no room or a local failure just drops
            # the copy).
            store: Any = self.storage
            if self._local is not None and self._local.begin(step, _tensor_bytes(state) + (
                    0 if shards is None else _shard_bytes(shards))):
                store = self._local.storage(self.storage)
            if shards is not None:
                assert self._sharded is not None
                # Collective on the sharded saver's own group: every rank's shards and DCP's
                # .metadata are durable when it returns (rank 0 gets every file's entry).
                entries += self._sharded.write(step, shards, storage=store)
            entries.append(write_payload(store, step, self.group.rank, state))
            if captured is not None:
                entries += write_artifacts(store, step, captured)
            written = _Written(step, entries, t0, stall,
                               captured.index if captured is not None else None, time.time())
            if self.group.distributed:
                return written  # committed from the training thread once every rank has written
            self._commit(written, [written.entries])
            return None
        except SaveError:
            self._drop_local()
            raise
        except (StorageError, OSError, RuntimeError) as exc:
            self._drop_local()
            raise SaveError(
                f"checkpoint at step {step} failed ({exc}); the previous checkpoint is intact"
            ) from exc

    def _commit(self, written: _Written, per_rank: list[Entries]) -> None:
        """Every rank's files are durable: write the manifest (the commit), then prune."""
        step = written.step
        files = dict(e for entries in per_rank for e in entries)
        manifest = Manifest(step=step, files=files, world_size=len(per_rank),
                            metadata=dict(self.metadata),
                            save_seconds=round(time.time() - written.captured_at, 6),
                            artifacts=dict(written.artifacts or {}))
        if self._lease is not None:
            self._lease.check()  # re-checked just before the manifest: the commit itself
        commit(self.storage, manifest)
        elapsed = time.time() - written.captured_at
        self._durations.append(elapsed)
        log.info("checkpoint at step %d committed (%s, training paused %.3fs, written in %.2fs)",
                 step, format_bytes(manifest.total_bytes), written.stall, elapsed)
        self._emit(CheckpointCommitted(
            segment_id=self.segment_id, step=step, committed_at=time.time(),
            stall_s=written.stall, save_s=elapsed, nbytes=manifest.total_bytes,
            captured_at=written.captured_at,
        ))
        self._retention.after_commit(step, self.keep_last)
        self._committed(step, announce=True)

    def _committed(self, step: int, *, announce: bool = False) -> None:
        """``step`` is committed at the run URL: this machine's copy of it becomes the one
        kept. ``announce``: this rank wrote the manifest, so it tells the peers and frees its
        older copy. The other ranks only know their files were gathered, not that the commit
        happened (rank 0 may die before the manifest): they keep their older copy until a
        later collective proves rank 0 came back from the commit (:meth:`agreed`); dropped at
        the gather, a survivor then read its own file of the step restored from the run URL
        (seen in the benchmark: DDP, rank 0's node killed between the gather and the manifest)."""
        if self._local is None:
            return
        if announce:
            self._local.seal(step, announce=True)
            return
        self._confirm()  # this gather proves the commit before it: rank 0 got past it to save again
        self._local.seal(step, keep_older=True)
        self._unconfirmed = step

    def agreed(self) -> None:
        """Every rank passed a collective after the last gather (distributed; the step's
        agreement): rank 0, which committed right after that gather, came back from it, so
        the commit happened (a failed one raises on rank 0, which then never reaches this
        collective). This rank's older local copies can go."""
        self._confirm()

    def _confirm(self) -> None:
        step, self._unconfirmed = self._unconfirmed, None
        if step is not None and self._local is not None:
            self._local.prune(step)

    def _drop_local(self) -> None:
        if self._local is not None:
            self._local.drop()

    def wait_retention(self, timeout: float | None = None) -> bool:
        """Block until old checkpoints due for deletion are deleted; False on timeout."""
        if not self._retention.wait(timeout):
            log.warning("retention is still deleting old checkpoints after %.0fs; leaving "
                        "it (what remains is deleted after the next commit)", timeout or 0)
            return False
        return True

    # -- completing ----------------------------------------------------------------------------

    def poll(self) -> bool:
        """True while this rank's save is still being written, or its files are still on
        their way to the peers (see :meth:`_copies_pending`); raises a failed one."""
        job = self._job
        if job is not None:
            if not job.done.is_set():
                return True
            self._collect(job)
        return self._copies_pending()

    def _copies_pending(self) -> bool:
        """Distributed: this rank's files of the step written and not yet committed are still
        being sent to the peers (each went as soon as it was complete here). The commit, at a
        step boundary where no rank is busy, waits for them (training does not), at most as
        long again as the write took (at least 1 s): a node lost right after a commit with its
        send under way left no peer its files, and every rank read them from the run URL (seen
        in the benchmark with the run URL on local disk, where the write ends moments before
        the commit: DDP rank 0's 64 MiB to two nodes, 0.3-0.8 s on one loaded core). A save
        due meanwhile, the stop checkpoint and the way out commit at once, as before."""
        written = self._written
        peer = self._local.peer if self._local is not None else None
        if written is None or peer is None or not peer.sending(written.step):
            return False
        return time.time() - written.written_at < max(1.0, written.written_at - written.captured_at)

    def _collect(self, job: _Job) -> None:
        self._job = None
        step = self._pending_step
        self._pending_step = None
        if job.error is not None:
            self._written = None
            raise job.error
        if job.result is not None:
            self._written = job.result
        else:
            self.last_saved_step = step

    def commit_written(self) -> None:
        """Distributed: every rank has written its files; rank 0 commits (all ranks call)."""
        written = self._written
        if written is None:
            return
        self._written = None
        per_rank = self.group.gather(written.entries)
        if self.group.is_main:
            assert per_rank is not None
            self._commit(written, per_rank)
        else:
            self._committed(written.step)
        self.last_saved_step = written.step

    def wait(self) -> None:
        """Block until the save in flight is written and committed (all ranks call it)."""
        job = self._job
        if job is not None:
            job.done.wait()
            self._collect(job)
        if self.group.distributed:
            if self._written is None:
                self.group.barrier()  # nothing to commit; every rank is past its save
                self._confirm()
                return
            # No barrier first: commit_written's gather waits for every rank's entries, and
            # a rank sends them only once its files are written.
            self.commit_written()
            self.group.barrier()  # the manifest exists before anyone moves on
            self._confirm()

    def _abort_dead_write(self, job: _Job, exc: BaseException) -> None:
        """This rank's attempt is dead with ``job`` still writing: abort its open uploads
        (an S3 multipart upload: nothing appears, no part stays billed), give the write
        :data:`DEAD_WRITE_WAIT_S` to end, else leave it running (:meth:`abandon`).

        Nothing can commit here: this rank never reaches the commit's gather again, and
        without the manifest its files are no checkpoint (the previous one stays the
        latest). The lease follows what is known: a write that ended lets the Checkpointer
        release the lease as on any exit; one left running keeps it held (not renewed) until
        this process is gone, so no next writer can take the run over while a late byte of
        this one may still land in a step folder it writes too.
        """
        step, t0 = self._pending_step, time.monotonic()
        aborted = 0 if job.done.is_set() else inflight.abort_all(DEAD_ABORT_S)
        ended = job.done.wait(DEAD_WRITE_WAIT_S)
        what = f"the save of step {step} was being written when this rank failed ({type(exc).__name__})"
        if ended:
            log.info("%s: not committed; %s, its write ended %.2fs later", what,
                     f"aborted {aborted} open upload(s)" if aborted else "no open upload to abort",
                     time.monotonic() - t0)
            return
        log.warning("%s: not committed; its write is still running %.2fs after %s, so it is left "
                    "to end with this process, and the run's lease stays held (not renewed) until "
                    "then", what, time.monotonic() - t0,
                    f"aborting {aborted} upload(s)" if aborted else "nothing could be aborted")
        self.abandon()

    def abandon(self) -> None:
        """Forget the save in flight (its daemon thread dies with the process), so the way
        out does not wait for a store that stopped answering."""
        self._abandoned = self.writing
        self._job = None
        self._pending_step = None
        self._written = None

    def finish_inflight(self, exc: BaseException | None) -> None:
        """On the way out, let a save in flight reach its commit (unless aborting)."""
        if isinstance(exc, KeyboardInterrupt):
            return  # a second Ctrl-C means now; the last commit is intact
        job = self._job
        if self.group.distributed and exc is not None and (job is not None or self._written is not None):
            # Other ranks may be gone: no collectives, so the commit (a gather) never comes.
            # The write in flight is worth nothing: its open uploads are aborted rather than
            # waited for (after a lost node this exit is part of the recovery, which the next
            # attempt waits for: 5.7 s for DDP's 256 MiB on S3 in issue 22's trace).
            if job is not None:
                self._abort_dead_write(job, exc)
            # The step never commits, so its local copy, and its files still queued for the
            # peers (sent before the commit), are worth nothing; dropped, the exit does not
            # wait for those sends.
            self._written = None
            self._drop_local()
            if job is not None:
                return
        if job is None:
            self.wait_retention(RETENTION_EXIT_WAIT_S)
            return
        try:
            self.wait()
        except SaveError as err:
            if exc is None:
                raise
            log.error("%s", err)
        self.wait_retention(RETENTION_EXIT_WAIT_S)


def _shard_bytes(state: Any) -> int:
    from ..format.sharded import local_nbytes

    return local_nbytes(state)


def _tensor_bytes(tree: Any) -> int:
    """About what ``torch.save`` of ``tree`` writes: its tensors' bytes (the rest is small)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, Mapping):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


class _Writer:
    """The background thread that writes a saver's saves, started on the first and kept
    while saves keep coming: starting a thread on every save cost the training thread 1-2
    ms of its stall on a busy machine. It ends after :data:`WRITER_IDLE_S` without work (a
    Checkpointer left open holds no thread forever). A daemon (a second Ctrl-C must not
    wait for it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._running = False  # a thread is taking jobs from self._jobs
        self._current: _Job | None = None

    def submit(self, job: _Job) -> None:
        with self._lock:
            # Saves run one at a time (the saver waits for the previous one first), so the
            # thread is idle here; one still busy with a save the saver gave up on
            # (abandon()) is left to it, and a new thread takes this one.
            busy = self._current is not None and not self._current.done.is_set()
            if not self._running or busy:
                self._jobs = queue.SimpleQueue()
                self._running = True
                threading.Thread(target=self._loop, args=(self._jobs,), name="spotrun-save",
                                 daemon=True).start()
            self._current = job
            self._jobs.put(job)

    def _loop(self, jobs: queue.SimpleQueue[_Job]) -> None:
        # Training comes first: on a busy CPU the writer (serialising, hashing, syscalls)
        # yields to the training threads instead of stretching their steps. Linux applies
        # nice per thread, and threads this one starts (the hash pool) inherit it.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        while True:
            try:
                job = jobs.get(timeout=WRITER_IDLE_S)
            except queue.Empty:
                with self._lock:  # submit() puts under the lock: nothing can slip in now
                    if jobs.empty():
                        if self._jobs is jobs:
                            self._running = False
                        return
                continue
            job.run()
            del job


class _Job:
    """One save, run by the :class:`_Writer`'s thread (or in the caller's, synchronously)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self.error = exc
        finally:
            self.done.set()
