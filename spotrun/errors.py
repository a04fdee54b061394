"""Every exception spotrun raises on purpose.

Catch :class:`SpotrunError` to handle them all. Each message is one line that names the
problem and, where there is one, the fix.

::

    SpotrunError
    ├── ConfigError                  a bad argument, option or environment variable
    │   ├── StorageURLError          a run URL that cannot be parsed or has no backend
    │   └── UnloadableStateError     saved state that a weights_only load would refuse
    ├── StorageError                 reading or writing the run URL failed
    │   ├── StorageNotFoundError     the bucket or directory does not exist
    │   ├── CredentialsError         no usable cloud credentials
    │   ├── StorageUnavailableError  still throttled, failing or silent after bounded retries
    │   └── CheckpointUnreadableError  a checkpoint could not be read (access, network)
    ├── CheckpointError              a checkpoint cannot be used
    │   ├── NoCheckpointError        no committed checkpoint at the run URL
    │   ├── CorruptCheckpointError   sizes, hashes or steps do not match its manifest
    │   ├── IncompatibleCheckpointError  its tensors do not fit the model (key, shapes)
    │   ├── UnsupportedFormatError   written by a newer spotrun than this one
    │   └── AllCheckpointsDamagedError  every checkpoint failed verification
    ├── SaveError                    a save (often a background one) failed
    ├── NoticeError                  an interruption-notice source misbehaved
    │   └── MetadataBusyError        a metadata service answered with a passing error: retry
    ├── CostError                    a cost report or estimate cannot be computed
    │   ├── PriceUnavailableError    no price source could answer
    │   └── LedgerRecordError        a run-ledger record the cost report cannot use
    ├── LaunchError                  the launcher could not keep the run going
    │   ├── CapacityError            no spot or on-demand capacity in any pool
    │   ├── ClusterWaitError         a node's cluster file never came (multi-node)
    │   └── EndpointUnreachableError  the cloud API could not be reached at all
    └── LeaseError                   the run's one-writer lease (see spotrun.records.lease)
        ├── LeaseHeldError           another live trainer is writing this run
        └── LeaseLostError           another trainer took this run over: no more commits

Each class carries the ``spotrun`` command's exit code for it (:attr:`SpotrunError.exit_code`):
2 (bad usage, configuration or environment) unless a subclass says otherwise; the launcher's
"the run could not go on" errors are 1. The CLI maps exceptions to codes only through it.
"""

from __future__ import annotations

__all__ = [
    "AllCheckpointsDamagedError",
    "CapacityError",
    "CheckpointError",
    "CheckpointUnreadableError",
    "ClusterWaitError",
    "ConfigError",
    "CorruptCheckpointError",
    "CostError",
    "CredentialsError",
    "EndpointUnreachableError",
    "IncompatibleCheckpointError",
    "LaunchError",
    "LeaseError",
    "LeaseHeldError",
    "LeaseLostError",
    "LedgerRecordError",
    "LoaderUsageError",
    "MetadataBusyError",
    "NoCheckpointError",
    "NoticeError",
    "PriceUnavailableError",
    "SaveError",
    "SpotrunError",
    "StorageError",
    "StorageNotFoundError",
    "StorageURLError",
    "StorageUnavailableError",
    "UnloadableStateError",
    "UnsupportedFormatError",
]


class SpotrunError(Exception):
    """Base of every error spotrun raises on purpose."""

    #: The ``spotrun`` command's exit code when this error ends it: 2 is "bad usage or
    #: configuration; the one-line message says what to fix".
    exit_code: int = 2


class ConfigError(SpotrunError, ValueError):
    """A bad argument, option or environment variable."""


class LoaderUsageError(ConfigError, TypeError, RuntimeError):
    """A :class:`~spotrun.ResumableLoader` given arguments or used in a way that would lose
    its position or its order (its own sampler replaced, a stale iterator used again).
    Also a TypeError/RuntimeError, what these cases raised before."""


class StorageURLError(ConfigError):
    """A run URL that cannot be parsed or names no installed fsspec backend."""


