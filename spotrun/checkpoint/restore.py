"""Restore: find the newest checkpoint that checks out and load it, on every rank together.

What both wrappers share (the :class:`~spotrun.Checkpointer` and the trainer integrations'
:class:`~spotrun.integrations._session.RunSession`): listing the run's checkpoints (a
listing that fails is "unreadable", never damage), the all-damaged policy and its message.
:class:`Restorer` is the Checkpointer's loader: rank 0's and this rank's payloads, verified
before anything is loaded, DCP shards resharded, artifacts put back, the outcome of each
checkpoint tried agreed between ranks (once, at its end, where its phases run no collective;
after each phase otherwise) so none is left alone in a collective.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import config
from ..config import IF_ALL_DAMAGED_ENV
from ..distributed import Group
from ..errors import (
    AllCheckpointsDamagedError,
    CheckpointError,
    CheckpointUnreadableError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    StorageNotFoundError,
    UnsupportedFormatError,
)
from ..format.commit import DAMAGED_DIR, CheckpointInfo, list_checkpoints, newest_valid, quarantine, verify_checkpoint
from ..format.manifest import Manifest
from ..format.snapshot import open_payload, payload_name, read_payload
from ..format.state import load_object_state, restore_rng_state, seed_everything, unwrap
from ..records.layout import checkpoint_dir
from ..recovery.local import NearestReader
from ..storage import Storage
from ..units import format_bytes
from .artifacts import restore_artifacts
from .data import ResumableLoader, rank_seed

if TYPE_CHECKING:
    from ..recovery.local import LocalCopy

__all__ = ["PAYLOAD_FORMAT", "RestoreProgress", "Restorer", "all_damaged_error", "list_readable"]

log = logging.getLogger(__name__)

#: The payload layout this spotrun writes (and the newest it reads).
PAYLOAD_FORMAT = 1


def list_readable(storage: Storage) -> list[CheckpointInfo]:
    """The run's checkpoints, oldest first; a listing that fails is not damage."""
    try:
        return list_checkpoints(storage)
    except StorageError as exc:
        raise CheckpointUnreadableError(
            f"cannot list or read the checkpoints ({exc}); that is not damage, so "
            f"nothing at {storage.display()} was skipped or changed: fix access "
            "(permissions, credentials, network) and start again") from exc


def all_damaged_error(storage: Storage, damaged: Sequence[tuple[int, str]], *,
                      argument: bool) -> AllCheckpointsDamagedError:
    """The refusal when every checkpoint failed verification (policy ``fail``);
    ``argument``: the wrapper also takes ``if_all_damaged=`` in code (the Checkpointer)."""
    listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
    how = (f"pass if_all_damaged='start_fresh' or set {IF_ALL_DAMAGED_ENV}=start_fresh"
           if argument else f"set {IF_ALL_DAMAGED_ENV}=start_fresh")
    return AllCheckpointsDamagedError(
        f"all {len(damaged)} checkpoints at {storage.display()} are damaged, "
        f"refusing to start over them ({listing}); see `spotrun verify "
        f"{storage.display()}`; to start from step 0 anyway (the damaged folders "
        f"are moved under {DAMAGED_DIR}/, not deleted) {how}"
    )


