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

import sys
from typing import Any

from ..errors import CheckpointError
from ..format.commit import find_latest_valid
from ..proof.diff import file_differences
from ..storage import Storage, open_storage

__all__ = ["compare_runs", "file_differences"]

def _final(storage: Storage) -> tuple[int, dict[str, Any]]:
    info = find_latest_valid(storage)
    if info is None or info.manifest is None:
        raise CheckpointError(f"no committed checkpoint at {storage.display()}")
    return info.step, dict(info.manifest.files)


def compare_runs(reference: str, candidate: str) -> tuple[int, list[str]]:
    """The newest valid checkpoints of two run URLs: (step, differences); [] when equal."""
    a, b = open_storage(reference), open_storage(candidate)
    step_a, files_a = _final(a)
    step_b, files_b = _final(b)
    if step_a != step_b:
        return step_a, [f"final step: {step_a} (reference) vs {step_b} (candidate)"]
    return step_a, file_differences(a, files_a, b, files_b, step_a)


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
