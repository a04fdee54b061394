"""/proc/PID/stat read once for every caller: the command name may hold spaces and ')'."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spotrun.procfs import stat_fields


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_fields_after_a_command_name_with_spaces_and_parentheses():
    proc = subprocess.Popen([sys.executable, "-c",
                             "open('/proc/self/comm', 'w').write('a) b (c'); print('ok', flush=True); "
                             "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        fields = stat_fields(proc.pid)
        assert fields is not None and fields[0] in "RSD" and int(fields[1]) == os.getpid()
        assert int(fields[19]) > 0  # the start time, in clock ticks since boot
    finally:
        proc.kill()
        proc.wait()


def test_no_such_process_is_none():
    assert stat_fields(2**22 + 12345) is None  # above pid_max's usual ceiling
