"""What the trainer integrations share: one process's hold on a run whose checkpoints are
folders a trainer writes itself (Hugging Face ``Trainer``, Accelerate ``save_state``).

The trainer writes its checkpoint folder to local disk (its own format, its own loader);
:class:`RunSession` then commits that folder under spotrun's protocol: every file copied to
``RUN_URL/<step>/`` through :meth:`Storage.open_write` (atomic, hashed on the way out, S3
multipart when remote), then the manifest with every size and checksum, written last. On
resume the newest *valid* checkpoint (verified against its manifest, damaged ones moved
aside) is handed back as a local folder for the trainer's own loader. Everything else is
the :class:`~spotrun.Checkpointer`'s own machinery, reused as is: the run lease, the
signals-and-notices inbox, the all-rank agreement, the ledger records, exit code 75.

Call order (every rank)::

    session.start()                        # lease, signal handlers, notice watchers, ledger
    folder = session.resume_dir(local)     # newest valid checkpoint as a local folder, or None
    session.training_started(step)
    stop, save = session.poll(step)        # at every step boundary (one tiny all-reduce)
    session.commit_folder(step, folder)    # after the trainer wrote a checkpoint folder
    session.stop(step, folder)             # on a stop: bounded commit, then SystemExit(75)
    session.finish(step)                   # done.json; or session.close(...) on the way out
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .. import config
from ..checkpoint.restore import RestoreProgress, all_damaged_error, list_readable
from ..checkpoint.segment import RunSegment
from ..config import IF_ALL_DAMAGED_ENV, env_str  # noqa: F401 - importable here, as before
from ..distributed import Group
from ..errors import CheckpointUnreadableError, ConfigError, SaveError, StorageError, StorageNotFoundError
from ..format.commit import BackgroundRetention, commit, list_checkpoints, newest_valid, quarantine, verify_checkpoint
from ..format.manifest import FileEntry, Manifest
from ..notices import Watcher
from ..records.events import CheckpointCommitted
from ..records.layout import EXIT_INTERRUPTED, EXIT_STOP_UNSAVED, checkpoint_dir
from ..records.lease import Lease
from ..storage import Storage, open_storage
from ..units import format_bytes
from .folders import folder_files, unsafe_names

__all__ = ["RunSession", "resolve_url"]

log = logging.getLogger(__name__)

_COPY_CHUNK = 16 << 20


def resolve_url(url: str | None, fallback: str | None) -> str:
    """The run URL: the argument, else ``$SPOTRUN_URL``, else the trainer's own output folder."""
    found = url or env_str("SPOTRUN_URL") or fallback
    if not found:
        raise ConfigError("no run URL: pass url=... or set SPOTRUN_URL (a path or s3://bucket/prefix)")
    return found


def _entry(writer: Any) -> FileEntry:
    # The manifest entry of a file just written through Storage.open_write: the writer
    # computed its checksums on the way out, as for snapshot.write_payload.
    return writer.entry


def _copy_counted(src: Any, out: Any, progress: RestoreProgress) -> None:
    """``shutil.copyfileobj``, counting each chunk into the restore's progress."""
    while True:
        chunk = src.read(_COPY_CHUNK)
        if not chunk:
            return
        out.write(chunk)
        progress.add(len(chunk))


