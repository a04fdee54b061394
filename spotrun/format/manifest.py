"""The checkpoint manifest: the one small file whose existence commits a checkpoint.

It names every payload file with its size and checksum, so a reader can tell a complete
checkpoint from a half-written or damaged one without trusting listing order or mtimes.
Format 2 lists a CRC32C per 16 MiB chunk (see :mod:`spotrun.format.checksum`); format 1 listed one
sha256 per file, and is still read and verified.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..records.layout import DCP_METADATA

__all__ = ["FORMAT_VERSION", "FileEntry", "Manifest"]

#: Bump when a reader of the previous version could misread the new layout.
#: 2: per-chunk CRC32C (``crc32c`` and ``chunk`` in each file entry) instead of sha256.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its size and its checksum, either a CRC32C per ``chunk``
    bytes (format 2, hex strings) or one sha256 (format 1)."""

    size: int
    sha256: str = ""
    crc32c: tuple[str, ...] = ()
    chunk: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size}
        if self.chunk:
            out["crc32c"] = list(self.crc32c)
            out["chunk"] = self.chunk
        if self.sha256:
            out["sha256"] = self.sha256
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileEntry:
        if "crc32c" in data:
            values = tuple(str(v) for v in data["crc32c"])
            chunk = int(data["chunk"])
            if chunk <= 0 or len(values) != -(-int(data["size"]) // chunk):
                raise ValueError(f"{len(values)} chunk checksums for {data['size']} bytes "
                                 f"in chunks of {chunk}")
            return cls(size=int(data["size"]), sha256=str(data.get("sha256", "")),
                       crc32c=values, chunk=chunk)
        return cls(size=int(data["size"]), sha256=str(data["sha256"]))


@dataclass
class Manifest:
    step: int
    files: dict[str, FileEntry]
    created_at: float = field(default_factory=time.time)
    world_size: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    save_seconds: float | None = None
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = field(default_factory=dict)
    #: Local files kept with the checkpoint (``Checkpointer(artifacts=...)``): the path as
    #: the script names it -> ``{"kind": "file", "file": NAME}``, ``{"kind": "dir",
    #: "files": {RELPATH: NAME}}`` or ``{"kind": "absent"}``; each NAME is also in
    #: :attr:`files` (size and checksum). Empty, and left out of the JSON, without artifacts.
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Written through torch.distributed.checkpoint (it lists DCP's index file)."""
        return DCP_METADATA in self.files

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        if not self.versions:
            self.versions = _versions()
        data = asdict(self)
        if not data["artifacts"]:
            del data["artifacts"]  # manifests without artifacts stay as they were
        data["files"] = {name: f.to_dict() for name, f in self.files.items()}
        data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at))
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        try:
            data = json.loads(raw)
            version = int(data["format_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from exc
        if version > FORMAT_VERSION:
            from .. import __version__

            raise UnsupportedFormatError(
                f"{where}: manifest format {version} is newer than this spotrun "
                f"({__version__}, format {FORMAT_VERSION}); upgrade spotrun to read it"
            )
        try:
            return cls(
                step=int(data["step"]),
                files={name: FileEntry.from_dict(f) for name, f in data["files"].items()},
                created_at=float(data["created_at"]),
                world_size=int(data.get("world_size", 1)),
                metadata=dict(data.get("metadata") or {}),
                save_seconds=data.get("save_seconds"),
                format_version=version,
                versions=dict(data.get("versions") or {}),
                artifacts=_artifacts(data.get("artifacts")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is malformed ({exc})") from exc


def _artifacts(raw: Any) -> dict[str, dict[str, Any]]:
    """The artifacts index as read (absent in older manifests); TypeError when malformed."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) and isinstance(v.get("kind"), str)
                                            for v in raw.values()):
        raise TypeError("artifacts must map each path to an object with a 'kind'")
    return {str(path): dict(entry) for path, entry in raw.items()}


def _versions() -> dict[str, str]:
    import torch

    from .. import __version__

    return {"spotrun": __version__, "torch": torch.__version__, "python": platform.python_version()}
