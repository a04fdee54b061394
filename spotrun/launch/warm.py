"""Warm workers: each of torchrun's workers runs in an interpreter started ahead of it.

Every attempt torchrun starts ``python -u script args`` per worker, and each new interpreter
imports torch, FSDP2 and spotrun again (2.9 s of CPU per worker on the 2-core test machine;
three at once were most of a survivor's restart). With warm workers (on by default;
``SPOTRUN_WARM_WORKERS=0`` turns them off) a node agent keeps one **standby** per worker of its next
attempt: an interpreter started ahead as ``python -u -c BOOT script args`` (so ``ps`` and
``pgrep -f script`` see the script), which imports :data:`PRELOAD` and then waits on a
socket. When torchrun starts a worker, the hook :func:`install` puts on torchrun's subprocess
handler gives a waiting standby the worker's environment and working directory instead of
starting a process; the standby runs the script as ``python -u script args`` would, and
torchrun gets the standby's ``Popen``. The agent started it, in a session of its own as
torchrun starts each worker, so torchrun waits for it, signals its session and reads its
exit code exactly as for a worker it started: exit codes, exit hooks, tracebacks and signals
are the interpreter's own, not emulated.

Where the standbys come from: :func:`pool`'s :meth:`Pool.fill`, called by the node agent at
its start (one, before it knows its attempt: a replacement asked for at a loss imports while
it waits) and for each attempt's worker count once it knows it. An agent that may run
another attempt (:meth:`Pool.keep`) starts the next attempt's standbys once a worker of this
one noted its first training step (:func:`spotrun.distributed.note_started`): a survivor's
next attempt starts warm, and the standbys' imports stay out of this attempt's restart.
torchrun run by hand (``python -m spotrun.distributed``, no agent) starts no standby.

Why standby interpreters and not forks of one forkserver (this module's first design, until
2026-12-07): forked workers share the forkserver's hash seed (one ``str`` hash order for every
rank and every attempt of a node, which no reseeding can change), its random generators and
everything else its interpreter held, and torchrun's multiprocessing start path differs from
its subprocess one (first failure only, ``__mp_main__``, a return-value queue). A standby is
a fresh interpreter of its own, started through torchrun's usual code path. What a fork did
better: it costs no CPU per attempt, where a standby imports torch again (3 s of CPU), which
is why the next ones start after the first step.

What can still differ from ``python -u script args``, and how it is kept from mattering: a
standby's interpreter started under the agent's environment at that moment, so it is used
only when the worker's environment equals that one in every variable except torchrun's
per-worker ones (``RANK``, ``MASTER_ADDR``, ... read when the script calls torch),
``TORCHELASTIC_*`` and ``SPOTRUN_*`` (read when called, never at import): any other
difference (``PYTHONPATH``, ``PYTHONHASHSEED``, ``OMP_NUM_THREADS``, ``LD_PRELOAD``...) starts
that worker as before, logged. Also started as before: a command that is not ``python -u
script`` or ``python -u -m module`` (``--no-python``, ``--run-path``), workers whose output
torchrun redirects to files (``--redirects``/``--tee``), a standby that died. Left different:
``sys.orig_argv`` (``-c BOOT`` in it), modules of :data:`PRELOAD` (and the run URL's storage
backend) in ``sys.modules`` before the script imports them, a few frames of this module above
the script's in a traceback, and an idle interpreter per worker for the agent's life (320 MiB
resident with torch, FSDP2, dynamo, DCP and spotrun imported).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import io
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["PRELOAD", "PRELOAD_ENV", "WARM_ENV", "Pool", "close", "current", "enabled", "idle_pids", "install", "pool",
           "standby", "worker_pids", "worker_tail"]

#: Set to 1 to run torchrun's workers in standby interpreters that imported torch ahead.
WARM_ENV = "SPOTRUN_WARM_WORKERS"

#: What a standby imports before it waits (import only: no CUDA call). FSDP2 and spotrun's
#: checkpointer are most of a worker's imports after torch (3 s of CPU here under load); a
#: module the script never uses costs the standby its import, once. Also imported ahead:
#: ``torch._dynamo``, which FSDP2's ``fully_shard`` (and ``torch.use_deterministic_algorithms``)
#: imports at its first call, and ``torch.distributed.checkpoint``, which the checkpointer imports
#: at a sharded model's first restore: 0.35 s of CPU per worker on a quiet 2-core machine, 1-2 s
#: under load, that every worker otherwise paid after the hand, between the rendezvous and the
#: restore, all ranks at once (+48 MiB resident per standby). And the run URL's storage backend
#: (:func:`_preload_storage`).
PRELOAD = ("torch", "torch.distributed", "torch.distributed.fsdp", "torch._dynamo",
           "torch.distributed.checkpoint", "spotrun", "spotrun.checkpoint")

#: More modules for a standby to import, comma-separated (e.g. transformers).
PRELOAD_ENV = "SPOTRUN_WARM_PRELOAD"

#: The next attempt's standbys are started once a worker of this one trained its first step
#: (their imports, 3 s of CPU each, then compete with the training, not with the attempt's
#: restart: rendezvous, model build, restore), or at the latest this many seconds after
#: torchrun took the standbys (a script without spotrun's Checkpointer notes no step).
REFILL_DELAY_S = 30.0

#: How long a worker's start waits for a standby still importing before starting the worker
#: as before: never longer than a fresh interpreter would take, unless the standby hangs.
READY_WAIT_S = 300.0

_READY = b"ready\n"
#: Variables read when called, never at import: spotrun's own, and torchrun's that its launcher
#: sets for the agent (``TORCHELASTIC_SIGNALS_TO_HANDLE``, read by torch's elastic code).
_RUNTIME = ("SPOTRUN_", "TORCHELASTIC_")
_BOOT = "import spotrun.launch.warm as w; w.standby({fd})"

log = logging.getLogger(__name__)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether node agents keep warm workers: on unless ``SPOTRUN_WARM_WORKERS`` says
    0/false/no/off (docs/launch.md, "Why this design", says why on and how it was proven)."""
    value = (os.environ if environ is None else environ).get(WARM_ENV, "")
    return value.strip().lower() not in {"0", "false", "no", "off"}


