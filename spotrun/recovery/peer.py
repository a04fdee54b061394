"""A copy on a peer: each node holds the newest checkpoint files of one other node (its buddy
holds this node's), sent while a save writes them, over a channel of its own.

The channel is plain HTTP/1.0 over TCP, one request per connection (``http.server`` on the
serving side, ``http.client`` on the asking side; nothing to install). It never touches the
training's process group: a peer copy must go on when that group is broken (a node vanished)
and must never hold up a collective. The server runs in each node's agent
(``python -m spotrun.launch.node``), which outlives the training processes of an attempt, so a
node's copies stay served while its workers restart. :func:`serve_attempt` runs it for one
attempt, at :meth:`~spotrun.launch.node.ClusterSpec.peer_address` (the node's own address),
and gives the workers what they need to reach it in their environment:

- ``SPOTRUN_PEER_BUDDY``: ``host:port`` of the node holding this node's copies (the next node
  of the cluster file, ``(i + 1) % N``),
- ``SPOTRUN_PEER_NODES``: every node's ``host:port`` (rank 0 sends the files every rank reads,
  see below, to all of them), ``SPOTRUN_PEER_SELF``: this node's,
- ``SPOTRUN_PEER_TOKEN``: the attempt's secret (:attr:`ClusterSpec.peer_token`, in the
  cluster file under the run URL only); every request carries it, compared in constant time.

What is sent: each file of a save as soon as it is complete in the rank's local copy, *before*
the commit (while the run URL's upload of it may still run, and while the other ranks still
write): a background thread of each rank sends it to its buddy, one file at a time, streamed
in 1 MiB blocks (memory-bounded), newest step only (a file of a newer step drops the queued
files of older ones; a failed save's files still queued are dropped). Sending only after the
commit left a window: a node killed right after a commit, before its send finished, left its
buddy with the previous step, and the replacement read its whole share from the run URL.
Rank 0 also sends the files that *every* rank reads on restore (its payload
``rank-00000.pt``, DCP's ``.metadata``, artifacts) to every other node, so a survivor of a
replicated (DDP) run restores without reading them from the run URL.

The commit message: the rank that wrote the manifest (rank 0), once the commit succeeded,
sends a small ``POST .../<step>/sealed`` to every node (ahead of any file it still has
queued, and before the next node's copy of a file it is sending to several). Only that rank
knows the commit happened: the other ranks learn that their files were gathered, not that
the manifest was written (the lease may refuse it). Reading the committed
manifest from the run URL instead would cost every node a run URL request per save and
credentials in the agent; the message costs a loopback round trip. A message that is lost (the
node went right after its commit) costs only memory, never a restore: the files wait as
pending, which a restore may use (below), until the next step's commit message frees them.

What is held: under ``$SPOTRUN_LOCAL_DIR/peer/<run key>/``: ``<step>/``, the newest step this
node heard committed, and ``.pending-<step>/``, the files of newer steps not yet heard
committed: the newest two of them (a file of a third pending step removes the oldest; a
commit message removes every older step). Two, not one: a rank sends a step's files only
once the step before went through the commit's gather, so the pending step before the newest
may well be committed with its commit message still on its way (rank 0 sends it after the
commit, from a thread that may still be sending its own big file, and on a busy machine the
other ranks reached their next save first). Keeping one pending step dropped exactly that
step's files, and a node lost right then had its replacement read them from the run URL
(seen in the benchmark, DDP at 64 MiB on one core: 6 of 10 runs). So a node holds at most
three steps for a moment (the sealed one and two pending), two once the message comes. A
save that fails or is abandoned never removes the older committed copy: its files stay
pending until newer steps replace them. A node asked for a file it does not hold answers with
what it holds instead, which the asking rank logs: a file read from the run URL says why.
The local copy's room rule applies (no room: the file is refused, the sender logs it, nothing
fails). A file arrives under a temporary name and is renamed into place only once every byte
came, so a sender killed in the middle leaves nothing a restore could use.

What is trusted: nothing. A restore checks every peer file (sealed or pending) against the
committed manifest (size and checksums) before it uses it, exactly as a local copy (see
:class:`~spotrun.recovery.local.NearestReader`); a peer that does not answer within the
timeout is skipped and the run URL is read.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hmac
import http.client
import logging
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..config import env_float_or_default, env_str
from ..units import format_bytes
from .localdir import local_dir_from_env, room, run_key

__all__ = [
    "BUDDY_ENV",
    "NODES_ENV",
    "SELF_ENV",
    "TOKEN_ENV",
    "PeerError",
    "PeerLink",
    "PeerServer",
    "fetch_file",
    "new_token",
    "send_file",
    "serve_attempt",
]

log = logging.getLogger(__name__)

BUDDY_ENV = "SPOTRUN_PEER_BUDDY"
NODES_ENV = "SPOTRUN_PEER_NODES"
SELF_ENV = "SPOTRUN_PEER_SELF"
TOKEN_ENV = "SPOTRUN_PEER_TOKEN"
#: Seconds any one socket operation of the channel may wait (connect, a block of a body).
TIMEOUT_ENV = "SPOTRUN_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
#: Seconds a finishing training process waits for its last send (a notice's final save).
EXIT_WAIT_ENV = "SPOTRUN_PEER_EXIT_WAIT"
DEFAULT_EXIT_WAIT = 30.0

_BLOCK = 1 << 20  # bytes per read/write: the buffer that bounds the channel's memory
_MAX_FILE = 1 << 40  # no checkpoint file is larger; a bigger Content-Length is refused
_MAX_CONCURRENT = 64  # requests one server handles at once; more are answered 503
_MIN_RATE = 8 << 20  # bytes/s a transfer may not fall below (its overall deadline)
_LINGER_QUIET = 1.0  # after training ends: serve until this long without a request ...
_LINGER_MAX = 20.0  # ... but never longer than this
_PARTIAL = ".partial-"
_PENDING = ".pending-"  # files of a step this node has not heard committed (see the docstring)
_PENDING_KEPT = 2  # pending steps held: the newest two (see the docstring)
_SEALED = "sealed"  # POST /v1/<run key>/<step>/sealed: the sender's run committed <step>
_RUN_KEY = re.compile(r"[0-9a-f]{16}")
_PART = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_TOKEN = re.compile(r"[0-9a-f]{32,128}")
_OWN_FILE = re.compile(r"rank-\d{5}\.pt|.*\.distcp")


class PeerError(Exception):
    """One transfer over the peer channel failed (refused, timed out, cut short)."""


def new_token() -> str:
    """A fresh attempt token (128 random bits, hex)."""
    return secrets.token_hex(16)


def valid_token(token: Any) -> bool:
    return isinstance(token, str) and bool(_TOKEN.fullmatch(token))


def _timeout() -> float:
    # A bad value must not cost a restore or a save: the default, with a warning.
    value = env_float_or_default(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    return value if value > 0 and math.isfinite(value) else DEFAULT_TIMEOUT


def _safe_name(name: str) -> bool:
    """A file name of a checkpoint folder: relative, no ``..``/``.`` parts, no odd characters."""
    parts = name.split("/")
    return (0 < len(name) <= 512 and len(parts) <= 4
            and all(_PART.fullmatch(p) and p not in (".", "..") for p in parts))


def _split_host(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _room_for(directory: Path, size: int) -> bool:
    return room(directory, size)[0]  # the local copy's room rule (localdir.room)


def _deadline(size: int, timeout: float) -> float:
    return time.monotonic() + timeout + size / _MIN_RATE


# -- the server (in the node agent) ---------------------------------------------------------------

class PeerServer:
    """The node's peer server: receives the buddy's files (``PUT``) and serves what this node
    holds of a step (``GET``: the files held for others, then the node's own local copy)."""

    def __init__(self, address: str, port: int, token: str, local_dir: str | os.PathLike[str],
                 run_url: str) -> None:
        if not valid_token(token):
            raise ValueError("the peer token must be 32-128 hex digits")
        self.token = token
        self.run_key = run_key(run_url)
        self.local_dir = Path(local_dir)
        self.root = self.local_dir / "peer" / self.run_key
        self.timeout = _timeout()
        self._lock = threading.Lock()  # placing a file and removing older steps
        self._slots = threading.BoundedSemaphore(_MAX_CONCURRENT)
        self._active = 0
        self._last_request = time.monotonic()
        handler = type("Handler", (_Handler,), {"peer": self, "timeout": self.timeout})
        server_class = _Server6 if ":" in address else ThreadingHTTPServer
        self._httpd = server_class((address, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> PeerServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="spotrun-peer",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self, linger: bool = False) -> None:
        """Stop serving; with ``linger``, first let transfers under way (a buddy's last send
        after a notice's checkpoint) finish: until no request came for a second, at most 20 s."""
        if linger:
            end = time.monotonic() + _LINGER_MAX
            while time.monotonic() < end:
                with self._lock:
                    quiet = self._active == 0 and time.monotonic() - self._last_request >= _LINGER_QUIET
                if quiet:
                    break
                time.sleep(0.05)
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- what the handler calls ---------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        given = (header or "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, self.token.encode())

    def _steps(self) -> tuple[int | None, list[int]]:
        """The newest sealed step held here (None: none) and the pending steps."""
        sealed: list[int] = []
        pending: list[int] = []
        if self.root.is_dir():
            for child in self.root.iterdir():
                if child.name.isdigit():
                    sealed.append(int(child.name))
                elif child.name.startswith(_PENDING) and child.name[len(_PENDING):].isdigit():
                    pending.append(int(child.name[len(_PENDING):]))
        return max(sealed, default=None), pending

    def refuses(self, step: int) -> str | None:
        """Why a file of ``step`` would not be kept (a newer step is sealed, or two newer
        ones are pending), or None."""
        sealed, pending = self._steps()
        if sealed is not None and sealed > step:
            return f"holds step {sealed}, newer than {step}"
        newer = sorted(p for p in pending if p > step)
        if sealed != step and len(newer) >= _PENDING_KEPT:
            return f"holds steps {', '.join(map(str, newer))} (pending), newer than {step}"
        return None

    def holding(self) -> str:
        """What this node holds of the run, in words (a 404's answer, for the asker's log):
        each step held for others with its files, and the step of the node's own copy."""
        from ..records.layout import checkpoint_dir

        sealed, pending = self._steps()
        folders = [(checkpoint_dir(sealed), f"step {sealed} sealed")] if sealed is not None else []
        folders += [(f"{_PENDING}{p}", f"step {p} pending") for p in sorted(pending)]
        parts = []
        for folder, what in folders:
            try:
                names = sorted(c.name for c in (self.root / folder).iterdir())
            except OSError:
                names = []
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            parts.append(f"{what} ({', '.join(names[:4]) + more or 'no files'})")
        own_root = self.local_dir / self.run_key
        own = sorted(c.name for c in own_root.iterdir() if c.name.isdigit()) if own_root.is_dir() else []
        return (f"holds for others: {'; '.join(parts) or 'nothing'}; own copy: "
                f"{f'step {int(own[-1])}' if own else 'none'}")

    def _folder(self, step: int, sealed: int | None) -> Path:
        from ..records.layout import checkpoint_dir

        return self.root / (checkpoint_dir(step) if step == sealed else f"{_PENDING}{step}")

    def place(self, step: int, name: str, partial: Path) -> str | None:
        """Move a complete received file into place; None, or why it was not kept.

        A file of the sealed step joins it; a file of a newer step is *pending* (the run URL
        has not committed it as far as this node knows); of the pending steps the newest
        two stay (the one before the newest may be committed, its commit message not here
        yet: see the module docstring), older ones (saves that failed or were overtaken)
        go. The sealed step stays until a newer one is sealed.
        """
        with self._lock:
            why = self.refuses(step)
            if why is not None:
                return why
            sealed, pending = self._steps()
            target = self._folder(step, sealed) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            if step != sealed:
                kept = sorted(set(pending) | {step})[-_PENDING_KEPT:]
                for old in pending:
                    if old not in kept:
                        shutil.rmtree(self.root / f"{_PENDING}{old}", ignore_errors=True)
        return None

    def seal(self, step: int) -> None:
        """The run URL committed ``step``: its pending files become the sealed step held
        here, and every older step (sealed or pending) goes. A step older than the sealed
        one is ignored (a late message)."""
        from ..records.layout import checkpoint_dir

        with self._lock:
            sealed, pending = self._steps()
            if sealed is not None and sealed >= step:
                return
            final = self.root / checkpoint_dir(step)
            if step in pending:
                os.replace(self.root / f"{_PENDING}{step}", final)
            else:
                final.mkdir(parents=True, exist_ok=True)  # none of it here yet: it may follow
            for child in self.root.iterdir():
                if child.name.isdigit():
                    old = int(child.name)
                elif child.name.startswith(_PENDING) and child.name[len(_PENDING):].isdigit():
                    old = int(child.name[len(_PENDING):])
                else:
                    continue
                if old < step:
                    shutil.rmtree(child, ignore_errors=True)

    def held(self, step: int, name: str) -> Path | None:
        """This node's file ``name`` of ``step``: held for another node (sealed or pending:
        a restore checks it against the committed manifest either way), else its own copy."""
        from ..records.layout import checkpoint_dir

        for base in (self.root / checkpoint_dir(step), self.root / f"{_PENDING}{step}",
                     self.local_dir / self.run_key / checkpoint_dir(step)):
            path = base / name
            if path.is_file():
                return path
        return None

    def enter(self) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            self._active += 1
            self._last_request = time.monotonic()
        return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            self._last_request = time.monotonic()
        self._slots.release()


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    peer: PeerServer
    server_version = "spotrun-peer"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("peer %s: " + format, self.client_address[0], *args)

    def _answer(self, code: int, why: str = "") -> None:
        body = why.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _target(self) -> tuple[int, str] | None:
        """(step, name) of ``/v1/<run key>/<step>/<name>``, after the token; None answered."""
        if not self.peer.authorized(self.headers.get("Authorization")):
            log.warning("peer request from %s refused: wrong token (another attempt, or not a "
                        "spotrun node)", self.client_address[0])
            self._answer(403, "wrong token")
            return None
        parts = self.path.split("/", 4)
        if (len(parts) != 5 or parts[0] or parts[1] != "v1" or not _RUN_KEY.fullmatch(parts[2])
                or not parts[3].isdigit() or len(parts[3]) > 12 or not _safe_name(parts[4])):
            self._answer(400, "bad path")
            return None
        if parts[2] != self.peer.run_key:
            self._answer(404, "another run")
            return None
        return int(parts[3]), parts[4]

    def _guarded(self, work: Any) -> None:
        if not self.peer.enter():
            self._answer(503, "busy")
            return
        try:
            work()
        finally:
            self.peer.leave()

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_PUT(self) -> None:
        self._guarded(self._put)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _post(self) -> None:
        target = self._target()
        if target is None:
            return
        step, name = target
        if name != _SEALED:
            self._answer(400, "bad path")
            return
        try:
            self.peer.seal(step)
        except OSError as exc:
            self._answer(500, str(exc))
            return
        self._answer(204)

    def _get(self) -> None:
        target = self._target()
        if target is None:
            return
        path = self.peer.held(*target)
        if path is None:
            # What it holds instead goes back with the answer: the asker's log then says why
            # a replacement read a file from the run URL (which step this node has, whose files).
            try:
                held = self.peer.holding()
            except OSError:  # a folder removed while it was listed (a commit message came)
                held = "its folders changed while listed"
            self._answer(404, f"not held; {held}")
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._answer(404, "not held")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, _BLOCK)

    def _put(self) -> None:
        target = self._target()
        if target is None:
            return
        step, name = target
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, "Content-Length needed")
            return
        if not 0 <= size <= _MAX_FILE:
            self._answer(413, "too large")
            return
        refused = self.peer.refuses(step)
        if refused is not None:
            self._answer(409, refused)
            return
        root = self.peer.root
        root.mkdir(parents=True, exist_ok=True)
        if not _room_for(root, size):
            log.warning("peer copy of step %d %s (%s) not kept: no room in %s (the run URL has it)",
                        step, name, format_bytes(size), self.peer.local_dir)
            self._answer(507, "no room")
            return
        partial = root / f"{_PARTIAL}{uuid.uuid4().hex}"
        why = None
        try:
            with open(partial, "wb") as out:
                left, end = size, _deadline(size, self.peer.timeout)
                while left:
                    block = self.rfile.read(min(_BLOCK, left))
                    if not block:
                        raise PeerError(f"cut short, {left} of {size} bytes missing")
                    out.write(block)
                    left -= len(block)
                    if time.monotonic() > end:
                        raise PeerError("too slow")
            why = self.peer.place(step, name, partial)
        except (OSError, PeerError) as exc:
            why = str(exc)
        finally:
            partial.unlink(missing_ok=True)
        if why is not None:
            log.info("peer copy of step %d %s from %s not kept: %s", step, name,
                     self.client_address[0], why)
            with contextlib.suppress(OSError):
                self._answer(409, why)
            return
        self._answer(204)


# -- the client (in the ranks) ---------------------------------------------------------------------

def _connect(address: str, timeout: float) -> http.client.HTTPConnection:
    host, port = _split_host(address)
    return http.client.HTTPConnection(host, port, timeout=timeout, blocksize=_BLOCK)


def send_file(address: str, token: str, run_key: str, step: int, name: str,
              path: str | os.PathLike[str] | int, timeout: float | None = None) -> None:
    """Stream the local file ``path`` (or an open descriptor of it: a file sent while its
    folder is renamed, sealed or dropped) to the peer at ``address`` as ``name`` of ``step``."""
    timeout = timeout or _timeout()
    conn = _connect(address, timeout)
    try:
        if isinstance(path, int):
            os.lseek(path, 0, os.SEEK_SET)
        with open(path, "rb", closefd=not isinstance(path, int)) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                conn.request("PUT", f"/v1/{run_key}/{step}/{name}", body=f,
                             headers={"Authorization": f"Bearer {token}", "Content-Length": str(size)})
            except OSError as exc:
                if conn.sock is None:  # never connected (refused, unreachable): no answer to read
                    raise
                # The server may have refused before taking the body (wrong token, no room,
                # an older step) and closed: its answer says why better than a broken pipe.
                try:
                    reply = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    raise exc from None
                why = reply.read(1024).decode(errors="replace")
                raise PeerError(f"{address} answered {reply.status} ({why})") from None
        _expect_done(conn, address)
    except (OSError, http.client.HTTPException) as exc:
        raise PeerError(f"{address}: {exc}") from None
    finally:
        conn.close()


def _expect_done(conn: http.client.HTTPConnection, address: str) -> None:
    """The peer's answer to a request that stores something: 204, else a PeerError with its words."""
    reply = conn.getresponse()
    why = reply.read(1024).decode(errors="replace")
    if reply.status != 204:
        raise PeerError(f"{address} answered {reply.status} ({why})")


def send_sealed(address: str, token: str, run_key: str, step: int, timeout: float | None = None) -> None:
    """Tell the peer at ``address`` that the run URL committed ``step`` (it keeps that step's
    files as the ones it holds and frees older ones)."""
    timeout = timeout or _timeout()
    conn = _connect(address, timeout)
    try:
        conn.request("POST", f"/v1/{run_key}/{step}/{_SEALED}",
                     headers={"Authorization": f"Bearer {token}", "Content-Length": "0"})
        _expect_done(conn, address)
    except (OSError, http.client.HTTPException) as exc:
        raise PeerError(f"{address}: {exc}") from None
    finally:
        conn.close()


def fetch_file(address: str, token: str, run_key: str, step: int, name: str, dest: Path,
               max_size: int, timeout: float | None = None) -> bool:
    """Stream the peer's ``name`` of ``step`` into ``dest``; False when it does not hold it.
    Raises :class:`PeerError` when the peer refuses, is silent past the timeout, or sends
    more than ``max_size`` bytes (the manifest's size: anything larger is not the file)."""
    return _fetch(address, token, run_key, step, name, dest, max_size, timeout) is None


def _fetch(address: str, token: str, run_key: str, step: int, name: str, dest: Path,
           max_size: int, timeout: float | None = None) -> str | None:
    """:func:`fetch_file`, saying why not: None when the file is in ``dest``, else the peer's
    words (it does not hold it; what it holds instead)."""
    timeout = timeout or _timeout()
    conn = _connect(address, timeout)
    try:
        conn.request("GET", f"/v1/{run_key}/{step}/{name}", headers={"Authorization": f"Bearer {token}"})
        reply = conn.getresponse()
        if reply.status == 404:
            return reply.read(2048).decode(errors="replace") or "not held"
        if reply.status != 200:
            raise PeerError(f"{address} answered {reply.status} ({reply.read(1024).decode(errors='replace')})")
        size = int(reply.getheader("Content-Length") or -1)
        if not 0 <= size <= max_size:
            raise PeerError(f"{address} offers {size} bytes, the manifest says {max_size}")
        end = _deadline(size, timeout)
        with open(dest, "wb") as out:
            left = size
            while left:
                block = reply.read(min(_BLOCK, left))
                if not block:
                    raise PeerError(f"{address} cut the file short ({left} of {size} bytes missing)")
                out.write(block)
                left -= len(block)
                if time.monotonic() > end:
                    raise PeerError(f"{address} is too slow")
        return None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise PeerError(f"{address}: {exc}") from None
    finally:
        conn.close()


class PeerLink:
    """A training process's end of the channel: sends each of its files to the buddy as soon
    as the file is complete in the local copy, tells every node when its run committed a
    step (rank 0), both in a background thread, and asks peers for files on restore."""

    def __init__(self, run_url: str, local_dir: str | os.PathLike[str], token: str, buddy: str,
                 nodes: Sequence[str] = (), self_address: str = "", rank: int = 0) -> None:
        self.run_key = run_key(run_url)
        self.local_dir = Path(local_dir)
        self.held_root = self.local_dir / "peer" / self.run_key
        self.token, self.buddy = token, buddy
        self.nodes = [n for n in nodes if n]
        self.self_address, self.rank = self_address, rank
        self._cond = threading.Condition()
        self._files: collections.deque[tuple[int, str, int]] = collections.deque()  # step, name, fd
        self._seals: list[int] = []
        self._busy = False
        self._sending: int | None = None  # the step of the file being sent now
        self._thread: threading.Thread | None = None
        self._tally: dict[int, list[float]] = {}  # step -> [started, bytes sent, files not sent]
        self._dead: set[str] = set()  # peers that failed once in this process: not asked again

    @classmethod
    def from_env(cls, run_url: str, local_dir: str | os.PathLike[str]) -> PeerLink | None:
        """The link the node agent set up (:func:`serve_attempt`), or None outside one."""
        token, buddy = env_str(TOKEN_ENV), env_str(BUDDY_ENV)
        if not token or not buddy or not valid_token(token):
            return None
        nodes = (env_str(NODES_ENV) or "").split(",")
        try:
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            rank = 0
        return cls(run_url, local_dir, token, buddy, nodes, env_str(SELF_ENV) or "", rank)

    # -- sending ------------------------------------------------------------------------------

    def targets(self, name: str) -> list[str]:
        """Where this rank sends its file ``name``: the buddy; rank 0's files that every rank
        reads also to every other node."""
        out = [self.buddy]
        shared = name == "rank-00000.pt" or not _OWN_FILE.fullmatch(name.rsplit("/", 1)[-1])
        if self.rank == 0 and shared:
            out += [n for n in self.nodes if n not in (self.buddy, self.self_address)]
        return out

    def offer(self, step: int, name: str, path: Path) -> None:
        """Send ``name`` of ``step`` (complete at ``path``; opened now, so that sealing or
        dropping its folder does not take it from under the send) in the background. Files
        of older steps not yet sent are dropped: only the newest step is worth holding.
        Never blocks and never raises."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            log.warning("peer copy of step %d %s not sent (%s); the run URL has it", step, name, exc)
            return
        with self._cond:
            self._discard(lambda s: s < step)
            self._files.append((step, name, fd))
            self._start()

    def push(self, step: int, files: list[tuple[str, Path]]) -> None:
        """Send ``files`` (name, complete local path) of ``step`` in the background."""
        for name, path in files:
            self.offer(step, name, path)

    def cancel(self, step: int) -> None:
        """The save of ``step`` failed or was abandoned: send none of its files still queued."""
        with self._cond:
            self._discard(lambda s: s == step)

    def announce(self, step: int) -> None:
        """This rank committed ``step`` at the run URL: tell every node (in the background,
        ahead of any file still queued), so each keeps that step's files and frees older."""
        with self._cond:
            self._seals.append(step)
            self._start()

    def _discard(self, which: Any) -> None:
        keep: collections.deque[tuple[int, str, int]] = collections.deque()
        for step, name, fd in self._files:
            if which(step):
                os.close(fd)
            else:
                keep.append((step, name, fd))
        self._files = keep

    def _start(self) -> None:
        # Under self._cond.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spotrun-peer-push", daemon=True)
            self._thread.start()
            _links.append(self)
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._files and not self._seals:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                self._busy = True
                if self._seals:
                    job: tuple[str, int, str, int] = ("seal", self._seals.pop(0), "", -1)
                else:
                    step, name, fd = self._files.popleft()
                    job = ("file", step, name, fd)
                    self._sending = step
            kind, step, name, fd = job
            try:
                if kind == "seal":
                    self._send_seal(step)
                    continue
                self._send(step, name, fd)
            except Exception:  # this thread sends every later copy: it must live
                log.exception("peer copy of step %d: unexpected error (the run URL has every file)", step)
            finally:
                if fd >= 0:
                    os.close(fd)
            with self._cond:
                self._sending = None
                if not any(s == step for s, _, _ in self._files):
                    self._report(step)

    def _send_seal(self, step: int) -> None:
        for target in self.nodes or [self.buddy]:
            try:
                send_sealed(target, self.token, self.run_key, step)
            except PeerError as exc:
                log.warning("peer %s not told that step %d is committed (%s); it keeps its older "
                            "copy too", target, step, exc)

    def _send(self, step: int, name: str, fd: int) -> None:
        tally = self._tally.setdefault(step, [time.monotonic(), 0, 0])
        for target in self.targets(name):
            with self._cond:
                if any(s > step for s, _, _ in self._files):
                    return  # a newer step's files are waiting: this one is not worth more time
                seals, self._seals = self._seals, []
            # A commit message announced meanwhile goes before the next node's copy: rank 0's
            # shared file goes to every node, one after another, and the other ranks' next
            # files must not reach a node long before the message that seals this step.
            for sealed in seals:
                self._send_seal(sealed)
            try:
                send_file(target, self.token, self.run_key, step, name, fd)
                tally[1] += os.fstat(fd).st_size
            except (PeerError, OSError) as exc:
                tally[2] += 1
                log.warning("peer copy of step %d %s to %s not sent (%s); the run URL has it",
                            step, name, target, exc)

    def _report(self, step: int) -> None:
        tally = self._tally.pop(step, None)
        if tally is None:
            return
        started, sent, skipped = tally
        log.info("peer copy of step %d: %s sent in %.2fs%s", step, format_bytes(int(sent)),
                 time.monotonic() - started, f", {int(skipped)} file(s) not sent" if skipped else "")

    def sending(self, step: int) -> bool:
        """Whether a file of ``step`` is still queued or being sent."""
        with self._cond:
            return self._sending == step or any(s == step for s, _, _ in self._files)

    def wait(self, timeout: float) -> bool:
        """Block until the sends under way are done; False after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._files or self._seals:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- restoring ----------------------------------------------------------------------------

    def held_paths(self, step: int, name: str) -> list[Path]:
        """Where this node keeps ``name`` of ``step`` when a peer sent it here: the sealed
        step, then a pending one (its commit message may never have come: the sender's node
        went right after the commit; the manifest check decides)."""
        from ..records.layout import checkpoint_dir

        return [self.held_root / checkpoint_dir(step) / name, self.held_root / f"{_PENDING}{step}" / name]

    def fetch(self, step: int, name: str, dest: Path, size: int) -> str | None:
        """Fetch ``name`` of ``step`` into ``dest`` from the buddy, else any other node;
        the peer that served it, or None (each failure logged)."""
        order = [self.buddy] + [n for n in self.nodes if n not in (self.buddy, self.self_address)]
        for address in order:
            if address in self._dead:
                continue
            try:
                why = _fetch(address, self.token, self.run_key, step, name, dest, size)
                if why is None:
                    return address
                # Which peer, and what it holds instead: the next occurrence of a file
                # read from the run URL explains itself (a buddy that never got it, a step
                # it dropped, a commit message not heard).
                log.info("peer %s%s does not hold step %d %s: %s", address,
                         " (the buddy)" if address == self.buddy else "", step, name, why)
            except PeerError as exc:
                self._dead.add(address)
                log.warning("peer %s did not serve step %d %s (%s); asking the next source",
                            address, step, name, exc)
        return None


_links: list[PeerLink] = []


def _exit_wait() -> float:
    limit = env_float_or_default(EXIT_WAIT_ENV, DEFAULT_EXIT_WAIT)
    return limit if limit >= 0 and math.isfinite(limit) else DEFAULT_EXIT_WAIT


def finish_sends(deadline: float | None = None) -> bool:
    """Give the sends under way (a stop checkpoint's) a bounded wait: at most
    ``SPOTRUN_PEER_EXIT_WAIT`` seconds, and never past ``deadline`` (epoch seconds: when the
    machine goes, less the stop margin). True when every send is done."""
    limit = _exit_wait()
    if deadline is not None:
        limit = max(0.0, min(limit, deadline - time.time()))
    done = True
    for link in _links:
        if not link.wait(limit):
            done = False
            log.warning("peer copy still being sent after %.0fs; leaving it (the run URL has "
                        "every file)", limit)
    return done


# A script may leave without the Checkpointer's stop path (an exception after a save): the
# interpreter's exit waits too. The stop path calls finish_sends itself, before SystemExit:
# scripts that end with os._exit (torch.distributed examples do, to skip gloo's teardown)
# never reach exit hooks.
atexit.register(finish_sends)


# -- one attempt, in the node agent ---------------------------------------------------------------

@contextlib.contextmanager
def serve_attempt(spec: Any, index: int, run_url: str | None = None) -> Iterator[dict[str, str]]:
    """Run this node's peer server for one attempt of ``spec`` (a
    :class:`~spotrun.launch.node.ClusterSpec`) and yield the environment its workers need.

    Nothing (an empty dict, no server) when the job has one node, the cluster file carries
    no token, or the local copy is off (``SPOTRUN_LOCAL_DIR=off``: no node copies at all); a
    server that cannot start (the port is taken) is logged and skipped: the run URL remains.
    """
    run_url = run_url or os.environ.get("SPOTRUN_URL", "")
    directory = local_dir_from_env() if run_url else None
    token = getattr(spec, "peer_token", "")
    if len(spec.nodes) < 2 or directory is None or not valid_token(token):
        yield {}
        return
    address = spec.peer_address(index)
    host, port = _split_host(address)
    try:
        server = PeerServer(host, port, token, directory, run_url).start()
    except OSError as exc:
        log.warning("no peer copies on this node: cannot serve at %s (%s); restores read the "
                    "run URL", address, exc)
        yield {}
        return
    n = len(spec.nodes)
    env = {
        BUDDY_ENV: spec.peer_address((index + 1) % n),
        NODES_ENV: ",".join(spec.peer_address(i) for i in range(n)),
        SELF_ENV: address,
        TOKEN_ENV: token,
    }
    log.info("peer copies: serving at %s, this node's copies go to %s", address, env[BUDDY_ENV])
    try:
        yield env
    finally:
        server.stop(linger=True)
