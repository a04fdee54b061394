"""How two runs' checkpoints differ: entry by entry for spotrun's payloads and a sharded
checkpoint's joined-up state, file by file (opened safely where possible) for every other file.

The one comparison ``spotrun check-resume``, its step-by-step diagnosis and
``python -m spotrun.integrations.compare`` all use; it depends on the checkpoint format only,
so the proof modules above it import it and never each other in a circle.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..format.sharded import read_full
from ..format.snapshot import read_payload
from ..records.layout import checkpoint_dir
from ..storage import Storage

__all__ = ["artifact_names", "diff_state", "file_differences", "is_payload", "state_at"]

#: Files that record the process (paths, timings), not the training state.
SKIPPED_FILES = frozenset({"training_args.bin"})
#: Keys of JSON files that record timings and paths, not the training state.
SKIPPED_JSON_KEYS = frozenset({"log_history", "best_model_checkpoint"})


def diff_state(a: Any, b: Any, path: str = "") -> list[str]:
    """Every entry where ``a`` and ``b`` differ, as dotted paths with a short reason."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if torch.equal(a, b):
            return []
        if a.is_floating_point():
            return [f"{path}: values differ (max abs diff {float((a.double() - b.double()).abs().max()):.3g})"]
        return [f"{path}: values differ"]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{sub}: only in the {'interrupted' if key in b else 'uninterrupted'} run")
            else:
                out.extend(diff_state(a[key], b[key], sub))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out.extend(diff_state(x, y, f"{path}[{i}]"))
        # An RNG state is a long tuple: name it once, not per element.
        return [f"{path}: values differ"] if len(out) > 3 else out
    if a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        return [f"{path}: {a!r} vs {b!r}"]
    return []


def artifact_names(manifest: Any) -> set[str]:
    """The files of a checkpoint that are copies of the script's local files (artifacts=)."""
    names: set[str] = set()
    for entry in (getattr(manifest, "artifacts", None) or {}).values():
        if entry.get("kind") == "file":
            names.add(entry["file"])
        elif entry.get("kind") == "dir":
            names.update(entry.get("files", {}).values())
    return names


def is_payload(name: str, artifacts: set[str]) -> bool:
    return name.endswith(".pt") and name not in artifacts


def state_at(storage: Storage, step: int, manifest: Any) -> dict[str, Any]:
    """Every payload of one committed checkpoint, by file name (``rank-00000``, ...)."""
    state: dict[str, Any] = {}
    artifacts = artifact_names(manifest)
    for name, entry in sorted(manifest.files.items()):
        if not is_payload(name, artifacts):
            continue  # DCP's files: compared whole, below; other files: file by file
        payload = read_payload(storage, step, name, entry)
        payload.pop("format", None)
        state[name.removesuffix(".pt")] = payload
    if manifest.sharded:
        # Model and optimizer as the shards join up: comparable whatever the world size.
        state["sharded"] = read_full(storage, manifest)
    return state


def _open_file(storage: Storage, step: int, name: str) -> Any:
    """The file's contents as Python objects, or None when they cannot be opened safely
    (then only its checksum is compared)."""
    data = bytes(storage.read_bytes(f"{checkpoint_dir(step)}/{name}"))
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data)
        if name.endswith(".json"):
            doc = json.loads(data)
            return {k: v for k, v in doc.items() if k not in SKIPPED_JSON_KEYS} if isinstance(doc, dict) else doc
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not loadable safely: compared by checksum only
        return None


def file_differences(a: Storage, files_a: dict[str, Any], b: Storage, files_b: dict[str, Any],
                     step: int, skip: Callable[[str], bool] | None = None) -> list[str]:
    """What differs between two checkpoints at ``step`` (their manifests' file entries),
    file by file; ``skip(name)`` leaves a file out (check-resume compares its own payloads
    entry by entry already)."""
    step_a = step_b = step
    out: list[str] = []
    for name in sorted(set(files_a) | set(files_b)):
        if name in SKIPPED_FILES or (skip is not None and skip(name)):
            continue
        if name not in files_a or name not in files_b:
            out.append(f"{name}: only in the {'candidate' if name in files_b else 'reference'} run")
            continue
        if files_a[name] == files_b[name]:  # same size and checksums: same bytes
            continue
        left, right = _open_file(a, step_a, name), _open_file(b, step_b, name)
        if left is None or right is None:
            out.append(f"{name}: bytes differ")
            continue
        # Equal contents in other bytes (torch.save's layout, skipped JSON keys) are equal.
        out.extend(diff_state(left, right, name))
    return out