def worker_tail(torchrun_args: Sequence[str]) -> tuple[str, ...] | None:
    """What torchrun runs after ``python -u`` for the trailing arguments of its command line
    (``script args`` or ``--module mod args``, as :func:`spotrun.launch.node.torchrun_command`
    gives them): ``(script, *args)`` or ``("-m", mod, *args)``; None for a command no standby
    runs (``--no-python``, ``--run-path``)."""
    args = list(torchrun_args)
    if not args or args[0] in ("--no-python", "--no_python", "--run-path", "--run_path"):
        return None
    if args[0] in ("--module", "-m"):
        return ("-m", *args[1:]) if len(args) > 1 else None
    return tuple(args)


def _worker_env(count: int) -> dict[str, str]:
    """The environment a standby starts under: the agent's now, with ``OMP_NUM_THREADS`` as
    torchrun sets it for more than one worker per node (torch 2.13's ``config_from_args``), so
    a standby started before torchrun ran matches the workers it will start."""
    env = dict(os.environ)
    if count > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _difference(started: Mapping[str, str], worker: Mapping[str, str],
                own: frozenset[str]) -> str | None:
    """The first variable (by name) that keeps a standby started under ``started`` from
    running a worker whose environment is ``worker``; None when it may. ``own``: torchrun's
    per-worker variables, read only when the script calls torch."""
    for key in sorted(set(started) | set(worker)):
        if started.get(key) != worker.get(key) and key not in own and not key.startswith(_RUNTIME):
            return key
    return None