class RunSession:
    """One training process's hold on a run whose checkpoints a trainer writes as folders."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        keep_last: int = 2,
        handle_signals: bool = True,
        watchers: Sequence[Watcher] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ConfigError(f"keep_last={keep_last} must be at least 1 (the newest checkpoint)")
        self.storage: Storage = open_storage(url, storage_options)
        self.keep_last = keep_last
        self.metadata = dict(metadata or {})
        self.if_all_damaged = config.if_all_damaged()
        #: Everything around the checkpoints: lease, signals and notices, ledger, the stop bound.
        self._seg = RunSegment(self.storage, handle_signals=handle_signals, watchers=watchers)
        self._interrupts = self._seg.interrupts
        self._lease: Lease | None = None
        self.active = False
        self.closed = False
        #: The newest step committed (or resumed from) by this process.
        self.last_committed: int | None = None
        self._retention = BackgroundRetention(self.storage)
        self._progress = RestoreProgress(self.storage.display(), 0)  # the restore's, on rank 0

    @property
    def segment_id(self) -> str:
        return self._seg.segment_id

    @property
    def steps_done(self) -> int:
        return self._seg.steps_done

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self._seg.steps_done = value

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def group(self) -> Group:
        if self._seg.group is None:
            raise RuntimeError("RunSession.start() first")
        return self._seg.group

    def start(self) -> None:
        """Take the run (lease), listen for signals and notices, record the segment. Idempotent."""
        if self.active or self.closed:
            return
        self._seg.join()
        self._lease = self._seg.begin()
        self.active = True
        atexit.register(self._at_exit)

    def close(self, reason: str, *, exit_code: int | None = None) -> None:
        """Leave the run: watchers off, lease released, the segment's end recorded."""
        if not self.active:
            return
        self.active = False
        self.closed = True
        seg = self._seg
        seg.stop_listening()
        self._retention.wait(30.0)
        seg.release(interrupted=exit_code == EXIT_INTERRUPTED)
        seg.record_end(None if reason == "finished" else reason)

    def _at_exit(self) -> None:
        # The trainer raised (or the script ended without finishing): say so in the ledger.
        if self.active:
            self.close("failed")

    # -- resume -------------------------------------------------------------------------------

    def resume_dir(self, local_root: str, check: Any = None) -> str | None:
        """The newest valid checkpoint as a local folder (downloaded under ``local_root`` when
        the run URL is remote), or None for a fresh run. Every rank gets the same answer.

        Sizes and checksums are verified before the trainer sees a byte; a damaged checkpoint
        is moved aside under ``damaged/`` and the one before it is used. A checkpoint that
        cannot be *read* is not damage: the start fails and nothing changes. When every
        checkpoint is damaged, the start fails unless ``SPOTRUN_IF_ALL_DAMAGED=start_fresh``.
        ``check(folder, step)``: the trainer's own problems with a verified local copy (its
        recorded step not the folder's), counted as damage too.
        """
        def fetch(manifest: Manifest) -> tuple[Any, list[str]]:
            path, problems = self._fetch_verified(manifest, local_root)
            if not problems and check is not None:
                problems = list(check(path, manifest.step))
            return path, problems

        found = self._resume_point(fetch)
        return None if found is None else found[1]

    def newest_valid_step(self) -> int | None:
        """The step of the newest valid checkpoint (verified in storage, as
        :meth:`resume_dir`), or None for a fresh run. Every rank gets the same answer."""
        def verify(manifest: Manifest) -> tuple[Any, list[str]]:
            self._progress.phase(f"verifying step {manifest.step}", manifest.total_bytes)
            return None, verify_checkpoint(self.storage, manifest, deep=True)

        found = self._resume_point(verify)
        return None if found is None else found[0]

    def _resume_point(self, check: Any) -> tuple[int, Any] | None:
        """Rank 0 finds the newest checkpoint that ``check(manifest)`` -> (value, problems)
        passes; every rank learns (step, value), or None."""
        self.start()
        group = self.group
        outcome: tuple[str, Any] = ("none", None)
        error: BaseException | None = None
        if group.is_main:
            try:
                with RestoreProgress(self.storage.display()) as self._progress:
                    outcome = self._find(check)
                if outcome[0] == "found":  # with its size and time, for the line below
                    outcome = ("found", (*outcome[1], self._progress.elapsed))
                    # For the ledger: every byte came from the run URL (downloaded, or read
                    # in place: the trainer loads the run URL's own folder).
                    self._seg.restored(self._progress.started_at, self._progress.elapsed,
                                       {"url": self._progress.done or outcome[1][2]})
            except Exception as exc:  # noqa: BLE001 - told to every rank, raised below
                error, outcome = exc, ("error", str(exc))
        if group.distributed:
            outcome = group.broadcast(outcome)
        if error is not None:
            raise error
        kind, value = outcome
        if kind == "error":
            raise CheckpointUnreadableError(f"rank 0 could not resume the run: {value}")
        if kind == "none":
            return None
        step, found, nbytes, seconds = value
        self.last_committed = self.steps_done = step
        log.info("resuming from step %d at %s (%s, read and verified in %.2fs)", step,
                 self.storage.display(checkpoint_dir(step)), format_bytes(nbytes), seconds)
        return step, found

    def _find(self, check: Any) -> tuple[str, Any]:
        infos = list_readable(self.storage)
        values: dict[int, Any] = {}

        def checked(info: Any) -> str | None:
            value, problems = check(info.manifest)
            if problems:
                return "; ".join(problems)
            values[info.step] = value
            return None

        chosen, damaged = newest_valid(infos, checked, where=self.storage.display())
        if damaged and chosen is None and self.if_all_damaged != "start_fresh":
            raise all_damaged_error(self.storage, damaged, argument=False)
        for step, problem in damaged:
            quarantine(self.storage, step, problem)
        if chosen is None:
            return ("none", None)
        return ("found", (chosen.step, values[chosen.step], chosen.manifest.total_bytes))

    def _fetch_verified(self, manifest: Manifest, local_root: str) -> tuple[str, list[str]]:
        """A local copy of the checkpoint (the folder itself on local storage) and its damage."""
        folder = checkpoint_dir(manifest.step)
        outside = unsafe_names(manifest.files)
        if outside:
            return "", outside
        local = self.storage.local_path(folder)
        progress = self._progress
        if local is not None:
            progress.phase(f"verifying step {manifest.step}", manifest.total_bytes)
            return local, verify_checkpoint(self.storage, manifest, deep=True)
        # Remote: download, then verify the copy with the same manifest (the same checks,
        # and the trainer then loads exactly the bytes that were verified).
        cache = os.path.join(local_root, "spotrun-resume")
        shutil.rmtree(cache, ignore_errors=True)
        dest = os.path.join(cache, folder)
        os.makedirs(dest, exist_ok=True)
        for name in manifest.files:
            try:
                src = self.storage.open_read(f"{folder}/{name}")
            except StorageNotFoundError:
                continue  # reported as missing by the verification below
            progress.phase(f"downloading step {manifest.step}: {name}", manifest.total_bytes)
            target = os.path.join(dest, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with src, open(target, "wb") as out:
                _copy_counted(src, out, progress)
        progress.phase(f"verifying the download of step {manifest.step}")
        copy = open_storage(cache)
        return dest, verify_checkpoint(copy, manifest, deep=True)

    def training_started(self, step: int) -> None:
        """Record where training (re)starts, step 0 included as the Checkpointer does: the
        cost report's restart overhead, and ``check-resume`` signals only after it."""
        self.start()
        self._seg.training_started(step)

    def newest_committed(self) -> int | None:
        """The newest committed step in storage (rank 0 reads, every rank learns it)."""
        step = None
        if self.group.is_main:
            found, _ = newest_valid(list_checkpoints(self.storage), warn=False)
            step = None if found is None else found.step
        return self.group.broadcast(step)

    # -- the loop -----------------------------------------------------------------------------

    def poll(self, steps_done: int) -> tuple[bool, bool]:
        """At a step boundary: (stop, save) as every rank agrees (one tiny all-reduce)."""
        inbox = self._interrupts
        self._seg.drain(steps_done)
        stop, save = self.group.agree(stop=inbox.stop_requested, save=inbox.save_requested)
        if stop:
            inbox.stop_requested = True
        if save:
            inbox.save_requested = False
        return stop, save

    def reclaim_signals(self) -> None:
        """Point SIGTERM/SIGINT at the inbox again, after a trainer installed handlers of its
        own over it (the handlers saved at :meth:`start` are still the ones restored)."""
        self._interrupts.reclaim_signal_handlers()

    @property
    def stop_requested(self) -> bool:
        return self._interrupts.stop_requested

    def request_stop(self) -> None:
        """Ask for a stop checkpoint and exit 75 at the next step boundary (thread-safe)."""
        self._interrupts.request_stop()

    # -- committing ---------------------------------------------------------------------------

    def commit_folder(self, step: int, folder: str, *, paused_since: float | None = None) -> None:
        """Commit the trainer's checkpoint ``folder`` as step ``step`` (every rank calls it).

        Every rank's files must be in ``folder`` (one machine) when the ranks arrive here.
        Rank 0 copies them to ``RUN_URL/<step>/``, then writes the manifest: payload first,
        manifest last. Whatever fails, the previous checkpoint stays the latest, untouched.
        """
        if self.last_committed == step:
            # A second save of the same step (the Trainer's epoch-end save after the final
            # step's): rewriting a committed folder's files would break its manifest.
            log.debug("step %d is already committed; not committed again", step)
            return
        group = self.group
        group.barrier()  # every rank's files (e.g. its RNG state) are in the folder
        error = None
        if group.is_main:
            try:
                self._copy_and_commit(step, folder, paused_since)
            except Exception as exc:  # noqa: BLE001 - told to every rank, raised below
                error = exc
        message = group.broadcast(None if error is None else str(error)) if group.distributed else None
        if error is not None:
            raise error
        if message is not None:
            raise SaveError(f"rank 0 could not commit the checkpoint at step {step}: {message}")
        self.last_committed = step

    def _copy_and_commit(self, step: int, folder: str, paused_since: float | None) -> None:
        names = folder_files(folder)  # subfolders too (FSDP/DeepSpeed shard folders)
        dest = checkpoint_dir(step)

        def write() -> dict[str, FileEntry]:
            files: dict[str, FileEntry] = {}
            for name in names:
                with open(os.path.join(folder, name), "rb") as src, \
                        self.storage.open_write(f"{dest}/{name}") as out:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                files[name] = _entry(out)
            return files

        self._commit(step, write, paused_since)

    def commit_payload(self, step: int, payload: Mapping[str, Any], *,
                       paused_since: float | None = None, bounded: bool = False) -> bool:
        """Commit one ``torch.save`` payload (``rank-00000.pt``) as step ``step``.

        Rank 0 only, no collectives (for trainers that save from rank 0 alone). ``bounded``:
        a stop checkpoint, given the time the machine has left; returns whether it committed.
        """
        from ..format.snapshot import write_payload

        def write() -> dict[str, FileEntry]:
            return dict([write_payload(self.storage, step, 0, payload)])

        if bounded:
            ok = self._bounded(step, lambda: self._commit(step, write, paused_since))
        else:
            self._commit(step, write, paused_since)
            ok = True
        if ok:
            self.last_committed = step
        return ok

    def _commit(self, step: int, write: Any, paused_since: float | None) -> None:
        """Payload files (``write()`` returns their manifest entries), then the manifest."""
        t0 = time.time()
        dest = checkpoint_dir(step)
        try:
            if self._lease is not None:
                self._lease.check()  # a writer whose lease was taken over writes nothing more
            files = write()
            manifest = Manifest(step=step, files=files, world_size=self.group.world_size,
                                metadata=dict(self.metadata), save_seconds=round(time.time() - t0, 6))
            if self._lease is not None:
                self._lease.check()  # re-checked just before the manifest: the commit itself
            commit(self.storage, manifest)
        except SaveError:
            raise
        except (StorageError, OSError) as exc:
            raise SaveError(
                f"checkpoint at step {step} failed ({exc}); the previous checkpoint is intact") from exc
        now = time.time()
        log.info("checkpoint at step %d committed (%s, written in %.2fs) at %s", step,
                 format_bytes(manifest.total_bytes), now - t0, self.storage.display(dest))
        self._seg.emit(CheckpointCommitted(
            segment_id=self.segment_id, step=step, committed_at=now,
            stall_s=now - (paused_since if paused_since is not None else t0),
            save_s=now - t0, nbytes=manifest.total_bytes, captured_at=paused_since or t0))
        self._retention.after_commit(step, self.keep_last)

    def stop(self, step: int, folder: str | None, *, paused_since: float | None = None) -> None:
        """Commit the stop checkpoint within the time the machine has left, then exit.

        Raises ``SystemExit(75)`` once committed (or when ``folder`` is None because this
        step is already committed), ``SystemExit(143)`` when the save failed (the previous
        checkpoint stays the latest); when it does not commit in time the process leaves
        with 143 at once, without unwinding (an abandoned writer is still running). The bound is the Checkpointer's: the
        notice's deadline minus ``SPOTRUN_STOP_MARGIN``, else ``SPOTRUN_STOP_TIMEOUT`` after
        the signal.
        """
        group = self.group
        committed = True
        if folder is not None and self.last_committed != step:
            group.barrier()
            ok: bool | None = True
            if group.is_main:
                # A missed deadline ends this process at once (see RunSegment.leave_abandoned):
                # the other ranks, waiting for the answer below, get it first.
                tell = (lambda: group.broadcast(False)) if group.distributed else None
                ok = self._bounded(step, lambda: self._copy_and_commit(step, folder, paused_since),
                                   tell_others=tell)
            committed = bool(group.broadcast(ok)) if group.distributed else bool(ok)
        code = EXIT_INTERRUPTED if committed else EXIT_STOP_UNSAVED
        if committed:
            self.last_committed = step
            log.info("stop checkpoint at step %d committed; exiting %d", step, code)
        self.close("interrupted", exit_code=code)
        raise SystemExit(code)

    def _bounded(self, step: int, commit_fn: Any, *, tell_others: Any = None) -> bool:
        """Run ``commit_fn`` within the stop bound (the one the Checkpointer's stop has):
        True when it committed, False when it failed; when the bound passes first the
        process leaves with 143 at once (:meth:`RunSegment.save_before_stop`)."""
        return self._seg.save_before_stop(step, commit_fn, previous=self.last_committed,
                                          tell_others=tell_others)

    def finish(self, step: int) -> None:
        """The run is complete: write ``done.json`` and record the segment's end."""
        if self.group.is_main and self.last_committed != step:
            log.warning("training ended at step %d but the newest checkpoint is step %s",
                        step, self.last_committed)
        self._seg.finish(step)
        self.close("finished")
