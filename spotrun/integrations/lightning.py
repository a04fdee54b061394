"""PyTorch Lightning: spotrun's notices, commit protocol and exact-resume rule.

One line (plus the resume path)::

    from spotrun.integrations.lightning import SpotrunCallback

    spot = SpotrunCallback()          # run URL: url=..., else $SPOTRUN_URL
    trainer = L.Trainer(..., callbacks=[spot])
    trainer.fit(model, train_dataloaders=loader, ckpt_path=spot.ckpt_path())

What happens:

- The callback installs :class:`SpotrunCheckpointIO` as the Trainer's ``CheckpointIO``: every
  ``trainer.save_checkpoint`` (``ModelCheckpoint``'s schedule, the stops below, the final
  step) becomes one ``rank-00000.pt`` payload committed under spotrun's protocol at
  ``RUN_URL/<global step>/`` (through spotrun's storage: local, S3, any fsspec URL),
  manifest last. Loading verifies sizes and checksums and uses ``weights_only=True``.
  ``ModelCheckpoint``'s paths only name the step; retention is ``keep_last``.
- :meth:`SpotrunCallback.ckpt_path` is the newest *valid* checkpoint (damaged ones moved
  aside, the one before used), or None for a fresh run.
- A SIGTERM, a first Ctrl-C or a spot notice (the Checkpointer's watchers and all-rank
  agreement) checkpoints at the end of the current batch and exits 75 (143 when the stop
  checkpoint could not commit in time). Lightning's own SIGTERM handling (which would end
  ``fit`` at the epoch's end with exit code 0) is replaced for the fit.
- The callback's own state (saved in the checkpoint) is every RNG, restored on resume;
  with a :class:`spotrun.ResumableLoader` as the train loader (Lightning saves stateful
  loaders) the data position is exact too. Ledger records and ``done.json`` as for plain
  loops.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

try:  # the unified package first; the standalone one otherwise
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # pragma: no cover - depends on which package is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(f"spotrun.integrations.lightning needs lightning ({exc}); "
                          "pip install 'spotrun[lightning]'") from exc

from ..errors import CheckpointError, ConfigError, CorruptCheckpointError
from ..format.snapshot import check_loadable, read_payload
from ..format.state import collect_rng_state, restore_rng_state
from ..notices import Watcher
from ..records.layout import EXIT_INTERRUPTED, EXIT_STOP_UNSAVED, checkpoint_dir, parse_step
from ._session import RunSession, resolve_url

__all__ = ["SpotrunCallback", "SpotrunCheckpointIO"]

log = logging.getLogger(__name__)

PAYLOAD_FORMAT = 1


def _plain(tree: Any) -> Any:
    """Dict subclasses (Lightning's ``AttributeDict`` hyper-parameters) as plain dicts, so the
    checkpoint loads under ``weights_only=True``; OrderedDicts (state dicts) stay as they are."""
    if isinstance(tree, Mapping) and type(tree) is not collections.OrderedDict:
        return {k: _plain(v) for k, v in tree.items()}
    if type(tree) is list:
        return [_plain(v) for v in tree]
    return tree


class SpotrunCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that writes through spotrun's storage and commit protocol.

    A checkpoint's place is its global step: ``save_checkpoint(ckpt, path)`` commits
    ``RUN_URL/<step>/rank-00000.pt`` whatever ``path`` says, and ``load_checkpoint(path)``
    reads the step named by ``path``'s last part (:meth:`SpotrunCallback.ckpt_path` gives
    such a path), verified against its manifest.
    """

    def __init__(self, session: RunSession) -> None:
        self.session = session
        #: Whether the last stop save committed in time (see :meth:`save_checkpoint`).
        self.stop_committed = True
        self._stop_save = False
        self.paused_since: float | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        step = int(checkpoint["global_step"])
        session = self.session
        if session.last_committed == step:
            log.debug("step %d is already committed; %s not written again", step, path)
            return
        state = _plain(checkpoint)
        check_loadable("lightning checkpoint", state)
        payload = {"format": PAYLOAD_FORMAT, "step": step, "lightning": state}
        self.stop_committed = session.commit_payload(step, payload, paused_since=self.paused_since,
                                                     bounded=self._stop_save)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        from ..format.commit import read_manifest
        from ..format.snapshot import payload_name

        step = parse_step(os.path.basename(str(path).rstrip("/")))
        if step is None:
            raise ConfigError(f"{path} is not a spotrun checkpoint folder; pass ckpt_path=callback.ckpt_path()")
        storage = self.session.storage
        manifest = read_manifest(storage, step)
        name = payload_name(0)
        if name not in manifest.files:
            raise CorruptCheckpointError(f"{storage.display(checkpoint_dir(step))}: manifest lists no {name}")
        payload = read_payload(storage, step, name, manifest.files[name], weights_only=True)
        if payload.get("format", 0) > PAYLOAD_FORMAT or "lightning" not in payload:
            raise CheckpointError(f"{storage.display(checkpoint_dir(step))} holds no Lightning checkpoint "
                                  "(written by another spotrun integration?); use a new run URL")
        # Loaded on the CPU: Lightning moves the state to the module's device itself.
        return payload["lightning"]

    def remove_checkpoint(self, path: Any) -> None:
        # Retention is spotrun's (keep_last, after a newer commit), never a path's removal.
        log.debug("not removing %s: spotrun keeps the newest keep_last checkpoints", path)


class SpotrunCallback(pl.Callback):
    """Makes a Lightning ``Trainer`` survive spot interruptions (see the module docstring).

    Args:
        url: the run URL. Default: ``$SPOTRUN_URL``.
        keep_last, watchers, handle_signals, storage_options, metadata: as for
            :class:`~spotrun.Checkpointer`.
        save_rng: save every RNG in the checkpoint and restore it on resume (exact resume).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        keep_last: int = 2,
        watchers: Sequence[Watcher] | None = None,
        handle_signals: bool = True,
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        save_rng: bool = True,
    ) -> None:
        self.session = RunSession(resolve_url(url, None), keep_last=keep_last, watchers=watchers,
                                  handle_signals=handle_signals, storage_options=storage_options,
                                  metadata=metadata)
        self.io = SpotrunCheckpointIO(self.session)
        self.save_rng = save_rng
        self.handle_signals = handle_signals
        self._resume_asked = False
        self._rng_to_restore: Any = None

    @property
    def state_key(self) -> str:
        return "spotrun"

    # -- before fit() ---------------------------------------------------------------------------

    def ckpt_path(self) -> str | None:
        """The newest valid checkpoint, for ``trainer.fit(..., ckpt_path=...)``; None when the
        run is new. Call it on every rank, after the Trainer is made (under DDP the process
        group must exist)."""
        self.session.start()
        found = self.session.newest_valid_step()
        self._resume_asked = True
        if found is None:
            return None
        return self.session.storage.display(checkpoint_dir(found))

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        current = trainer.strategy.checkpoint_io
        if not isinstance(current, SpotrunCheckpointIO):
            if type(current).__name__ not in ("TorchCheckpointIO", "AsyncCheckpointIO"):
                raise ConfigError(f"the Trainer already has a {type(current).__name__} checkpoint plugin; "
                                  "spotrun's SpotrunCallback needs its own (drop the other plugin)")
            trainer.strategy.checkpoint_io = self.io

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        session = self.session
        session.start()
        if not self._resume_asked:
            newest = session.newest_committed()
            if newest is not None:
                session.close("failed")
                raise ConfigError(
                    f"{session.storage.display()} already has a checkpoint at step {newest} but "
                    "fit() was not told to resume; pass ckpt_path=callback.ckpt_path(), or use "
                    "a new run URL")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.training_started(trainer.global_step)
        if self.handle_signals:
            # Lightning registered its SIGTERM handler after ours; it would end fit at the
            # epoch's end with exit code 0. The inbox's handler alone decides, as in plain loops.
            self.session.reclaim_signals()

    # Every save here is a full checkpoint (model, optimizers, loops); ``weights_only=False``
    # says so, else Lightning logs "`weights_only` was not set" at each of them.
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        stop, save = self.session.poll(step)
        self.io.paused_since = time.time()
        if stop:
            self._stop(trainer, step)
        elif save and self.session.last_committed != step:
            trainer.save_checkpoint(self._path(step), weights_only=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if self.session.last_committed != step:
            self.io.paused_since = time.time()
            trainer.save_checkpoint(self._path(step), weights_only=False)
        self.session.finish(step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SystemExit):
            self.session.close("stopped" if isinstance(exception, KeyboardInterrupt) else "failed")

    def _stop(self, trainer: Any, step: int) -> None:
        self.io._stop_save = True
        committed = True
        group = self.session.group
        try:
            if self.session.last_committed != step:
                trainer.save_checkpoint(self._path(step), weights_only=False)
                committed = self.io.stop_committed
            committed = bool(group.broadcast(committed)) if group.distributed else committed
        except RuntimeError as exc:
            # Rank 0 leaves at once (143) when its stop save misses the deadline
            # (RunSegment.save_before_stop); the other ranks are then in Lightning's own save
            # barrier, which rank 0 cannot answer, and find the process group closed. That
            # is this stop's outcome, not a crash: leave with the same code as rank 0.
            if not group.distributed or group.is_main:
                raise
            log.warning("rank 0 did not confirm the stop checkpoint at step %d (%s); the previous "
                        "checkpoint stays the latest", step, str(exc).splitlines()[0][:200])
            committed = False
        finally:
            self.io._stop_save = False
        code = EXIT_INTERRUPTED if committed else EXIT_STOP_UNSAVED
        if committed:
            log.info("stop checkpoint at step %d committed; exiting %d", step, code)
        self.session.close("interrupted", exit_code=code)
        raise SystemExit(code)

    def _path(self, step: int) -> str:
        return self.session.storage.display(checkpoint_dir(step))

    # -- the callback's own state: every RNG ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rng": collect_rng_state()} if self.save_rng else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.save_rng and "rng" in state_dict:
            restore_rng_state(state_dict["rng"])
