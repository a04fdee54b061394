"""Artifacts: local files and folders kept inside each checkpoint and put back on restore.

Scripts write files outside the run URL and read them back later (a best model, a
tokenizer, eval outputs); on a fresh spot instance they are gone, and after a crash on the
same machine they may be newer than the checkpoint the run resumes from. So they are part
of the checkpoint: rank 0 reads them in the training thread at the step being saved
(:func:`capture_artifacts`), the background writer stores them beside the payload with the
storage's own hashing writer (:func:`write_artifacts`), and the manifest lists them, which
commits them together with the state. :func:`restore_artifacts` verifies the restored
checkpoint's copies (with the one verification the manifest's files go through) and
replaces the local paths with them, each file or folder atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, ConfigError, CorruptCheckpointError, SaveError
from ..format.commit import verify_checkpoint
from ..format.manifest import FileEntry, Manifest
from ..records.layout import checkpoint_dir
from ..storage import Storage

__all__ = ["Captured", "artifact_paths", "capture_artifacts", "restore_artifacts",
           "write_artifacts"]

log = logging.getLogger(__name__)

#: Stored names start with this, so they never meet a payload, DCP file or the manifest.
PREFIX = "artifact-"
#: Temporaries of a restore beside the target: ``.NAME.spotrun-restore-ID``.
_TMP_TAG = ".spotrun-restore-"


@dataclass
class Captured:
    """Rank 0's artifacts as they were at one step: the manifest's index and the bytes."""

    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[tuple[str, bytes]] = field(default_factory=list)


def artifact_paths(paths: Sequence[str | os.PathLike[str]] | None) -> list[str]:
    """The ``artifacts=`` argument as normalised path strings (refusing duplicates)."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        if not isinstance(p, (str, os.PathLike)) or not os.fspath(p):
            raise ConfigError(f"artifacts={paths!r}: each entry must be a file or folder path")
        norm = os.path.normpath(os.fspath(p))
        if norm in out:
            raise ConfigError(f"artifact {norm!r} is listed twice; list each path once")
        out.append(norm)
    for a in out:
        for b in out:
            if a != b and (b + os.sep).startswith(a.rstrip(os.sep) + os.sep):
                raise ConfigError(f"artifact {b!r} lies inside artifact {a!r}; list only {a!r}")
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-60:] or "file"


def capture_artifacts(paths: Sequence[str]) -> Captured:
    """Read every artifact now (training thread, at the step being saved)."""
    captured = Captured()
    for i, path in enumerate(paths):
        try:
            if os.path.isfile(path):
                name = f"{PREFIX}{i:02d}-{_safe(os.path.basename(path))}"
                captured.files.append((name, _read(path)))
                captured.index[path] = {"kind": "file", "file": name}
            elif os.path.isdir(path):
                files: dict[str, str] = {}
                for j, rel in enumerate(_walk(path)):
                    name = f"{PREFIX}{i:02d}-{j:05d}-{_safe(os.path.basename(rel))}"
                    captured.files.append((name, _read(os.path.join(path, rel))))
                    files[rel.replace(os.sep, "/")] = name
                captured.index[path] = {"kind": "dir", "files": files}
            elif os.path.lexists(path):
                raise SaveError(f"artifact {path!r} is neither a file nor a folder; list "
                                "regular files or folders in artifacts=")
            else:
                captured.index[path] = {"kind": "absent"}
        except OSError as exc:
            raise SaveError(f"cannot read artifact {path!r} ({exc}); the previous checkpoint "
                            "is intact: fix the file's permissions or drop it from artifacts=") from exc
    return captured


