"""The ``spotrun`` command: argument parsing only; every command calls the library.

Exit codes of the CLI itself (a training command's own codes are in ``spotrun.records.layout``):

* 0  success (``verify``: every checkpoint intact; ``check-resume``: PASS)
* 1  the command ran and found a problem (damage, FAIL, a failed run)
* 2  bad usage or configuration (a one-line error says which and how to fix it)
* 130  interrupted by Ctrl-C

Every :class:`~spotrun.errors.SpotrunError` carries its code (``exit_code``); :func:`main`
maps exceptions to codes through it and nothing else. An error from outside spotrun that a
user's input caused (a missing file, a NUL byte in a path, options a backend rejects) is one
line and exit 2 too; its traceback is logged at ``-vv``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import ConfigError, SpotrunError

__all__ = ["main"]

# Each module defines ``register(subparsers)``, adding its commands with
# ``set_defaults(func=handler)``; a handler takes the parsed args and returns an exit code.
# Modules keep heavy imports (torch, boto3) inside handlers so ``--help`` stays fast.
_COMMAND_MODULES = ("checkpoints", "launch", "cost", "logs")


class _Parser(argparse.ArgumentParser):
    """argparse with spotrun's error form: one line and exit 2, pointing at ``--help``,
    rather than a usage block several lines long above the line that matters. Subcommand
    parsers are of the same class (``add_subparsers`` uses the parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"spotrun: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="spotrun",
        description="Keep PyTorch training alive on spot capacity and report what spot saved.",
    )
    parser.add_argument("--version", action="version", version=f"spotrun {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="-v: also other libraries' INFO lines (botocore, s3fs...); -vv: spotrun's debug "
        "lines and the traceback behind a one-line error (default: spotrun's progress, warnings "
        "and errors)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


# Run URLs and paths the commands take; checked before any command runs (and so before
# anything contacts a cloud).
_PATH_ARGS = ("url", "run_url", "resume", "workdir", "name")


def check_path_args(args: argparse.Namespace) -> None:
    """Refuse NUL bytes in any path and http(s):// run URLs, with a one-line fix."""
    for attr in _PATH_ARGS:
        value = getattr(args, attr, None)
        if not isinstance(value, str):
            continue
        flag = attr if attr == "url" else "--" + attr.replace("_", "-")
        if "\x00" in value:
            raise ConfigError(f"{flag} {value!r} contains a NUL byte, which no path may hold; remove it")
        if attr in ("url", "run_url", "resume") and value.lower().startswith(("http://", "https://")):
            raise ConfigError(
                f"{flag} {value!r}: http(s):// is read-only and cannot hold a run; use s3://bucket/prefix "
                "(for an S3-compatible server, set AWS_ENDPOINT_URL or --storage-options "
                "'{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'), gs://, az:// or a path"
            )


def _foreign_error_line(exc: BaseException) -> str | None:
    """One line for an exception from outside spotrun that the user's input caused, or None."""
    if isinstance(exc, FileNotFoundError):
        name = exc.filename if exc.filename is not None else exc
        return f"{name}: no such file or directory; check the path (or the command after --)"
    if isinstance(exc, PermissionError):
        name = exc.filename if exc.filename is not None else exc
        return f"{name}: permission denied; check the path and its permissions"
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return "a path contains a NUL byte, which no path may hold; remove it"
    if isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
        return f"{exc}; pass only options the storage backend accepts (--storage-options)"
    if isinstance(exc, (OSError, ValueError)):
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("spotrun").setLevel(min(level, logging.INFO))
    from .redact import quiet_secrets

    quiet_secrets(level)
    try:
        check_path_args(args)
        return int(args.func(args) or 0)
    except SpotrunError as exc:
        print(f"spotrun: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spotrun: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = _foreign_error_line(exc)
        if line is None:
            raise
        logging.getLogger("spotrun").debug("traceback of the error below", exc_info=True)
        print(f"spotrun: error: {' '.join(line.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
