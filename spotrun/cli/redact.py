"""Nothing secret in the command's logs, at any verbosity.

botocore's DEBUG logging prints each request's canonical request, string to sign and headers:
the access key id (in ``Credential=``), the session token (``X-Amz-Security-Token``) and the
signature. ``spotrun -vv`` wants spotrun's own debug lines, not those, so two layers:

1. the SDK loggers (botocore, aiobotocore, s3fs, urllib3, ...) are never louder than the
   command's level and never below INFO, even at ``-vv`` (``SPOTRUN_SDK_DEBUG=1`` lets their
   debug lines through, still redacted, for debugging the SDK). At the default level they are
   at WARNING: "Found credentials in environment variables" is not news before a one-line
   error;
2. a filter on every root handler rewrites any record that still carries a credential: the
   values of this process's ``AWS_*`` credential variables, access key id shapes,
   ``Credential=...``, ``Signature=...``, security-token headers and every token shape of
   :mod:`spotrun.secret_shapes` (the ones ``launch --env`` refuses).
"""

from __future__ import annotations

import logging
import os
import re

from ..secret_shapes import TOKEN_SHAPES

__all__ = ["RedactingFilter", "quiet_secrets", "redact"]

SDK_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "aiohttp")
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    # Authorization: AWS4-HMAC-SHA256 Credential=KEY/date/..., SignedHeaders=..., Signature=hex
    re.compile(r"(Credential=)[^,\s'\"]+", re.IGNORECASE),
    re.compile(r"(Signature=)[0-9a-f]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Credential=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(x-amz-security-token:)[^\n]+", re.IGNORECASE),
    # The shapes `spotrun launch --env` refuses (JWTs, sk_live_ keys, Slack webhooks...).
    TOKEN_SHAPES,
)
MASK = "<redacted>"


def _known_values() -> list[str]:
    # Short values (a test's "testing") would mangle ordinary words; real ones are long.
    return [v for v in (os.environ.get(n, "") for n in _CREDENTIAL_VARS) if len(v) >= 12]


def redact(text: str) -> str:
    """``text`` with every credential-shaped substring replaced by ``<redacted>``."""
    for value in _known_values():
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's final message (args merged, exception text included) redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def quiet_secrets(level: int = logging.WARNING) -> None:
    """Put the SDK loggers at ``level`` but never below INFO (so never louder than the
    command's own level), and a :class:`RedactingFilter` on every root handler."""
    sdk_level = level if os.environ.get("SPOTRUN_SDK_DEBUG") == "1" else max(level, logging.INFO)
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(sdk_level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
