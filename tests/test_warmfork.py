"""tests/warmfork.py's waits end at their deadlines, even for a child that prints nothing.

A whole-suite run once sat 14 minutes on one forked trainer: ``communicate(timeout=120)``
checked its deadline only between lines, and the child printed none. These children are
tiny scripts (no torch work), forked from the worker's warm interpreter.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from helpers import wait_for_line
from warmfork import WarmTimeout, _alive

SILENT = "import time\nprint('before the silence', flush=True)\ntime.sleep(600)\n"
CHATTY = "for i in range(200):\n    print(f'line {i}', flush=True)\n"


def _script(tmp_path, text: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(text)
    return str(path)


def test_communicate_kills_a_silent_child_at_its_deadline_and_shows_where_it_sat(tmp_path, warm_python):
    child = warm_python.spawn([_script(tmp_path, SILENT)])
    t0 = time.monotonic()
    with pytest.raises(WarmTimeout) as caught:
        child.communicate(timeout=2)
    assert time.monotonic() - t0 < 30  # the deadline, plus the stack dump's 2 s and the kill
    assert isinstance(caught.value, subprocess.TimeoutExpired)
    said = str(caught.value)
    assert "before the silence" in said  # what it printed
    assert "time.sleep(600)" in said or "child.py" in said, said  # its stack (faulthandler)
    assert child.returncode is not None and not _alive(child.pid)  # killed, reaped


def test_wait_and_wait_for_line_end_at_their_deadlines(tmp_path, warm_python):
    child = warm_python.spawn([_script(tmp_path, SILENT)])
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=1)
    assert time.monotonic() - t0 < 20 and child.poll() is None  # as a Popen's: left running
    with pytest.raises(AssertionError, match="no 'never printed' within 1"):
        wait_for_line(child, "never printed", timeout=1)
    assert time.monotonic() - t0 < 40
    assert not _alive(child.pid)  # given up on: killed, nothing left running


def test_lines_read_while_waiting_for_the_exit_are_kept(tmp_path, warm_python):
    child = warm_python.spawn([_script(tmp_path, CHATTY)])
    assert child.wait(timeout=60) == 0  # reads past its 200 lines to the exit note
    out, _ = child.communicate(timeout=10)
    assert out.splitlines() == [f"line {i}" for i in range(200)]


def test_a_note_landing_in_a_childs_unended_line_is_still_read(tmp_path, warm_python):
    # Unbuffered, a print is two writes (text, newline): a child killed between them, or
    # printing as the server notes its pid, shares a line with the note. Both were missed
    # (the note had to be a line of its own) and the test read on forever.
    child = warm_python.spawn([_script(tmp_path, "import os, sys, time\nsys.stdout.write('abc')\n"
                                                 "time.sleep(0.5)\nprint('def')\nsys.stdout.write('step 7')\n"
                                                 "os._exit(3)\n")])
    out, _ = child.communicate(timeout=60)
    assert (child.returncode, out) == (3, "abcdef\nstep 7")


# Two forks that each wait for the other's file: met only when the server runs them side by
# side (as torchrun's ranks must; one at a time, the first waits out its 60 s and exits 1).
PAIR = """
import os, sys, time
mine, theirs = sys.argv[1], sys.argv[2]
open(mine, "w").write(str(os.getpid()))
end = time.monotonic() + 60
while not os.path.exists(theirs):
    if time.monotonic() > end:
        sys.exit(1)
    time.sleep(0.02)
print("met", flush=True)
if len(sys.argv) > 3:
    time.sleep(600)  # killed by the test (through its client)
"""


def _client(warm_exec, script: str, *args: str) -> subprocess.Popen:
    from helpers import env_for

    env = {**env_for(""), **warm_exec.at_start}
    return subprocess.Popen(warm_exec.command(script, *args), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_warm_exec_serves_clients_side_by_side_and_a_killed_client_takes_its_fork(tmp_path, warm_exec):
    script = _script(tmp_path, PAIR)
    a, b = tmp_path / "a", tmp_path / "b"
    first = _client(warm_exec, script, str(a), str(b))
    second = _client(warm_exec, script, str(b), str(a), "stay")
    assert first.communicate(timeout=120) == ("met\n", None) and first.returncode == 0
    assert second.stdout.readline() == "met\n"
    fork = int(b.read_text())  # the fork's pid, not its client's
    assert fork != second.pid and _alive(fork)
    second.kill()  # SIGKILL: no handler forwards it; the server sees its client gone
    second.wait(timeout=30)
    end = time.monotonic() + 30
    while _alive(fork):
        assert time.monotonic() < end, "the fork outlived its killed client"
        time.sleep(0.05)
