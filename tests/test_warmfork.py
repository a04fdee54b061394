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
