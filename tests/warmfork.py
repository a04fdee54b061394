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
saves; a bit-exact comparison is between forks of one server (alike) or fresh processes, not a
fork against a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

# What every warm server runs first: the imports its forks share, and ``run_script`` (a fork's
# whole life: the script run as ``python ARGV``, then the interpreter's exit, never returning).
_PRELUDE = textwrap.dedent(
    """
    import atexit, faulthandler, json, os, runpy, signal, sys, threading
    # The imports every round shares: torch and spotrun, and what a first optimizer step and
    # save import lazily (torch._dynamo and sympy: 900 modules, 3 of a round's 4 s under load).
    # Import only: no tensor op runs here, so no thread pool exists to be forked.
    import torch, torch._dynamo, torch.optim, numpy.random, fsspec.implementations.local
    import spotrun, spotrun.checkpoint, spotrun.format, spotrun.storage
    def note(text):
        # One write of the whole line: under PYTHONUNBUFFERED a print() is two (text, then
        # newline), and a child printing at that moment lands in between ("step 1warmfork: pid
        # 42"): the note was missed and the test read on forever. A child's own line can still
        # be cut by a note; WarmPython.readline finds the note wherever it lands.
        os.write(1, f"warmfork: {text}\\n".encode())
    # What the script left (its namespace, an exception and its frames) is kept until the
    # fork's os._exit, as the interpreter keeps it until its finalization, where a thread that
    # wants the GIL back is stopped instead. Freed here, DDP's reducer destroyed the gloo group
    # holding the GIL while gloo's run loop waited for the GIL to free a tensor: a rank refused
    # by AllCheckpointsDamagedError hung so (test_restore_safety, once in a few runs).
    KEPT = []
    def run_script(argv, env):
        code, interrupted = 1, False
        try:
            # SIGUSR2 dumps every thread's stack into its output: what a child past its
            # deadline was stuck in, shown before it is killed (nothing here sends it else).
            faulthandler.register(signal.SIGUSR2, all_threads=True)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if argv[0] == "-m":  # python -m MODULE ARGS: the module's path first, the folder on the path
                sys.argv = ["-m", *argv[2:]]
                sys.path[0] = os.getcwd()
                # Not imported before it runs, as in a fresh interpreter (runpy warns otherwise).
                sys.modules.pop(argv[1], None)
                KEPT.append(runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
            else:
                sys.argv = list(argv)
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
                KEPT.append(runpy.run_path(argv[0], run_name="__main__"))
            code = 0
        except SystemExit as exc:
            KEPT.append(exc)
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt as exc:
            KEPT.append(exc)
            sys.excepthook(*sys.exc_info())
            interrupted = True
        except BaseException as exc:
            KEPT.append(exc)
            # Through sys.excepthook, as the interpreter reports it: torch.distributed's hook
            # prefixes every line with the rank ("[rank1]: ...").
            sys.excepthook(*sys.exc_info())
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
    """
)

_SERVER = _PRELUDE + textwrap.dedent(
    """
    note("ready")
    for request in sys.stdin:
        argv, env = json.loads(request)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            run_script(argv, env)
        note(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        note(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
    """
)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie the server has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


#: The bound of a wait given no timeout (``communicate()``, ``wait()``): a test that forgot
#: one fails after this long instead of holding its worker, and the whole suite, forever.
NO_TIMEOUT_S = 600.0


class _Deadline(Exception):
    """No full line from the server before the deadline (internal to this module)."""


class WarmTimeout(subprocess.TimeoutExpired):
    """A warm child did not exit in time; it was killed, and the message shows what it printed."""

    def __str__(self) -> str:
        out = self.output if isinstance(self.output, str) else ""
        return f"{super().__str__()}; it was killed. Its output (tail):\n{out[-4000:]}"


def _deadline(timeout: float | None) -> float:
    return time.monotonic() + (NO_TIMEOUT_S if timeout is None else timeout)


