"""Every environment variable spotrun reads, in one place.

Arguments passed in code always win over the environment; the environment wins over the
defaults below. Read them through these helpers so a bad value fails with one clear line.

=============================  ==========================================================
``SPOTRUN_URL``                the run URL when none is passed
``SPOTRUN_NOTICE_SOURCE``      ``auto`` (default), ``ec2``, ``gcp``, ``azure`` or ``none``
``SPOTRUN_IMDS_ENDPOINT``      EC2 metadata base URL (default ``http://169.254.169.254``)
``SPOTRUN_GCP_METADATA_ENDPOINT``  GCP metadata base URL
``SPOTRUN_AZURE_METADATA_ENDPOINT``  Azure IMDS base URL
``SPOTRUN_POLL_INTERVAL``      seconds between metadata polls (default 5, AWS's advice)
``SPOTRUN_REBALANCE``          on a rebalance recommendation: ``checkpoint`` (default),
                               ``stop`` or ``ignore``
``SPOTRUN_SEGMENT_ID``         set by the launcher so ledger records join its segment
``SPOTRUN_RUN_ID``             set on EC2 instances by the launcher's boot script (the tag)
``SPOTRUN_PYTHON``             boot script: the interpreter that records exit codes
                               (default ``python3`` on PATH)
``SPOTRUN_LOG``                boot script: where the instance logs (``/var/log/spotrun.log``)
``SPOTRUN_CACHE_DIR``          where ``prices.json`` (cached AWS price answers) lives
                               (default ``$XDG_CACHE_HOME/spotrun`` or ``~/.cache/spotrun``)
``SPOTRUN_S3_PART_MIB``        S3 multipart part size and ranged-read size in MiB
                               (default 16; 5 to 5120, S3's limits)
``SPOTRUN_S3_CONCURRENCY``     S3 parts or ranges in flight per transfer (default 8); a
                               write holds at most (this + 1) x part size of buffers
``SPOTRUN_S3_RETRIES``         extra tries per S3 part/range after botocore's own retries,
                               on throttling, 5xx and dropped connections (default 3)
``SPOTRUN_S3_RETRY_SECONDS``   time limit on those extra tries: none starts (and one
                               running is cut) this long after the first (default 120)
``SPOTRUN_S3_ATTEMPTS``        botocore's attempts per S3 request, in all (standard retry
                               mode; default 3); used unless ``config_kwargs`` has ``retries``
``SPOTRUN_S3_CONNECT_TIMEOUT`` seconds to open a connection to S3 (default 10)
``SPOTRUN_S3_READ_TIMEOUT``    seconds of silence on an S3 connection before the request
                               fails and is retried (default 60)
``SPOTRUN_STOP_TIMEOUT``       after a signal (or a stop without a known deadline), how long
                               the stop checkpoint may take, counted from the signal
                               (default 90: EC2 gives 120 s)
``SPOTRUN_STOP_MARGIN``        after a notice with a deadline, the stop checkpoint must
                               commit this many seconds before it (default 10)
``SPOTRUN_IF_ALL_DAMAGED``     ``fail`` (default) or ``start_fresh``: what a restore does when
                               every checkpoint failed verification (see the Checkpointer)
``SPOTRUN_LEDGER_FLUSH_S``     longest wait at exit for queued ledger records (default 5)
``SPOTRUN_RESTORE_PROGRESS_S`` seconds between progress lines while a restore reads its
                               checkpoint (default 10; 0 for none)
``SPOTRUN_EXIT_NOTES``         set by ``python -m spotrun.distributed`` for its workers: where
                               they note a committed stop (torchrun does not report codes)
``SPOTRUN_KEEP_ALL_CHECKPOINTS``  set by ``spotrun check-resume`` for the runs it compares:
                               retention (``keep_last``) deletes nothing
``SPOTRUN_LEASE_TTL``          seconds a run's writer lease lives without a heartbeat
                               (default 30): how long a relaunch elsewhere may wait for a
                               writer that vanished without releasing it
``SPOTRUN_LEASE_HEARTBEAT``    seconds between lease renewals (default TTL / 3)
``SPOTRUN_LEASE_WAIT``         longest a new writer waits for a lease whose owner may be
                               gone to expire (default: TTL + heartbeat); 0 refuses at once
``SPOTRUN_LEASE_TAKEOVER``     set by a launcher: comma-separated segment ids whose
                               processes it saw end; their lease is taken over at once
``SPOTRUN_LOCAL_DIR``          where each save also leaves this machine's copy of the newest
                               checkpoint, read back on a restart when it matches the manifest
                               (default ``/dev/shm/spotrun``; ``off`` for none; see
                               :mod:`spotrun.recovery.local`)
=============================  ==========================================================
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from . import validate
from .errors import ConfigError

__all__ = ["DEFAULT_STOP_MARGIN_S", "DEFAULT_STOP_TIMEOUT_S", "IF_ALL_DAMAGED_ENV", "StopKnobs",
           "env_choice", "env_float", "env_float_or_default", "env_int", "env_str",
           "if_all_damaged", "restore_progress_s", "stop_knobs"]

#: ``SPOTRUN_STOP_TIMEOUT``: EC2 gives two minutes from notice to shutdown; leave room.
DEFAULT_STOP_TIMEOUT_S = 90.0
#: ``SPOTRUN_STOP_MARGIN``: time to log, write the ledger and exit before the deadline.
DEFAULT_STOP_MARGIN_S = 10.0
#: ``SPOTRUN_RESTORE_PROGRESS_S``: a progress line this often while a restore reads.
DEFAULT_RESTORE_PROGRESS_S = 10.0
#: What a restore does when every checkpoint is damaged, for launchers and wrappers that
#: cannot change the training code (``Checkpointer(if_all_damaged=...)`` wins over it).
IF_ALL_DAMAGED_ENV = "SPOTRUN_IF_ALL_DAMAGED"
IF_ALL_DAMAGED_CHOICES = ("fail", "start_fresh")


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {default}") from None


def env_float_or_default(name: str, default: float) -> float:
    """:func:`env_float` for the way out (stop checkpoint, ledger flush), where a bad value
    must not cost the exit: the default instead, with a warning naming the variable."""
    try:
        return env_float(name, default)
    except ConfigError as exc:
        logging.getLogger(__name__).warning("%s; using %g", exc, default)
        return default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; set it to e.g. {default}") from None


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class StopKnobs:
    """The stop checkpoint's bounds, read once when a run segment starts."""

    #: ``SPOTRUN_STOP_TIMEOUT``: seconds from a signal (or a stop with no known deadline).
    timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    #: ``SPOTRUN_STOP_MARGIN``: seconds before a notice's deadline the commit must land.
    margin_s: float = DEFAULT_STOP_MARGIN_S
    #: ``SPOTRUN_LEDGER_FLUSH_S``: longest wait on the way out for queued ledger records.
    ledger_flush_s: float = 5.0


