"""The ``spotrun`` command: argument parsing only; every command calls the library.

Exit codes of the CLI itself (a training command's own codes are in ``spotrun.layout``):

* 0  success (``verify``: every checkpoint intact; ``check-resume``: PASS)
* 1  the command ran and found a problem (damage, FAIL, a failed run)
* 2  bad usage or configuration (a one-line error says which and how to fix it)
* 130  interrupted by Ctrl-C
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import SpotrunError

__all__ = ["main"]

# Each module defines ``register(subparsers)``, adding its commands with
# ``set_defaults(func=handler)``; a handler takes the parsed args and returns an exit code.
# Modules keep heavy imports (torch, boto3) inside handlers so ``--help`` stays fast.
_COMMAND_MODULES = ("checkpoints", "launch", "cost")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="spotrun",
        description="Keep PyTorch training alive on spot capacity and report what spot saved.",
    )
    parser.add_argument("--version", action="version", version=f"spotrun {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("spotrun").setLevel(min(level, logging.INFO))
    try:
        return int(args.func(args) or 0)
    except SpotrunError as exc:
        print(f"spotrun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spotrun: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