class WarmChild:
    """One forked run of a script, read and signalled as a ``subprocess.Popen`` is (the
    subset the tests use: ``pid``, ``stdout``, ``send_signal``, ``kill``, ``wait``, ``poll``,
    ``communicate``, ``returncode``).

    Every wait has a deadline that holds even while the child prints nothing (the server's
    pipe is polled, not read line by line); ``communicate`` kills a child still running at its
    deadline and raises :class:`WarmTimeout` with what it printed. (A ``readline`` of a
    silent child once blocked a whole suite for 14 minutes.)"""

    def __init__(self, server: WarmPython, pid: int) -> None:
        self._server, self.pid = server, pid
        self.stdout = _ChildLines(self)
        self.returncode: int | None = None
        self.pending: list[str] = []  # its output lines read from the pipe, not yet returned
        self.printed: list[str] = []  # all it printed (for a timeout's report)

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
        """The rest of its output once it exited (stderr is in it, as ``spawn`` merges it).
        Still running at ``timeout`` (None: :data:`NO_TIMEOUT_S`): killed, and
        :class:`WarmTimeout` names what it printed."""
        deadline = _deadline(timeout)
        lines = []
        try:
            while True:
                line = self.stdout.readline(deadline=deadline)
                if not line:
                    break
                lines.append(line)
        except _Deadline:
            self._kill_and_reap()
            raise WarmTimeout(f"warm child {self.pid} ({self.args})", timeout or NO_TIMEOUT_S,
                              output="".join(self.printed)) from None
        return "".join(lines), None

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, as ``Popen.wait``; ``subprocess.TimeoutExpired`` at ``timeout``
        (None: :data:`NO_TIMEOUT_S`), the child left running (as a Popen's)."""
        deadline = _deadline(timeout)
        while self.returncode is None:
            try:
                if not self._server.readline(deadline):
                    raise AssertionError(f"the warm interpreter exited before child {self.pid}")
            except _Deadline:
                raise subprocess.TimeoutExpired(f"warm child {self.pid} ({self.args})",
                                                timeout or NO_TIMEOUT_S, output="".join(self.printed)) from None
        return self.returncode

    @property
    def args(self) -> str:
        return " ".join(self._server.argv_of(self))

    def _kill_and_reap(self) -> None:
        """Kill it past its deadline; first its threads' stacks (SIGUSR2) into its output."""
        if self.returncode is None:
            self.send_signal(signal.SIGUSR2)
            end = time.monotonic() + 2.0
            with contextlib.suppress(_Deadline):
                while self.returncode is None and self._server.readline(end):
                    pass
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
            self.wait(timeout=30)


class _ChildLines:
    """The child's output lines; ends (``""``) once the server says the child exited."""

    def __init__(self, child: WarmChild) -> None:
        self._child = child

    def readline(self, deadline: float | None = None) -> str:
        """Its next line, or ``""`` once it exited. With ``deadline`` (``time.monotonic()``),
        raises ``_Deadline`` if no line came by then; without, waits at most
        :data:`NO_TIMEOUT_S`, then kills the child and raises :class:`WarmTimeout`."""
        child = self._child
        bounded = deadline is not None
        deadline = _deadline(None) if deadline is None else deadline
        while not child.pending and child.returncode is None:
            try:
                if not child._server.readline(deadline):
                    return ""
            except _Deadline:
                if bounded:
                    raise
                child._kill_and_reap()
                raise WarmTimeout(f"warm child {child.pid} ({child.args})", NO_TIMEOUT_S,
                                  output="".join(child.printed)) from None
        return child.pending.pop(0) if child.pending else ""

    def readline_by(self, deadline: float) -> str | None:
        """Its next line, ``""`` once it exited, None if nothing came by ``deadline`` (then
        the child is killed: a test that stops waiting for it leaves nothing running)."""
        try:
            return self.readline(deadline=deadline)
        except _Deadline:
            self._child._kill_and_reap()
            return None


#: The server's notes: one write each, so whole, but possibly right after a child's unended line.
_NOTE = re.compile(r"warmfork: (?P<what>ready|pid|exit)(?: (?P<pid>\d+))?(?: (?P<code>-?\d+))?\n\Z")

#: Environment variables read at interpreter or torch start (a fork cannot change them).
_AT_START = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCH_", "PYTORCH_", "CUDA", "LD_", "MALLOC")


def _at_start(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_AT_START)}


