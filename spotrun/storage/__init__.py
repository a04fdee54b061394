"""Access to a run URL through fsspec: local disk, ``s3://``, ``memory://`` or any backend.

Everything above this module speaks in paths *relative to the run URL*
(``"000000000100/manifest.json"``) and never touches fsspec directly, so a backend's
quirks (listing caches, non-atomic local writes, S3's lack of rename) are handled once, here.

Layout: :mod:`.base` holds the :class:`Storage` front and what every backend shares; one
module a backend does the rest: :mod:`.local` (local disk), :mod:`.s3` (S3) and
:mod:`.fsspec` (every other fsspec filesystem). Which backend a URL gets is a registry
``protocol -> Backend class`` (:func:`available_backends`) whose built-in entries are
``"module:Class"`` strings imported on first use; :func:`register_backend` adds one, and a
protocol not registered uses the generic fsspec backend. Each backend checks its own options
(S3's part size, concurrency and retries are the S3 backend's).

Atomicity, per backend:

* local disk: write to a temporary name in the same directory, ``fsync``, ``os.replace``,
  then ``fsync`` the directory, so a crash leaves either the old file or the new one;
* object stores: an object only becomes visible when its PUT (or multipart completion)
  succeeds, so a plain write is already all-or-nothing (and a rename would be a full copy);
* ``memory://`` and every other backend: written under a temporary name, then moved, since
  their files may be visible from the moment they are opened.

Speed (``s3://``): a write smaller than one part is a single PUT; a larger one is a multipart
upload with up to ``concurrency`` parts in flight (each from a thread of its own, with its
CRC32C as S3's ``ChecksumCRC32C``) while the caller keeps producing bytes,
completed only when every part is in and aborted on any failure, so an object never appears
half-written and no multipart upload is left behind. A large read is ``concurrency`` ranged
GETs into one preallocated buffer. Memory: a write holds at most ``(concurrency + 1) x part_size`` bytes of buffers
(9 x 16 MiB = 144 MiB by default) whatever the object's size; a read holds the object itself
and nothing more than small socket reads besides. Knobs: the constructor's ``part_size`` and
``concurrency``, else ``SPOTRUN_S3_PART_MIB``, ``SPOTRUN_S3_CONCURRENCY``,
``SPOTRUN_S3_RETRIES`` (see :mod:`spotrun.config`).

Nothing waits forever (``s3://``), and the retry layers do not multiply:

* every request has a connect and a read timeout (``SPOTRUN_S3_CONNECT_TIMEOUT``, 10 s;
  ``SPOTRUN_S3_READ_TIMEOUT``, 60 s of silence on the socket);
* botocore retries each request (standard mode: throttling, 5xx, timeouts, dropped
  connections) up to ``SPOTRUN_S3_ATTEMPTS`` attempts in all (3), with its exponential
  backoff (at most 1 + 2 s between them);
* s3fs's own retry loop (5 more rounds of all of the above, which made a throttled read
  retry for minutes) is turned off;
* parts and ranges, which a long transfer cannot afford to lose, get ``SPOTRUN_S3_RETRIES``
  more rounds (3) with exponential backoff, and none starts, and a running read is cut,
  once ``SPOTRUN_S3_RETRY_SECONDS`` (120 s) have passed since the first try (a part sent
  from an upload thread cannot be cut; the timeouts above bound it).

So a throttled or failing request gives up after about 15 s (at most
``SPOTRUN_S3_RETRY_SECONDS`` plus one attempt), and a silent endpoint after at most
attempts x (connect + read timeout), with :class:`~spotrun.errors.StorageUnavailableError`
naming the URL, what was retried and for how long. Timeouts and retry settings the caller
passes in ``storage_options["config_kwargs"]`` win over these defaults.
"""

from __future__ import annotations

from .._lazy import lazy_names
from .base import (
    URL_ENV,
    Backend,
    HashingWriter,
    MiB,
    Storage,
    available_backends,
    backend_class,
    open_storage,
    register_backend,
    translate_errors,
)

# The backends' own public names, imported from their module on first use, so that
# ``import spotrun.storage`` (a run on local disk) loads no backend it does not use.
_LAZY = {
    "LocalBackend": ".local",
    "fsync_dir": ".local",
    "FsspecBackend": ".fsspec",
    "ObjectStoreBackend": ".fsspec",
    "S3Backend": ".s3",
    "DEFAULT_ATTEMPTS": ".s3",
    "DEFAULT_CONCURRENCY": ".s3",
    "DEFAULT_CONNECT_TIMEOUT_S": ".s3",
    "DEFAULT_PART_MIB": ".s3",
    "DEFAULT_READ_TIMEOUT_S": ".s3",
    "DEFAULT_RETRIES": ".s3",
    "DEFAULT_RETRY_SECONDS": ".s3",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__all__ = [
    "URL_ENV",
    "Backend",
    "FsspecBackend",
    "HashingWriter",
    "LocalBackend",
    "MiB",
    "ObjectStoreBackend",
    "S3Backend",
    "Storage",
    "available_backends",
    "backend_class",
    "open_storage",
    "register_backend",
    "translate_errors",
]
