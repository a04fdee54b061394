"""`spotrun logs RUN_URL`: print a run's shipped output (see :mod:`spotrun.launch.logs`).

The output is untrusted bytes: terminal control sequences in it are shown escaped, not
obeyed (:mod:`spotrun.cli.terminal`); ``--raw`` writes the bytes exactly as shipped.

Exit codes: 0 printed; 2 no run or no logs at the URL, or an unknown --segment/--node (one
line on stderr lists the known ones); 130 Ctrl-C during --follow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .. import validate
from .terminal import TerminalSanitizer


def _node(text: str) -> int:
    value = text.removeprefix("node-")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a node rank (0, 1, ... or node-0)")
    return int(value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logs",
        help="print a run's output (shipped to RUN_URL/logs/ by the launcher), from anywhere",
        description="Print the output of a run's command, as the launcher shipped it to "
        "RUN_URL/logs/<segment>/node-<N>/ (locally or from each instance): segments in the "
        "order they ran, then nodes. With more than one segment or node, a '==> SEGMENT "
        "node-N <==' line starts each one's output. Output arrives in chunks (every few "
        "seconds), so the newest lines of a live run may lag a little. Control characters in "
        "the output (escape sequences that set the window title, write the clipboard, clear "
        "the screen...) are printed as visible escapes like \\x1b, colours are kept and a "
        "carriage return ends a line; --raw writes the bytes exactly as shipped.",
    )
    p.add_argument("url", metavar="RUN_URL", help="the run URL (a path or s3://bucket/prefix)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new output until the run is over (Ctrl-C to stop)")
    p.add_argument("--segment", metavar="S", help="only this segment (e.g. sim-2 or an instance id)")
    p.add_argument("--node", type=_node, metavar="R", help="only this node rank (0, 1, ...)")
    p.add_argument("--raw", action="store_true",
                   help="write the shipped bytes unchanged, control sequences included (for a file or "
                   "a program, not a terminal)")
    p.add_argument("--interval", type=validate.argparse_type(validate.duration, "--interval", allow_minimum=False),
                   default=2.0, metavar="SECONDS",
                   help="with --follow: seconds between polls (default 2)")
    p.set_defaults(func=_logs)


def _logs(args: argparse.Namespace) -> int:
    from ..launch.logs import (
        check_log_selection,
        follow_logs,
        read_logs,
        require_run,
        with_headers,
    )
    from ..storage import open_storage

    storage = open_storage(args.url)
    out = sys.stdout.buffer
    clean = None if args.raw else TerminalSanitizer()
    try:
        if args.follow:
            require_run(storage)
            chunks = follow_logs(storage, segment=args.segment, node=args.node, interval=args.interval)
            # Which sources will show is not known ahead: headers unless one is pinned.
            headers = args.segment is None or args.node is None
        else:
            headers = len(check_log_selection(storage, args.segment, args.node)) > 1
            chunks = read_logs(storage, segment=args.segment, node=args.node)
        for data in with_headers(chunks, headers=headers):
            out.write(data if clean is None else clean.feed(data))
            out.flush()
        if clean is not None:
            out.write(clean.close())
            out.flush()
    except KeyboardInterrupt:
        if clean is not None:
            _write_quietly(out, clean.close())  # never leave the terminal coloured
        _flush_quietly(out)
        return 130
    except BrokenPipeError:
        # `spotrun logs URL | head`: the reader has what it wanted.
        _silence_stdout()
        return 0
    if args.follow:
        # Checked once the run is over: while it runs, a segment may not have started yet.
        check_log_selection(storage, args.segment, args.node)
    return 0


def _write_quietly(out: object, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        out.write(data)  # type: ignore[attr-defined]


def _flush_quietly(out: object) -> None:
    try:
        out.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    # Python flushes stdout at exit; onto a closed pipe that would print a traceback.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
