"""The commit protocol: which checkpoints exist, which is the latest valid one, retention.

Writers follow one order (see :func:`commit`): every payload file first, the manifest last.
Readers therefore treat a folder without a readable manifest as garbage from a crashed save,
and pick the latest checkpoint by the *number* in its folder name, never by listing order or
modification time (so step 10 is newer than step 9 on every backend).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import (
    CorruptCheckpointError,
    StorageError,
    StorageNotFoundError,
)
from ..records.layout import DAMAGED_DIR, MANIFEST, checkpoint_dir, parse_step
from ..storage import Storage, translate_errors
from . import checksum
from .manifest import Manifest

__all__ = [
    "DAMAGED_DIR",
    "KEEP_ALL_ENV",
    "CheckpointInfo",
    "commit",
    "find_latest_valid",
    "list_checkpoints",
    "list_damaged",
    "newest_valid",
    "prune",
    "quarantine",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

Status = Literal["committed", "incomplete", "invalid"]

_PAYLOAD_FILE = re.compile(r"rank-\d{5}\.pt")
# A payload's pickle (its structure without tensor bytes) larger than this is not opened
# just to read its step in `spotrun verify`.
_MAX_PICKLE_BYTES = 256 << 20


@dataclass
class CheckpointInfo:
    """One checkpoint folder as found in storage."""

    step: int
    status: Status
    manifest: Manifest | None = None
    problem: str | None = None

    @property
    def name(self) -> str:
        return checkpoint_dir(self.step)


def commit(storage: Storage, manifest: Manifest) -> None:
    """Commit a checkpoint whose payload files are all durably written.

    Must be the last write of a save: once ``manifest.json`` exists, readers take the
    checkpoint as complete.
    """
    storage.write_bytes(f"{checkpoint_dir(manifest.step)}/{MANIFEST}", manifest.to_json())


def read_manifest(storage: Storage, step: int) -> Manifest:
    """The manifest in ``step``'s folder; CorruptCheckpointError if it names another step.

    A manifest copied from another folder (by hand, or a sync tool) would otherwise make a
    restore report one step and load another's state.
    """
    rel = f"{checkpoint_dir(step)}/{MANIFEST}"
    where = storage.display(rel)
    try:
        data = storage.read_bytes(rel)
    except StorageError as exc:
        if _is_a_folder(storage, rel, exc):
            # Structural damage (a stray folder, a sync tool's artefact), not a failed read:
            # this checkpoint is damaged, and the ones before it still count.
            raise CorruptCheckpointError(
                f"{where} is a folder, not a manifest file") from exc
        raise
    manifest = Manifest.from_json(data, where=where)
    if manifest.step != step:
        raise CorruptCheckpointError(
            f"{where}: manifest says step {manifest.step} but its folder is step {step} "
            "(copied from another checkpoint?)"
        )
    return manifest


def _is_a_folder(storage: Storage, rel: str, exc: StorageError) -> bool:
    """Whether the read of ``rel`` failed because ``rel`` is a folder: the OS says so
    (local disk), or the store found no object but lists entries under it (object stores
    and ``memory://``, where a folder is a prefix)."""
    if isinstance(exc.__cause__, IsADirectoryError):
        return True
    return isinstance(exc, StorageNotFoundError) and bool(storage.list_dir(rel))


def list_checkpoints(storage: Storage) -> list[CheckpointInfo]:
    """Every checkpoint folder under the run URL, oldest step first, with its status.

    ``incomplete`` means no manifest (a save that never committed); ``invalid`` means a
    manifest that is damaged (unparseable, or naming another step). Payload files are not
    checked here (see :func:`verify_checkpoint`). A manifest that cannot be *read* (access
    denied, network) raises StorageError: that says nothing about the checkpoint, so it is
    never reported as damage.
    """
    found: list[CheckpointInfo] = []
    for name in storage.list_dir():
        step = parse_step(name)
        if step is None:
            continue
        if MANIFEST not in storage.list_dir(name):
            found.append(CheckpointInfo(step, "incomplete", problem="no manifest (save never committed)"))
            continue
        try:
            found.append(CheckpointInfo(step, "committed", manifest=read_manifest(storage, step)))
        except StorageNotFoundError:
            # Listed a moment ago, gone now: retention (manifest first) is deleting it.
            found.append(CheckpointInfo(step, "incomplete", problem="manifest removed while listing"))
        except CorruptCheckpointError as exc:
            found.append(CheckpointInfo(step, "invalid", problem=str(exc)))
    return sorted(found, key=lambda c: c.step)


def verify_checkpoint(storage: Storage, manifest: Manifest, *, deep: bool = True) -> list[str]:
    """Problems with a committed checkpoint's files; an empty list means intact.

    ``deep`` re-checksums every byte and checks that each payload holds the manifest's step;
    otherwise only presence and sizes are checked. Only proven damage is a problem; a file
    that cannot be read (access denied, network) raises StorageError instead.
    """
    problems: list[str] = []
    folder = checkpoint_dir(manifest.step)
    present = set(storage.list_dir(folder))
    for name, entry in sorted(manifest.files.items()):
        rel = f"{folder}/{name}"
        where = storage.display(rel)
        if "/" not in name and name not in present:  # nested names: size() below says
            problems.append(f"{where}: missing")
            continue
        try:
            size = storage.size(rel)
        except StorageNotFoundError:
            problems.append(f"{where}: missing")
            continue
        if size != entry.size:
            problems.append(f"{where}: size {size} bytes, manifest says {entry.size} (truncated or overwritten)")
            continue
        if deep:
            data: bytes | bytearray | None = None
            if storage.is_local:
                found = storage.verify(rel, entry)  # memory-mapped, no copy
            else:
                # Read once, for the checksum and for the payload's step below.
                data = storage.read_bytes(rel)
                found = checksum.problem(data, entry)
            if found:
                problems.append(f"{where}: {found}")
                continue
            if _PAYLOAD_FILE.fullmatch(name):
                problem = _payload_step_problem(storage, rel, manifest.step, data)
                if problem:
                    problems.append(f"{where}: {problem}")
    return problems


class _Opaque:
    """Stands in for every class and tensor storage while reading a payload's step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StepReader(pickle.Unpickler):
    # Resolves no global and loads no tensor: nothing in the file can run, and only the
    # pickle's few bytes are read, not the tensor data.
    def find_class(self, module: str, name: str) -> Any:
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        return None


def _payload_step_problem(storage: Storage, rel: str, step: int,
                          data: bytes | bytearray | None) -> str | None:
    """Why the payload at ``rel`` does not belong to ``step``, or None when it does.

    Reads only the pickle record of the ``torch.save`` zip (from ``data`` when the file was
    already read whole), never its tensor bytes, and resolves no class: nothing in the file
    can run. Costs a small fraction of the checksum that precedes it.
    """
    from .snapshot import (
        BufferReader,  # here: snapshot imports torch, ls/verify need not
    )

    with translate_errors(storage.display(rel), "reading"):
        local = storage.local_path(rel)
        f: Any = BufferReader(data) if data is not None else open(local or "", "rb")  # noqa: SIM115
        try:
            try:
                with zipfile.ZipFile(f) as z:
                    pkl = next((i for i in z.infolist() if i.filename.endswith("/data.pkl")), None)
                    if pkl is None:
                        return "not a torch.save payload (no data.pkl)"
                    if pkl.file_size > _MAX_PICKLE_BYTES:
                        return None
                    raw = z.read(pkl)
            except (zipfile.BadZipFile, EOFError, ValueError) as exc:
                return f"not a readable torch.save payload ({exc})"
        finally:
            f.close()
    try:
        payload = _StepReader(io.BytesIO(raw)).load()
    except Exception as exc:  # noqa: BLE001 - any failure to parse is damage
        return f"payload cannot be parsed ({type(exc).__name__}: {exc})"
    if not isinstance(payload, dict):
        return "not a spotrun payload"
    saved = payload.get("step", step)
    if type(saved) is not int or saved != step:
        return f"payload holds step {saved!r} but its folder is step {step} (copied from another checkpoint?)"
    return None


def newest_valid(
    infos: Sequence[CheckpointInfo],
    check: Callable[[CheckpointInfo], str | None] | None = None,
    *,
    before: int | None = None,
    where: str = "",
    warn: bool = True,
) -> tuple[CheckpointInfo | None, list[tuple[int, str]]]:
    """The one "latest valid checkpoint" rule: the newest of ``infos`` that is committed and
    passes ``check``, and the ``(step, problem)`` of every damaged one met on the way.

    ``infos`` come from :func:`list_checkpoints` (oldest first, as it returns them); the
    walk goes newest first, by step number. A folder without a manifest is not a checkpoint
    (skipped quietly); an invalid manifest and a ``check`` that returns a problem are damage
    (skipped with a warning, reported back). ``check`` raises for anything that is *not*
    damage (access denied, network): skipping such a checkpoint would pick an older one for
    no reason. Used by :func:`find_latest_valid`, the Checkpointer's restore (whose
    ``check`` loads the state) and the launchers (no ``check``: cheap enough to poll;
    ``warn=False``, since they poll).
    """
    note = log.warning if warn else log.debug
    damaged: list[tuple[int, str]] = []
    for info in reversed(infos):
        if before is not None and info.step >= before:
            continue
        if info.status == "incomplete":
            log.debug("skipping %s/%s: %s", where, info.name, info.problem)
            continue
        if info.status == "invalid" or info.manifest is None:
            note("skipping checkpoint at step %d: %s", info.step, info.problem)
            damaged.append((info.step, info.problem or "invalid manifest"))
            continue
        problem = check(info) if check is not None else None
        if problem:
            note("skipping damaged checkpoint at step %d (%s); trying an older one",
                 info.step, problem)
            damaged.append((info.step, problem))
            continue
        return info, damaged
    return None, damaged


def find_latest_valid(
    storage: Storage, *, deep: bool = True, before: int | None = None
) -> CheckpointInfo | None:
    """The newest committed checkpoint whose files verify, or None when there is none.

    Damaged newer ones are skipped with a warning naming the damage, so one bad save (a
    disk error, a hand-edited file) never blocks resuming. A checkpoint that cannot be read
    (access denied, network) raises StorageError: that is not damage, and skipping it would
    pick an older checkpoint for no reason.
    """
    def verified(info: CheckpointInfo) -> str | None:
        assert info.manifest is not None
        return "; ".join(verify_checkpoint(storage, info.manifest, deep=deep)) or None

    found, _ = newest_valid(list_checkpoints(storage), verified, before=before,
                            where=storage.display())
    return found


#: Set (to anything) by ``spotrun check-resume`` for the runs it compares: retention is off.
KEEP_ALL_ENV = "SPOTRUN_KEEP_ALL_CHECKPOINTS"


def prune(storage: Storage, *, keep_last: int, newest_committed: int) -> list[int]:
    """Delete old checkpoints after ``newest_committed`` was committed; returns removed steps.

    Keeps the ``keep_last`` newest committed checkpoints. Also removes folders left by
    crashed saves *older* than the newest commit; a folder newer than it may be a save in
    progress in another process, so it is left alone. An older folder whose manifest is
    damaged is evidence, not garbage: it is moved under :data:`DAMAGED_DIR`, not deleted.
    Retention is best effort: a storage error is logged and retention runs again after the
    next commit (the commit it follows is already durable).
    """
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    removed: list[int] = []
    if os.environ.get(KEEP_ALL_ENV):
        # spotrun check-resume compares the two runs step by step, so it needs them all.
        return removed
    try:
        infos = [c for c in list_checkpoints(storage) if c.step <= newest_committed]
    except StorageError as exc:
        log.warning("retention skipped this time (%s); it runs again after the next checkpoint", exc)
        return removed
    committed = [c for c in infos if c.status == "committed"]
    keep = {c.step for c in committed[-keep_last:]}
    if newest_committed not in keep:
        # Never delete anything unless the commit we were told about is really there.
        raise CorruptCheckpointError(
            f"refusing to prune: checkpoint {newest_committed} is not committed at {storage.display()}"
        )
    try:
        for info in infos:
            if info.step in keep:
                continue
            if info.status == "invalid":
                quarantine(storage, info.step, info.problem or "damaged manifest")
                removed.append(info.step)
                continue
            # Manifest first, so a crash mid-delete leaves an "incomplete" folder, never a
            # "committed" one with files missing.
            if info.status == "committed":
                storage.remove(f"{info.name}/{MANIFEST}")
            storage.remove(info.name)
            removed.append(info.step)
    except StorageError as exc:
        log.warning("retention stopped part-way (%s); it runs again after the next checkpoint", exc)
    if removed:
        log.info("retention: removed checkpoints at steps %s", removed)
    return removed



class BackgroundRetention:
    """Retention after each commit, off the critical path: deleting an old checkpoint (GBs
    of S3 objects) must neither stall the training thread that commits nor hold up the next
    save. One prune at a time, in commit order."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._thread: threading.Thread | None = None

    def after_commit(self, step: int, keep_last: int) -> None:
        previous = self._thread

        def run() -> None:
            if previous is not None:
                previous.join()
            try:
                prune(self.storage, keep_last=keep_last, newest_committed=step)
            except Exception as exc:  # noqa: BLE001 - the commit it follows is durable
                log.warning("retention after the checkpoint at step %d failed (%s); it runs "
                            "again after the next commit", step, exc)

        self._thread = threading.Thread(target=run, name="spotrun-retention", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the pending deletions are done; False when still running at timeout."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

def quarantine(storage: Storage, step: int, problem: str) -> str:
    """Move the damaged checkpoint folder of ``step`` aside; returns where it went.

    The folder leaves the checkpoint namespace, so no later save writes into it and no
    restore or retention looks at it again, but nothing is lost: it lands under
    ``damaged/<folder>-<UTC time>-<id>/`` with a ``damaged.json`` saying why. Local disk
    renames the folder (atomic); object stores copy each file (server-side on S3) and
    then delete the original, manifest first, so an interrupted move leaves the original
    either still damaged (found and moved again next time) or uncommitted, never a
    committed checkpoint with files missing.
    """
    folder = checkpoint_dir(step)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = f"{DAMAGED_DIR}/{folder}-{stamp}-{uuid.uuid4().hex[:6]}"
    where = storage.display(folder)
    storage.move_folder(folder, dest, remove_first=(MANIFEST,))
    note = {"step": step, "problem": problem, "moved_at": time.time(), "from": where}
    storage.write_bytes(f"{dest}/damaged.json", (json.dumps(note, indent=1) + "\n").encode())
    log.warning("moved damaged checkpoint %s aside to %s (kept as evidence; delete it when done)",
                where, storage.display(dest))
    return dest


def list_damaged(storage: Storage) -> list[str]:
    """Folders under :data:`DAMAGED_DIR` (checkpoints moved aside as damaged), oldest first."""
    return storage.list_dir(DAMAGED_DIR)