def _env_number(name: str, default: float, example: str) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return validate.number(raw, name, minimum=0, example=example)


def stop_knobs() -> StopKnobs:
    """The stop bounds from the environment, checked: a value that is not a finite number
    of seconds >= 0 is refused with one line (ConfigError) when the segment starts, rather
    than discovered at the stop, where the only choice left would be to guess."""
    return StopKnobs(
        timeout_s=_env_number("SPOTRUN_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT_S, "90"),
        margin_s=_env_number("SPOTRUN_STOP_MARGIN", DEFAULT_STOP_MARGIN_S, "10"),
        ledger_flush_s=_env_number("SPOTRUN_LEDGER_FLUSH_S", 5.0, "5"),
    )


def restore_progress_s() -> float:
    """``SPOTRUN_RESTORE_PROGRESS_S``, checked (0 turns the progress lines off)."""
    return _env_number("SPOTRUN_RESTORE_PROGRESS_S", DEFAULT_RESTORE_PROGRESS_S, "10")


def if_all_damaged(argument: str | None = None) -> str:
    """The all-damaged policy: ``argument`` when given, else ``$SPOTRUN_IF_ALL_DAMAGED``,
    else ``"fail"``; anything but ``fail``/``start_fresh`` is refused."""
    if argument is None:
        return env_choice(IF_ALL_DAMAGED_ENV, IF_ALL_DAMAGED_CHOICES, "fail")
    if argument not in IF_ALL_DAMAGED_CHOICES:
        raise ConfigError(f"if_all_damaged={argument!r} must be 'fail' or 'start_fresh'")
    return argument
