"""Compare the final checkpoints of two runs file by file, whatever the trainer's format.

``spotrun check-resume`` compares spotrun payloads (``*.pt``); a Hugging Face or Accelerate
checkpoint also holds ``model.safetensors``, ``*.bin``, ``*.pth``, ``*.pkl`` and JSON. Here
every file the two final manifests list is compared: equal checksums are equal files;
otherwise the contents are opened (safetensors, ``torch.load(weights_only=True)``, JSON) and
diffed entry by entry, naming what differs. Files that only describe the process, not the
training state (HF's pickled ``training_args.bin``, the log history), are left out.

    python -m spotrun.integrations.compare RUN_URL_A RUN_URL_B     # exit 0 equal, 1 differ
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from ..commit import find_latest_valid
from ..errors import CheckpointError
from ..layout import checkpoint_dir
from ..resume_check import diff_state
from ..storage import Storage, open_storage

__all__ = ["compare_runs", "file_differences"]

#: Files that record the process (paths, timings), not the training state.
SKIPPED_FILES = frozenset({"training_args.bin"})
#: Keys of JSON files that record timings and paths, not the training state.
SKIPPED_JSON_KEYS = frozenset({"log_history", "best_model_checkpoint"})


def _final(storage: Storage) -> tuple[int, dict[str, Any]]:
    info = find_latest_valid(storage)
    if info is None or info.manifest is None:
        raise CheckpointError(f"no committed checkpoint at {storage.display()}")
    return info.step, dict(info.manifest.files)


def _open(storage: Storage, step: int, name: str) -> Any:
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
        import torch

        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not loadable safely: compared by checksum only
        return None


def compare_runs(reference: str, candidate: str) -> tuple[int, list[str]]:
    """The newest valid checkpoints of two run URLs: (step, differences); [] when equal."""
    a, b = open_storage(reference), open_storage(candidate)
    step_a, files_a = _final(a)
    step_b, files_b = _final(b)
    if step_a != step_b:
        return step_a, [f"final step: {step_a} (reference) vs {step_b} (candidate)"]
    return step_a, file_differences(a, files_a, b, files_b, step_a)


def file_differences(a: Storage, files_a: dict[str, Any], b: Storage, files_b: dict[str, Any],
                     step: int, skip: Any = None) -> list[str]:
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
        left, right = _open(a, step_a, name), _open(b, step_b, name)
        if left is None or right is None:
            out.append(f"{name}: bytes differ")
            continue
        # Equal contents in other bytes (torch.save's layout, skipped JSON keys) are equal.
        out.extend(diff_state(left, right, name))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m spotrun.integrations.compare RUN_URL_A RUN_URL_B", file=sys.stderr)
        return 2
    step, differences = compare_runs(*args)
    if differences:
        print(f"FAIL at step {step}: " + "; ".join(differences))
        return 1
    print(f"PASS: the final checkpoints (step {step}) are equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
