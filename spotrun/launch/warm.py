"""Warm workers: torchrun's workers forked from an interpreter that already imported torch.

Opt-in (``SPOTRUN_WARM_WORKERS=1``; see docs/launch.md, "Recovery"). Every attempt torchrun
starts ``python -u script`` per worker, and each new interpreter imports torch again (2.9 s of
CPU per worker on the 2-core test machine; three at once dominate a survivor's restart). With
warm workers, :func:`spotrun.distributed.torchrun` hands torchrun a function entrypoint
(:func:`run_worker`) and the ``forkserver`` start method instead: the stdlib forkserver is
started early, from the node agent's preload thread (:func:`start_forkserver`), with torch
imported (never CUDA initialised: import only), and each worker is a fork of it. The forkserver
lives as long as the agent, so a survivor's next attempt forks at once; a dead one is started
again by CPython's ``ensure_running``.

:func:`run_worker` makes the fork look like ``python -u script args`` to the script: its own
session, the agent's environment at the attempt's start plus torchrun's per-worker variables,
``sys.argv``, ``sys.path[0]``, the working directory, a fresh ``__main__``, unbuffered stdout and
stderr, the interpreter's default SIGINT/SIGTERM handlers, and the same exit codes (non-daemon
threads joined and ``atexit`` handlers run before it exits, which a multiprocessing child
otherwise skips). What stays different is listed in docs/launch.md.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import logging
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = ["WARM_ENV", "enabled", "run_worker", "start_forkserver"]

#: Set to 1 to run torchrun's workers as forks of a forkserver that imported torch.
WARM_ENV = "SPOTRUN_WARM_WORKERS"

#: What the forkserver imports before it forks any worker (import only: no CUDA call).
#: FSDP2 and spotrun's checkpointer are most of a worker's imports after torch (3 s of CPU
#: here under load); a module the script never uses costs the forkserver its import, once.
PRELOAD = ("torch", "torch.distributed", "torch.distributed.fsdp", "spotrun",
           "spotrun.checkpoint", "spotrun.launch.warm")

#: More modules for the forkserver to import, comma-separated (e.g. transformers).
PRELOAD_ENV = "SPOTRUN_WARM_PRELOAD"

log = logging.getLogger(__name__)

#: The environment this module was imported under. In a forked worker it is the forkserver's
#: (imported there by PRELOAD), so what differs from it is what torchrun set for the worker.
_BASE_ENV = dict(os.environ)

#: [True] once this worker's return value is, or will be, in torchrun's queue (put by
#: os._exit(0), or by torchrun's wrapper when run_worker returns).
_RETURN_PUT = [False]


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``SPOTRUN_WARM_WORKERS`` asks for warm workers (1/true/yes/on)."""
    value = (os.environ if environ is None else environ).get(WARM_ENV, "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def start_forkserver() -> bool:
    """Start the stdlib forkserver with :data:`PRELOAD` imported (a no-op when it runs).

    Safe from any thread (``ensure_running`` holds a lock). Returns False, with a warning,
    when it cannot be started; torchrun then starts subprocess workers as without warm ones.
    """
    try:
        import multiprocessing
        from multiprocessing import forkserver

        extra = [m.strip() for m in os.environ.get(PRELOAD_ENV, "").split(",") if m.strip()]
        multiprocessing.get_context("forkserver").set_forkserver_preload([*PRELOAD, *extra])
        forkserver.ensure_running()
        return True
    except Exception as exc:  # noqa: BLE001 - warm workers are an optimisation, never a failure
        log.warning("could not start the warm-worker forkserver (%s); "
                    "torchrun starts its workers as subprocesses", exc)
        return False


def _no_parent_death_signal() -> None:
    # torch.multiprocessing asks for SIGINT when the forkserver dies; a subprocess worker
    # has no such signal and trains on when only its agent was killed.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG, 0


def _unbuffered_stdio() -> None:
    """stdout and stderr as ``python -u`` makes them: a text layer writing through to fd 1/2."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        with contextlib.suppress(Exception):
            old.flush()
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False),
                                  encoding=getattr(old, "encoding", None) or "utf-8",
                                  errors="backslashreplace" if name == "stderr" else
                                  (getattr(old, "errors", None) or "strict"),
                                  line_buffering=False, write_through=True)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


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


def _thread_counts() -> None:
    # torch read OMP_NUM_THREADS when the forkserver imported it (before torchrun set it for
    # this attempt): apply the worker's own value, as a fresh interpreter would have read it.
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        import torch

        torch.set_num_threads(int(value))


def _fresh_random_state() -> None:
    """Random generators seeded from the OS, as a fresh interpreter's are.

    torch seeds its default CPU generator from the OS when it is imported, and numpy its
    legacy global state when ``numpy.random`` is imported; a fork inherits the forkserver's,
    so every worker of every attempt of one forkserver would start from the same state:
    unseeded ``torch.rand`` / dropout masks / ``np.random`` draws equal on all ranks and
    repeated after each restart, where subprocess workers draw independently. A script that
    seeds (``torch.manual_seed``) is unaffected either way. CPython reseeds ``random`` in
    every fork child itself; CUDA generators do not exist yet (the forkserver never
    initialises CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.random.default_generator.seed()
    mod = sys.modules.get("numpy.random")
    if mod is not None:
        with contextlib.suppress(Exception):
            mod.seed()


def _return_value_queue() -> Any:
    """The queue torchrun's worker wrapper puts this worker's return value in (torch 2.13:
    ``ret_val_`` in ``torch.distributed.elastic.multiprocessing.api._wrap``, which calls us),
    or None where a torch keeps it elsewhere."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_wrap" and "ret_val_" in frame.f_locals:
            return frame.f_locals["ret_val_"]
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _return_before_exit_0() -> None:
    """Make ``os._exit(0)`` tell torchrun this worker returned.

    torchrun's function workers count as finished only once their return value is in its
    queue; one that left by ``os._exit(0)`` (scripts end so to skip gloo's teardown, the
    examples do) would leave torchrun's agent polling forever. Put the value just before.
    """
    queue = _return_value_queue()
    if queue is None:
        log.warning("warm workers: torchrun's return-value queue not found; a worker that "
                    "ends with os._exit(0) would not be seen to finish")
        return
    real_exit = os._exit
    put = threading.Lock()
    done = _RETURN_PUT

    def _exit(code: int) -> NoReturn:
        if code == 0:
            with put:
                if not done[0]:
                    done[0] = True
                    with contextlib.suppress(Exception):
                        queue.put(None)  # a pipe write: it stays readable after this exits
        real_exit(code)

    os._exit = _exit  # type: ignore[assignment]


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter exits with for ``sys.exit(code)``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _finish() -> None:
    """What a fresh interpreter does on its way out: join non-daemon threads, run atexit."""
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def run_worker(environ: dict[str, str], cwd: str, module: bool, target: str, *args: str) -> None:
    """torchrun's function entrypoint: run ``target`` as ``python -u [-m] target args`` would.

    ``environ`` is the agent's ``os.environ`` when the attempt started; torchrun's per-worker
    variables (RANK, ...) are those in this process's environment that differ from the
    forkserver's. Returns (exit 0) when the script ends normally or by ``sys.exit(0)``; any
    other ending leaves the process with the code the interpreter would have had.
    """
    os.setsid()  # as torchrun's subprocess workers: a signal to the node's group reaches us once
    _no_parent_death_signal()
    own = {k: v for k, v in os.environ.items() if _BASE_ENV.get(k) != v}
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
    _unbuffered_stdio()
    os.chdir(cwd)
    _thread_counts()
    _fresh_random_state()
    _return_before_exit_0()
    code = 0
    try:
        if module:
            import runpy

            sys.argv = [target, *args]  # runpy puts the module's file in argv[0]
            sys.path[0:1] = [cwd]
            _fresh_main(None)
            runpy._run_module_as_main(target, alter_argv=True)  # type: ignore[attr-defined]
        else:
            sys.argv = [target, *args]
            path = os.path.abspath(target)
            sys.path[0:1] = [os.path.dirname(os.path.realpath(path))]
            main = _fresh_main(path)
            with io.open_code(path) as f:
                source = f.read()
            exec(compile(source, path, "exec"), main.__dict__)  # the user's script, as python runs it
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        code = -signal.SIGINT
        traceback.print_exc()
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, exit 1
        code = 1
        with contextlib.suppress(Exception):
            sys.excepthook(*sys.exc_info())
    _finish()
    if code == 0:
        _RETURN_PUT[0] = True  # torchrun's wrapper puts it; os._exit(0) later must not again
        return  # torchrun collects a return value from every worker before they exit
    if code < 0:  # an unhandled KeyboardInterrupt: the interpreter ends by SIGINT itself
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)