class _Standby:
    """One interpreter started ahead: its process, the socket it waits on, what it started under."""

    def __init__(self, tail: tuple[str, ...], env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-c", _BOOT.format(fd=theirs.fileno()), *tail],
                env=env, pass_fds=(theirs.fileno(),),
                # A session of its own, as torchrun starts each worker: a signal to the node's
                # process group reaches a worker once, through the agent.
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.tail, self.env, self.ready = ours, tail, env, False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        """True once the standby said it imported :data:`PRELOAD` (waits up to ``timeout``)."""
        if not self.ready:
            try:
                if select.select([self.sock], [], [], timeout)[0]:
                    self.ready = self.sock.recv(len(_READY)) == _READY
            except OSError:
                return False
        return self.ready

    def hand(self, env: Mapping[str, str], cwd: str) -> bool:
        """Make the standby the worker: its environment and working directory, then EOF."""
        try:
            self.sock.sendall(json.dumps({"env": dict(env), "cwd": cwd}).encode())
            self.sock.shutdown(socket.SHUT_WR)
            return True
        except OSError:
            return False
        finally:
            self.sock.close()

    def retire(self) -> None:
        """End an idle standby (EOF tells it to leave; SIGKILL covers one still importing)."""
        self.sock.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


class Pool:
    """A node agent's standbys. Thread-safe: the agent's preload thread, its main thread and
    the refill thread all call it."""

    def __init__(self) -> None:
        self._idle: list[_Standby] = []
        self._handed: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._refilling: threading.Thread | None = None
        self._keep: tuple[int, tuple[str, ...] | None] | None = None
        self._closed = False
        #: Whether a worker of the running attempt trained its first step (set by spotrun's
        #: torchrun: the workers' notes); None: not known, the refill waits REFILL_DELAY_S.
        self.first_step: Callable[[], bool] | None = None

    def fill(self, count: int, tail: tuple[str, ...] | None) -> int:
        """Start standbys until ``count`` for ``tail`` wait (idle ones for another command, or
        started under another environment, are ended first). Returns how many it started;
        never raises (warm workers are an optimisation: a failure leaves workers cold)."""
        if tail is None or count < 1:
            return 0
        env = _worker_env(count)
        started = 0
        with self._lock:
            if self._closed:
                return 0
            keep = [s for s in self._idle
                    if s.alive() and s.tail == tail and _difference(s.env, env, frozenset()) is None]
            unfit = [s for s in self._idle if s not in keep]
            self._idle = keep
            try:
                while len(self._idle) < count:
                    self._idle.append(_Standby(tail, env))
                    started += 1
            except Exception as exc:  # noqa: BLE001 - e.g. out of processes: workers start cold
                log.warning("could not start a warm-worker standby (%s); workers start as usual", exc)
        _retire_all(unfit)  # outside the lock: each waits for its process to be reaped
        if started:
            log.info("warm workers: %d standby interpreter(s) importing torch for %s", started, tail[0])
        return started

    def keep(self, count: int, tail: tuple[str, ...] | None) -> None:
        """From now on, once torchrun took standbys, start new ones until ``count`` for
        ``tail`` wait again (an agent that runs more than one attempt): when a worker noted
        its first step (:attr:`first_step`), at most :data:`REFILL_DELAY_S` after the take."""
        with self._lock:
            self._keep = (count, tail)

    def _refill_after_start(self) -> None:
        keep, started = self._keep, self.first_step
        if keep is None:
            return
        with self._lock:
            if self._closed or self._refilling is not None:
                return  # one refill pending at a time
            self._refilling = threading.Thread(target=self._refill, args=(keep, started),
                                               name="spotrun-warm-refill", daemon=True)
            self._refilling.start()

    def _refill(self, keep: tuple[int, tuple[str, ...] | None], started: Callable[[], bool] | None) -> None:
        # Polls a local folder (a listdir each): the restart it waits out is seconds long.
        deadline = time.monotonic() + REFILL_DELAY_S
        while time.monotonic() < deadline and not self._closed:
            with contextlib.suppress(Exception):
                if started is not None and started():
                    break
            time.sleep(0.2)
        with self._lock:
            self._refilling = None
        if not self._closed:
            self.fill(*keep)

    def take(self, tail: tuple[str, ...], env: Mapping[str, str], cwd: str,
             own: frozenset[str] = frozenset()) -> subprocess.Popen[bytes] | None:
        """A standby made into the worker ``python -u *tail`` with ``env`` in ``cwd``, or None
        (none fits: the caller starts the worker as usual)."""
        with self._lock:
            ended = [s for s in self._idle if not s.alive()]
            for s in ended:
                log.warning("warm workers: a standby ended before it was used (exit %s)", s.proc.poll())
                self._idle.remove(s)
            chosen: _Standby | None = None
            why = None
            for s in self._idle:
                if s.tail != tail:
                    continue
                why = _difference(s.env, env, own)
                if why is None:
                    chosen = s
                    break
            if chosen is not None:
                self._idle.remove(chosen)
        _retire_all(ended)  # outside the lock (they ended: reaped at once)
        if chosen is None:
            if why is not None:
                log.warning("warm workers: %s differs from when the standby started; "
                            "starting this worker as usual", why)
            return None
        self._refill_after_start()
        if chosen.wait_ready(READY_WAIT_S) and chosen.hand(env, cwd):
            log.info("warm workers: rank %s runs in standby %d (torch imported ahead)",
                     env.get("RANK", "?"), chosen.proc.pid)
            with self._lock:
                self._handed = [p for p in self._handed if p.poll() is None] + [chosen.proc]
            return chosen.proc
        log.warning("warm workers: a standby did not get ready (exit %s); starting this worker as usual",
                    chosen.proc.poll())
        chosen.retire()
        return None

    def idle_pids(self) -> set[int]:
        """The process ids of the standbys that wait (a dead attempt's stop spares them)."""
        with self._lock:
            return {s.proc.pid for s in self._idle}

    def worker_pids(self) -> set[int]:
        """The process ids of standbys made into workers that still run: a dead attempt's
        stop stops them, though they were started before the attempt. (Only live ones: a
        ``Popen`` that reaped its process never gives its pid again, which may be reused.)"""
        with self._lock:
            return {p.pid for p in self._handed if p.poll() is None}

    def close(self) -> None:
        """End every idle standby and any pending fill (the agent is leaving)."""
        with self._lock:
            self._closed = True  # a pending refill sees it and starts nothing
            idle, self._idle = self._idle, []
        _retire_all(idle)


def _retire_all(standbys: list[_Standby]) -> None:
    """End standbys, never under the pool's lock: a retire waits (up to 10 s) for its
    process, and the agent's main thread must not wait behind it to take a standby."""
    for s in standbys:
        s.retire()


_POOL: Pool | None = None
_POOL_LOCK = threading.Lock()


def current() -> Pool | None:
    """This process's standbys, if it started any (a node agent with warm workers)."""
    return _POOL


def idle_pids() -> set[int]:
    """The process ids of this process's idle standbys (none: no pool)."""
    current_pool = _POOL
    return set() if current_pool is None else current_pool.idle_pids()


def worker_pids() -> set[int]:
    """The process ids of this process's standbys that run workers now (none: no pool)."""
    current_pool = _POOL
    return set() if current_pool is None else current_pool.worker_pids()


def close() -> None:
    """End this process's idle standbys and forget its pool (a node agent run in-process,
    as tests do, that returns)."""
    global _POOL
    with _POOL_LOCK:
        current_pool, _POOL = _POOL, None
    if current_pool is not None:
        current_pool.close()


def pool() -> Pool:
    """This process's standbys (one pool per node agent), made on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = Pool()
            atexit.register(_POOL.close)
        return _POOL


def install() -> bool:
    """Make torchrun's subprocess handler (torch 2.13) take workers from :func:`pool`.

    Once per process; False, with a warning, where this torch's handler is not the one
    spotrun knows (workers then start as usual)."""
    try:
        from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler as sh
    except ImportError as exc:
        log.warning("warm workers: torchrun's subprocess handler not found (%s); workers start as usual", exc)
        return False
    cls = sh.SubprocessHandler
    if getattr(cls, "_spotrun_warm", False):
        return True
    init, popen = cls.__init__, getattr(cls, "_popen", None)
    try:
        init_sig = inspect.signature(init)
        known = "env" in init_sig.parameters and callable(popen) \
            and list(inspect.signature(popen).parameters) == ["self", "args", "env"]
    except (TypeError, ValueError):
        known = False
    if not known:
        log.warning("warm workers: this torch's subprocess handler is not the one spotrun knows; "
                    "workers start as usual")
        return False

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        env = init_sig.bind(self, *args, **kwargs).arguments.get("env")
        # torchrun's per-worker variables (RANK, ...); None: unknown, no standby for it
        self._spotrun_own = frozenset(env) if isinstance(env, dict) else None
        init(self, *args, **kwargs)

    def _popen(self: Any, args: tuple, env: dict[str, str]) -> Any:
        proc = None
        own = getattr(self, "_spotrun_own", None)
        if (_POOL is not None and own is not None and len(args) > 2 and args[0] == sys.executable
                and args[1] == "-u" and getattr(self, "_stdout", None) is None
                and getattr(self, "_stderr", None) is None):
            proc = _POOL.take(tuple(str(a) for a in args[2:]), env, os.getcwd(), own)
        return proc if proc is not None else popen(self, args, env)

    cls.__init__, cls._popen, cls._spotrun_warm = __init__, _popen, True
    return True


# --- inside a standby ---------------------------------------------------------------------


def _preload() -> None:
    extra = [m.strip() for m in os.environ.get(PRELOAD_ENV, "").split(",") if m.strip()]
    for name in (*PRELOAD, *extra):
        try:
            __import__(name)
        except Exception as exc:
            if name in PRELOAD[:2]:
                raise  # no torch: nothing to be warm for; the agent starts workers as usual
            print(f"spotrun warm worker: not preloading {name}: {exc}", file=sys.stderr)
    _preload_storage()


def _preload_storage() -> None:
    """Import the code of the run URL's storage (``$SPOTRUN_URL``, set by the launchers for
    every node): the spotrun backend and the fsspec filesystem class (for ``s3://``: s3fs,
    aiobotocore and botocore, 0.15 s of CPU quiet, 0.5 s under load), which the checkpointer
    otherwise imports when it opens the run URL, after the hand. Import only: no filesystem
    or client is made (those read the worker's environment, credentials among it)."""
    url = os.environ.get("SPOTRUN_URL", "")
    if not url:
        return
    try:
        import fsspec
        from fsspec.core import split_protocol

        from spotrun.storage import backend_class

        protocol = split_protocol(url)[0] or "file"
        backend_class(protocol)
        fsspec.get_filesystem_class(protocol)
    except Exception as exc:  # noqa: BLE001 - the worker imports it itself, and fails there if it must
        print(f"spotrun warm worker: not preloading the run URL's storage code: {exc}", file=sys.stderr)


def _fresh_main(file: str | None) -> types.ModuleType:
    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=__import__("builtins"), __spec__=None, __package__=None,
                         __cached__=None)
    if file is not None:
        from importlib.machinery import SourceFileLoader

        main.__file__ = file
        main.__loader__ = SourceFileLoader("__main__", file)
    sys.modules["__main__"] = main
    return main


