"""Hugging Face ``Trainer``: spotrun's notices, commit protocol and exact-resume rule.

One line::

    import spotrun.integrations.hf as spot_hf

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    spot_hf.train(trainer)            # run URL: url=..., else $SPOTRUN_URL, else args.output_dir

or, keeping your own ``trainer.train`` call::

    cb = SpotrunCallback()
    trainer = Trainer(..., callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_path(trainer))

What happens:

- On start, the newest *valid* checkpoint (sizes and checksums verified against its manifest,
  and the Trainer's own ``global_step`` in ``trainer_state.json`` against the folder's step;
  a damaged one moved aside and the one before it used) is what ``resume_from_checkpoint``
  gets, downloaded first when the run URL is remote. A run URL that has checkpoints but a
  ``train()`` that was not told to resume is refused (it would silently start over).
- Every checkpoint the Trainer saves (its own ``save_steps`` schedule, the final step, and
  the stops below) is committed under spotrun's protocol: the Trainer's folder is copied to
  ``RUN_URL/<step>/``, manifest last. ``keep_last`` committed checkpoints are kept; the
  Trainer's own ``checkpoint-N`` folder is removed once committed (``keep_hf_checkpoints``).
- A SIGTERM, a first Ctrl-C or a spot notice (the same watchers, the same all-rank agreement
  as the Checkpointer) sets ``should_save`` and ``should_training_stop``: the Trainer saves
  at the current step, the folder is committed, and the process exits 75.
- Ledger records (segment, checkpoints with their stall, notices, resume) as for plain
  loops, so ``spotrun cost``, ``spotrun launch`` and ``spotrun check-resume`` work unchanged;
  the end of training writes ``done.json``.

Exactness is the Trainer's own: it restores model, optimizer, LR schedule, grad scaler and
every RNG, and reaches the data position by skipping the batches of the current epoch
(docs/integrations.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"spotrun.integrations.hf needs transformers ({exc}); pip install 'spotrun[hf]'") from exc

from ..errors import ConfigError
from ..notices import Watcher
from ._session import RunSession, resolve_url
from .folders import trainer_json_step_problem

__all__ = ["SpotrunCallback", "train"]

log = logging.getLogger(__name__)

_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME


class SpotrunCallback(TrainerCallback):
    """Makes a Hugging Face ``Trainer`` survive spot interruptions (see the module docstring).

    Args:
        url: the run URL (a path, ``s3://bucket/prefix``, any fsspec URL). Default:
            ``$SPOTRUN_URL``, else the Trainer's ``args.output_dir``.
        keep_last: committed checkpoints to keep (older ones are deleted after a newer commit).
        keep_hf_checkpoints: keep the Trainer's own ``checkpoint-N`` folders after their
            commit (default: removed, the committed copy is the checkpoint; they are always
            kept when ``load_best_model_at_end`` needs them).
        watchers, handle_signals, storage_options, metadata: as for
            :class:`~spotrun.Checkpointer`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        keep_last: int = 2,
        keep_hf_checkpoints: bool = False,
        watchers: Sequence[Watcher] | None = None,
        handle_signals: bool = True,
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.keep_hf_checkpoints = keep_hf_checkpoints
        self._session_args = dict(keep_last=keep_last, watchers=watchers, handle_signals=handle_signals,
                                  storage_options=storage_options, metadata=metadata)
        self.session: RunSession | None = None
        self._resume_asked = False
        self._stopping = False
        self._step_end_at: float | None = None

    def _session_for(self, args: Any) -> RunSession:
        if self.session is None:
            self.session = RunSession(resolve_url(self.url, args.output_dir), **self._session_args)
        return self.session

    # -- before train() -------------------------------------------------------------------------

    def resume_path(self, trainer: Any) -> str | None:
        """The folder to pass as ``trainer.train(resume_from_checkpoint=...)``: the newest
        valid checkpoint of the run (verified; downloaded under ``args.output_dir`` when the
        run URL is remote), or None for a fresh run. Call it on every rank."""
        args = getattr(trainer, "args", trainer)
        session = self._session_for(args)
        path = session.resume_dir(args.output_dir, check=_step_problems)
        self._resume_asked = True
        return path

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self._session_for(args)
        session.start()
        if not self._resume_asked:
            newest = session.newest_committed()
            if newest is not None and state.global_step < newest:
                session.close("failed")
                raise ConfigError(
                    f"{session.storage.display()} already has a checkpoint at step {newest} but "
                    f"this train() starts at step {state.global_step}; resume it with "
                    "trainer.train(resume_from_checkpoint=callback.resume_path(trainer)) (or "
                    "spotrun.integrations.hf.train(trainer)), or use a new run URL")
        session.training_started(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        assert self.session is not None
        stop, save = self.session.poll(state.global_step)
        self._step_end_at = time.time()
        if stop:
            self._stopping = True
            control.should_save = True
            control.should_training_stop = True
        elif save or state.global_step >= state.max_steps:
            # A notice's checkpoint without stopping, or the final step (the Trainer saves
            # there only when its schedule says so; a finished run needs it committed).
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.session is not None
        step = state.global_step
        folder = os.path.join(args.output_dir, f"{_PREFIX}-{step}")
        if self._stopping:
            self.session.stop(step, folder, paused_since=self._step_end_at)  # raises SystemExit
        self.session.commit_folder(step, folder, paused_since=self._step_end_at)
        if args.should_save and not (self.keep_hf_checkpoints or args.load_best_model_at_end):
            shutil.rmtree(folder, ignore_errors=True)  # committed: the copy is the checkpoint

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.session is not None
        if self._stopping:
            # The Trainer stopped without saving this step (a save strategy that declined):
            # the newest commit stays the latest.
            folder = os.path.join(args.output_dir, f"{_PREFIX}-{state.global_step}")
            self.session.stop(state.global_step, folder if os.path.isdir(folder) else None,
                              paused_since=self._step_end_at)
        self.session.finish(state.global_step)


def _step_problems(folder: str, step: int) -> list[str]:
    """The Trainer's own step (``trainer_state.json``) must be the folder's: files copied
    from another checkpoint pass every checksum of a re-hashed manifest, not this."""
    problem = trainer_json_step_problem(os.path.join(folder, _STATE_FILE), step)
    return [problem] if problem else []


def train(trainer: Any, *, url: str | None = None, **callback_kwargs: Any) -> Any:
    """``trainer.train()`` under spotrun: adds a :class:`SpotrunCallback` (unless the Trainer
    has one), resumes from the newest valid checkpoint, trains; returns what ``train`` returns.

    Exits 75 after an interruption's checkpoint is committed (``SystemExit``)."""
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SpotrunCallback)), None)
    if cb is None:
        cb = SpotrunCallback(url, **callback_kwargs)
        trainer.add_callback(cb)
    elif url is not None or callback_kwargs:
        raise ConfigError("the Trainer already has a SpotrunCallback; pass its options there, not to train()")
    path = cb.resume_path(trainer)
    try:
        return trainer.train(resume_from_checkpoint=path)
    except SystemExit:
        raise
    except BaseException as exc:
        if cb.session is not None:
            cb.session.close("stopped" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
