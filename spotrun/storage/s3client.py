"""A thread-safe (synchronous) botocore S3 client that is s3fs's own client in every way
that matters: the same credentials, endpoint, region, timeouts and retry settings.

Why a second client: s3fs's aiobotocore client runs every request on fsspec's one event-loop
thread, which also signs each part (SHA-256 of the payload over plain HTTP) and pushes it
through aiohttp. On a few cores that one thread is the limit of a multipart upload (0.65-0.69x
boto3's ``upload_fileobj`` here). A botocore client is thread-safe, and hashlib, the CRC and
socket writes release the GIL, so parts sent from a thread pool use every core.

How it stays "the same client":

* credentials are read, for every request botocore signs, from the live aiobotocore
  client's own credentials object (through the s3fs loop: aiobotocore's are coroutines), so
  whatever s3fs resolved (keys passed in, a profile, an instance role, and its refreshes)
  signs these requests too; an anonymous s3fs (``anon=True``) gives an unsigned client;
* ``client_kwargs`` (endpoint, ``verify``, ...), ``endpoint_url`` and ``use_ssl`` are passed
  exactly as s3fs passes them, the region is the one s3fs resolved for the bucket, and the
  ``config_kwargs`` (spotrun's timeouts and botocore retry settings, see
  :func:`spotrun.storage.s3._s3_client_options`) become the client's ``Config``; a profile
  given to s3fs is this session's profile, so endpoint settings from the config file and
  ``AWS_ENDPOINT_URL`` apply the same way.

Two settings differ on purpose: enough pooled connections for the parts in flight, and
``request_checksum_calculation="when_required"``, because every part carries spotrun's own
CRC32C (botocore would otherwise compute a CRC32 of each part on top).
"""

from __future__ import annotations

import inspect
from typing import Any

import botocore.session
from botocore import UNSIGNED
from botocore.config import Config
from botocore.credentials import CredentialProvider, Credentials
from botocore.exceptions import NoCredentialsError
from fsspec.asyn import sync


class _LoopCredentials(Credentials):
    """botocore credentials that defer to an aiobotocore credentials object.

    botocore asks ``get_frozen_credentials()`` for every request it signs; answering from
    the aiobotocore object (which refreshes itself) keeps both clients on one identity.
    """

    method = "spotrun-s3fs"

    def __init__(self, source: Any, loop: Any) -> None:
        self._source = source
        self._loop = loop
        frozen = self.get_frozen_credentials()
        super().__init__(frozen.access_key, frozen.secret_key, frozen.token,
                         method=self.method)

    def get_frozen_credentials(self) -> Any:
        getter = self._source.get_frozen_credentials
        return sync(self._loop, getter) if inspect.iscoroutinefunction(getter) else getter()


class _FixedProvider(CredentialProvider):
    METHOD = "spotrun-s3fs"
    CANONICAL_NAME = "spotrun-s3fs"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


def threaded_client(fs: Any, bucket: str, max_connections: int) -> Any:
    """A botocore S3 client mirroring ``fs`` (an ``s3fs.S3FileSystem``) for ``bucket``,
    with at least ``max_connections`` pooled connections. Thread-safe; not fork-safe (its
    connections belong to this process)."""
    sync(fs.loop, fs.set_session)
    aio = sync(fs.loop, fs.get_s3, bucket)
    session = botocore.session.Session(profile=(getattr(fs, "kwargs", None) or {}).get("profile"))
    options = {k: v for k, v in (fs.config_kwargs or {}).items() if k in Config.OPTION_DEFAULTS}
    options.setdefault("connect_timeout", fs.connect_timeout)
    options.setdefault("read_timeout", fs.read_timeout)
    if fs.anon:
        options["signature_version"] = UNSIGNED
    else:
        # The credentials aiobotocore signs s3fs's requests with (private attribute of a
        # botocore RequestSigner, stable for years); else the session's chain.
        source = getattr(getattr(aio, "_request_signer", None), "_credentials", None)
        if source is None:
            source = sync(fs.loop, fs.session.get_credentials)
        if source is None:
            # As s3fs's own calls would fail: spotrun reports it as CredentialsError.
            raise NoCredentialsError()
        resolver = session.get_component("credential_provider")
        resolver.providers.insert(0, _FixedProvider(_LoopCredentials(source, fs.loop)))
    options["max_pool_connections"] = max(max_connections,
                                          int(options.get("max_pool_connections") or 10))
    # Every part carries spotrun's CRC32C; botocore computing a CRC32 as well would only
    # cost CPU (it is what "when_supported", botocore's default since 1.36, does).
    options["request_checksum_calculation"] = "when_required"
    kwargs = {k: v for k, v in (fs.client_kwargs or {}).items()
              if k not in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                           "config")}
    if fs.endpoint_url and not kwargs.get("endpoint_url"):
        kwargs["endpoint_url"] = fs.endpoint_url
    kwargs.setdefault("use_ssl", fs.use_ssl)
    kwargs["region_name"] = aio.meta.region_name
    client = session.create_client("s3", config=Config(**options), **kwargs)
    client.meta.events.register("before-sign.s3.UploadPart", _declare_checksum_header)
    return client


def _declare_checksum_header(request: Any, **_: Any) -> None:
    """Tell botocore's signer that the part carries a checksum header.

    Over TLS botocore skips the SHA-256 of a streamed payload (about 1 GB/s a core) when
    the request has a checksum header, but it only knows of checksums it computed itself;
    one the caller passes (``ChecksumCRC32C``) is not registered, so every part would be
    hashed for the signature as well. Over plain HTTP botocore signs the payload anyway.
    """
    name = "x-amz-checksum-crc32c"
    if name in request.headers:
        checksum = request.context.setdefault("checksum", {})
        checksum.setdefault("request_algorithm",
                            {"algorithm": "crc32c", "in": "header", "name": name})