def standby(fd: int) -> None:
    """A standby's life (``python -u -c BOOT script args``): import, say ready, wait for the
    worker's environment and working directory, then run ``script args`` as ``python -u``
    does. EOF before them (retired, or the agent is gone): leave quietly."""
    sock = socket.socket(fileno=fd)
    _preload()
    chunks: list[bytes] = []
    try:
        sock.sendall(_READY)
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except OSError:
        chunks = []
    sock.close()
    if not chunks:
        os._exit(0)
    order = json.loads(b"".join(chunks))
    os.environ.clear()
    os.environ.update(order["env"])
    os.chdir(order["cwd"])
    tail = sys.argv[1:]  # -c leaves its own argv[0] as "-c"
    if tail[0] == "-m":
        import runpy

        sys.argv = [tail[1], *tail[2:]]  # runpy puts the module's file in argv[0]
        sys.path[0] = os.getcwd()  # python -m: the working directory
        _fresh_main(None)
        runpy._run_module_as_main(tail[1], alter_argv=True)  # type: ignore[attr-defined]
        return
    sys.argv = list(tail)
    path = os.path.abspath(tail[0])
    sys.path[0] = os.path.dirname(os.path.realpath(path))  # python script: its directory
    main = _fresh_main(path)
    with io.open_code(path) as f:
        source = f.read()
    exec(compile(source, path, "exec"), main.__dict__)  # the user's script, as python runs it