class RestoreProgress:
    """What a restore is doing and how much it has read: a progress line every
    ``interval_s`` (``SPOTRUN_RESTORE_PROGRESS_S``, default 10 s; 0 for none) while it runs,
    so a multi-GB restore from S3 is not silent, and the figures for the "resumed" line.

    Bytes count as read when a file (or a chunk of a streamed download) has arrived.
    """

    def __init__(self, where: str, interval_s: float | None = None) -> None:
        self.where = where
        self.interval_s = config.restore_progress_s() if interval_s is None else interval_s
        self.doing = "listing checkpoints"
        self.total: int | None = None  # the size of the checkpoint being read
        self.done = 0
        #: When the restore began (epoch seconds), for the ledger's ``training_resumed``.
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RestoreProgress:
        self.started_at = time.time()
        self._t0 = time.monotonic()
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._report, name="spotrun-restore-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def phase(self, doing: str, total: int | None = None) -> None:
        """Now doing ``doing`` (e.g. "reading step 50: rank-00000.pt") on a checkpoint of
        ``total`` bytes."""
        self.doing = doing
        if total is not None:
            self.total = total

    def add(self, nbytes: int) -> None:
        self.done += nbytes

    def line(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        of = f" of {format_bytes(self.total)}" if self.total else ""
        return (f"restoring from {self.where}: {self.doing}; {format_bytes(self.done)}{of} "
                f"read in {elapsed:.0f}s ({format_bytes(int(self.done / elapsed))}/s)")

    def _report(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info("%s", self.line())


class Restorer:
    """Loads the newest valid checkpoint into a Checkpointer's live objects.

    Args:
        storage, group: the run and this process's group.
        replicated: the objects saved once, in rank 0's payload (name -> object).
        per_rank: the objects each rank saved in its own payload.
        values: the plain values, updated in place.
        artifacts: local paths put back from the restored checkpoint.
        policy: ``"fail"`` or ``"start_fresh"`` when every checkpoint is damaged.
        sharded: model, optimizers and their DCP state function when the run is sharded.
    """

    def __init__(
        self,
        storage: Storage,
        group: Group,
        *,
        replicated: Mapping[str, Any],
        per_rank: Mapping[str, Any],
        values: dict[str, Any],
        artifacts: Sequence[str],
        weights_only: bool,
        save_rng: bool,
        policy: str,
        sharded: tuple[Any, Sequence[Any], Callable[[], dict[str, Any]]] | None = None,
        progress: RestoreProgress | None = None,
        local: LocalCopy | None = None,
    ) -> None:
        self.storage, self.group = storage, group
        # Where this restore's reads go: the run URL, or per file this machine's copy of the
        # step being loaded where that copy matches its manifest (set by _try_load).
        self._local = local
        self._reader: Any = storage
        #: Where the restored bytes came from, for the "resumed" line.
        self.sources = "all from the run URL"
        self.replicated, self.per_rank, self.values = replicated, per_rank, values
        self.artifacts = list(artifacts)
        self.weights_only, self.save_rng, self.policy = weights_only, save_rng, policy
        self.sharded = sharded is not None
        self.model, self.optimizers, self.sharded_state = sharded or (None, (), None)
        #: The step whose state reached the live objects (even if later found damaged).
        self.state_loaded_from: int | None = None
        self.progress = progress or RestoreProgress(storage.display(), 0)
        #: The size of the checkpoint restored (all ranks' files), once one is.
        self.restored_bytes = 0
        # Every reader this restore used (one per checkpoint tried), for the bytes it read.
        self._readers: list[NearestReader] = []
        #: The checkpoint bytes read by source ("local", "peer", "url"): on rank 0 every
        #: rank's together (gathered once the restore is decided), elsewhere this rank's.
        self.bytes_read: dict[str, int] = {"local": 0, "peer": 0, "url": 0}
        # Every rank's bytes together, as the latest agreement carried them (None before
        # one): after a checkpoint's last agreement no rank reads again, so the final
        # agreement's figures are the restore's, without a gather of their own.
        self._agreed_bytes: dict[str, int] | None = None
        # Whether a checkpoint's phases run without collectives, so one agreement at the
        # end of each checkpoint tried is enough (see _try_load).
        self._one_agreement = not self.sharded or _loads_without_collectives(self.model)

    def newest_valid(self) -> int | None:
        """Load the newest committed checkpoint whose files check out; return its step.

        Rank 0 lists the checkpoints; every rank walks the same list, newest first, loads
        its part of each candidate and agrees with the others on the outcome (see
        :meth:`_agree`). Every payload's checksums are verified before any of it is loaded
        (see :func:`~spotrun.format.snapshot.open_payload`), so a damaged checkpoint leaves the
        objects untouched and the older one is loaded into them. Only proven
        damage skips a checkpoint; damaged ones are moved aside once a usable one is found
        (or a fresh start was asked for), so no later save writes into them.
        """
        group = self.group
        self.state_loaded_from = None
        listed: Any = None
        if group.is_main:
            try:
                listed = list_readable(self.storage)
            except CheckpointUnreadableError as exc:
                listed = _Outcome("unreadable", str(exc))
        listed = group.broadcast(listed)
        if isinstance(listed, _Outcome):
            raise CheckpointUnreadableError(listed.message)
        newest = next((i for i in reversed(listed) if i.manifest is not None), None)
        if newest is not None and newest.manifest.world_size != group.world_size:
            log.warning(
                "checkpoint at step %d was written by %d ranks, this run has %d: resuming "
                "on another world size (see the README's exact-resume rules)",
                newest.step, newest.manifest.world_size, group.world_size,
            )
        chosen, damaged = newest_valid(
            listed, lambda info: self._try_load(info.step, info.manifest, group),
            where=self.storage.display())
        found = None if chosen is None else chosen.step
        if chosen is not None and chosen.manifest is not None:
            self.restored_bytes = chosen.manifest.total_bytes
        self._gather_bytes(group)
        if damaged and found is None and self.policy != "start_fresh":
            raise all_damaged_error(self.storage, damaged, argument=True)
        if damaged:  # the same list on every rank: it comes from agreed outcomes
            if group.is_main:
                for step, problem in damaged:
                    quarantine(self.storage, step, problem)
            group.barrier()  # the damaged folders are out of the way before anyone saves
        if damaged and found is None:
            if self.state_loaded_from is not None:
                # A hash failed only after its state was loaded (verified while loading):
                # the objects no longer hold their initial state, so step 0 from here would
                # not be a fresh start. The folders are out of the way; a new process is.
                raise AllCheckpointsDamagedError(
                    f"every checkpoint at {self.storage.display()} was damaged and has been "
                    f"moved under {DAMAGED_DIR}/, but this process had already loaded state "
                    f"from the damaged step {self.state_loaded_from}; start it again to "
                    "begin from step 0 with freshly built objects"
                )
            log.warning("every checkpoint at %s was damaged (moved under %s/); starting from "
                        "step 0 as asked (if_all_damaged='start_fresh')",
                        self.storage.display(), DAMAGED_DIR)
        return found

    def bytes_by_source(self) -> dict[str, int]:
        """The checkpoint bytes this rank read, by source, over every checkpoint it tried
        (a damaged newest one read before the older one that loaded counts too: it was
        read)."""
        out = {"local": 0, "peer": 0, "url": 0}
        for reader in self._readers:
            for key, n in reader.bytes_by_source().items():
                out[key] = out.get(key, 0) + n
        return out

    def _gather_bytes(self, group: Group) -> None:
        # Every rank reaches this together (the outcomes before it were agreed), so the one
        # gather cannot leave a rank waiting alone. Rank 0 records the job's total. The
        # last agreement already carried every rank's figures (or nothing was tried, and
        # nobody read a byte): no collective of its own then.
        mine = self.bytes_by_source()
        if not group.distributed or self._agreed_bytes is not None or not self._readers:
            agreed = self._agreed_bytes
            self.bytes_read = agreed if agreed is not None and group.is_main else mine
            return
        everyone = group.gather(mine)
        if everyone is None:
            self.bytes_read = mine
            return
        self.bytes_read = {key: sum(int(d.get(key, 0)) for d in everyone) for key in mine}

    def _try_load(self, step: int, manifest: Manifest, group: Group) -> str | None:
        """Load one committed checkpoint on every rank; None when it loaded, else its damage.

        Three phases: rank 0 checks that every listed file is there with its size (cheap,
        and catches a partial copy); a sharded checkpoint's model and optimizer load
        through DCP (resharded to this world size); each rank loads rank 0's payload
        (shared state) and its own, verifying their hashes. When none of them runs a
        collective (a replicated run; a sharded one of DTensors, FSDP2 or tensor parallel,
        whose state is built and loaded rank by rank), a rank whose phase failed skips the
        rest and all of them meet once, at the end: one agreement per checkpoint instead
        of one per phase (each waits for the slowest rank, most of a restore's time on a
        busy machine). FSDP1's ShardedTensor state is built and loaded collectively, so
        there every phase still ends in its own agreement, and no rank is left in a
        collective alone.
        """
        outcome: _Outcome | None = None
        # Without a local copy the reader only counts what comes from the run URL.
        self._reader = (NearestReader(self.storage, manifest, None) if self._local is None
                        else self._local.reader(self.storage, manifest))
        self._readers.append(self._reader)
        self.progress.phase(f"checking step {step}'s files", manifest.total_bytes)
        one = self._one_agreement
        agree = (lambda o: o) if one else (lambda o: self._agree(group, o))
        if group.is_main:
            outcome = self._attempt(lambda: self._check_present(step, manifest))
        outcome = agree(outcome)
        if outcome is None and manifest.sharded:
            outcome = agree(self._attempt(lambda: self._load_sharded(manifest, agreed=not one)))
        if outcome is None:
            outcome = agree(self._attempt(lambda: self._load_payloads(manifest, group)))
        if one:
            outcome = self._agree(group, outcome)
        if outcome is None and (self.artifacts or manifest.artifacts):
            # The same checkpoint's files, so state and artifacts never come from two saves.
            outcome = self._agree(group, self._attempt(lambda: self._put_back_artifacts(manifest)))
        if outcome is None:
            if self._local is not None:
                self.sources = self._reader.summary()
            return None
        if outcome.kind == "damaged":
            return outcome.message
        if outcome.kind == "unreadable":
            raise CheckpointUnreadableError(
                f"cannot read the checkpoint at step {step} ({outcome.message}); that is not "
                f"damage, so it was not skipped and nothing at {self.storage.display()} was "
                "changed: fix access (permissions, credentials, network) and start again"
            )
        if outcome.error is not None:
            raise outcome.error  # this rank's own failure, with its traceback
        raise CheckpointError(f"restore failed on another rank: {outcome.message}")

    @staticmethod
    def _attempt(load: Any) -> _Outcome | None:
        """Run one load phase; classify its failure (only proven damage may be skipped)."""
        try:
            load()
        except (CorruptCheckpointError, StorageNotFoundError) as exc:
            # A listed file that is gone is damage, like a wrong size.
            return _Outcome("damaged", str(exc))
        except StorageError as exc:
            return _Outcome("unreadable", str(exc))
        except Exception as exc:  # noqa: BLE001 - passed on, then raised on this rank
            return _Outcome("error", f"{type(exc).__name__}: {exc}", exc)
        return None

    def _agree(self, group: Group, mine: _Outcome | None) -> _Outcome | None:
        """The outcome every rank acts on: the worst of all ranks' (error > unreadable >
        damaged). One all-gather of a few integers (each rank's outcome and the bytes it
        has read so far, by source), every rank deciding alike from the same figures; the
        messages are gathered only when some rank failed."""
        if not group.distributed:
            return mine
        code = 0 if mine is None else _KINDS.index(mine.kind) + 1
        counts = self.bytes_by_source()
        rows = group.all_gather_ints([code, *(counts.get(k, 0) for k in _SOURCES)])
        self._agreed_bytes = {k: sum(row[i + 1] for row in rows) for i, k in enumerate(_SOURCES)}
        worst = max(row[0] for row in rows)
        if worst == 0:
            return None
        messages = group.all_gather(None if mine is None else mine.message)
        kind = _KINDS[worst - 1]
        message = "; ".join(f"rank {r}: {m}" for r, (row, m) in enumerate(
            zip(rows, messages, strict=True)) if row[0] == worst)
        if mine is not None and mine.kind == kind:
            return _Outcome(kind, message, mine.error)
        return _Outcome(kind, message)

    def _check_present(self, step: int, manifest: Manifest) -> None:
        problems = verify_checkpoint(self.storage, manifest, deep=False)
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
        if payload_name(0) not in manifest.files:
            raise CorruptCheckpointError(
                f"{self.storage.display(checkpoint_dir(step))}: manifest lists no {payload_name(0)}")

    def _put_back_artifacts(self, manifest: Manifest) -> None:
        """This checkpoint's artifacts, verified, back at their local paths (one rank per
        machine: local rank 0, where torchrun says, else rank 0)."""
        local_rank = int(os.environ.get("LOCAL_RANK", self.group.rank))
        if local_rank == 0:
            restore_artifacts(self._reader, manifest, self.artifacts)

    def _load_sharded(self, manifest: Manifest, *, agreed: bool = True) -> None:
        """Model and optimizer from DCP's files, resharded to this run's world size.
        ``agreed=False``: this rank's failure is raised as is, the ranks agree later."""
        if not self.sharded:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {manifest.step} holds a sharded model (FSDP / tensor "
                "parallel) but this run's model is not sharded; shard it the same way (or "
                "pass sharded=True)"
            )
        from ..format.optim_init import init_optimizer_state
        from ..format.sharded import read_metadata, read_sharded, set_state

        assert self.sharded_state is not None
        self.progress.phase(f"reading step {manifest.step}: sharded model and optimizer")
        # DCP's index, read once for both uses below. Read here only where this rank's
        # failure may wait for the agreement after the checkpoint's phases (as the read's
        # does); where ranks agree at once (FSDP1), read_sharded reads it itself.
        metadata = None if agreed else read_metadata(self._reader, manifest)
        # From here the live objects change: the optimizer's state is made, then loaded.
        self.state_loaded_from = manifest.step
        if metadata is not None:
            # A fresh optimizer's state sized from the index, so that building the state
            # below runs no zero-gradient optimizer step (its time and memory: optim_init).
            init_optimizer_state(self.model, list(self.optimizers), metadata)
        state = self.sharded_state()  # this world size's own (empty) shards, filled in place
        read_sharded(self._reader, manifest, state, weights_only=self.weights_only, agree=agreed,
                     metadata=metadata)
        self.progress.add(sum(e.size for n, e in manifest.files.items() if not n.endswith(".pt")))
        set_state(unwrap(self.model), list(self.optimizers), state)

    def _load_payloads(self, manifest: Manifest, group: Group) -> None:
        """Rank 0's payload (shared state) and this rank's own, loaded and verified."""
        if self.sharded and not manifest.sharded:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {manifest.step} holds a replicated model but this "
                "run's model is sharded; restore it without sharding (sharded=False), or "
                "start a new run URL"
            )
        step, shared_name = manifest.step, payload_name(0)
        shared_entry = manifest.files[shared_name]
        self.progress.phase(f"reading step {step}: {shared_name} ({format_bytes(shared_entry.size)})")
        shared, verification = open_payload(self._reader, step, shared_name, shared_entry,
                                            weights_only=self.weights_only)
        self.progress.add(shared_entry.size)
        own: dict | None = shared
        if not group.is_main:
            verification.check()  # another rank's file: verified before anything is used
            mine = payload_name(group.rank)
            own = None
            if mine in manifest.files:
                entry = manifest.files[mine]
                self.progress.phase(f"reading step {step}: {mine} ({format_bytes(entry.size)})")
                own = read_payload(self._reader, step, mine, entry, weights_only=self.weights_only)
                self.progress.add(entry.size)
        # From here the live objects may hold this checkpoint's state, proven good or not.
        self.state_loaded_from = step
        try:
            self._apply(shared, own, group, step)
        except CheckpointError:
            verification.check()  # damage explains a misfit better than the misfit
            raise
        verification.check()

    def _apply(self, shared: dict, own: dict | None, group: Group, step: int) -> None:
        """Put rank 0's shared state and this rank's own into the live objects.

        A rank with no saved state of its own (the run resumes on more ranks than saved it)
        takes rank 0's copy of a :class:`~spotrun.ResumableLoader` (its position is global,
        the same on every rank) and seeds its RNGs from ``(seed, rank, step)``, so resuming
        the same checkpoint on the same world size always gives the same streams. Other
        per-rank objects start fresh, with a warning.
        """
        if shared.get("format", 0) > PAYLOAD_FORMAT:
            raise UnsupportedFormatError(
                f"checkpoint payload format {shared.get('format')} is newer than this spotrun "
                "understands; upgrade spotrun"
            )
        saved_objects = shared.get("objects", {})
        for name, obj in self.replicated.items():
            if name not in saved_objects:
                raise CheckpointError(
                    f"checkpoint has no state for {name!r} (it has {sorted(saved_objects)}); "
                    "pass the same objects under the same names as the run that saved it"
                )
            load_object_state(name, obj, saved_objects[name])
        self.values.update(shared.get("values", {}))
        if own is None:
            self._start_new_rank(shared, group, step)
            return
        for name, obj in self.per_rank.items():
            if name in own.get("per_rank", {}):
                load_object_state(name, obj, own["per_rank"][name])
            else:
                log.warning("checkpoint has no %r state for rank %d; it starts fresh",
                            name, group.rank)
        if self.save_rng and "rng" in own:
            restore_rng_state(own["rng"])

    def _start_new_rank(self, shared: dict, group: Group, step: int) -> None:
        """A rank the checkpoint had no files for: global state from rank 0, a fresh seed."""
        seed = 0
        for name, obj in self.per_rank.items():
            inner = unwrap(obj)
            if isinstance(inner, ResumableLoader) and name in shared.get("per_rank", {}):
                load_object_state(name, obj, shared["per_rank"][name])
                seed = inner.seed
            else:
                log.warning("checkpoint has no %r state for rank %d (it was saved by fewer "
                            "ranks); it starts fresh", name, group.rank)
        if self.save_rng:
            seed_everything(rank_seed(seed, group.rank, step))


# Outcome codes in the one agreement, worse later (0: loaded), and the byte sources.
_KINDS = ("damaged", "unreadable", "error")
_SOURCES = ("local", "peer", "url")


def _loads_without_collectives(model: Any) -> bool:
    """Whether building and loading ``model``'s sharded state runs no collective (DTensors:
    FSDP2, tensor parallel); FSDP1's sharded state dicts gather and scatter."""
    from ..format.sharded import loads_without_collectives

    return loads_without_collectives(model)


class _Outcome:
    """Why one restore phase failed on a rank: ``damaged`` (skip to an older checkpoint),
    ``unreadable`` (stop, change nothing) or ``error`` (anything else: stop)."""

    def __init__(self, kind: str, message: str, error: BaseException | None = None) -> None:
        self.kind, self.message, self.error = kind, message, error

    def __reduce__(self) -> tuple:  # broadcast between ranks without the exception
        return (_Outcome, (self.kind, self.message))

