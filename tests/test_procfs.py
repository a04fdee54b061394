"""/proc/PID/stat read once for every caller: the command name may hold spaces and ')'."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from spotrun.procfs import pid_gone, pid_started, stat_fields


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


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_pid_gone_one_rule_for_live_zombie_reused_and_missing():
    """The lease, the ledger's dead-writer check and both launchers' controller checks ask
    this one function: a zombie (exited, not reaped) is gone, a live process is not, a
    start time that differs means the pid was reused, a pid nobody has is gone."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        started = pid_started(live.pid)
        assert started is not None
        assert not pid_gone(live.pid)
        assert not pid_gone(live.pid, started)
        assert pid_gone(live.pid, started + 1)  # another process's start time: reused
        for _ in range(200):  # exited, not reaped: /proc says Z until wait()
            fields = stat_fields(dead.pid)
            if fields is not None and fields[0] == "Z":
                break
            time.sleep(0.02)
        assert stat_fields(dead.pid)[0] == "Z"
        assert pid_gone(dead.pid)
    finally:
        live.kill()
        live.wait()
        dead.wait()
    assert pid_gone(dead.pid)  # reaped: no such process
    assert pid_gone(2**22 + 12345)