class StorageError(SpotrunError, OSError):
    """Reading or writing the run URL failed."""


class StorageNotFoundError(StorageError):
    """The bucket or directory behind a run URL does not exist."""


class CredentialsError(StorageError):
    """No usable cloud credentials were found."""


class CheckpointError(SpotrunError):
    """A checkpoint cannot be used."""


class NoCheckpointError(CheckpointError):
    """No committed checkpoint exists at the run URL."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match the sizes and hashes in its manifest, or its
    manifest or payload names another step than its folder (it cannot be parsed, or was
    copied from another checkpoint)."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint's state does not fit the object it is loaded into."""


class UnsupportedFormatError(CheckpointError):
    """A manifest written in a newer format than this spotrun understands."""


class SaveError(SpotrunError):
    """A save failed; the previous committed checkpoint is untouched."""


class NoticeError(SpotrunError):
    """An interruption-notice source misbehaved."""


class CostError(SpotrunError):
    """A cost report or estimate cannot be computed."""


class PriceUnavailableError(CostError):
    """No price source (API, cache, shipped snapshot, override) could answer."""


class LedgerRecordError(CostError, ValueError):
    """A run-ledger record whose fields do not fit its event (a NaN or out-of-range time,
    a string where a number belongs, an unknown end reason). The cost report skips it with
    a warning naming the record and prices the rest."""


class LaunchError(SpotrunError):
    """The launcher could not keep the run going."""

    #: The launch ran and could not go on (no capacity, a refused call): a failed run.
    exit_code = 1


class ClusterWaitError(LaunchError):
    """A node of a multi-node job waited for its cluster file (``launch/nodes/<id>.json``)
    and none came, or the one that came does not name it."""


class CapacityError(LaunchError):
    """No spot or on-demand capacity could be had in any allowed pool."""


class EndpointUnreachableError(LaunchError):
    """The cloud API (EC2, SSM) could not be reached at all: connection refused, DNS, a
    wrong ``--region`` or ``AWS_ENDPOINT_URL``. Nothing was changed by the failed call; fix
    the network or endpoint and run again."""

    exit_code = 2


class MetadataBusyError(NoticeError):
    """A metadata service answered with a passing error (HTTP 5xx, 429, 408): it is there
    and struggling, so keep watching and retry with backoff; never a reason to give up."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status



class LeaseError(SpotrunError):
    """The run URL's single-writer lease could not be taken or kept."""


class LeaseHeldError(LeaseError):
    """Another trainer, alive or not yet known to be gone, holds the run's lease."""


class LeaseLostError(LeaseError):
    """This process's lease was taken over: it must not write or commit again."""


class StorageUnavailableError(StorageError):
    """The store kept throttling (503 SlowDown), failing (5xx) or not answering (timeouts,
    dropped connections) through every bounded retry. Nothing is wrong with the data: try
    again later, or give the retries more room (``SPOTRUN_S3_RETRIES``,
    ``SPOTRUN_S3_RETRY_SECONDS``, ``SPOTRUN_S3_ATTEMPTS``)."""


class UnloadableStateError(ConfigError):
    """State that ``torch.load(weights_only=True)`` would refuse, caught at save time.

    Saving it would succeed and every resume would then fail, leaving the run stuck; the
    message names the key path and how to store the value instead.
    """


class CheckpointUnreadableError(StorageError):
    """A checkpoint could not be read for a reason that is not damage.

    Access denied, a network failure or throttling that outlasted the retries says nothing
    about the checkpoint itself, so it is not skipped: the start is refused and nothing in
    storage is changed. Fix access and start again.
    """


class AllCheckpointsDamagedError(CheckpointError):
    """Every checkpoint at the run URL failed verification, so the run refuses to start.

    Starting from step 0 would throw the run away; pass ``if_all_damaged="start_fresh"``
    (or set ``SPOTRUN_IF_ALL_DAMAGED=start_fresh``) to do it anyway: the damaged folders
    are moved aside under ``damaged/`` first, never overwritten.
    """