def _walk(root: str) -> list[str]:
    """Regular files under ``root`` (relative paths, sorted); links are followed as files."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if _TMP_TAG in f:
                continue
            full = os.path.join(folder, f)
            if os.path.isfile(full):
                found.append(os.path.relpath(full, root))
    return found


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_artifacts(storage: Storage, step: int, captured: Captured) -> list[tuple[str, FileEntry]]:
    """Store the captured bytes in ``step``'s folder (before its manifest); their entries.

    Written through :meth:`Storage.open_write` like the payload, so each entry's size and
    checksum come from the same writer, computed on the way out.
    """
    entries = []
    for name, data in captured.files:
        with storage.open_write(f"{checkpoint_dir(step)}/{name}") as f:
            f.write(data)
        entries.append((name, f.entry))
    return entries


def restore_artifacts(storage: Storage, manifest: Manifest, paths: Sequence[str]) -> None:
    """Put the checkpoint's artifacts back at ``paths`` (those this run lists).

    Every stored file is verified first (CorruptCheckpointError: the restore falls back to
    an older checkpoint, whose artifacts are put back instead); only then is anything
    local touched. A path saved as absent is removed; a path this checkpoint does not hold
    (listed since) is left as it is, with a warning.
    """
    saved = manifest.artifacts
    for path in sorted(set(saved) - set(paths)):
        log.warning("the checkpoint at step %d holds artifact %r, which this run does not list "
                    "in artifacts=; not restored", manifest.step, path)
    wanted = {p: saved[p] for p in paths if p in saved}
    for p in paths:
        if p not in saved:
            log.warning("artifact %r is not in the checkpoint at step %d (listed since that "
                        "save?); the local copy is left as it is", p, manifest.step)
    names = {p: _stored_names(p, e, manifest) for p, e in wanted.items()}
    every = {n for ns in names.values() for n in ns.values()}
    if every:
        problems = verify_checkpoint(
            storage, Manifest(step=manifest.step, files={n: manifest.files[n] for n in every}))
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
    folder = checkpoint_dir(manifest.step)
    for path, entry in wanted.items():
        try:
            _clean_temporaries(path)
            if entry["kind"] == "absent":
                if os.path.lexists(path):
                    log.info("artifact %r did not exist at step %d: removed", path, manifest.step)
                    _remove(path)
            elif entry["kind"] == "file":
                _place_file(path, storage.read_bytes(f"{folder}/{names[path]['']}"))
            else:
                _place_dir(path, {rel: storage.read_bytes(f"{folder}/{n}")
                                  for rel, n in names[path].items()})
        except OSError as exc:
            raise CheckpointError(
                f"cannot put artifact {path!r} back from the checkpoint at step "
                f"{manifest.step} ({exc}); make the path writable and start again") from exc
    if wanted:
        log.info("artifacts restored from step %d: %s", manifest.step, ", ".join(wanted))


def _stored_names(path: str, entry: dict[str, Any], manifest: Manifest) -> dict[str, str]:
    """{relative path ('' for a file artifact): stored name}, checked against the manifest."""
    kind = entry.get("kind")
    if kind == "absent":
        names: dict[str, str] = {}
    elif kind == "file" and isinstance(entry.get("file"), str):
        names = {"": entry["file"]}
    elif kind == "dir" and isinstance(entry.get("files"), dict):
        names = {str(rel): str(n) for rel, n in entry["files"].items()}
        for rel in names:
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or "" in parts:
                raise CorruptCheckpointError(
                    f"artifact {path!r}: stored file {rel!r} would land outside its folder")
    else:
        raise CorruptCheckpointError(f"artifact {path!r}: malformed manifest entry {entry!r}")
    for n in names.values():
        if n not in manifest.files:
            raise CorruptCheckpointError(
                f"artifact {path!r}: {n} is not among the manifest's files")
    return names


def _tmp_beside(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}{_TMP_TAG}{uuid.uuid4().hex[:8]}")


def _clean_temporaries(path: str) -> None:
    """Leftovers of a restore that was killed part-way, beside ``path``."""
    head, tail = os.path.split(os.path.abspath(path))
    if not os.path.isdir(head):
        return
    for name in os.listdir(head):
        if name.startswith(f".{tail}{_TMP_TAG}"):
            _remove(os.path.join(head, name))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _place_file(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (a kill leaves the old or the new)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_beside(path)
    _write_durably(tmp, data)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)  # it was a folder locally; the checkpoint says file
    os.replace(tmp, path)


def _place_dir(path: str, files: dict[str, bytes]) -> None:
    """Replace the folder ``path`` with exactly ``files``: built aside, then swapped in.

    A kill between the two renames leaves ``path`` missing for a moment; the next start
    restores it again (a restore always finishes before training does).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_beside(path)
    os.makedirs(tmp)
    for rel, data in files.items():
        target = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write_durably(target, data)
    if os.path.lexists(path):
        old = _tmp_beside(path)
        os.rename(path, old)
        os.rename(tmp, path)
        _remove(old)
    else:
        os.rename(tmp, path)
