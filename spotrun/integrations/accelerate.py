"""Accelerate: ``save_state`` / ``load_state`` through spotrun's commit protocol, with the
notice watcher, the all-rank agreement and exit code 75.

::

    from spotrun.integrations.accelerate import SpotrunAccelerate

    accelerator = Accelerator()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(loader)        # a spotrun.ResumableLoader: exact data
    spot = SpotrunAccelerate(accelerator, every_steps=100)  # run URL: url=..., else $SPOTRUN_URL
    for step in spot.range(total_steps):                  # restores, then starts at 0 or the saved step
        train_step(...)
    # the end: final checkpoint committed, done.json written

``accelerator.save_state`` writes its folder on local disk (``staging_dir``); spotrun commits
it to ``RUN_URL/<step>/`` (every file copied through spotrun's storage, manifest last with
sizes and checksums) and removes the local copy. On start, the newest *valid* checkpoint
(verified; damaged ones moved aside) is downloaded if remote and given to
``accelerator.load_state``. A SIGTERM, a first Ctrl-C or a spot notice: the current step
finishes, its state is saved and committed, and the process exits 75.

Accelerate loads its RNG file and ``register_for_checkpointing`` objects with
``weights_only=False``: spotrun verifies their checksums first, but the manifest lives beside
them, so point the run URL at storage only you write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..notices import Watcher
from ._session import RunSession, resolve_url
from .folders import trainer_json_step_problem

__all__ = ["SpotrunAccelerate"]

log = logging.getLogger(__name__)


#: The training step a checkpoint folder was saved at, written beside Accelerate's files.
STEP_FILE = "spotrun_step.json"


def _step_problems(folder: str, step: int) -> list[str]:
    """A folder whose files were copied from another checkpoint (manifest re-hashed) passes
    every checksum; the step saved in it tells them apart (damage: the one before is used)."""
    problem = trainer_json_step_problem(os.path.join(folder, STEP_FILE), step)
    return [problem] if problem else []


class SpotrunAccelerate:
    """Checkpoint an ``Accelerator``'s state under spotrun (see the module docstring).

    Args:
        accelerator: the ``accelerate.Accelerator`` (after ``prepare``; objects registered
            with ``register_for_checkpointing`` are saved too).
        url: the run URL. Default: ``$SPOTRUN_URL``.
        every_steps: checkpoint when the completed-step count is a multiple of this.
        every_seconds: checkpoint when this long has passed since the last one.
        staging_dir: where ``save_state`` writes before the commit (and a remote
            checkpoint is downloaded to). Default: a temporary folder.
        keep_last, watchers, handle_signals, storage_options, metadata: as for
            :class:`~spotrun.Checkpointer`.
    """

    def __init__(
        self,
        accelerator: Any,
        url: str | None = None,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        staging_dir: str | None = None,
        keep_last: int = 2,
        watchers: Sequence[Watcher] | None = None,
        handle_signals: bool = True,
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if every_steps is not None and every_steps < 1:
            raise ConfigError(f"every_steps={every_steps} must be a positive number of steps")
        if every_seconds is not None and every_seconds <= 0:
            raise ConfigError(f"every_seconds={every_seconds} must be positive")
        self.accelerator = accelerator
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.session = RunSession(resolve_url(url, None), keep_last=keep_last, watchers=watchers,
                                  handle_signals=handle_signals, storage_options=storage_options,
                                  metadata=metadata)
        self._staging_arg = staging_dir
        self._staging: str | None = None
        self.steps_done = 0
        self._restored = False
        self._last_save_at = time.time()

    @property
    def staging_dir(self) -> str:
        if self._staging is None:
            # Every rank writes into one folder (one machine): rank 0 picks it.
            chosen = self._staging_arg or (tempfile.mkdtemp(prefix="spotrun-accelerate-")
                                           if self.session.group.is_main else None)
            self._staging = self.session.group.broadcast(chosen) if self.session.group.distributed else chosen
            assert self._staging is not None
            os.makedirs(self._staging, exist_ok=True)
        return self._staging

    def restore(self) -> int:
        """Load the newest valid checkpoint into the Accelerator; return the step to start at
        (0 for a fresh run). Every rank calls it. Idempotent."""
        if self._restored:
            return self.steps_done
        self.session.start()
        path = self.session.resume_dir(self.staging_dir, check=_step_problems)
        if path is not None:
            self.accelerator.load_state(path)
            self.steps_done = self.session.last_committed or 0
        self.session.training_started(self.steps_done)
        self._restored = True
        self._last_save_at = time.time()
        return self.steps_done

    def range(self, total_steps: int) -> Iterator[int]:
        """Step indices from the restored position to ``total_steps``; :meth:`step` after
        each, :meth:`finish` at the end (breaking out of the loop does neither)."""
        start = self.restore()
        for i in range(start, total_steps):
            yield i
            self.step(i + 1)
        self.finish()

    def step(self, steps_done: int | None = None) -> None:
        """A training step completed: save on schedule or notice; on a stop, save, commit and
        raise ``SystemExit(75)`` (143 when the stop checkpoint could not commit in time)."""
        if not self._restored:
            raise RuntimeError("call restore() (or use range()) before step()")
        self.steps_done = self.steps_done + 1 if steps_done is None else int(steps_done)
        stop, save = self.session.poll(self.steps_done)
        paused = time.time()
        time_due = self.every_seconds is not None and paused - self._last_save_at >= self.every_seconds
        (time_due,) = self.session.group.agree(time_due=time_due)
        if stop:
            folder = self._save_state() if self.session.last_committed != self.steps_done else None
            self.session.stop(self.steps_done, folder, paused_since=paused)  # raises SystemExit
        step_due = self.every_steps is not None and self.steps_done % self.every_steps == 0
        if save or time_due or step_due:
            self.save(paused_since=paused)

    def save(self, *, paused_since: float | None = None) -> None:
        """Save and commit the current step now (every rank calls it)."""
        if self.session.last_committed == self.steps_done:
            return
        folder = self._save_state()
        self.session.commit_folder(self.steps_done, folder, paused_since=paused_since)
        self._last_save_at = time.time()
        if self.session.group.is_main:
            shutil.rmtree(folder, ignore_errors=True)  # committed: the copy is the checkpoint

    def _save_state(self) -> str:
        folder = os.path.join(self.staging_dir, f"step-{self.steps_done}")
        if self.session.group.is_main:
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of a save that never committed
        self.session.group.barrier()
        self.accelerator.save_state(folder)
        if self.session.group.is_main:
            # Accelerate records no training step of its own (its ``step`` counts gradient
            # accumulation): this file is the loop's, checked against the folder on resume.
            with open(os.path.join(folder, STEP_FILE), "w") as f:
                json.dump({"global_step": self.steps_done}, f)
        return folder

    def finish(self) -> None:
        """The run is complete: commit a final checkpoint and write ``done.json``."""
        self.save()
        self.session.finish(self.steps_done)
        if self.session.group.is_main and self._staging_arg is None and self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)

    def close(self, reason: str = "stopped") -> None:
        """Leave the run without finishing it (the ledger records ``reason``)."""
        self.session.close(reason)