class WarmPython:
    """A server interpreter started with ``env`` that forks ``python ARGS`` look-alikes.
    One child at a time; close it (a context manager) when the test ends."""

    def __init__(self, env: dict[str, str], start_timeout: float = 600.0) -> None:
        self._env = dict(env)
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        assert self._proc.stdout is not None
        self._fd = self._proc.stdout.fileno()
        self._buf = b""
        self._eof = False
        self._child: WarmChild | None = None
        self._early: list[str] = []  # a new child's lines before the note of its pid
        self._partial = ""  # a child's line cut by a note: its start
        self._argv: dict[int, list[str]] = {}
        self._lines: list[str] = []
        deadline = time.monotonic() + start_timeout
        try:
            while True:
                line = self.readline(deadline)
                if not line:
                    raise AssertionError(f"the warm interpreter did not start:\n{self.tail()}")
                if line == "warmfork: ready\n":
                    break
        except _Deadline:
            self.close()
            raise AssertionError(f"the warm interpreter did not start in {start_timeout:.0f}s:\n"
                                 f"{self.tail()}") from None

    def tail(self) -> str:
        return "".join(self._lines)[-4000:]

    def argv_of(self, child: WarmChild) -> list[str]:
        return self._argv.get(child.pid, [])

    def _read_line(self, deadline: float) -> str:
        """The next raw line of the pipe, ``""`` at its end; ``_Deadline`` if none came by
        ``deadline``. The pipe is polled, so a silent writer cannot hold this past it."""
        while True:
            cut = self._buf.find(b"\n")
            if cut >= 0:
                raw, self._buf = self._buf[:cut + 1], self._buf[cut + 1:]
                return raw.decode("utf-8", "replace")
            if self._eof:
                raw, self._buf = self._buf, b""
                return raw.decode("utf-8", "replace")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Deadline
            ready, _, _ = select.select([self._fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._fd, 65536)
                if chunk:
                    self._buf += chunk
                else:
                    self._eof = True

    def readline(self, deadline: float | None = None) -> str:
        """The next output line (the child's or a note; ``""`` at the end of the pipe) by
        ``deadline`` (``time.monotonic()``; None: :data:`NO_TIMEOUT_S` from now), else
        ``_Deadline``. A child's line is kept for its ``stdout`` whoever reads it; a child's
        exit note sets its ``returncode``. A note that cut into a child's line is told apart
        (the child's part goes on after it), so no note is missed."""
        line = self._read_line(_deadline(None) if deadline is None else deadline)
        self._lines = [*self._lines[-200:], line]
        found = _NOTE.search(line)
        if found is None:
            line, self._partial = self._partial + line, ""
            if line:
                self._deliver(line)
            return line
        cut, line = line[:found.start()], line[found.start():]
        if found["what"] == "exit":
            # The dead child's unterminated last line (killed mid-print), as a Popen gives it.
            if self._partial + cut:
                self._deliver(self._partial + cut)
            self._partial = ""
            child = self._child
            if child is not None and int(found["pid"]) == child.pid:
                child.returncode = int(found["code"])
        else:
            self._partial += cut  # the new child's line, cut by its pid note, goes on after it
        return line

    def _deliver(self, line: str) -> None:
        child = self._child
        if child is None:
            self._early.append(line)  # a child printed before the note of its pid came
        elif child.returncode is None:
            child.pending.append(line)
            child.printed = [*child.printed[-2000:], line]

    def spawn(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> WarmChild:
        """Fork a child running ``python ARGS`` (``ARGS[0]``: the script) with ``env`` (None:
        the server's). A previous child still running is killed first."""
        if env is not None and _at_start(env) != _at_start(self._env):
            differ = sorted(set(_at_start(env).items()) ^ set(_at_start(self._env).items()))
            raise AssertionError(f"a fork cannot take these (read at start): {differ}; start a process")
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
            self._child.wait(timeout=60)
        self._child, self._early, self._partial = None, [], ""
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps([args, env]) + "\n").encode())
        self._proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.readline(deadline)
            except _Deadline:
                raise AssertionError(f"the warm interpreter forked no child in {timeout:.0f}s:\n"
                                     f"{self.tail()}") from None
            if not line:
                raise AssertionError(f"the warm interpreter exited:\n{self.tail()}")
            found = _NOTE.match(line)
            if found and found["what"] == "pid":
                child = WarmChild(self, int(found["pid"]))
                child.pending, child.printed = self._early, list(self._early)
                self._argv = {child.pid: list(args)}
                self._child, self._early = child, []
                return child

    def close(self) -> None:
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.communicate(timeout=30)

    def __enter__(self) -> WarmPython:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A warm server for a command another program starts (``spotrun check-resume`` runs its
# command once per attempt and signals it; torchrun starts one per rank): it serves ``python
# warmfork.py SOCKET SCRIPT ARGS``, a client of a few stdlib imports that has the server fork
# ``python SCRIPT ARGS`` with the client's environment, working folder and standard streams
# (passed over the socket), forwards the signals it gets to that fork and exits as the fork did
# (a signal's death by the same signal). A client killed outright (SIGKILL, which no handler
# sees) takes its fork with it. Clients are served side by side (one select loop, no thread:
# every fork is of a one-threaded process), as a torchrun's ranks must run together.
_EXEC_SERVER = _PRELUDE + textwrap.dedent(
    """
    import random, select, socket
    import numpy
    AT_START = tuple(json.loads(sys.argv[2]))
    STARTED = dict(os.environ)
    exec(sys.argv[3])  # the imports this server's forks share beyond the prelude's
    # What those imports wrote to the environment (Lightning sets a PYTORCH_ variable): a
    # fresh process importing them writes it over what it was given, so a fork gets it too,
    # and a client is compared with the environment the server started with.
    SET_BY_IMPORTS = {k: v for k, v in os.environ.items() if STARTED.get(k) != v}
    def at_start(env):
        found = {k: v for k, v in env.items() if k.startswith(AT_START)}
        # A path given twice is the path once (a test's env_for on an env_for'd environment).
        if "PYTHONPATH" in found:
            found["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(found["PYTHONPATH"].split(os.pathsep)))
        return found
    def send(conn, **msg):
        try:
            conn.sendall((json.dumps(msg) + "\\n").encode())
        except OSError:
            pass  # the client is gone; its fork is dealt with where its socket is read
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    listener.listen(64)
    note("ready")
    forks = {}  # pidfd -> (pid, the client's socket)
    def serve(conn):
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\\n"):
            more = conn.recv(1 << 20)
            if not more:
                break
            data += more
        request = json.loads(data)
        if at_start(request["env"]) != at_start(STARTED):
            differ = sorted(set(at_start(request["env"]).items()) ^ set(at_start(STARTED).items()))
            send(conn, error=f"a fork cannot take these (read at start): {differ}; start a process")
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            # Nothing of the server's or of the other clients' stays open in a fork.
            listener.close()
            for pidfd, (_, other) in forks.items():
                os.close(pidfd)
                other.close()
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            # A fresh interpreter seeds Python's and NumPy's global RNGs from the OS, each
            # its own: so does each fork (else every fork would draw what the others do,
            # and an unseeded script would resume "exactly" here and nowhere else).
            random.seed()
            numpy.random.seed()
            run_script(request["argv"], {**request["env"], **SET_BY_IMPORTS})
        for fd in fds:
            os.close(fd)
        send(conn, pid=pid)
        forks[os.pidfd_open(pid)] = (pid, conn)
    def reap(pidfd, client_gone):
        pid, conn = forks.pop(pidfd)
        if client_gone:  # killed: its fork goes too
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not client_gone:
            send(conn, exit=os.waitstatus_to_exitcode(status))
        os.close(pidfd)
        conn.close()
    while True:
        clients = {conn.fileno(): pidfd for pidfd, (_, conn) in forks.items()}
        ready, _, _ = select.select([listener, *forks, *clients], [], [])
        for fd in ready:
            if fd is listener:
                conn, _ = listener.accept()
                serve(conn)
            elif fd in forks:  # its fork exited (a pidfd and a socket never share a number)
                reap(fd, client_gone=False)
            elif fd in clients and clients[fd] in forks:
                pidfd = clients[fd]
                if not forks[pidfd][1].recv(1):
                    reap(pidfd, client_gone=True)
    """
)

#: What the client forwards to its fork (what ``check-resume`` and the launchers send).
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class WarmExec:
    """A server that imported torch and spotrun, listening on a socket for :meth:`command`'s
    clients: ``python warmfork.py SOCKET SCRIPT ARGS`` behaves as ``python SCRIPT ARGS`` (its
    own environment, folder, streams, signals and exit), in a fork that skips the imports.
    Clients are served side by side. Started with ``env``; a client whose environment
    differs from it in what is read at start (``PYTHON*``, ``OMP_*``...) is refused.
    ``imports``: Python the server runs once before its first fork (modules every fork shares
    beyond torch and spotrun)."""

    def __init__(self, env: dict[str, str], folder: str, start_timeout: float = 600.0,
                 imports: str = "") -> None:
        self.socket = os.path.join(folder, "warm.sock")
        #: What a client's environment must hold as it is here (read when the server started).
        self.at_start = _at_start(env)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_SERVER, self.socket, json.dumps(_AT_START), imports], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], start_timeout)
        line = self._proc.stdout.readline() if ready else b""
        if line != b"warmfork: ready\n":
            self.close()
            raise AssertionError(f"the warm exec server did not start in {start_timeout:.0f}s: {line!r}")
        # Drained from here on, so that nothing it prints can fill the pipe and stop it.
        self._drain = _Drain(self._proc.stdout)

    def command(self, script: str, *args: str) -> list[str]:
        """The command line that runs ``python SCRIPT ARGS`` as a warm fork."""
        return [sys.executable, *self.args(script, *args)]

    def args(self, script: str, *args: str) -> list[str]:
        """:meth:`command` less the interpreter (for helpers that put ``python`` first)."""
        return [os.path.abspath(__file__), self.socket, script, *args]

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=30)

    def __enter__(self) -> WarmExec:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Drain:
    """Reads a pipe to its end in a daemon thread (what the server itself prints: nothing,
    unless it fails; kept for a failure's message)."""

    def __init__(self, pipe) -> None:
        import threading

        self.text = b""
        self._pipe = pipe
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for line in self._pipe:
            self.text = (self.text + line)[-4000:]


