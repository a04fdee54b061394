"""Forks of one interpreter that imported torch and spotrun: for the kill -9 loops.

The crash tests start a training script, let it reach its saves and SIGKILL it, several times
over one run URL. A fresh ``python script`` per round spends most of the round importing torch
(3 s of CPU here, far more on a loaded 2-core box); the kill itself needs a fraction of a
second. :class:`WarmPython` imports once and forks a child per round that runs the script as
``python script args`` would (``__main__``, ``sys.argv``, ``sys.path[0]``, stdin from
/dev/null, the parent's environment, the exit: threads joined, ``atexit`` run, the script's exit
code); the child is a real process, SIGKILLed for real, mid-save.
Its output and the server's notes share one pipe, so a child is read as a ``Popen`` would be.

What a fork cannot take from its own environment is what is read when an interpreter or torch
starts: ``PYTHON*`` (the path, the hash seed: every fork shares the server's), ``OMP_*``,
``MKL_*``, ``TORCH_*``, ``CUDA*``... :meth:`WarmPython.spawn` refuses an environment that
differs from the server's there. So it is for tests of what a process does with signals and
saves, not for bit-exact comparisons between processes (those start fresh ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

_SERVER = textwrap.dedent(
    """
    import atexit, json, os, runpy, signal, sys, threading, traceback
    # The imports every round shares: torch and spotrun, and what a first optimizer step and
    # save import lazily (torch._dynamo and sympy: 900 modules, 3 of a round's 4 s under load).
    # Import only: no tensor op runs here, so no thread pool exists to be forked.
    import torch, torch._dynamo, torch.optim, numpy.random, fsspec.implementations.local
    import spotrun, spotrun.checkpoint, spotrun.format, spotrun.storage
    print("warmfork: ready", flush=True)
    for request in sys.stdin:
        argv, env = json.loads(request)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code, interrupted = 1, False
            try:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                sys.argv = list(argv)
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
                runpy.run_path(argv[0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except KeyboardInterrupt:
                traceback.print_exc()
                interrupted = True
            except BaseException:
                traceback.print_exc()
            finally:
                # As the interpreter's own exit: non-daemon threads joined, atexit run; an
                # uncaught KeyboardInterrupt ends the process by SIGINT (exit -2), as python's.
                try:
                    threading._shutdown()
                    atexit._run_exitfuncs()
                finally:
                    sys.stdout.flush(); sys.stderr.flush()
                    if interrupted:
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        os.kill(os.getpid(), signal.SIGINT)
                    os._exit(code)
        print(f"warmfork: pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"warmfork: exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
    """
)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie the server has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class WarmChild:
    """One forked run of a script, read and signalled as a ``subprocess.Popen`` is (the
    subset the tests use: ``pid``, ``stdout``, ``send_signal``, ``kill``, ``wait``, ``poll``,
    ``communicate``, ``returncode``)."""

    def __init__(self, server: WarmPython, pid: int) -> None:
        self._server, self.pid = server, pid
        self.stdout = _ChildLines(self)
        self.returncode: int | None = None
        self.early: list[str] = []  # its lines read before the server's note of its pid

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            # Exited and reaped by the server already: a no-op, as for a Popen.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid):
            self.wait(timeout=30)  # its exit note is on its way
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """The rest of its output once it exited (stderr is in it, as ``spawn`` merges it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lines = []
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"warm child {self.pid}", timeout or 0)
            line = self.stdout.readline()
            if not line:
                break
            lines.append(line)
        self.wait()
        return "".join(lines), None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"warm child {self.pid}", timeout or 0)
            if not self._server.readline():
                raise AssertionError("the warm interpreter exited")
        return self.returncode


class _ChildLines:
    """The child's output lines; ends (``""``) once the server says the child exited."""

    def __init__(self, child: WarmChild) -> None:
        self._child = child

    def readline(self) -> str:
        if self._child.early:
            return self._child.early.pop(0)
        while self._child.returncode is None:
            line = self._child._server.readline()
            if line and not line.startswith("warmfork: "):
                return line
            if not line:
                return ""
        return ""


#: Environment variables read at interpreter or torch start (a fork cannot change them).
_AT_START = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCH_", "PYTORCH_", "CUDA", "LD_", "MALLOC")


def _at_start(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_AT_START)}


class WarmPython:
    """A server interpreter started with ``env`` that forks ``python ARGS`` look-alikes.
    One child at a time; close it (a context manager) when the test ends."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = dict(env)
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        self._child: WarmChild | None = None
        self._lines: list[str] = []
        while True:
            line = self.readline()
            if not line:
                raise AssertionError(f"the warm interpreter did not start:\n{''.join(self._lines)[-4000:]}")
            if line == "warmfork: ready\n":
                break

    def readline(self) -> str:
        """The next output line (the child's or a note); records a child's exit note."""
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        self._lines = [*self._lines[-200:], line]
        found = re.match(r"warmfork: exit (\d+) (-?\d+)$", line)
        if found and self._child is not None and int(found.group(1)) == self._child.pid:
            self._child.returncode = int(found.group(2))
        return line

    def spawn(self, args: list[str], env: dict[str, str] | None = None) -> WarmChild:
        """Fork a child running ``python ARGS`` (``ARGS[0]``: the script) with ``env`` (None:
        the server's). A previous child still running is killed first."""
        if env is not None and _at_start(env) != _at_start(self._env):
            differ = sorted(set(_at_start(env).items()) ^ set(_at_start(self._env).items()))
            raise AssertionError(f"a fork cannot take these (read at start): {differ}; start a process")
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
            self._child.wait(timeout=60)
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps([args, env]) + "\n")
        self._proc.stdin.flush()
        early: list[str] = []
        while True:
            line = self.readline()
            if not line:
                raise AssertionError(f"the warm interpreter exited:\n{''.join(self._lines)[-4000:]}")
            found = re.match(r"warmfork: pid (\d+)$", line)
            if found:
                self._child = WarmChild(self, int(found.group(1)))
                self._child.early = early
                return self._child
            if not line.startswith("warmfork: "):
                early.append(line)

    def close(self) -> None:
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.communicate(timeout=30)

    def __enter__(self) -> WarmPython:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
