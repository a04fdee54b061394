"""The commit protocol: which checkpoints exist, which is the latest valid one, retention.

Writers follow one order (see :func:`commit`): every payload file first, the manifest last.
Readers therefore treat a folder without a readable manifest as garbage from a crashed save,
and pick the latest checkpoint by the *number* in its folder name, never by listing order or
modification time (so step 10 is newer than step 9 on every backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from .errors import CheckpointError, CorruptCheckpointError, StorageError, UnsupportedFormatError
from .layout import MANIFEST, checkpoint_dir, parse_step
from .manifest import Manifest
from .storage import Storage

__all__ = [
    "CheckpointInfo",
    "commit",
    "find_latest_valid",
    "list_checkpoints",
    "prune",
    "verify_checkpoint",
]

log = logging.getLogger("spotrun")

Status = Literal["committed", "incomplete", "invalid"]


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
    rel = f"{checkpoint_dir(step)}/{MANIFEST}"
    return Manifest.from_json(storage.read_bytes(rel), where=storage.display(rel))


def list_checkpoints(storage: Storage) -> list[CheckpointInfo]:
    """Every checkpoint folder under the run URL, oldest step first, with its status.

    ``incomplete`` means no manifest (a save that never committed); ``invalid`` means a
    manifest that cannot be read. Payload files are not checked here (see
    :func:`verify_checkpoint`).
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
        except UnsupportedFormatError:
            raise
        except (CheckpointError, StorageError) as exc:
            found.append(CheckpointInfo(step, "invalid", problem=str(exc)))
    return sorted(found, key=lambda c: c.step)


def verify_checkpoint(storage: Storage, manifest: Manifest, *, deep: bool = True) -> list[str]:
    """Problems with a committed checkpoint's files; an empty list means intact.

    ``deep`` re-hashes every byte; otherwise only presence and sizes are checked.
    """
    problems: list[str] = []
    folder = checkpoint_dir(manifest.step)
    present = set(storage.list_dir(folder))
    for name, entry in sorted(manifest.files.items()):
        rel = f"{folder}/{name}"
        where = storage.display(rel)
        if name not in present:
            problems.append(f"{where}: missing")
            continue
        size = storage.size(rel)
        if size != entry.size:
            problems.append(f"{where}: size {size} bytes, manifest says {entry.size} (truncated or overwritten)")
            continue
        if deep:
            _, digest = storage.sha256(rel)
            if digest != entry.sha256:
                problems.append(f"{where}: sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}... (corrupted)")
    return problems


def find_latest_valid(
    storage: Storage, *, deep: bool = True, before: int | None = None
) -> CheckpointInfo | None:
    """The newest committed checkpoint whose files verify, or None when there is none.

    Damaged or unreadable newer ones are skipped with a warning naming the damage, so one
    bad save (a disk error, a hand-edited file) never blocks resuming.
    """
    for info in reversed(list_checkpoints(storage)):
        if before is not None and info.step >= before:
            continue
        if info.status == "incomplete":
            log.debug("skipping %s: %s", storage.display(info.name), info.problem)
            continue
        if info.status == "invalid" or info.manifest is None:
            log.warning("skipping checkpoint %s: %s", storage.display(info.name), info.problem)
            continue
        problems = verify_checkpoint(storage, info.manifest, deep=deep)
        if problems:
            log.warning(
                "skipping damaged checkpoint at step %d (%s); falling back to an older one",
                info.step,
                "; ".join(problems),
            )
            continue
        return info
    return None


def prune(storage: Storage, *, keep_last: int, newest_committed: int) -> list[int]:
    """Delete old checkpoints after ``newest_committed`` was committed; returns removed steps.

    Keeps the ``keep_last`` newest committed checkpoints. Also removes folders left by
    crashed saves *older* than the newest commit; a folder newer than it may be a save in
    progress in another process, so it is left alone.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    removed: list[int] = []
    infos = [c for c in list_checkpoints(storage) if c.step <= newest_committed]
    committed = [c for c in infos if c.status == "committed"]
    keep = {c.step for c in committed[-keep_last:]}
    if newest_committed not in keep:
        # Never delete anything unless the commit we were told about is really there.
        raise CorruptCheckpointError(
            f"refusing to prune: checkpoint {newest_committed} is not committed at {storage.display()}"
        )
    for info in infos:
        if info.step in keep:
            continue
        # Manifest first, so a crash mid-delete leaves an "incomplete" folder, never a
        # "committed" one with files missing.
        if info.status == "committed":
            storage.remove(f"{info.name}/{MANIFEST}")
        storage.remove(info.name)
        removed.append(info.step)
    if removed:
        log.info("retention: removed checkpoints at steps %s", removed)
    return removed