def _client(sock_path: str, argv: list[str]) -> int:
    """``python warmfork.py SOCKET SCRIPT ARGS``: run ``SCRIPT ARGS`` as a fork of the server
    at SOCKET and end as it ended (see :class:`WarmExec`)."""
    import socket

    pid: int | None = None
    pending: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if pid is None:
            pending.append(sig)  # before the fork exists: sent as soon as it does
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}) + "\n"
    socket.send_fds(conn, [request.encode()], [0, 1, 2])
    replies = conn.makefile("r")
    for line in replies:
        reply = json.loads(line)
        if "error" in reply:
            print(f"warmfork: {reply['error']}", file=sys.stderr)
            return 2
        if "pid" in reply:
            pid = reply["pid"]
            for sig in pending:
                os.kill(pid, sig)
        if "exit" in reply:
            code = int(reply["exit"])
            # The fork has ended: a signal from here on is for no one (a supervisor's SIGTERMs
            # while a stopped process tears down), and must not turn its exit into a death.
            for sig in _FORWARDED:
                signal.signal(sig, signal.SIG_IGN)
            if code < 0:  # killed by a signal: so is this process, as a Popen would see it
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            return code
    print("warmfork: the warm exec server closed before its fork exited", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(_client(sys.argv[1], sys.argv[2:]))
