"""The checkpoint manifest: the one small file whose existence commits a checkpoint.

It names every payload file with its size and sha256, so a reader can tell a complete
checkpoint from a half-written or damaged one without trusting listing order or mtimes.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CorruptCheckpointError, UnsupportedFormatError
from .layout import DCP_METADATA

__all__ = ["FORMAT_VERSION", "FileEntry", "Manifest"]

#: Bump when a reader of the previous version could misread the new layout.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


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
            from . import __version__

            raise UnsupportedFormatError(
                f"{where}: manifest format {version} is newer than this spotrun "
                f"({__version__}, format {FORMAT_VERSION}); upgrade spotrun to read it"
            )
        try:
            return cls(
                step=int(data["step"]),
                files={
                    name: FileEntry(size=int(f["size"]), sha256=str(f["sha256"]))
                    for name, f in data["files"].items()
                },
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

    from . import __version__

    return {"spotrun": __version__, "torch": torch.__version__, "python": platform.python_version()}
