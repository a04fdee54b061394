"""A trainer's checkpoint folder as the files of one spotrun checkpoint, subfolders included.

Sharded trainers write nested folders: the HF Trainer and Accelerate under FSDP put each
model's and optimizer's shards in ``pytorch_model_fsdp_0/`` and ``optimizer_0/``
(torch.distributed.checkpoint folders), DeepSpeed writes ``global_step<N>/`` beside a
``latest`` file. Every regular file of the folder, at any depth, is one manifest entry
named by its path relative to the folder with ``/`` between the parts (its size and
checksums like any payload file), so the manifest, written last, commits the whole tree,
and a restore puts each file back at the same relative path.

A manifest is data read from storage: a name that would land outside the checkpoint
folder (``..``, an absolute path) is damage, never followed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

from ..errors import SaveError

__all__ = ["folder_files", "trainer_json_step_problem", "unsafe_names"]

log = logging.getLogger(__name__)


def folder_files(folder: str) -> list[str]:
    """Every regular file under ``folder`` as a ``/``-separated relative path, sorted.

    Links to files are followed (their content is what a loader would read); a link to a
    folder is not entered, so a link cannot pull a whole other tree into the checkpoint.
    """
    found: list[str] = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(here, d)))
        for name in sorted(files):
            path = os.path.join(here, name)
            if os.path.isfile(path):
                found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    if not found:
        raise SaveError(f"{folder} is empty: the trainer wrote no checkpoint there")
    return sorted(found)


def unsafe_names(names: Iterable[str]) -> list[str]:
    """Problems with manifest file names that would not stay inside the checkpoint folder."""
    problems = []
    for name in names:
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name or ".." in parts or "" in parts
                or "." in parts):
            problems.append(f"manifest names file {name!r}, which would land outside its "
                            "checkpoint folder")
    return problems


def trainer_json_step_problem(path: str, step: int, key: str = "global_step") -> str | None:
    """Why the trainer's own step in JSON file ``path`` is not ``step``, or None when it is.

    A checkpoint folder whose files were copied from another checkpoint (and its manifest
    re-hashed) passes every checksum; the step the trainer itself recorded tells them
    apart. A missing file is no problem here (not every trainer writes one).
    """
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{path}: cannot be read as JSON ({exc})"
    saved = doc.get(key) if isinstance(doc, dict) else None
    if type(saved) is not int or saved != step:
        return (f"{path}: the trainer recorded {key}={saved!r} but its folder is step {step} "
                "(copied from another checkpoint?)")
    return None
