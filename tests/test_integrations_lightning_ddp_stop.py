"""Lightning with DDP whose stop checkpoint misses the deadline: every rank leaves with 143.

Rank 0's bounded stop save (slowfile:// writes take a second each, SPOTRUN_STOP_TIMEOUT=3)
leaves at once with 143; rank 1 is then in Lightning's own save barrier, which nobody will
answer. It used to die there with a gloo traceback and exit 1 (a "failed" run to the
launcher); now it reads the closed group as this stop's outcome and leaves with 143 too.
"""

from __future__ import annotations

import os
import signal

import pytest
from helpers import REPO, env_for, finish_session, ledger_events, torchrun, wait_for_line

from spotrun.records.layout import EXIT_STOP_UNSAVED

pytest.importorskip("lightning")
SCRIPT = str(REPO / "tests" / "scripts" / "lightning_ddp_stop.py")


@pytest.mark.slow
def test_other_ranks_exit_143_when_rank_0_misses_the_stop_deadline(tmp_path, warm_ranks):
    url = f"slowfile://{tmp_path}/run"
    env = env_for(url, SPOTRUN_TEST_WRITE_DELAY="1", SPOTRUN_STOP_TIMEOUT="3", SPOTRUN_NOTICE_SOURCE="none",
                  OMP_NUM_THREADS="1")
    proc = torchrun(SCRIPT, 2, env=env, warm=warm_ranks)  # its ranks forks of a warm server
    wait_for_line(proc, "rank 1 step 3", timeout=180)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish_session(proc, 120)
    assert code == EXIT_STOP_UNSAVED, out[-3000:]
    assert "did not commit within" in out, out[-3000:]
    assert f"rank 1 exit code {EXIT_STOP_UNSAVED}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    ended = ledger_events(f"{tmp_path}/run", "segment_ended")
    assert [e["reason"] for e in ended] == ["interrupted"], ended
